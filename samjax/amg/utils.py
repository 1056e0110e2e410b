"""Helpers for the automatic mask generator, matching `segment_anything.utils.amg`.

Two families live here:

* Host-side helpers (NumPy / OpenCV / pycocotools): point grids, crop boxes, RLE
  encoding and decoding, small-region removal, and NumPy twins of the device
  functions. They run once per image or once per kept mask, so they stay on the host.
* Device-side helpers (`jax.numpy`, jit-able, static shapes): stability score, mask
  boxes, crop-edge filtering, uncropping and a greedy box NMS that reproduces
  `torchvision.ops.batched_nms` with a single category. Where the official code
  filters (changes lengths), these return boolean masks so that callers can keep a
  fixed padded batch shape under `jax.jit`.

Every formula follows the official implementation, including its integer/float
quirks, so that the JAX generator produces the same masks, boxes and order.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ArrayLike = Union[np.ndarray, jax.Array, Sequence[float]]

# ----------------------------------------------------------------------------------
# Host side: grids and crops.
# ----------------------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """Evenly spaced point grid in [0, 1]^2, cell centres of an n x n tiling.

  Args:
    n_per_side: points along each side.

  Returns:
    (n_per_side**2, 2) float64 array of (x, y); x varies fastest (row-major over y).
  """
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  # meshgrid's default "xy" indexing puts x along columns, so raveling row by row
  # yields x fastest, exactly like the official tile/stack construction.
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int,
                                scale_per_layer: int) -> List[np.ndarray]:
  """Point grids for crop layers 0..n_layers (layer i uses n / scale**i per side).

  Args:
    n_per_side: points per side in layer 0.
    n_layers: number of crop layers beyond the full image.
    scale_per_layer: downscale factor of points-per-side per layer.

  Returns:
    List of n_layers + 1 arrays, each (k_i**2, 2) float64 in [0, 1].
  """
  # Float division then truncation, as upstream (e.g. int(32 / 3**1) == 10).
  return [build_point_grid(int(n_per_side / (scale_per_layer**i)))
          for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
  """Crop boxes of all layers: the full image, then (2**i)**2 overlapping crops.

  Args:
    im_size: (H, W) of the original image.
    n_layers: number of crop layers beyond the full image.
    overlap_ratio: overlap of neighbouring crops in layer 1, as a fraction of the
      short side; deeper layers scale it down with the crop size.

  Returns:
    crop_boxes: list of [x0, y0, x1, y1] Python ints (x1/y1 exclusive). Within a
      layer the order is x0-major (all y0 for the first x0, then the next x0), as in
      `itertools.product(x0s, y0s)` upstream; that order matters downstream because
      crop NMS breaks score ties by position.
    layer_idxs: crop layer of each box (0 for the full image).
  """
  im_h, im_w = im_size
  short_side = min(im_h, im_w)
  crop_boxes = [[0, 0, im_w, im_h]]
  layer_idxs = [0]

  def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
    # Same float expression as upstream so that rounding can never differ.
    return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

  for i_layer in range(n_layers):
    n_crops_per_side = 2**(i_layer + 1)
    # Keep upstream's evaluation order: (ratio * short) * (2 / n).
    overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
    crop_w = crop_len(im_w, n_crops_per_side, overlap)
    crop_h = crop_len(im_h, n_crops_per_side, overlap)
    x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
    y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
    for x0, y0 in itertools.product(x0s, y0s):
      crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layer_idxs.append(i_layer + 1)
  return crop_boxes, layer_idxs


def box_xyxy_to_xywh(box_xyxy: ArrayLike) -> np.ndarray:
  """Converts XYXY boxes to XYWH (w = x1 - x0, h = y1 - y0), keeping the dtype.

  Args:
    box_xyxy: (..., 4) boxes. Upstream only ever passes a single (4,) box.

  Returns:
    (..., 4) NumPy copy in XYWH. Note that mask boxes use the inclusive max pixel as
    x1/y1, so the resulting width is one less than the pixel extent (as upstream).
  """
  box = np.array(box_xyxy, copy=True)
  box[..., 2] = box[..., 2] - box[..., 0]
  box[..., 3] = box[..., 3] - box[..., 1]
  return box


# ----------------------------------------------------------------------------------
# Host side: run-length encoding.
# ----------------------------------------------------------------------------------


def _rle_from_fortran_flat(flat: np.ndarray, change_idxs: np.ndarray, h: int,
                           w: int) -> Dict[str, Any]:
  """Builds one uncompressed RLE from a column-major flat mask and its change points.

  Args:
    flat: (H*W,) bool mask flattened in Fortran (column-major) order.
    change_idxs: sorted positions p such that flat[p] != flat[p + 1].
    h, w: mask size.
  """
  bounds = np.concatenate(([0], change_idxs + 1, [h * w]))
  counts = np.diff(bounds).tolist()
  # COCO RLE always starts with a run of zeros, possibly empty.
  if flat[0]:
    counts = [0] + counts
  return {"size": [h, w], "counts": counts}


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
  """Uncompressed COCO RLE of one binary mask (same output as `mask_to_rle_pytorch`).

  Args:
    mask: (H, W) boolean (or 0/1) array; must be non-empty.

  Returns:
    {"size": [H, W], "counts": [int, ...]} with runs over the column-major flattening,
    alternating background/foreground and starting with background.
  """
  mask = np.asarray(mask).astype(bool, copy=False)
  h, w = mask.shape
  flat = mask.ravel(order="F")
  change = np.flatnonzero(flat[1:] != flat[:-1])
  return _rle_from_fortran_flat(flat, change, h, w)


def mask_to_rle_batch(masks: np.ndarray) -> List[Dict[str, Any]]:
  """`mask_to_rle` for a (B, H, W) stack, sharing one vectorised diff.

  Args:
    masks: (B, H, W) boolean array.

  Returns:
    List of B uncompressed RLE dicts.
  """
  masks = np.asarray(masks).astype(bool, copy=False)
  b, h, w = masks.shape
  if b == 0:
    return []
  flat = masks.transpose(0, 2, 1).reshape(b, h * w)
  rows, cols = np.nonzero(flat[:, 1:] != flat[:, :-1])
  # np.nonzero is row-major, so each mask's change points form one sorted slice.
  starts = np.searchsorted(rows, np.arange(b + 1))
  return [_rle_from_fortran_flat(flat[i], cols[starts[i]:starts[i + 1]], h, w)
          for i in range(b)]


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
  """Decodes an uncompressed RLE.

  Args:
    rle: {"size": [H, W], "counts": [...]} with counts summing to H*W.

  Returns:
    (H, W) bool array (a transposed view of a column-major buffer, like upstream).
  """
  h, w = rle["size"]
  counts = np.asarray(rle["counts"], dtype=np.int64)
  parity = (np.arange(counts.size) % 2).astype(bool)
  flat = np.repeat(parity, counts)
  return flat.reshape(w, h).transpose()


def area_from_rle(rle: Dict[str, Any]) -> int:
  """Foreground pixel count of an uncompressed RLE (sum of the odd runs)."""
  return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
  """Compresses an uncompressed RLE with pycocotools; counts becomes a str for JSON."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel

  h, w = uncompressed_rle["size"]
  rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
  rle["counts"] = rle["counts"].decode("utf-8")
  return rle


def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: str) -> Tuple[np.ndarray, bool]:
  """Fills small holes or removes small islands (8-connectivity), as upstream.

  Args:
    mask: (H, W) bool mask.
    area_thresh: components with fewer pixels than this are small.
    mode: "holes" (fill small background components) or "islands" (drop small
      foreground components; if all are small the largest one is kept).

  Returns:
    (mask, changed). `changed` is True whenever some component was small, even if
    the "keep the largest" fallback leaves the pixels identical (upstream quirk
    that lowers the mask's score in `postprocess_small_regions`). When unchanged
    the input object itself is returned.
  """
  import cv2  # pylint: disable=import-outside-toplevel

  assert mode in ("holes", "islands"), mode
  correct_holes = mode == "holes"
  working = (correct_holes ^ mask).astype(np.uint8)
  n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
  sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the working mask's background
  small = sizes < area_thresh
  if not small.any():
    return mask, False
  # A per-label lookup table replaces upstream's np.isin over label lists.
  if correct_holes:
    # Label 0 of the inverted mask is the original foreground; add the small holes.
    fill = np.concatenate(([True], small))
  else:
    fill = np.concatenate(([False], ~small))
    if not fill.any():
      fill[int(np.argmax(sizes)) + 1] = True
  assert fill.shape[0] == n_labels
  return fill[regions], True


# ----------------------------------------------------------------------------------
# Host side: NumPy twins of the device functions (used on already-host data, e.g.
# in `postprocess_small_regions`).
# ----------------------------------------------------------------------------------


def calculate_stability_score_np(mask_logits: np.ndarray, mask_threshold: float,
                                 threshold_offset: float) -> np.ndarray:
  """NumPy `calculate_stability_score` over the last two axes.

  Args:
    mask_logits: (..., H, W) float32 logits.
    mask_threshold: binarisation threshold (0.0 for SAM).
    threshold_offset: shift applied up (intersection) and down (union).

  Returns:
    (...,) float32 IoU of the two binarisations; NaN where the union is empty.
  """
  logits = np.asarray(mask_logits)
  # Thresholds are summed as Python floats, then compared in the logits' dtype (NumPy
  # weak scalars), exactly as torch does.
  hi = mask_threshold + threshold_offset
  lo = mask_threshold - threshold_offset
  inter = np.count_nonzero(logits > hi, axis=(-2, -1)).astype(np.int32)
  union = np.count_nonzero(logits > lo, axis=(-2, -1)).astype(np.int32)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.asarray(inter.astype(np.float32) / union.astype(np.float32), np.float32)


def batched_mask_to_box_np(masks: np.ndarray) -> np.ndarray:
  """NumPy `batched_mask_to_box`: XYXY boxes with inclusive max coordinates.

  Args:
    masks: (..., H, W) bool masks.

  Returns:
    (..., 4) int64 [x0, y0, x1, y1]; [0, 0, 0, 0] for empty masks. Upstream returns
    float32 zeros when the input has no elements at all; here it is always int64.
  """
  masks = np.asarray(masks).astype(bool, copy=False)
  h, w = masks.shape[-2:]
  if masks.size == 0:
    return np.zeros(masks.shape[:-2] + (4,), np.int64)
  in_h = masks.any(axis=-1)
  in_w = masks.any(axis=-2)
  ys = np.arange(h, dtype=np.int64)
  xs = np.arange(w, dtype=np.int64)
  bottom = np.where(in_h, ys, 0).max(axis=-1)
  top = np.where(in_h, ys, h).min(axis=-1)
  right = np.where(in_w, xs, 0).max(axis=-1)
  left = np.where(in_w, xs, w).min(axis=-1)
  empty = (right < left) | (bottom < top)
  out = np.stack([left, top, right, bottom], axis=-1)
  return out * ~empty[..., None]


# ----------------------------------------------------------------------------------
# Device side (jax.numpy, jit-able).
# ----------------------------------------------------------------------------------


def calculate_stability_score(mask_logits: jax.Array, mask_threshold: float,
                              threshold_offset: float) -> jax.Array:
  """Stability score: IoU of the masks thresholded at thr + offset and thr - offset.

  Since the high-threshold mask is contained in the low-threshold one, the IoU is a
  ratio of pixel counts.

  Args:
    mask_logits: (..., H, W) float logits.
    mask_threshold: binarisation threshold (0.0 for SAM).
    threshold_offset: shift of the threshold (1.0 by default in the generator).

  Returns:
    (...,) float32 scores; NaN where both counts are zero (0 / 0 as upstream), which
    fails any `>=` filter.
  """
  # Python floats are added in double precision first, like upstream, then compared
  # as weak scalars in the logits' dtype.
  hi = mask_threshold + threshold_offset
  lo = mask_threshold - threshold_offset
  inter = jnp.sum(mask_logits > hi, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(mask_logits > lo, axis=(-2, -1), dtype=jnp.int32)
  return inter.astype(jnp.float32) / union.astype(jnp.float32)


def batched_mask_to_box(masks: jax.Array) -> jax.Array:
  """XYXY boxes around masks, with inclusive max coordinates.

  Args:
    masks: (..., H, W) masks; nonzero is foreground.

  Returns:
    (..., 4) int32 [x0, y0, x1, y1]; [0, 0, 0, 0] for empty masks.
  """
  masks = masks.astype(bool)
  h, w = masks.shape[-2:]
  if h == 0 or w == 0:
    return jnp.zeros(masks.shape[:-2] + (4,), jnp.int32)
  in_h = jnp.any(masks, axis=-1)  # (..., H): rows that contain foreground
  in_w = jnp.any(masks, axis=-2)  # (..., W): columns that contain foreground
  return boxes_from_row_col_flags(in_h, in_w)


def boxes_from_row_col_flags(in_h: jax.Array, in_w: jax.Array) -> jax.Array:
  """XYXY int32 boxes from per-row (..., H) and per-column (..., W) foreground flags.

  Rows without foreground count as 0 for the max and as H (past the end) for the
  min, so an empty mask ends up with bottom < top and is zeroed, as the reference.
  """
  h, w = in_h.shape[-1], in_w.shape[-1]
  ys = jnp.arange(h, dtype=jnp.int32)
  xs = jnp.arange(w, dtype=jnp.int32)
  bottom = jnp.max(jnp.where(in_h, ys, 0), axis=-1)
  top = jnp.min(jnp.where(in_h, ys, h), axis=-1)
  right = jnp.max(jnp.where(in_w, xs, 0), axis=-1)
  left = jnp.min(jnp.where(in_w, xs, w), axis=-1)
  empty = (right < left) | (bottom < top)
  out = jnp.stack([left, top, right, bottom], axis=-1)
  return jnp.where(empty[..., None], 0, out)


def uncrop_boxes_xyxy(boxes: jax.Array, crop_box: ArrayLike) -> jax.Array:
  """Shifts (..., 4) XYXY boxes from crop to image coordinates (keeps boxes' dtype).

  Args:
    boxes: (..., 4) boxes in the crop frame.
    crop_box: [x0, y0, x1, y1] of the crop (list or array, may be traced).
  """
  crop = jnp.asarray(crop_box)
  offset = jnp.stack([crop[0], crop[1], crop[0], crop[1]]).astype(boxes.dtype)
  return boxes + offset


def uncrop_points(points: jax.Array, crop_box: ArrayLike) -> jax.Array:
  """Shifts (..., 2) XY points from crop to image coordinates (keeps points' dtype).

  Upstream points are float64 on the host; with JAX's default float32 prefer doing
  this on the host when exact float64 `point_coords` are needed.
  """
  crop = jnp.asarray(crop_box)
  return points + crop[:2].astype(points.dtype)


def uncrop_masks(masks: jax.Array, crop_box: ArrayLike, orig_h: int,
                 orig_w: int) -> jax.Array:
  """Zero-pads (..., h, w) crop masks into the (..., orig_h, orig_w) image frame.

  Args:
    masks: (..., h, w) masks with h = y1 - y0 and w = x1 - x0.
    crop_box: [x0, y0, x1, y1]; may be traced (one compilation serves all crops of
      the same size).
    orig_h, orig_w: static image size.
  """
  if masks.shape[-2:] == (orig_h, orig_w):
    return masks  # the full-image crop
  crop = jnp.asarray(crop_box).astype(jnp.int32)
  canvas = jnp.zeros(masks.shape[:-2] + (orig_h, orig_w), masks.dtype)
  zeros = (jnp.int32(0),) * (masks.ndim - 2)
  return lax.dynamic_update_slice(canvas, masks, zeros + (crop[1], crop[0]))


def is_box_near_crop_edge(boxes: jax.Array, crop_box: ArrayLike, orig_box: ArrayLike,
                          atol: float = 20.0) -> jax.Array:
  """Flags boxes touching a crop edge that is not also an image edge.

  Args:
    boxes: (..., 4) XYXY boxes in crop coordinates.
    crop_box: [x0, y0, x1, y1] of the crop in image coordinates.
    orig_box: [0, 0, W, H] of the original image.
    atol: distance (inclusive) that counts as touching.

  Returns:
    (...,) bool; True means the box should be discarded.
  """
  crop = jnp.asarray(crop_box).astype(jnp.float32)
  orig = jnp.asarray(orig_box).astype(jnp.float32)
  b = uncrop_boxes_xyxy(boxes, crop_box).astype(jnp.float32)
  # torch.isclose(a, b, atol, rtol=0) is |a - b| <= atol.
  near_crop = jnp.abs(b - crop) <= atol
  near_image = jnp.abs(b - orig) <= atol
  return jnp.any(near_crop & ~near_image, axis=-1)


def _strict_threshold_f32(thr: float) -> np.float32:
  """float32 t such that `x > t` equals `x > thr` (double) for every float32 x.

  torchvision compares its float32 IoU with the double threshold; when float32(thr)
  rounds up (e.g. 0.1), a plain float32 comparison would disagree on IoU == t.
  """
  t = np.float32(thr)
  if float(t) > thr:
    t = np.nextafter(t, np.float32(-np.inf))
  return t


def pairwise_box_iou(boxes: jax.Array, others: Optional[jax.Array] = None) -> jax.Array:
  """(N, M) IoU of XYXY boxes (against `others`, default themselves), torchvision's
  float32 formula.

  area = (x1 - x0) * (y1 - y0) (no +1), inter = max(0, w) * max(0, h),
  iou = inter / ((area_i + area_j) - inter). Degenerate pairs give NaN (0 / 0).
  Every entry is computed by the same elementwise float32 operations, so a row computed
  alone equals that row of the full matrix bit for bit.
  """
  boxes = boxes.astype(jnp.float32)
  others = boxes if others is None else others.astype(jnp.float32)
  x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
  u0, v0, u1, v1 = (others[:, k] for k in range(4))
  area = (x1 - x0) * (y1 - y0)
  area_o = (u1 - u0) * (v1 - v0)
  w = jnp.maximum(0.0, jnp.minimum(x1[:, None], u1[None, :])
                  - jnp.maximum(x0[:, None], u0[None, :]))
  h = jnp.maximum(0.0, jnp.minimum(y1[:, None], v1[None, :])
                  - jnp.maximum(y0[:, None], v0[None, :]))
  inter = w * h
  return inter / ((area[:, None] + area_o[None, :]) - inter)


#: Above this many boxes `box_nms` computes each kept box's IoU row when it is needed
#: instead of the whole (N, N) matrix up front: memory O(N) instead of N^2 (4096 boxes
#: -> 16 MiB of bool overlaps; 100,000 -> 10 GB), work O(kept * N) instead of O(N^2).
NMS_DENSE_MAX = 4096


def box_nms(boxes: jax.Array, scores: jax.Array, iou_threshold: Union[float, jax.Array],
            valid_mask: Optional[jax.Array] = None,
            max_keep: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """Greedy NMS with static shapes, equal to `batched_nms` with one category.

  Boxes are visited by descending score, ties by ascending index (torchvision's CPU
  kernel uses a stable sort); each visited, unsuppressed box is kept and suppresses
  every later box whose IoU with it is > iou_threshold.

  Args:
    boxes: (N, 4) XYXY boxes (cast to float32, like `boxes.float()` upstream).
    scores: (N,) scores, assumed not NaN.
    iou_threshold: suppression threshold. Pass a Python float (static) for exact
      torchvision semantics (float32 IoU compared against a double threshold); a
      traced value is compared in float32.
    valid_mask: optional (N,) bool; invalid entries (padding) are never kept and
      never suppress anything.
    max_keep: optional static cap; stops after this many boxes are kept (the same as
      truncating torchvision's output).

  Returns:
    keep: (N,) bool, True for kept boxes (in the input indexing).
    order: (N,) int32 permutation; its first `keep.sum()` entries are the kept
      indices in torchvision's output order (descending score), followed by the
      remaining indices in visiting order (invalid ones last).
  """
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((0,), bool), jnp.zeros((0,), jnp.int32)
  scores = scores.astype(jnp.float32)
  valid = jnp.ones((n,), bool) if valid_mask is None else valid_mask.astype(bool)
  iota = jnp.arange(n, dtype=jnp.int32)
  # lax.sort orders floats totally (-0.0 < +0.0) while torch treats them as equal,
  # so canonicalise zeros before negating for a descending sort.
  neg_scores = jnp.where(scores == 0, 0.0, -scores)
  # Lexicographic keys: valid first, then descending score, then ascending index
  # (the unique index key makes the result deterministic, i.e. a stable sort).
  _, _, visit = lax.sort(((~valid).astype(jnp.int32), neg_scores, iota), num_keys=3)
  valid_sorted = valid[visit]

  sorted_boxes = boxes[visit]
  if isinstance(iou_threshold, (float, int, np.floating, np.integer)):
    thr = _strict_threshold_f32(float(iou_threshold))
  else:
    thr = jnp.asarray(iou_threshold, jnp.float32)
  if n <= NMS_DENSE_MAX:
    overlaps = pairwise_box_iou(sorted_boxes) > thr
    overlap_row = lambda i: overlaps[i]
  else:
    overlap_row = lambda i: pairwise_box_iou(
        lax.dynamic_slice_in_dim(sorted_boxes, i, 1), sorted_boxes)[0] > thr

  limit = n if max_keep is None else int(max_keep)

  def cond(state):
    alive, _, count = state
    return jnp.any(alive) & (count < limit)

  def body(state):
    alive, kept, count = state
    # Every earlier position is already kept or suppressed, so the first alive box
    # is the next one the sequential kernel would keep.
    i = jnp.argmax(alive)
    kept = kept.at[i].set(True)
    # Clear i explicitly: a zero-area box has NaN self-IoU and would not clear itself.
    alive = (alive & ~overlap_row(i)).at[i].set(False)
    return alive, kept, count + 1

  _, kept_sorted, _ = lax.while_loop(
      cond, body, (valid_sorted, jnp.zeros((n,), bool), jnp.int32(0)))

  keep = jnp.zeros((n,), bool).at[visit].set(kept_sorted)
  # Stable partition of the visiting order: kept boxes first.
  _, part = lax.sort(((~kept_sorted).astype(jnp.int32), iota), num_keys=2)
  return keep, visit[part]


def nms_kept_indices(keep: jax.Array, order: jax.Array) -> np.ndarray:
  """Host helper: the kept indices in torchvision's output order, as int64 NumPy.

  Args:
    keep, order: outputs of `box_nms`.
  """
  keep = np.asarray(keep)
  return np.asarray(order)[:int(keep.sum())].astype(np.int64)
