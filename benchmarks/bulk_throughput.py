"""End-to-end bulk throughput: `samjax automask` vs the official `scripts/amg.py`.

Both commands run on the same folder of images with the same weights and the same
generator settings, in this process, one after the other, and write their own files
(amg.py's default PNG folders, or its `--convert-to-rle` JSONs, against `samjax
automask --output-format amg-png / amg-json`). What is timed is each whole command:
loading the model, listing and decoding the images, the model, filtering, RLE and
writing. Images per second = images / wall seconds of the command.

Each command runs twice into fresh output folders: "cold" (samjax compiles; its
persistent compilation cache starts empty) and "warm" (samjax finds its programs in
that cache, as a rerun or a second host sharing it does; the official script has
nothing to warm beyond PyTorch's first-call allocations). The ratio is samjax's
images/s over the official's (> 1: samjax faster). "Per image" leaves out what a long
job pays once: loading the model (the official's timed inside its registry builder;
for samjax everything before the job's loop: model load, checks, manifest), so it is
what a job of many images converges to.

Weights: `tiny` is the trained tiny checkpoint of tests/fixtures/tiny_trained
exported to .pth (real, localised masks), or a randomized tiny model where the
fixture is absent; `vit_b` is an official-architecture ViT-B with every tensor
randomized, saved as .pth (what amg.py loads through its own registry) and
converted to a samjax checkpoint (what samjax loads). Images: the photos of
--image-dir (default /work/shared/images or shared/images when present), shrunk to --max-side and
cycled to the run's number of images, else synthesized scenes; never kept.

Settings (`SETTINGS`): `defaults` (the official thresholds; random ViT-B weights keep
no mask there), `lowered` (pred_iou_thresh 0.1, stability_score_thresh 0.4, as
tests/test_official_layouts.py) and `many` (IoU 0.05, stability 0.3 at offset 0.1,
no NMS: hundreds of masks per image from random weights, the write-heavy case).

  python -m benchmarks.bulk_throughput                            # CPU defaults (short)
  python -m benchmarks.bulk_throughput --runs tiny:16:lowered:4 vit_b:32:many:4 \\
      --torch-device cuda --dtypes float32,bfloat16               # on a GPU

Writes results.json and results.md to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Optional

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU

import numpy as np

# Where the official script may be (it is not part of the `segment_anything` package):
# $SAMJAX_OFFICIAL_AMG, then a checkout of facebookresearch/segment-anything, then beside
# the wheels that benchmarks/gpu_run.sh installs (.whl/amg.py).
OFFICIAL_AMG_PATHS = ("/work/shared/reference/segment-anything/scripts/amg.py",
                      "/work/shared/reference/scripts/amg.py",
                      "shared/reference/segment-anything/scripts/amg.py", ".whl/amg.py")
IMAGE_DIRS = ("/work/shared/images", "shared/images")
TRAINED_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "tests", "fixtures", "tiny_trained")
SETTINGS: dict[str, dict[str, float]] = {
    "defaults": {},
    "lowered": {"pred_iou_thresh": 0.1, "stability_score_thresh": 0.4},
    "many": {"pred_iou_thresh": 0.05, "stability_score_thresh": 0.3,
             "stability_score_offset": 0.1, "box_nms_thresh": 1.0},
}
# The official flag of each samjax format.
FORMATS = {"amg-png": [], "amg-json": ["--convert-to-rle"]}
# Short CPU run: 2 cores manage ViT-B at 8x8 points on 2 images in a few minutes.
DEFAULT_RUNS = ("tiny:16:lowered:4", "tiny:16:many:4", "vit_b:8:many:2")


# ------------------------------------------------------------------ the official script


def find_official_amg() -> Optional[str]:
  """The official scripts/amg.py ($SAMJAX_OFFICIAL_AMG first), or None."""
  for path in (os.environ.get("SAMJAX_OFFICIAL_AMG"), *OFFICIAL_AMG_PATHS):
    if path and os.path.isfile(path):
      return path
  return None


def _build_official(config, checkpoint: Optional[str] = None):
  """An official Sam of `config`, loaded as `segment_anything.build_sam._build_sam` does."""
  import torch  # pylint: disable=import-outside-toplevel
  from samjax import reference  # pylint: disable=import-outside-toplevel
  sam = reference.build_official(config)
  sam.eval()
  if checkpoint is not None:
    with open(checkpoint, "rb") as f:
      state_dict = torch.load(f)
    sam.load_state_dict(state_dict)
  return sam


def load_official_amg(path: Optional[str] = None, configs: Mapping[str, Any] = ()):
  """The official scripts/amg.py as a module, its `main` and `parser` unchanged.

  Args:
    path: the script (default `find_official_amg()`).
    configs: extra `--model-type` names -> samjax configs (e.g. {"tiny": samjax.tiny}):
      added to the script's `sam_model_registry` as builders of the official `Sam`
      of that config, so the script itself loads a checkpoint of a model that the
      official registry does not know.

  Raises:
    FileNotFoundError: no script found.
  """
  path = path or find_official_amg()
  if not path:
    raise FileNotFoundError("the official scripts/amg.py was not found (set "
                            "$SAMJAX_OFFICIAL_AMG)")
  spec = importlib.util.spec_from_file_location("segment_anything_scripts_amg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  registry = dict(module.sam_model_registry)
  for name, config in dict(configs).items():
    registry[name] = functools.partial(_build_official, config)
  module.sam_model_registry = registry
  return module


# ------------------------------------------------------------------------ the inputs


@dataclasses.dataclass(frozen=True)
class Run:
  """One row: model, points per side, setting name, number of images."""
  model: str
  points: int
  setting: str
  images: int

  @classmethod
  def parse(cls, text: str) -> "Run":
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("tiny", "vit_b", "vit_l", "vit_h") \
        or parts[2] not in SETTINGS:
      raise argparse.ArgumentTypeError(
          f"wants MODEL:POINTS:SETTING[:IMAGES] (models tiny/vit_b/vit_l/vit_h, settings "
          f"{'/'.join(SETTINGS)}), got {text!r}")
    return cls(parts[0], int(parts[1]), parts[2], int(parts[3]) if len(parts) == 4 else 4)


def make_images(folder: str, n: int, image_dir: Optional[str], max_side: int) -> str:
  """`n` JPEGs in `folder`: `image_dir`'s photos (cycled), else synthesized 768x1024
  scenes, shrunk to `max_side`; returns a description."""
  import cv2  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  photos = []
  if image_dir and image_dir != "none" and os.path.isdir(image_dir):
    photos = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir)
                    if f.lower().endswith((".jpg", ".jpeg", ".png")))
  sizes = []
  for i in range(n):
    if photos:
      img = cv2.imread(photos[i % len(photos)], cv2.IMREAD_COLOR)
    else:
      from benchmarks.amg import synth_image  # pylint: disable=import-outside-toplevel
      img = np.ascontiguousarray(synth_image(i)[..., ::-1])
    scale = max_side / max(img.shape[:2])
    if scale < 1:
      img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA)
    sizes.append(f"{img.shape[0]}x{img.shape[1]}")
    cv2.imwrite(os.path.join(folder, f"img_{i:03d}.jpg"), img,
                [cv2.IMWRITE_JPEG_QUALITY, 95])
  where = (f"{len(photos)} photo(s) of {image_dir}" if photos else "synthesized scenes")
  return f"{n} JPEGs from {where} ({', '.join(sorted(set(sizes)))})"


@functools.lru_cache(maxsize=None)
def make_weights(model: str, folder: str) -> tuple[str, str, str, str]:
  """(official --model-type, .pth for amg.py, samjax checkpoint, description), made once
  per model and folder."""
  import torch  # pylint: disable=import-outside-toplevel
  import samjax  # pylint: disable=import-outside-toplevel
  from samjax import reference  # pylint: disable=import-outside-toplevel
  from samjax.io.checkpoint import convert_checkpoint  # pylint: disable=import-outside-toplevel
  pth = os.path.join(folder, f"{model}.pth")
  if model == "tiny" and os.path.isdir(TRAINED_TINY):
    from samjax.io.checkpoint import load_any, state_dict_from_params  # pylint: disable=import-outside-toplevel
    config, params = load_any(TRAINED_TINY)
    torch.save({k: torch.from_numpy(np.array(v))
                for k, v in state_dict_from_params(params, config).items()}, pth)
    return "samjax_tiny", pth, TRAINED_TINY, "trained tiny (tests/fixtures/tiny_trained)"
  config = getattr(samjax, model)
  reference.save_random_checkpoint(config, pth, seed=0)
  ckpt = os.path.join(folder, f"{model}-samjax")
  convert_checkpoint(pth, ckpt)
  return ("samjax_tiny" if model == "tiny" else model), pth, ckpt, \
      f"{model}, every tensor randomized (seed 0)"


# ----------------------------------------------------------------------- the commands


def _count_masks(out: str, fmt: str) -> tuple[int, list[str]]:
  """(masks, output names) of a folder in an amg layout (job files left out)."""
  names = sorted(n for n in os.listdir(out) if n != "samjax_job.json" and
                 not n.startswith((".", "failures")))
  total = 0
  for n in names:
    if fmt == "amg-json":
      with open(os.path.join(out, n)) as f:
        total += len(json.load(f))
    else:
      with open(os.path.join(out, n, "metadata.csv")) as f:
        total += len(f.read().split("\n")) - 1
  return total, names


def run_official(amg, images: str, out: str, model_type: str, pth: str, fmt: str,
                 gen: list[str], device: str) -> tuple[float, float]:
  """(wall seconds of amg.py's `main` on `images`, of which loading the model); its
  prints swallowed."""
  import torch  # pylint: disable=import-outside-toplevel
  args = amg.parser.parse_args(["--input", images, "--output", out, "--model-type",
                                model_type, "--checkpoint", pth, "--device", device,
                                *FORMATS[fmt], *gen])
  registry, load = amg.sam_model_registry, [0.0]

  def timed_build(checkpoint):
    t = time.perf_counter()
    model = registry[model_type](checkpoint=checkpoint).to(device)
    load[0] = time.perf_counter() - t
    return model
  amg.sam_model_registry = {**registry, model_type: timed_build}
  try:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
      amg.main(args)
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    return time.perf_counter() - t0, load[0]
  finally:
    amg.sam_model_registry = registry


def run_samjax(images: str, out: str, ckpt: str, fmt: str, gen: list[str], dtype: str,
               cache: str) -> tuple[float, float]:
  """(wall seconds of `samjax automask` on `images` in this process, of which before
  the job's loop: model load, checks, manifest)."""
  from samjax.cli import build_parser  # pylint: disable=import-outside-toplevel
  from samjax.cli.automask import run_automask  # pylint: disable=import-outside-toplevel
  args = build_parser().parse_args(
      ["automask", images, "--out", out, "--checkpoint", ckpt, "--output-format", fmt,
       "--dtype", dtype, "--quiet", "--no-progress", "--compilation-cache", cache, *gen])
  t0 = time.perf_counter()
  summary = run_automask(args)
  wall = time.perf_counter() - t0
  if summary.exit_code != 0:
    raise RuntimeError(f"samjax automask: {summary}")
  return wall, max(wall - summary.elapsed_s, 0.0)


def gen_flags(run: Run) -> list[str]:
  """The generator flags (the same names in amg.py and `samjax automask`)."""
  flags = ["--points-per-side", str(run.points)]
  for k, v in SETTINGS[run.setting].items():
    flags += ["--" + k.replace("_", "-"), str(v)]
  return flags


def bench_run(amg, run: Run, fmt: str, dtypes: list[str], args, work: str) -> list[dict]:
  """The rows of one `Run` (one per samjax dtype; the official runs once, in fp32)."""
  tag = f"{run.model}-{run.points}-{run.setting}-{run.images}"
  images = os.path.join(work, f"images-{tag}")
  shutil.rmtree(images, ignore_errors=True)
  image_text = make_images(images, run.images, args.image_dir, args.max_side)
  wdir = os.path.join(work, f"weights-{run.model}")
  os.makedirs(wdir, exist_ok=True)
  model_type, pth, ckpt, weights = make_weights(run.model, wdir)
  gen = gen_flags(run)
  official, official_load = {}, {}
  for phase in ("cold", "warm"):
    out = os.path.join(work, f"official-{tag}-{fmt}-{phase}")
    shutil.rmtree(out, ignore_errors=True)
    official[phase], official_load[phase] = run_official(amg, images, out, model_type, pth,
                                                         fmt, gen, args.torch_device)
    print(f"  official {phase}: {official[phase]:.1f} s", flush=True)
  official_masks, official_names = _count_masks(out, fmt)
  rows = []
  for dtype in dtypes:
    cache = os.path.join(work, f"xla-cache-{tag}-{dtype}")
    shutil.rmtree(cache, ignore_errors=True)
    ours, ours_setup = {}, {}
    for phase in ("cold", "warm"):
      our_out = os.path.join(work, f"samjax-{tag}-{fmt}-{dtype}-{phase}")
      shutil.rmtree(our_out, ignore_errors=True)
      ours[phase], ours_setup[phase] = run_samjax(images, our_out, ckpt, fmt, gen, dtype,
                                                  cache)
      print(f"  samjax {dtype} {phase}: {ours[phase]:.1f} s", flush=True)
    masks, names = _count_masks(our_out, fmt)
    n = run.images
    # Per image once the model is loaded (warm): what a long job converges to.
    o_loop = n / max(official["warm"] - official_load["warm"], 1e-9)
    s_loop = n / max(ours["warm"] - ours_setup["warm"], 1e-9)
    rows.append({
        "model": run.model, "weights": weights, "points_per_side": run.points,
        "setting": run.setting, "settings": SETTINGS[run.setting], "format": fmt,
        "images": n, "image_set": image_text, "samjax_dtype": dtype,
        "official_dtype": "float32",
        "official": {"cold_s": official["cold"], "warm_s": official["warm"],
                     "model_load_s": official_load["warm"],
                     "warm_images_per_s": n / official["warm"],
                     "loop_images_per_s": o_loop, "masks_per_image": official_masks / n},
        "samjax": {"cold_s": ours["cold"], "warm_s": ours["warm"],
                   "setup_s": ours_setup["warm"], "warm_images_per_s": n / ours["warm"],
                   "loop_images_per_s": s_loop, "masks_per_image": masks / n},
        "ratio_warm": official["warm"] / ours["warm"],
        "ratio_loop": s_loop / o_loop,
        "ratio_cold": official["cold"] / ours["cold"],
        "same_names": names == official_names,
    })
  shutil.rmtree(images, ignore_errors=True)
  return rows


# -------------------------------------------------------------------------- reporting


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks.common import _cpu_model, _git_commit, cpu_count  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "host": platform.node(), "cpu": _cpu_model(), "cpus": cpu_count(),
          "jax": jax.__version__, "jax_device": f"{dev.platform}: {dev.device_kind}",
          "torch": torch.__version__, "git": _git_commit(),
          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
  if torch.cuda.is_available():
    info["torch_device"] = torch.cuda.get_device_name(0)
  return info


def markdown(rows: list[dict], info: dict, command: str) -> str:
  lines = ["# End-to-end bulk throughput: samjax automask vs official scripts/amg.py",
           "", f"`{command}`", "",
           f"{info['date']}, {info['cpu']} ({info['cpus']} CPUs), JAX {info['jax']} on "
           f"{info['jax_device']}, PyTorch {info['torch']}"
           + (f" on {info['torch_device']}" if "torch_device" in info else " on CPU")
           + f", git {info.get('git') or '?'}"
           + (f", load average {info['load_average'][0]:.1f} at the start"
              if info.get("load_average") else "")
           + ". Command img/s = images / wall seconds of the whole command (model load, "
           "decode, model, filtering, RLE, writes), warm (samjax's compilation cache filled "
           "by the cold run); per image: the same without loading the model. Ratio > 1: "
           "samjax faster.", "",
           "| model | points | setting | format | images | samjax dtype | official img/s "
           "(command) | samjax img/s (command) | ratio | official img/s (per image) | "
           "samjax img/s (per image) | ratio | cold s official / samjax | masks/img "
           "official / samjax |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
           "--- |"]
  for r in rows:
    o, s = r["official"], r["samjax"]
    lines.append(
        f"| {r['model']} | {r['points_per_side']}x{r['points_per_side']} | {r['setting']} | "
        f"{r['format']} | {r['images']} | {r['samjax_dtype']} | {o['warm_images_per_s']:.3g} | "
        f"{s['warm_images_per_s']:.3g} | **{r['ratio_warm']:.2f}** | "
        f"{o['loop_images_per_s']:.3g} | {s['loop_images_per_s']:.3g} | "
        f"{r['ratio_loop']:.2f} | {o['cold_s']:.1f} / {s['cold_s']:.1f} | "
        f"{o['masks_per_image']:.1f} / {s['masks_per_image']:.1f} |")
  sets = sorted({r["image_set"] for r in rows})
  if sets:
    lines += ["", "Images: " + "; ".join(sets) + "."]
  return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", nargs="+", type=Run.parse,
                      default=[Run.parse(r) for r in DEFAULT_RUNS],
                      metavar="MODEL:POINTS:SETTING[:IMAGES]",
                      help=f"rows to run (default: {' '.join(DEFAULT_RUNS)})")
  parser.add_argument("--formats", default="amg-png",
                      help="comma list of amg-png (amg.py's default) and amg-json "
                           "(--convert-to-rle) (default: %(default)s)")
  parser.add_argument("--dtypes", default="float32",
                      help="samjax compute dtypes, comma list (the official runs in fp32, "
                           "TF32 off) (default: %(default)s)")
  parser.add_argument("--torch-device", default="cpu", help="amg.py --device")
  parser.add_argument("--image-dir", default=None,
                      help="photos to use (default: the first of "
                           f"{', '.join(IMAGE_DIRS)} that exists; 'none' or a missing "
                           "folder: synthesized scenes)")
  parser.add_argument("--max-side", type=int, default=800,
                      help="photos are shrunk to this longest side (default: %(default)s)")
  parser.add_argument("--out", default="benchmarks/results/bulk",
                      help="where results.json and results.md go")
  parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
  args = parser.parse_args(argv)
  if args.image_dir is None:
    args.image_dir = next((d for d in IMAGE_DIRS if os.path.isdir(d)), None)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks.common import _set_torch_tf32  # pylint: disable=import-outside-toplevel
  import samjax  # pylint: disable=import-outside-toplevel
  _set_torch_tf32(torch, False)
  amg = load_official_amg(configs={"samjax_tiny": samjax.tiny})
  formats = [f for f in args.formats.split(",") if f]
  dtypes = [d for d in args.dtypes.split(",") if d]
  command = "python -m benchmarks.bulk_throughput " + " ".join(argv if argv is not None
                                                                else sys.argv[1:])
  info = machine()
  os.makedirs(args.out, exist_ok=True)
  rows: list[dict] = []
  errors: list[str] = []
  with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
    for run in args.runs:
      for fmt in formats:
        print(f"{run} {fmt}", flush=True)
        try:
          rows += bench_run(amg, run, fmt, dtypes, args, work)
        except Exception as e:  # pylint: disable=broad-except
          errors.append(f"{run} {fmt}: {type(e).__name__}: {e}")
          print(f"  failed: {errors[-1]}", flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
          json.dump({"machine": info, "command": command, "rows": rows, "errors": errors},
                    f, indent=1)
        md = markdown(rows, info, command)
        with open(os.path.join(args.out, "results.md"), "w") as f:
          f.write(md)
  print(md)
  for e in errors:
    print(f"error: {e}")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
