"""Compile `samjax.encode_image` for TPU chips from this (CPU) host; print what XLA says.

    python -m benchmarks.tpu_compile                       # ViT-B/H, batch 1/8, v5e/v6e
    python -m benchmarks.tpu_compile --models vit_h --batches 8 --chips v5e \
        --options fold_xla,fold_tpu --json /tmp/tpu.json

Needs libtpu (`pip install -e .[tpu]`), no TPU: `jax.experimental.topologies` describes
a chip and XLA's TPU compiler compiles for it here. Every number is a COMPILE-TIME
figure, not a timing: HBM the program needs (temporaries, arguments, outputs, from
`compiled.memory_analysis()`), FLOPs and bytes accessed (`compiled.cost_analysis()`;
for the Pallas flash kernel these are the kernel's own declared cost, padding
included), and a roofline bound max(FLOPs / peak bf16 rate, bytes / HBM bandwidth)
from the chip's datasheet figures (a lower bound on the run time, never a measurement).
A program that does not fit is reported with the temporaries the compiler asked for.

Options are the encoder's attention settings ("WINDOWED/GLOBAL" pairs allowed);
"fold_tpu" is the folded form with `samjax.modeling.attention_tpu.flash_attention_tpu`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

DEFAULT_OPTIONS = ("einsum", "xla", "fold_xla", "fold_tpu", "fold_xla/fold_tpu",
                   "fold_tpu/fold_xla")
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def _csv(s: str) -> List[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def chip_info(chip: str):
  """Pallas' datasheet record of `chip` (HBM bytes, bandwidth, bf16 FLOP/s)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1)


def tpu_device(chip: str):
  """One chip of a described topology (compiles for it; runs nothing).

  Described as `samjax plan` describes it (`samjax.plan.topology_devices`: one host,
  v4 chips as one megacore device each, as a TPU VM runs them), so the figures here
  and the plan's are of the same program.
  """
  from samjax.plan import topology_devices  # pylint: disable=import-outside-toplevel
  return topology_devices(TOPOLOGIES.get(chip, chip))[0]


def attention_kwarg() -> str:
  """Name of `encode_image`'s attention argument in this tree."""
  import samjax  # pylint: disable=import-outside-toplevel
  params = inspect.signature(samjax.encode_image).parameters
  return "attention" if "attention" in params else "attention_impl"


def compile_encoder(model: str, batch: int, chip: str, option: str,
                    dtype: str = "bfloat16") -> Dict[str, Any]:
  """Compiles encode_image for one chip; returns its compile-time figures."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import SingleDeviceSharding  # pylint: disable=import-outside-toplevel
  import samjax  # pylint: disable=import-outside-toplevel
  from samjax.modeling import Sam  # pylint: disable=import-outside-toplevel

  cfg = samjax.get_config(model)
  dt = jnp.dtype(dtype)
  sharding = SingleDeviceSharding(tpu_device(chip))
  s = cfg.image_size
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  params = jax.eval_shape(lambda x: Sam(cfg).init(jax.random.PRNGKey(0), x,
                                                  method=Sam.embed_image), images)["params"]
  on_chip = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  params, images = jax.tree.map(on_chip, params), on_chip(images)
  row: Dict[str, Any] = {"model": model, "batch": batch, "chip": chip, "option": option,
                         "dtype": dtype}
  kw = attention_kwarg()
  t0 = time.perf_counter()
  try:
    fn = jax.jit(lambda p, x: samjax.encode_image(p, x, cfg, dt, **{kw: option}))
    compiled = fn.lower(params, images).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    row["compile_s"] = time.perf_counter() - t0
    need = re.search(r"HLO temporaries \(([\d.]+)G\)", text)
    if "RESOURCE_EXHAUSTED" in text and need:
      row["error"] = "does not fit"
      row["temp_gb"] = float(need.group(1)) * 2 ** 30 / 1e9  # XLA prints GiB as "G"
    else:
      row["error"] = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    return row
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = chip_info(chip)
  row.update(temp_gb=mem.temp_size_in_bytes / 1e9, arg_gb=mem.argument_size_in_bytes / 1e9,
             out_gb=mem.output_size_in_bytes / 1e9, tflop=cost.get("flops", 0.0) / 1e12,
             accessed_gb=cost.get("bytes accessed", 0.0) / 1e9)
  total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  row["fits"] = total <= info.hbm_capacity_bytes
  row["roofline_ms"] = 1e3 * max(cost.get("flops", 0.0) / info.bf16_ops_per_second,
                                 cost.get("bytes accessed", 0.0) / info.mem_bw_bytes_per_second)
  return row


def format_table(rows: List[Dict[str, Any]]) -> str:
  """A markdown table of compile results (GB = 1e9 bytes)."""
  lines = ["| model | batch | chip | attention (win/global) | fits | temp GB | args GB | "
           "out GB | TFLOP | accessed GB | roofline bound ms | compile s |",
           "|" + "---|" * 12]
  for r in rows:
    head = f"| {r['model']} | {r['batch']} | {r['chip']} | {r['option']} |"
    if "error" in r:
      temp = f"{r['temp_gb']:.2f} needed" if "temp_gb" in r else "-"
      why = "no" if r["error"] == "does not fit" else f"error: {r['error']}"
      lines.append(f"{head} {why} | {temp} | | | | | | {r['compile_s']:.0f} |")
      continue
    lines.append(f"{head} {'yes' if r['fits'] else 'no'} | {r['temp_gb']:.2f} | "
                 f"{r['arg_gb']:.2f} | {r['out_gb']:.3f} | {r['tflop']:.2f} | "
                 f"{r['accessed_gb']:.1f} | {r['roofline_ms']:.1f} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.tpu_compile",
      description="Compile samjax.encode_image for TPU chips on this host and print XLA's "
                  "memory and cost analysis (compile-time figures, not timings).")
  p.add_argument("--models", default="vit_b,vit_h", help="comma list (default vit_b,vit_h)")
  p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
  p.add_argument("--chips", default="v5e,v6e", help=f"comma list of {sorted(TOPOLOGIES)}")
  p.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                 help="comma list of attention settings (default: %(default)s)")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  # The compile targets a described chip, not this host: keep JAX itself on the CPU.
  # Every JAX process that loads libtpu takes /tmp/libtpu_lockfile; without the second
  # variable, describing a chip fails ("ABORTED: ... libtpu multi-process lockfile")
  # while any other JAX process on the host holds it. Nothing here touches a real TPU.
  # Set here, not at import, so that importing this module (the tests do) leaves the
  # environment alone; both are read when JAX first starts, which is below.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("libtpu is not installed: pip install -e '.[tpu]'", file=sys.stderr)
    return 2
  print("Compile-time figures from XLA's TPU compiler on this host: NOT timings.",
        flush=True)
  rows = []
  for model in _csv(args.models):
    for batch in map(int, _csv(args.batches)):
      for chip in _csv(args.chips):
        for option in _csv(args.options):
          row = compile_encoder(model, batch, chip, option, args.dtype)
          rows.append(row)
          print(json.dumps(row), flush=True)
          if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
              json.dump(rows, f, indent=1)
  print(format_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
