"""Writes the results: `results.json` (everything), `results.md` (tables), `ratios.png`.

Every speed ratio is oriented the same way: > 1 means samjax is faster
(throughputs samjax/official; for the AMG, official seconds / samjax seconds).
Written after every section, so a run cut short still leaves its numbers behind.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional


def _fmt(v: Optional[float], spec: str = ".3g") -> str:
  if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
    return "-"
  return format(v, spec)


def _get(d: Optional[Dict[str, Any]], *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _json_default(o):
  try:
    import numpy as np
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
  except ImportError:
    pass
  return str(o)


def write_json(results: Dict[str, Any], out_dir: str) -> str:
  path = os.path.join(out_dir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, default=_json_default)
  os.replace(tmp, path)  # never leave a half-written file if the run is killed mid-write
  return path


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def markdown(results: Dict[str, Any]) -> str:
  m = results.get("machine", {})
  lines = ["# samjax vs official PyTorch SAM: speed and numerics", ""]
  dev = m.get("torch_device_name") or m.get("jax_device")
  lines.append(f"- date: {m.get('date')}; device: {dev} (JAX backend `{m.get('jax_backend')}`)")
  lines.append(f"- CPU: {m.get('cpu_model')}, {m.get('cpu_cores_usable')} usable cores "
               f"(torch threads {m.get('torch_threads')}); RAM {m.get('mem_total_gib')} GiB; "
               f"1-min load average at start {_fmt(m.get('load_avg_1min'), '.2f')}")
  load, cores = m.get("load_avg_1min"), m.get("cpu_cores_usable")
  if m.get("jax_backend") == "cpu" and load is not None and cores and load > 0.5 * cores:
    lines.append("- **other processes were using these CPU cores**: CPU timings (PyTorch's "
                 "above all) are noisy; compare `min_s` in the JSON or rerun on an idle machine")
  lines.append(f"- jax {m.get('jax')}, flax {m.get('flax')}, torch {m.get('torch')}, "
               f"numpy {m.get('numpy')}; commit {m.get('git_commit')}")
  a = results.get("args", {})
  lines.append(f"- command: `{a.get('command')}`; seed {a.get('seed')}; weights: official "
               "model with every tensor randomized, converted in memory")
  lines.append("- speed ratio > 1 means samjax is faster; `max rel` = max |samjax - ref| / "
               "max |ref|; mask IoU thresholds logits at 0")
  lines.append("")

  fl = results.get("flops") or {}
  if fl:
    lines += ["## Image encoder FLOPs (analytic, per 1 image)", ""]
    rows = [[k, _fmt(v["total"] / 1e9, ".5g"), _fmt(v["total"] / 2e9, ".5g")] +
            [_fmt(v[p] / 1e9, ".4g") for p in ("qkv", "attn_qk", "attn_av", "rel_pos", "proj",
                                                "mlp", "patch_embed", "neck")]
            for k, v in fl.items()]
    lines += _table(["model", "GFLOP", "GMAC", "qkv", "attn QK", "attn AV", "rel-pos", "proj",
                     "MLP", "patch", "neck"], rows)
    lines.append("")

  pk = results.get("peak") or {}
  if pk:
    lines += ["## Dense matmul rate measured in this run (MFU denominator)", ""]
    rows = [[k, str(v.get("n")), _fmt(v.get("tflops"), ".1f")] for k, v in pk.items()
            if isinstance(v, dict)]
    lines += _table(["kernel", "n (n^3 matmul)", "TFLOP/s"], rows)
    lines.append("")

  enc = results.get("encoder") or []
  if enc:
    lines += ["## Image encoder (images/s, median of timed iterations)", ""]
    rows = []
    for r in enc:
      d = r["dtype"]
      n32 = _get(r, "numerics", "samjax_vs_official_fp32")
      nsame = _get(r, "numerics", f"samjax_vs_official_{d}")
      nofficial = _get(r, "numerics", f"official_{d}_vs_official_fp32")
      att = r.get("attention") or {}
      att_s = (f"{att.get('window')}/{att.get('global')}" if "window" in att
               else str(att.get("requested", "-")))
      rows.append([
          r["model"], str(r["batch"]), d, att_s,
          _fmt(_get(r, "samjax", "images_per_s")), _fmt(_get(r, "official", "images_per_s")),
          _fmt(r.get("ratio"), ".2f"),
          _fmt(_get(r, "samjax", "compile_s"), ".1f"),
          _fmt(_get(r, "samjax", "tflops"), ".3g") + " / " +
          _fmt(_get(r, "official", "tflops"), ".3g"),
          _fmt(_get(r, "samjax", "mfu_vs_bf16_peak"), ".1%") + " / " +
          _fmt(_get(r, "official", "mfu_vs_bf16_peak"), ".1%"),
          _fmt(_get(n32, "max_rel"), ".1e"), _fmt(_get(n32, "mask_iou"), ".4f"),
          _fmt(_get(nsame, "max_rel"), ".1e"), _fmt(_get(nsame, "mask_iou"), ".4f"),
          _fmt(_get(nofficial, "max_rel"), ".1e"), _fmt(_get(nofficial, "mask_iou"), ".4f"),
      ])
    lines += _table(["model", "batch", "dtype", "attention window/global", "samjax img/s",
                     "official img/s", "ratio", "samjax compile s", "TFLOP/s sj / off", "MFU sj / off",
                     "max rel vs off fp32", "mask IoU vs off fp32", "max rel vs off same dtype",
                     "mask IoU vs off same dtype", "off dtype vs off fp32 max rel",
                     "off dtype vs off fp32 IoU"], rows)
    lines += ["", "MFU is against the best bf16 dense matmul rate measured above (GPU only). "
              "Mask IoU: 16 point prompts on image 0 decoded by the official fp32 decoder "
              "from each embedding.", ""]
    profiled = [r for r in enc if r.get("profile")]
    if profiled:
      lines += ["### Where the samjax encoder's device time goes (traced calls)", ""]
      for r in profiled:
        att = r.get("attention") or {}
        p = r["profile"]
        t = p.get("kernels") or p.get("xla_ops") or p.get("host_ops") or {}
        if not t:
          continue
        lines.append(f"- {r['model']} b{r['batch']} {r['dtype']} attention "
                     f"{att.get('requested')}: {t['total_ms']:.2f} ms of device time per call "
                     f"(wall {p.get('wall_ms_per_call_traced', float('nan')):.2f} ms); "
                     + ", ".join(f"{k} {v['share']:.0%}" for k, v in t["by_kind"].items()))
        lines.append("")
        lines += _table(["ms/call", "share", "per call", "kind", "kernel"],
                        [[_fmt(x["ms"], ".3f"), f"{x['share']:.1%}",
                          _fmt(x["count_per_call"], ".3g"), x["kind"],
                          "`" + x["name"].replace("|", "/") + "`"] for x in t["top"]])
        lines.append("")

  pr = results.get("prompt") or []
  if pr:
    lines += ["## Prompt path (prompts/s; single-point prompts, 3 masks each, fixed "
              "embedding)", ""]
    rows = []
    for r in pr:
      d = r["dtype"]
      n32 = _get(r, "numerics", "samjax_vs_official_fp32")
      nsame = _get(r, "numerics", f"samjax_vs_official_{d}")
      rows.append([
          r["model"], r["variant"], str(r["prompts"]), d,
          _fmt(_get(r, "samjax", "prompts_per_s"), ".4g"),
          _fmt(_get(r, "samjax_model_decode", "prompts_per_s"), ".4g"),
          _fmt(_get(r, "official", "prompts_per_s"), ".4g"),
          _fmt(r.get("ratio"), ".2f"), _fmt(r.get("ratio_model_decode"), ".2f"),
          _fmt(_get(r, "samjax", "compile_s"), ".2f"),
          _fmt(_get(n32, "max_rel"), ".1e"), _fmt(_get(n32, "iou"), ".4f"),
          _fmt(_get(nsame, "max_rel"), ".1e"), _fmt(_get(nsame, "iou"), ".4f"),
      ])
    lines += _table(["model", "output", "prompts/call", "dtype", "samjax jit", "SamModel.decode",
                     "official", "ratio jit", "ratio decode", "samjax compile s",
                     "max rel vs off fp32", "mask IoU vs off fp32", "max rel vs off same dtype",
                     "mask IoU vs off same dtype"], rows)
    lines += ["", "`samjax jit`: `jax.jit(decode_masks)` on device-resident prompts; "
              "`SamModel.decode`: numpy prompts in (bucketing + host->device copy), as "
              "`Predictor` uses it. Official: `prompt_encoder` + `mask_decoder` "
              "(+ `postprocess_masks` for the upscaled rows).", ""]

  am = results.get("amg") or []
  if am:
    lines += ["## Automatic mask generator (seconds per image, warm median)", ""]
    rows = []
    for r in am:
      n = r.get("numerics") or {}
      grid = (r.get("kwargs") or {}).get("points_per_side")
      rows.append([
          r["model"], r["setting"], r.get("dtype", "float32"), f"{grid}x{grid}" if grid else "-",
          r.get("image", ""),
          _fmt(_get(r, "samjax", "seconds_per_image")),
          _fmt(_get(r, "official", "seconds_per_image")), _fmt(r.get("ratio"), ".2f"),
          _fmt(_get(r, "samjax", "cold_s")), _fmt(_get(r, "official", "cold_s")),
          _fmt(_get(r, "samjax", "masks"), "d"), _fmt(_get(r, "official", "masks"), "d"),
          _fmt(n.get("official_best_iou_mean"), ".4f"),
          _fmt(n.get("samjax_best_iou_mean"), ".4f"),
      ])
    lines += _table(["model", "setting", "dtype", "points", "image", "samjax s/img",
                     "official s/img",
                     "ratio", "samjax cold s", "official cold s", "samjax masks",
                     "official masks", "official->samjax best IoU", "samjax->official best IoU"],
                    rows)
    lines += ["", "dtype is samjax's compute dtype; the official generator always runs in fp32, "
              "its only working mode (under bf16 autocast its MaskData.to_numpy() fails).", ""]

  if results.get("skipped"):
    lines += ["## Skipped", ""]
    lines += [f"- {s['section']}: {s['what']} ({s['why']})" for s in results["skipped"]]
    lines.append("")
  if results.get("errors"):
    lines += ["## Errors (the run continued past each)", ""]
    lines += [f"- {e['section']} / {e['what']}: `{e['error'][:300]}`"
              for e in results["errors"]]
    lines.append("")
  for note in results.get("notes") or []:
    lines.append(f"- {note}")
  return "\n".join(lines) + "\n"


def write_markdown(results: Dict[str, Any], out_dir: str) -> str:
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write(markdown(results))
  return path


def ratio_rows(results: Dict[str, Any]):
  """(label, ratio, section) for every row that has a speed ratio."""
  out = []
  for r in results.get("encoder") or []:
    if r.get("ratio"):
      req = (r.get("attention") or {}).get("requested", "auto")
      tag = "" if req in (None, "auto") else f" {req}"
      out.append((f"encoder {r['model']} b{r['batch']} {r['dtype']}{tag}", r["ratio"],
                  "encoder"))
  for r in results.get("prompt") or []:
    if r.get("ratio"):
      v = "up" if r.get("upscaled") else "lowres"
      out.append((f"prompt {r['model']} n{r['prompts']} {r['dtype']} {v}", r["ratio"],
                  "prompt"))
  for r in results.get("amg") or []:
    if r.get("ratio"):
      out.append((f"AMG {r['model']} {r['setting']} {r.get('dtype', 'float32')}", r["ratio"],
                  "amg"))
  return out


def write_png(results: Dict[str, Any], out_dir: str) -> Optional[str]:
  rows = ratio_rows(results)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"encoder": "#4c72b0", "prompt": "#dd8452", "amg": "#55a868"}
  fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.6))
  y = list(range(len(rows)))[::-1]
  vals = [r[1] for r in rows]
  ax.barh(y, vals, color=[colors[r[2]] for r in rows])
  ax.set_yticks(y)
  ax.set_yticklabels([r[0] for r in rows], fontsize=8)
  ax.set_xscale("log")
  ax.axvline(1.0, color="k", lw=1)
  for yi, v in zip(y, vals):
    ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=7)
  lo, hi = min(vals + [1.0]), max(vals + [1.0])
  ax.set_xlim(lo / 1.5, hi * 2.0)
  dev = (results.get("machine") or {}).get("torch_device_name") or \
      (results.get("machine") or {}).get("jax_device")
  ax.set_title(f"samjax / official speed ratio (>1: samjax faster), {dev}", fontsize=9)
  ax.set_xlabel("speed ratio (log scale)")
  fig.tight_layout()
  path = os.path.join(out_dir, "ratios.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_all(results: Dict[str, Any], out_dir: str, png: bool = True) -> None:
  os.makedirs(out_dir, exist_ok=True)
  write_json(results, out_dir)
  write_markdown(results, out_dir)
  if png:
    try:
      write_png(results, out_dir)
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
      results.setdefault("notes", []).append(f"PNG not written: {type(e).__name__}: {e}")
      write_json(results, out_dir)
