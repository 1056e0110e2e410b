"""Automatic mask generator: seconds per image and mask counts, samjax vs official.

Two settings: the constructor defaults (pred_iou_thresh=0.88,
stability_score_thresh=0.95), and "all-pass" (both thresholds 0), which keeps every
candidate up to NMS and so exercises the whole post-processing path with many masks
(randomized weights rarely produce masks that pass the default thresholds).

Each generator runs once cold (samjax compiles here) and then `--amg-iters` times warm;
seconds per image is the warm median. Both run in fp32 (true fp32 matmuls on both
sides) unless `--amg-dtypes` adds bfloat16: samjax in bf16 compute against the official in
fp32, its only working mode (under bf16 autocast its MaskData.to_numpy() fails on bf16
tensors). Numerics: mask counts, and for every official mask the best IoU among the
samjax masks (and the reverse), on a 4x-subsampled pixel grid.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.common import (MODES, Context, Models, free_memory, guarded, jax_precision,
                               jnp_dtype, log, torch_mode)

SECTION = "amg"
SETTINGS = {
    "defaults": {},
    "all-pass": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}
SUBSAMPLE = 4


def synth_image(seed: int = 0, h: int = 768, w: int = 1024) -> np.ndarray:
  """An HxWx3 uint8 scene: shaded background, filled shapes, mild noise.

  Non-square on purpose, so that the resize-and-pad path is part of the benchmark.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([60 + 80 * xx / w, 90 + 60 * yy / h, 140 - 50 * xx / w], -1)
  for _ in range(14):
    color = rng.uniform(0, 255, 3)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    if rng.random() < 0.5:
      ry, rx = rng.uniform(30, h / 4), rng.uniform(30, w / 4)
      m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    else:
      hh, ww = rng.uniform(40, h / 3), rng.uniform(40, w / 3)
      m = (np.abs(yy - cy) <= hh / 2) & (np.abs(xx - cx) <= ww / 2)
    img[m] = color
  img += rng.normal(0, 4, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def load_image(path: Optional[str], seed: int) -> Tuple[np.ndarray, str]:
  """RGB uint8 image from `path` (OpenCV, else Pillow), or a synthesized one."""
  if not path:
    return synth_image(seed), "synthesized 768x1024"
  try:
    import cv2
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
      raise FileNotFoundError(f"cannot read image {path}")
    img = np.ascontiguousarray(bgr[..., ::-1])
  except ImportError:
    from PIL import Image
    img = np.asarray(Image.open(path).convert("RGB"))
  return img, f"{path} ({img.shape[0]}x{img.shape[1]})"


def _masks(records: List[Dict[str, Any]]) -> np.ndarray:
  """(n, H/4, W/4) bool masks from AMG records (numpy, jax or torch segmentations)."""
  ms = []
  for r in records:
    seg = r["segmentation"]
    if hasattr(seg, "detach"):
      seg = seg.detach().cpu().numpy()
    ms.append(np.asarray(seg, bool)[::SUBSAMPLE, ::SUBSAMPLE])
  return np.stack(ms) if ms else np.zeros((0, 1, 1), bool)


def match_masks(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
  """Best-IoU matching of mask sets a (official) and b (samjax)."""
  out: Dict[str, float] = {}
  if len(a) == 0 or len(b) == 0:
    both_empty = len(a) == len(b)
    out.update(official_best_iou_mean=1.0 if both_empty else 0.0,
               samjax_best_iou_mean=1.0 if both_empty else 0.0)
    return out
  fa = a.reshape(len(a), -1).astype(np.float32)
  fb = b.reshape(len(b), -1).astype(np.float32)
  inter = fa @ fb.T
  union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  best_a, best_b = iou.max(1), iou.max(0)
  out["official_best_iou_mean"] = float(best_a.mean())
  out["official_matched_iou90"] = float((best_a >= 0.9).mean())
  out["samjax_best_iou_mean"] = float(best_b.mean())
  out["samjax_matched_iou90"] = float((best_b >= 0.9).mean())
  return out


def _time_generate(gen, image, iters: int, time_cap: Optional[float], sync=None):
  t0 = time.perf_counter()
  out = gen.generate(image)
  if sync:
    sync()
  cold = time.perf_counter() - t0
  times = []
  for _ in range(max(iters, 0)):
    t0 = time.perf_counter()
    out = gen.generate(image)
    if sync:
      sync()
    times.append(time.perf_counter() - t0)
    if time_cap and sum(times) > time_cap:
      break
  warm = float(np.median(times)) if times else cold
  return {"cold_s": cold, "seconds_per_image": warm, "iters": len(times),
          "masks": len(out)}, out


def run(ctx: Context, models: Models) -> None:
  args = ctx.args
  try:
    from samjax.amg.generator import AutomaticMaskGenerator
  except Exception as e:  # noqa: BLE001 - written in parallel; may not exist yet
    ctx.record_error(SECTION, "import samjax.amg.generator", e)
    ctx.skip(SECTION, "all", f"samjax.amg.generator unavailable: {type(e).__name__}: {e}")
    return
  from samjax.model import SamModel
  image, desc = load_image(args.amg_image, args.seed)
  log(f"[amg] {models.name} on {desc}")
  official_gen_cls = None
  with guarded(ctx, SECTION, "import segment_anything.SamAutomaticMaskGenerator"):
    from segment_anything import SamAutomaticMaskGenerator
    official_gen_cls = SamAutomaticMaskGenerator

  settings = [x for x in getattr(args, "amg_settings", list(SETTINGS)) if x in SETTINGS]
  dtypes = getattr(args, "amg_dtypes", None) or ["float32"]
  for sname in settings:
    kw = dict(SETTINGS[sname], points_per_side=args.amg_points_per_side)
    official = off_out = None  # timed once per setting, shared by the dtype rows
    for dname in dtypes:
      mode = MODES[dname]
      label = f"{models.name} {sname} {dname}"
      if ctx.out_of_time():
        ctx.skip(SECTION, label, "deadline")
        continue
      log(f"[amg] {label}")
      row: Dict[str, Any] = {"model": models.name, "setting": sname, "kwargs": kw,
                             "image": desc, "dtype": dname, "official_dtype": "float32"}
      sj_out = None
      with guarded(ctx, SECTION, f"{label} samjax"):
        gen = AutomaticMaskGenerator(SamModel(models.config, models.params,
                                              dtype=jnp_dtype(mode)), **kw)
        with jax_precision(mode):
          row["samjax"], sj_out = _time_generate(gen, image, args.amg_iters, args.time_cap)
        del gen
      # The official generator only runs in fp32: under bf16 autocast its
      # MaskData.to_numpy() fails on bf16 tensors. So every row compares with it in fp32.
      if official is None and official_gen_cls is not None:
        with guarded(ctx, SECTION, f"{models.name} {sname} official"):
          gen = official_gen_cls(models.official, **kw)
          with torch_mode(ctx, MODES["float32"]):
            official, off_out = _time_generate(gen, image, args.amg_iters, args.time_cap,
                                               ctx.torch_sync)
          del gen
      if official is not None:
        row["official"] = official
      if "samjax" in row and "official" in row:
        row["ratio"] = (row["official"]["seconds_per_image"] /
                        row["samjax"]["seconds_per_image"])
      if sj_out is not None and off_out is not None:
        with guarded(ctx, SECTION, f"{label} numerics"):
          row["numerics"] = match_masks(_masks(off_out), _masks(sj_out))
      ctx.results[SECTION].append(row)
      _log_row(row)
      sj_out = None
      free_memory(ctx)
    off_out = None


def _log_row(row):
  parts = []
  for k in ("samjax", "official"):
    t = row.get(k)
    if t:
      parts.append(f"{k} {t['seconds_per_image']:.3g} s/image (cold {t['cold_s']:.3g}s), "
                   f"{t['masks']} masks")
  if "ratio" in row:
    parts.append(f"speed ratio {row['ratio']:.2f}x")
  num = row.get("numerics")
  if num:
    parts.append(f"official masks' best IoU mean {num['official_best_iou_mean']:.4f}")
  log("  " + "; ".join(parts))
