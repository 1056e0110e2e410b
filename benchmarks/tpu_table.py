"""The README's TPU table: the image encoder on one chip of each TPU generation.

    python -m benchmarks.tpu_table                         # every row, resuming
    python -m benchmarks.tpu_table --rows v6e:vit_b,v6e:vit_h --search-compiles 2
    python -m benchmarks.tpu_table --render                # the markdown of what is there
    python -m benchmarks.tpu_table --bulk v5e:2x4          # the README's bulk command

Per row (model x generation) it compiles, with `samjax.plan`, the bulk job's encoder
for one chip (`v5e:1x1`, `v6e:1x1`, `v4:1x1x1`, `v5p:1x1x1`) at 1 and 8 images per
call, then looks for the largest batch that fits (90% of HBM) with `plan._search`,
starting from the line through those two sizes and stopping after `--search-compiles`
more compiles (the bracket is then reported as it is: "fits at 44, not at 45" or "at
least 32"). Memory is not linear in the batch (ViT-B on v5e: 1.02 GB at 1, 1.67 GB at 8,
but 60 is the most that fits), so a bracket from one extrapolation is not trusted.

Every compile is written to the JSON file (`--out`) as soon as it finishes and is
never redone, so the script can be stopped and restarted. A full-size compile takes
2-13 minutes on a 2-core host. ALL FIGURES ARE COMPILE-TIME FIGURES FROM XLA'S TPU
COMPILER, NOT TIMINGS: the roofline is an upper bound on images/s.

`--bulk TARGET` plans the whole bulk job of the README (`samjax automask --model vit_h
--points-per-side 32 --crop-n-layers 1`, 8 images per step) for a topology and writes
the report as text and JSON to `benchmarks/reports/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

#: One chip of each generation, in the order the rows are made.
SINGLE_CHIP = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v4": "v4:1x1x1", "v5p": "v5p:1x1x1"}
MODELS = ("vit_b", "vit_h", "vit_l")
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "tpu_table.json")
REPORTS = os.path.join(os.path.dirname(__file__), "reports")
#: Measured on one H200, bf16 (README, "GPU: NVIDIA H200": ViT-H from
#: reports/h200-2026-11-28-vit_h-variants.md, ViT-B from the first run, h200-2026-11-28-run1.md).
H200 = {
    "vit_h": "68.4 img/s (batch 8)",
    "vit_b": "195 img/s (batch 8), 146 (batch 1); older code",
    "vit_l": "not measured",
}
#: The README's bulk command (`samjax automask ... --model vit_h --points-per-side 32
#: --crop-n-layers 1`) as `samjax plan` flags.
#: The decoder programs are left out: the bulk job does not run them.
BULK_FLAGS = ["--model", "vit_h", "--points-per-side", "32", "--crop-n-layers", "1",
              "--batch-size", "8", "--programs", "encode,crop_stats,crop_masks"]


def _rows_arg(text: str) -> List[str]:
  rows = [r.strip() for r in text.split(",") if r.strip()]
  for r in rows:
    gen, _, model = r.partition(":")
    if gen not in SINGLE_CHIP or model not in MODELS:
      raise argparse.ArgumentTypeError(f"rows are GEN:MODEL with GEN in {list(SINGLE_CHIP)} "
                                       f"and MODEL in {list(MODELS)}, got {r!r}")
  return rows


def default_rows() -> List[str]:
  """v5e and v6e first (ViT-B, ViT-H, ViT-L), then v4 and v5p."""
  rows = []
  for gens in (("v5e", "v6e"), ("v4", "v5p")):
    for model in MODELS:
      rows += [f"{g}:{model}" for g in gens]
  return rows


def command(target: str, model: str, batch: str, extra: str = "") -> str:
  """The `samjax plan` command that compiles one cell."""
  per = "" if batch == "auto" else f" --crops-per-device {batch}"
  return (f"samjax plan --target {target} --model {model} --batch-size {batch}{per} "
          f"--programs encode{extra} --json")


# ----------------------------------------------------------------------------------
# The JSON file: {"rows": {"v5e:vit_b": {...}}}, written after every compile.
# ----------------------------------------------------------------------------------
def load(path: str) -> Dict[str, Any]:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return {"disclaimer": "", "rows": {}}


def save(data: Dict[str, Any], path: str) -> None:
  from samjax.plan import NOT_TIMINGS  # pylint: disable=import-outside-toplevel
  data["disclaimer"] = NOT_TIMINGS
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _plan_from_dict(d: Dict[str, Any]):
  """A ProgramPlan back from its `to_dict()` (the derived keys dropped)."""
  from samjax import plan as plan_lib  # pylint: disable=import-outside-toplevel
  names = {f.name for f in dataclasses.fields(plan_lib.ProgramPlan)}
  kw = {k: v for k, v in d.items() if k in names}
  if kw.get("search") is not None:
    kw["search"] = [tuple(x) for x in kw["search"]]
  return plan_lib.ProgramPlan(**kw)


def make_row(key: str, data: Dict[str, Any], path: str, search_compiles: int,
             say=print) -> Dict[str, Any]:
  """Compiles what row `key` still lacks; saves after each compile."""
  from samjax import plan as plan_lib  # pylint: disable=import-outside-toplevel
  gen, model = key.split(":")
  target = SINGLE_CHIP[gen]
  row = data["rows"].setdefault(key, {"target": target, "model": model, "compiles": {}})
  compiles: Dict[str, Any] = row["compiles"]  # per-device batch (str) -> ProgramPlan dict

  def measure(k: int):
    if str(k) in compiles:
      return _plan_from_dict(compiles[str(k)])
    say(f"{key}: compiling the encoder for {k} image(s) on {target} ...")
    report = plan_lib.plan(target, model=model, batch_size=k, programs=("encode",),
                           crops_per_device=k, decoder_prompts=())
    prog = report.program("encode")
    compiles[str(k)] = prog.to_dict()
    row.update(device_kind=report.device_kind, attention=report.attention,
               devices_per_chip=report.devices_per_chip, dtype=report.dtype)
    save(data, path)
    say(f"{key}: batch {k}: " + (f"{prog.total_bytes / 1e9:.2f} GB, fits={prog.fits}"
                                 if prog.compiled else prog.error) +
        f" ({prog.compile_s:.0f} s)")
    return prog

  p1, p8 = measure(1), measure(8)
  if search_compiles > 0 and not row.get("search_done"):
    done_before = set(compiles)
    known = [_plan_from_dict(d) for k, d in compiles.items() if k != "8"]
    _, log, tried = plan_lib._search(  # pylint: disable=protected-access
        measure, p8, known=known, max_compiles=search_compiles)
    lo = max((k for k, p in tried.items() if p.fits), default=None)
    hi = min((k for k, p in tried.items() if not p.fits and (lo is None or k > lo)),
             default=None)
    row.update(max_batch=lo, smallest_not_fitting=hi, search=log,
               search_closed=hi is not None and lo is not None and hi - lo == 1,
               search_compiles=len(set(compiles) - done_before))
    # A later run with more --search-compiles goes on from the sizes compiled so far.
    row["search_done"] = row["search_closed"] or hi == 1
    save(data, path)
  return row


# ----------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------
def _cell_hbm(p: Optional[Dict[str, Any]]) -> str:
  if p is None:
    return "not compiled"
  if p["error"]:
    need = p.get("needed_bytes")
    return f"does not fit ({need / 1e9:.1f} GB asked)" if need else "does not compile"
  return f"{p['total_bytes'] / 1e9:.2f} GB ({100 * p['hbm_fraction']:.0f}%)"


def _cell_max(row: Dict[str, Any]) -> str:
  lo, hi = row.get("max_batch"), row.get("smallest_not_fitting")
  compiles = row.get("compiles", {})
  if "search" not in row:
    p8 = compiles.get("8")
    return "not searched" + ("; 8 fits" if p8 and p8.get("fits") else "")
  if lo is None:
    return "none fits" if hi == 1 else "not found"
  size = compiles.get(str(lo), {}).get("total_bytes") or row.get("max_batch_bytes")
  at = f" ({size / 1e9:.1f} GB)" if size else ""
  if row.get("search_closed"):
    return f"{lo}{at}"
  if hi is not None:
    return f"{lo}-{hi - 1}: {lo} fits{at}, {hi} does not"
  return f">= {lo}{at}"


def render(data: Dict[str, Any], rows: Optional[List[str]] = None) -> str:
  """The markdown table (one line per model x generation, missing cells named)."""
  head = ("| model | chip | HBM, batch 1 | HBM, batch 8 | largest batch that fits (90% HBM) "
          "| GFLOP / image | roofline bound, img/s per chip (batch 8) | H200, measured | "
          "compile s (1 / 8) |")
  lines = [head, "|" + " --- |" * 9]
  for key in rows or default_rows():
    gen, model = key.split(":")
    row = data["rows"].get(key)
    if row is None:
      lines.append(f"| {model} | {gen} | not compiled | | | | | {H200[model]} | |")
      continue
    c = row.get("compiles", {})
    p1, p8 = c.get("1"), c.get("8")
    ref = p8 if p8 and not p8["error"] else (p1 if p1 and not p1["error"] else None)
    gflop = f"{ref['flops_per_item'] / 1e9:,.0f}" if ref else "-"
    if p8 and not p8["error"] and p8.get("roofline_s_per_item"):
      roof = (f"{row.get('devices_per_chip', 1) / p8['roofline_s_per_item']:.0f} "
              f"({p8['bound']}-bound)")
    else:
      roof = "-"
    comp = " / ".join(f"{p['compile_s']:.0f}" if p else "-" for p in (p1, p8))
    lines.append(f"| {model} | {gen} ({row['target']}) | {_cell_hbm(p1)} | {_cell_hbm(p8)} | "
                 f"{_cell_max(row)} | {gflop} | {roof} | {H200[model]} | {comp} |")
  notes = [f"* {key}: {data['rows'][key]['note']}" for key in rows or default_rows()
           if data["rows"].get(key, {}).get("note")]
  return "\n".join(lines + ([""] + notes if notes else []))


def commands(rows: Optional[List[str]] = None) -> str:
  out = []
  for key in rows or default_rows():
    gen, model = key.split(":")
    t = SINGLE_CHIP[gen]
    out.append(f"* {model} {gen}: `{command(t, model, '1')}`; "
               f"`{command(t, model, '8', ' --max-batch')}`")
  return "\n".join(out)


# ----------------------------------------------------------------------------------
# The bulk command for a topology.
# ----------------------------------------------------------------------------------
def bulk(target: str, say=print) -> str:
  """Plans the README's bulk job for `target`; writes reports/plan-<target>-vit_h.{txt,json}."""
  from samjax.cli.plan import add_arguments  # pylint: disable=import-outside-toplevel
  from samjax.cli.automask import options_from_args  # pylint: disable=import-outside-toplevel
  from samjax import plan as plan_lib  # pylint: disable=import-outside-toplevel
  args = add_arguments(argparse.ArgumentParser()).parse_args(
      ["--target", target, *BULK_FLAGS])
  t0 = time.time()
  report = plan_lib.plan(target, model=args.model, dtype=args.dtype, batch_size=args.batch_size,
                         options=options_from_args(args), attention=args.attention,
                         image_hw=args.image_size, margin=args.margin,
                         crops_per_device=args.crops_per_device, programs=args.programs,
                         progress=lambda line: say(f"{target}: {line}"))
  name = f"plan-{target.replace(':', '-')}-vit_h"
  os.makedirs(REPORTS, exist_ok=True)
  cmd = " ".join(["samjax plan --target", target, *BULK_FLAGS])
  text = (f"$ {cmd}\n(run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}, "
          f"{time.time() - t0:.0f} s on a shared 2-core host)\n\n{report.format()}\n")
  with open(os.path.join(REPORTS, name + ".txt"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(REPORTS, name + ".json"), "w", encoding="utf-8") as f:
    json.dump({"command": cmd, **report.to_dict()}, f, indent=1)
  say(text)
  return text


def bulk_markdown(target: str) -> Optional[str]:
  """A markdown table of a `--bulk` report (None if there is none yet)."""
  path = os.path.join(REPORTS, f"plan-{target.replace(':', '-')}-vit_h.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    r = json.load(f)
  lines = [f"`{r['command']}`: {r['num_devices']} x {r['device_kind']}, "
           f"{r['capacity_bytes'] / 1e9:.0f} GB HBM each; "
           + ("every program compiles and fits." if r["ok"] else
              "NOT OK: " + "; ".join(r["failures"])),
           "", "| program | shapes | HBM per chip | of HBM | compile s |",
           "| --- | --- | --- | --- | --- |"]
  for p in r["programs"]:
    hbm = (f"{p['total_bytes'] / 1e9:.2f} GB | {100 * p['hbm_fraction']:.0f}%"
           if not p["error"] else f"{p['error']} |")
    lines.append(f"| {p['name']}{'' if p['in_job'] else ' (not in the job)'} | "
                 f"{p['detail']} | {hbm} | {p['compile_s']:.0f} |")
  lines.append(f"| the job's estimated peak | largest program + one call's low-res logits | "
               f"{r['job_peak_bytes'] / 1e9:.2f} GB | "
               f"{100 * r['job_peak_bytes'] / r['capacity_bytes']:.0f}% | |")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.tpu_table",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=_rows_arg, default=None,
                 help="comma list of GEN:MODEL (default: all, v5e/v6e first)")
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON file (default: %(default)s)")
  p.add_argument("--search-compiles", type=int, default=3,
                 help="most compiles of the largest-batch search per row (default 3)")
  p.add_argument("--render", action="store_true", help="only print the markdown")
  p.add_argument("--bulk", default=None, metavar="TARGET",
                 help="plan the README's bulk command for this topology instead")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  say = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
  if args.bulk:
    bulk(args.bulk, say)
    return 0
  data = load(args.out)
  if not args.render:
    for key in args.rows or default_rows():
      make_row(key, data, args.out, args.search_compiles, say)
  print(render(data, args.rows))
  print()
  print(commands(args.rows))
  if args.render:
    for target in ("v5e:2x4", "v6e:2x2"):
      text = bulk_markdown(target)
      if text:
        print(f"\n{text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
