"""Where the time goes: a device-time breakdown of one jitted call, from a JAX trace.

`profile_jax(fn, out_dir, name)` traces a few calls of an already-compiled function with
`jax.profiler` (perfetto JSON), then sums the device-side events by kernel name and by
kind (matmul, attention, convolution, copy/transpose, reduction, other fusions). The
summary goes into the benchmark's JSON/markdown; the raw trace stays under
`out_dir/profiles/` for Perfetto (ui.perfetto.dev) or TensorBoard.

On a GPU the events are the CUDA kernels on the device's streams (and, where the trace
has it, the XLA-op line, which names the HLO fusions); on a CPU, the XLA:CPU thunks.

(Not named `profile.py`: scripts in this folder run as `python benchmarks/x.py` put it
first on sys.path, where that name would shadow the standard library's `profile`, which
cProfile, and so torch, imports.)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List

from benchmarks.common import jax_sync, log

KINDS = (  # first match wins
    ("convolution", re.compile(r"conv(?!ert)|convolution|implicit_gemm|nhwc", re.I)),
    ("attention", re.compile(r"cudnn|flash|fmha|fprop.*attn|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|\bdot|wgmma|triton_gemm",
                          re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|pad", re.I)),
    ("reduction", re.compile(r"reduce|reduction|softmax|norm", re.I)),
    ("fusion/other", re.compile(r".*")),
)


def kind_of(name: str) -> str:
  for kind, pat in KINDS:
    if pat.search(name):
      return kind
  return "fusion/other"


def _short(name: str, n: int = 90) -> str:
  name = re.sub(r"<.*>", "<...>", name)
  return name if len(name) <= n else name[: n - 3] + "..."


def summarize_trace(path: str, calls: int, top: int = 15) -> Dict[str, Any]:
  """Per-call device time by line (thread), by kind and by name, from a perfetto trace."""
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {p for p, n in procs.items() if "/device:" in n}
  by_line: Dict[str, List[dict]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    pid = e.get("pid")
    if device_pids:
      if pid not in device_pids:
        continue
    elif threads.get((pid, e.get("tid")), "") == "python":
      continue
    line = f"{procs.get(pid, pid)} | {threads.get((pid, e.get('tid')), e.get('tid'))}"
    by_line[line].append(e)
  lines = {k: sum(e["dur"] for e in v) / 1e3 / calls for k, v in by_line.items()}

  def table(evs):
    tot = collections.defaultdict(float)
    cnt = collections.Counter()
    for e in evs:
      tot[e["name"]] += e["dur"] / 1e3 / calls
      cnt[e["name"]] += 1
    total = sum(tot.values()) or 1e-12
    kinds = collections.defaultdict(float)
    for name, ms in tot.items():
      kinds[kind_of(name)] += ms
    names = sorted(tot, key=tot.get, reverse=True)[:top]
    return {"total_ms": total,
            "by_kind": {k: {"ms": v, "share": v / total}
                        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": _short(n), "kind": kind_of(n), "ms": tot[n],
                     "share": tot[n] / total, "count_per_call": cnt[n] / calls}
                    for n in names]}

  out: Dict[str, Any] = {"lines_ms_per_call": lines}
  kernel_lines = [k for k in by_line if "stream" in k.lower()]
  op_lines = [k for k in by_line if "xla ops" in k.lower()]
  if kernel_lines:
    out["kernels"] = table([e for k in kernel_lines for e in by_line[k]])
  if op_lines:
    out["xla_ops"] = table([e for k in op_lines for e in by_line[k]])
  if not kernel_lines and not op_lines and by_line:  # CPU: the busiest worker line
    busiest = max(by_line, key=lambda k: lines[k])
    out["host_ops"] = table(by_line[busiest])
  return out


def profile_jax(fn: Callable[[], Any], out_dir: str, name: str, calls: int = 3
                ) -> Dict[str, Any]:
  """Traces `calls` calls of a warm `fn` and returns the device-time summary."""
  import jax
  tmp = tempfile.mkdtemp(prefix="samjax_prof_")
  try:
    jax_sync(fn())
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax_sync(fn())
    wall = (time.perf_counter() - t0) / calls
    found = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
      raise RuntimeError("jax.profiler wrote no perfetto trace")
    summary = summarize_trace(found[0], calls)
    summary["wall_ms_per_call_traced"] = wall * 1e3
    dest = os.path.join(out_dir, "profiles")
    os.makedirs(dest, exist_ok=True)
    shutil.copy(found[0], os.path.join(dest, f"{name}.perfetto.json.gz"))
    summary["trace_file"] = os.path.join("profiles", f"{name}.perfetto.json.gz")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  _log_summary(summary)
  return summary


def _log_summary(s: Dict[str, Any]):
  for key in ("kernels", "xla_ops", "host_ops"):
    t = s.get(key)
    if not t:
      continue
    kinds = ", ".join(f"{k} {v['ms']:.2f} ms ({v['share']:.0%})" for k, v in t["by_kind"].items())
    log(f"  profile [{key}] {t['total_ms']:.2f} ms/call: {kinds}")
    for r in t["top"][:10]:
      log(f"    {r['ms']:8.3f} ms {r['share']:6.1%} x{r['count_per_call']:<5g} [{r['kind']}] "
          f"{r['name']}")
