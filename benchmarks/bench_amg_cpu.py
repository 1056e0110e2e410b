"""Automatic mask generation: official PyTorch generator vs samjax, same weights.

(Named for the CPU comparison it was written for; `--torch-device cuda` runs the
official model on a GPU, samjax then uses JAX's default device.)

Runs `segment_anything.SamAutomaticMaskGenerator` and `samjax.AutomaticMaskGenerator`
on the same image with the same randomized weights (tiny and/or ViT-B) in one
process, and prints wall times (samjax's first call, which compiles, is reported
separately), the speed ratio, mask counts and the share of masks matched at
IoU >= 0.9 in both directions.

Randomized weights predict low IoUs, so at the official defaults few or no masks
survive the filters; the `lowered` settings (IoU filter 0.05, stability 0.3 at
offset 0.1, no NMS) make both generators produce, encode and return hundreds of
masks, which is the expensive case.

  python benchmarks/bench_amg_cpu.py                      # tiny defaults + lowered, ViT-B 16
  python benchmarks/bench_amg_cpu.py --runs tiny:32:default vit_b:32:default
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

SETTINGS = {
    "default": {},
    "lowered": dict(pred_iou_thresh=0.05, stability_score_thresh=0.3,
                    stability_score_offset=0.1, box_nms_thresh=1.0),
}


def load_image(path: str | None) -> tuple[np.ndarray, str]:
  import cv2
  path = path or "/work/shared/images/dog.jpg"
  if os.path.exists(path):
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB), path
  rng = np.random.default_rng(0)
  img = np.full((534, 800, 3), 90, np.uint8)
  for _ in range(30):
    c = tuple(int(v) for v in rng.integers(0, 255, 3))
    cv2.circle(img, (int(rng.integers(0, 800)), int(rng.integers(0, 534))),
               int(rng.integers(10, 150)), c, -1)
  return img, "synthetic 534x800"


def match_shares(a, b) -> tuple[float, float]:
  """Share of a's masks with an IoU >= 0.9 partner in b, and the converse."""
  if not a or not b:
    return (1.0, 1.0) if not a and not b else (0.0, 0.0)
  fa = np.stack([m["segmentation"] for m in a]).reshape(len(a), -1).astype(np.float32)
  fb = np.stack([m["segmentation"] for m in b]).reshape(len(b), -1).astype(np.float32)
  inter = fa @ fb.T
  iou = inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None] - inter, 1)
  return float(np.mean(iou.max(1) >= 0.9)), float(np.mean(iou.max(0) >= 0.9))


def run(model_name: str, points: int, setting: str, image: np.ndarray, repeats: int,
        tmp: str, torch_device: str = "cpu") -> dict:
  import torch
  import samjax
  from samjax import reference
  from samjax.amg.generator import AutomaticMaskGenerator
  from segment_anything import SamAutomaticMaskGenerator

  config = samjax.get_config(model_name) if model_name != "tiny" else samjax.tiny
  pth = os.path.join(tmp, f"{model_name}.pth")
  official_model = reference.save_random_checkpoint(config, pth, seed=1).to(torch_device)
  kw = dict(points_per_side=points, **SETTINGS[setting])

  official = SamAutomaticMaskGenerator(official_model, **kw)
  t_off = []
  with torch.no_grad():
    for _ in range(repeats):
      t = time.perf_counter()
      ref = official.generate(image)
      t_off.append(time.perf_counter() - t)

  ours_gen = AutomaticMaskGenerator(pth, **kw)
  t = time.perf_counter()
  ours = ours_gen.generate(image)
  t_first = time.perf_counter() - t
  t_ours = []
  for _ in range(repeats):
    t = time.perf_counter()
    ours = ours_gen.generate(image)
    t_ours.append(time.perf_counter() - t)
  share = match_shares(ours, ref)
  return dict(model=model_name, points=points, setting=setting, official_s=min(t_off),
              samjax_s=min(t_ours), samjax_compile_s=max(t_first - min(t_ours), 0.0),
              ratio=min(t_off) / min(t_ours), n_official=len(ref), n_samjax=len(ours),
              share_samjax_in_official=share[0], share_official_in_samjax=share[1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image", help="image path (default: /work/shared/images/dog.jpg or "
                                 "a synthetic image)")
  p.add_argument("--runs", nargs="+", metavar="MODEL:POINTS:SETTING",
                 default=["tiny:32:default", "tiny:32:lowered", "vit_b:16:default"],
                 help="models (tiny, vit_b, ...), points per side, and settings "
                      f"({', '.join(SETTINGS)})")
  p.add_argument("--repeats", type=int, default=2, help="timed runs per side (min taken)")
  p.add_argument("--torch-device", default="cpu",
                 help="device of the official model, e.g. cuda (samjax uses JAX's default)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads (default: torch's choice)")
  args = p.parse_args(argv)

  import jax
  import torch
  jax.config.update("jax_default_matmul_precision", "highest")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  image, name = load_image(args.image)
  print(f"image {name} {image.shape[0]}x{image.shape[1]}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} x{len(jax.devices())}; torch {torch.__version__} "
        f"on {args.torch_device} ({torch.get_num_threads()} threads)")
  header = (f"{'model':6s} {'pts':>4s} {'setting':8s} {'official s':>10s} {'samjax s':>9s} "
            f"{'compile s':>9s} {'ratio':>6s} {'n off':>6s} {'n ours':>6s} "
            f"{'share o->s':>10s} {'share s->o':>10s}")
  print(header)
  with tempfile.TemporaryDirectory() as tmp:
    for spec in args.runs:
      model_name, points, setting = spec.split(":")
      r = run(model_name, int(points), setting, image, args.repeats, tmp, args.torch_device)
      print(f"{r['model']:6s} {r['points']:4d} {r['setting']:8s} {r['official_s']:10.2f} "
            f"{r['samjax_s']:9.2f} {r['samjax_compile_s']:9.2f} {r['ratio']:6.1f} "
            f"{r['n_official']:6d} {r['n_samjax']:6d} {r['share_official_in_samjax']:10.4f} "
            f"{r['share_samjax_in_official']:10.4f}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
