"""Validation: mIoU with one interior point and with the tight box per GT instance."""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional

import jax.numpy as jnp
import numpy as np

from samjax.config import SamConfig
from samjax.resize import resize_bilinear
from samjax.runtime import Runtime
from samjax.runtime.mesh import pad_to_multiple
from samjax.train.data import interior_point, prepare_example
from samjax.train.embeddings import compute_embeddings, eval_runtime
from samjax.train.prompts import valid_region


@dataclasses.dataclass
class EvalSet:
  """Validation instances in the input frame, with their fixed prompts.

  Attributes:
    images: raw images (for re-encoding while the encoder trains).
    inst_image: (M,) index of each instance's image.
    gt: (M, S, S) bool masks in the input frame.
    valid_hw: (M, 2) un-padded size of the instance's image.
    points: (M, 2) interior-most point (max of the distance transform), xy.
    boxes: (M, 4) tight xyxy boxes.
  """

  images: List[np.ndarray]
  inst_image: np.ndarray
  gt: np.ndarray
  valid_hw: np.ndarray
  points: np.ndarray
  boxes: np.ndarray

  def __len__(self) -> int:
    return len(self.inst_image)


def build_eval_set(dataset, config: SamConfig, max_images: Optional[int] = None) -> EvalSet:
  """Prepares every instance of the first `max_images` images of `dataset`."""
  n = len(dataset) if max_images is None else min(len(dataset), max_images)
  images, inst_image, gt, hw, points, boxes = [], [], [], [], [], []
  for i in range(n):
    image, masks = dataset[i]
    ex = prepare_example(image, masks, config.image_size)
    images.append(image)
    for m, box in zip(ex.masks, ex.boxes):
      inst_image.append(i)
      gt.append(m)
      hw.append(ex.valid_hw)
      points.append(interior_point(m))
      boxes.append(box)
  s = config.image_size
  return EvalSet(images, np.asarray(inst_image, np.int32),
                 np.asarray(gt, bool).reshape(-1, s, s), np.asarray(hw, np.int32).reshape(-1, 2),
                 np.asarray(points, np.float32).reshape(-1, 2),
                 np.asarray(boxes, np.float32).reshape(-1, 4))


@functools.lru_cache(maxsize=16)
def _eval_fn(rt: Runtime):
  """Compiled (params, emb, points, boxes, gt, valid_hw) -> (n, 2) IoUs (point, box)."""
  s = rt.config.image_size

  def fn(params, emb, points, boxes, gt, valid_hw):
    n = points.shape[0]
    dec = functools.partial(rt.decoder, params, emb)
    lp, ip = dec(points[:, None], jnp.ones((n, 1), jnp.int32), None, None,
                 multimask_output=True)
    # A single point is ambiguous: take the mask the model is most confident in.
    lp = jnp.take_along_axis(lp, jnp.argmax(ip, axis=1)[:, None, None, None], axis=1)
    lb, _ = dec(None, None, boxes, None, multimask_output=False)
    pred = resize_bilinear(jnp.concatenate([lp, lb], axis=1), (s, s)) > 0
    pred = pred & valid_region(valid_hw, s)[:, None]
    g = gt[:, None]
    inter = jnp.sum(pred & g, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | g, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)  # (n, 2)

  return rt.jit(fn, in_specs=("replicated",) + ("batch",) * 5, out_specs="batch")


def evaluate(params, config: SamConfig, eval_set: EvalSet, dtype: str = "float32",
             embeddings: Optional[np.ndarray] = None, mesh=None, chunk: int = 32,
             batch_size: int = 8, *, runtime: Optional[Runtime] = None) -> Dict[str, float]:
  """Validation mIoU with a single positive interior point and with the tight box.

  IoUs are measured in the model input frame (GT resized with nearest neighbour):
  the point prompt's most confident multimask output and the box prompt's single
  output, upsampled bilinearly and thresholded at 0.

  Args:
    params: SAM params.
    eval_set: from `build_eval_set`.
    dtype, mesh: compute dtype name and device mesh, when no `runtime` is given
      (default: all local devices, "auto" attention kernels).
    embeddings: (num images, h, w, C) precomputed embeddings, or None to encode.
    chunk: instances per decoder call (rounded up to a multiple of the devices).
    batch_size: images per encoder call.
    runtime: the Runtime to run on (its config, dtype, kernels and mesh).

  Returns:
    {"point_miou", "box_miou", "miou" (their mean), "instances"}.
  """
  rt = eval_runtime(config, dtype, mesh, runtime)
  if len(eval_set) == 0:
    return {"point_miou": float("nan"), "box_miou": float("nan"), "miou": float("nan"),
            "instances": 0}
  params = rt.place(params)
  if embeddings is None:
    embeddings = compute_embeddings(params, eval_set.images, config, batch_size=batch_size,
                                    runtime=rt)
  fn = _eval_fn(rt)
  m = rt.num_devices
  chunk = -(-chunk // m) * m
  ious = []
  for start in range(0, len(eval_set), chunk):
    sl = slice(start, start + chunk)
    arrays = (embeddings[eval_set.inst_image[sl]], eval_set.points[sl], eval_set.boxes[sl],
              eval_set.gt[sl], eval_set.valid_hw[sl])
    n = len(arrays[1])
    arrays = tuple(pad_to_multiple(a, chunk) for a in arrays)
    ious.append(np.asarray(fn(params, *rt.shard(arrays)))[:n])
  iou = np.concatenate(ious)
  point, box = float(iou[:, 0].mean()), float(iou[:, 1].mean())
  return {"point_miou": point, "box_miou": box, "miou": 0.5 * (point + box),
          "instances": int(len(iou))}
