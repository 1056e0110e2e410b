"""`python -m benchmarks`: samjax vs official PyTorch SAM, speed and numerics side by side.

Examples:
  python -m benchmarks --quick                      # CPU smoke run: tiny + ViT-B, batch 1
  python -m benchmarks --models vit_b,vit_h --batch-sizes 1,8 --dtypes float32,bfloat16 \
      --amg --out /tmp/bench                        # the GPU run (see gpu_run.sh)

See benchmarks/README.md for what every number means.
"""

from __future__ import annotations

import os

# JAX and PyTorch share the GPU in this process. By default JAX grabs 75% of GPU memory
# up front, which would leave PyTorch's ViT-H (4096x4096 attention maps) to run out of
# memory; allocate on demand instead. Must happen before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402

from benchmarks.common import MODES, guarded, log  # noqa: E402

# Few iterations, and each measurement capped at 15 s, so ViT-B on a 2-core CPU finishes
# in minutes; the tiny model still gets the default 10 (cheap) iterations.
QUICK = dict(models="tiny,vit_b", batch_sizes="1", dtypes="float32,bfloat16", iters=None,
             prompt_iters=5, warmup=1, time_cap=15.0, amg_iters=1, amg_model="tiny",
             amg_points_per_side=16)


def _csv(s):
  return [x.strip() for x in str(s).split(",") if x.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="samjax vs the official PyTorch SAM: image encoder, prompt path and "
                  "automatic mask generator speed, plus numerics, on the same randomized "
                  "weights in one process.")
  p.add_argument("--models", default=None,
                 help="comma list of vit_b, vit_l, vit_h, tiny (default vit_b)")
  p.add_argument("--batch-sizes", default=None, help="encoder batch sizes (default 1,8)")
  p.add_argument("--dtypes", default=None,
                 help=f"comma list of {', '.join(MODES)} (default float32,bfloat16)")
  p.add_argument("--iters", type=int, default=None,
                 help="timed iterations (default: encoder 10, or 5 for ViT-L/H; prompt 20, "
                      "5 with --quick)")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed calls before timing, counting the first (compiling) one "
                      "(default 2)")
  p.add_argument("--prompts", default="1,64", help="prompts per decoder call (default 1,64)")
  p.add_argument("--no-prompt-upscale", dest="prompt_upscale", action="store_false",
                 help="skip the prompt rows that also upscale masks to the SxS frame")
  p.add_argument("--prompt-upscale", dest="prompt_upscale", action="store_true",
                 help="include those rows (the default; undoes an earlier --no-prompt-upscale)")
  p.add_argument("--prompt-all-models", action="store_true",
                 help="time the prompt path for every model, even when the mask decoder is "
                      "the same network (ViT-B/L/H share it)")
  p.add_argument("--sections", default="encoder,prompt",
                 help="comma list of encoder, prompt (AMG is added by --amg)")
  p.add_argument("--amg", action="store_true", help="also benchmark the automatic mask generator")
  p.add_argument("--amg-image", default=None,
                 help="photo for the AMG (default: a synthesized 768x1024 scene)")
  p.add_argument("--amg-model", default=None, help="model for the AMG (default: first of --models)")
  p.add_argument("--amg-iters", type=int, default=None, help="warm AMG runs after the cold one "
                 "(default 2)")
  p.add_argument("--amg-settings", default="defaults,all-pass",
                 help="comma list of AMG settings: defaults, all-pass (default both)")
  p.add_argument("--amg-dtypes", default="float32",
                 help=f"comma list of AMG precision modes from {', '.join(MODES)} "
                      "(default float32)")
  p.add_argument("--amg-points-per-side", type=int, default=None,
                 help="AMG point grid (default 32, the official default; 16 with --quick)")
  p.add_argument("--attention-impl", default="auto",
                 help="samjax encoder attention kernel(s): a comma list, one encoder row "
                      "each, of auto, einsum, xla, cudnn or WINDOWED/GLOBAL pairs such as "
                      "cudnn/xla (default auto)")
  p.add_argument("--profile", action="store_true",
                 help="trace each samjax encoder configuration after timing it and report "
                      "its device time by kernel (traces under OUT/profiles)")
  p.add_argument("--peak", choices=("auto", "on", "off"), default="auto",
                 help="measure the dense matmul rate for MFU (auto: on GPU only)")
  p.add_argument("--time-cap", type=float, default=None,
                 help="seconds after which one measurement stops iterating (default 60)")
  p.add_argument("--deadline-s", type=float, default=None,
                 help="start no new measurement after this many seconds (default: none)")
  p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
  p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                 help="output directory (default benchmarks/results)")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke run: tiny + vit_b, batch 1, fp32+bf16, 15 s per measurement "
                      "at most, AMG (if --amg) on the tiny model with a 16x16 point grid")
  args = p.parse_args(argv)

  defaults = dict(models="vit_b", batch_sizes="1,8", dtypes="float32,bfloat16", iters=None,
                  prompt_iters=20, warmup=2, time_cap=60.0, amg_iters=2, amg_model=None,
                  amg_points_per_side=32)
  if args.quick:
    defaults.update(QUICK)
  for k, v in defaults.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  args.models = _csv(args.models)
  args.batch_sizes = [int(x) for x in _csv(args.batch_sizes)]
  args.dtypes = _csv(args.dtypes)
  args.prompts = [int(x) for x in _csv(args.prompts)]
  args.sections = _csv(args.sections)
  args.amg_settings = _csv(args.amg_settings)
  args.amg_dtypes = _csv(args.amg_dtypes)
  bad = [d for d in args.dtypes + args.amg_dtypes if d not in MODES]
  if bad:
    p.error(f"unknown dtype(s) {bad}; choose from {list(MODES)}")
  from samjax.config import CONFIGS
  bad = [m for m in args.models + ([args.amg_model] if args.amg_model else [])
         if m not in CONFIGS]
  if bad:
    p.error(f"unknown model(s) {bad}; choose from {sorted(CONFIGS)}")
  if not args.amg_model:
    args.amg_model = args.models[0]
  # Numerics for any reduced precision compare against fp32 PyTorch; run fp32 first so
  # its outputs are the reference rather than an extra untimed pass.
  args.dtypes.sort(key=lambda d: d != "float32")
  args.command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  import jax
  from benchmarks import amg, encoder, flops, peak, prompt, report
  from benchmarks.common import Context, build_models, free_memory, machine_info
  from samjax.config import CONFIGS, get_config

  # JAX first: it claims its device and loads its CUDA libraries before PyTorch does.
  jax.devices()
  ctx = Context(args)
  res = ctx.results
  res["args"] = {k: v for k, v in vars(args).items()}

  def save(png=True):
    res["elapsed_s"] = ctx.elapsed()
    report.write_all(res, args.out, png=png)

  torch_ok = False
  with guarded(ctx, "setup", "import torch"):
    ctx.init_torch()
    torch_ok = True
  with guarded(ctx, "setup", "machine info"):
    res["machine"] = machine_info(ctx)
  log("machine: " + ", ".join(f"{k}={v}" for k, v in (res.get("machine") or {}).items()
                              if k in ("cpu_model", "cpu_cores_usable", "jax", "jax_device",
                                       "torch", "torch_device_name", "torch_threads")))

  log("[flops] image encoder, per 1024x1024 image (analytic, matmuls only):")
  for name in sorted(set(list(CONFIGS) + args.models), key=list(CONFIGS).index):
    res["flops"][name] = flops.encoder_flops(get_config(name))
    log("  " + flops.describe(get_config(name)))

  if not torch_ok:
    res["notes"].append("torch unavailable: nothing to compare against")
    save()
    return 1

  if args.peak == "on" or (args.peak == "auto" and ctx.on_gpu):
    log("[peak] dense matmul rate")
    with guarded(ctx, "peak", "matmul rate"):
      res["peak"] = peak.run(ctx)
    free_memory(ctx)
  save(png=False)

  def amg_section(models):
    if ctx.out_of_time():
      ctx.skip("amg", models.name, "deadline")
      return
    with guarded(ctx, "amg", models.name):
      amg.run(ctx, models)
    save()

  # The AMG runs last, after every model's encoder and prompt rows: with a deadline set,
  # the per-model numbers (ViT-H's MFU above all) matter more than the AMG's.
  amg_models = None
  for name in args.models:
    if ctx.out_of_time():
      ctx.skip("all", name, "deadline")
      continue
    log(f"=== {name}: building the official model with randomized weights + converting")
    models = None
    with guarded(ctx, "setup", f"build {name}"):
      models = build_models(ctx, name)
      log(f"  built in {models.setup_s:.1f}s")
    if models is None:
      continue
    if "encoder" in args.sections:
      with guarded(ctx, "encoder", name):
        encoder.run(ctx, models)
      save()
    if "prompt" in args.sections:
      with guarded(ctx, "prompt", name):
        prompt.run(ctx, models)
      save()
    if args.amg and name == args.amg_model:
      amg_models = models  # small next to ViT-H; saves building it again
    models = None
    gc.collect()
    jax.clear_caches()  # drop this model's executables before the next (bigger) one
    free_memory(ctx)

  if args.amg:
    if amg_models is None and not ctx.out_of_time():
      with guarded(ctx, "setup", f"build {args.amg_model} for the AMG"):
        amg_models = build_models(ctx, args.amg_model)
    if amg_models is not None:
      amg_section(amg_models)
    elif ctx.out_of_time():
      ctx.skip("amg", args.amg_model, "deadline")
    amg_models = None
    free_memory(ctx)

  save()
  log(f"done in {ctx.elapsed():.0f}s; wrote {os.path.join(args.out, 'results.json')}, "
      f"results.md, ratios.png")
  if res["errors"]:
    log(f"{len(res['errors'])} error(s) recorded (see results.md)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
