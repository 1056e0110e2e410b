"""Automatic mask generation: the official `SamAutomaticMaskGenerator`, compiled.

`AutomaticMaskGenerator` prompts SAM with a grid of points (optionally again on
overlapping image crops), filters the masks by predicted IoU, stability and crop
edges, removes duplicates with box NMS and returns SA-1B style records. Options,
outputs and their order follow `segment_anything.SamAutomaticMaskGenerator`; the
formulas (thresholds, tie-breaking, integer/float quirks) are those of
`segment_anything/automatic_mask_generator.py` and `utils/amg.py`.

Device design (per group of crops that share shapes):

* `_encode_sharded`: the crop images of several images, padded to a multiple of the
  device count, are embedded in one call, data-parallel over a 1-D `Mesh` (params
  replicated once per generator).
* `_crop_stats` (compiled once per (point batches, crop-size bucket, crops per
  device)): for every local crop, decodes all point batches (`lax.map`), then for
  the masks that pass the predicted-IoU filter only computes, chunk by chunk, the
  full-resolution logits, their stability score and box, applies the stability and
  crop-edge filters and runs the greedy box NMS. Full-resolution logits never exist
  for more than one chunk of masks at a time. It returns per-mask scalars and the
  NMS order; the low-resolution logits stay on the device.
* `_crop_masks` (compiled once per (point batches, crop-size bucket, crops per
  device)): upsamples a fixed-size chunk of survivors to full resolution and
  returns them transposed (column-major image order, what RLE reads) as bits
  packed 8 to a byte on accelerators, plain bools on CPU.

Per dispatched group of crops there are two host round trips (scalars, then masks),
independent of the number of point batches; groups are pipelined so that the host's
work on one group (unpacking, records, encoding) overlaps the next group's device
work.

Full-resolution logits: the official code upsamples the low-resolution logits to the
model frame (`image_size` square), crops the resized image's extent and resizes to
the crop size, both bilinear without antialiasing. Per axis that is a fixed linear
map with at most three taps per output pixel, which we compose on the host (float64,
from PyTorch's exact weights) into one matrix per axis and cut into blocks of rows
that each read a narrow window of the low-res axis (`_banded_operator`): two small
matmuls per block give the logits at any crop size from data operators, so shapes
stay bucketed, with 4-6x fewer flops than dense operators. Numerically this equals
the official two-step resize up to float32 rounding (the same order as the rest of
the model's differences to PyTorch).

Measured parity (tests/test_automatic.py, tiny models): the same masks in the same
order as the official generator, with predicted IoUs within ~1e-6; with the trained
tiny checkpoint and with a synthetic decoder the masks are pixel-identical; with the
randomized decoder ~2% of masks differ by single pixels whose logits lie within
float32 noise of 0 (stability scores within ~4e-5).

Known divergence: above 1000 boxes torchvision's `batched_nms` (CPU) switches to
an algorithm that re-sorts kept boxes with an unstable sort, so the official order
of exactly tied scores is then arbitrary. Within a crop scores are continuous, but
the cross-crop and small-region NMS scores tie massively: with more than 1000 masks
entering those, the official order within ties may differ from ours (always index
order, as torchvision's exact path); the kept masks are the same.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from samjax import amg_utils
from samjax.config import SamConfig
from samjax.functional import decode_masks, encode_image
from samjax.mesh import DATA_AXIS, data_mesh, replicate, shard_batch
from samjax.modeling import MASK_THRESHOLD
from samjax.resize import interp_matrix
from samjax.transforms import ResizeLongestSide

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

#: Survivors upsampled per `_crop_masks` call (one compilation serves any count).
SURVIVOR_CHUNK = 32
#: Full-resolution logits materialised at once, in float32 elements. On CPU, small
#: chunks that stay in cache measured ~2-4x faster than large ones.
_STATS_BUDGET = {"cpu": 1 << 19}
_STATS_BUDGET_DEFAULT = 1 << 26


# ----------------------------------------------------------------------------------
# Shapes and host-side operators.
# ----------------------------------------------------------------------------------


def size_bucket(n: int) -> int:
  """Padded length for a crop side of `n` pixels (compilation bucket).

  Four buckets per octave (multiples of 2**(ceil(log2 n) - 3)), at least 64, so
  padding wastes at most 25% per side and images of similar sizes share compiled
  functions. Always a multiple of 8 (the masks are bit-packed along it).
  """
  n = int(n)
  if n <= 64:
    return 64
  step = 1 << (math.ceil(math.log2(n)) - 3)
  return -(-n // step) * step


def _pow2_ceil(n: int) -> int:
  b = 1
  while b < n:
    b *= 2
  return b


@functools.lru_cache(maxsize=1024)
def _axis_operator(out_len: int, resized_len: int, padded_len: int, model_size: int,
                   low_res_len: int) -> np.ndarray:
  """Low-res logits -> crop pixels along one axis, as the official postprocessing.

  The official `postprocess_masks` upsamples low_res -> model_size, keeps the first
  `resized_len` entries (the un-padded resized crop) and resizes those to `out_len`,
  both with PyTorch's bilinear weights. Both steps are linear, so they compose into
  one matrix; rows past `out_len` are zero (padding of the compilation bucket).

  Returns:
    (padded_len, low_res_len) float32.
  """
  up = interp_matrix(low_res_len, model_size).astype(np.float64)[:resized_len]
  down = interp_matrix(resized_len, out_len).astype(np.float64)
  op = np.zeros((padded_len, low_res_len), np.float32)
  op[:out_len] = down @ up
  op.setflags(write=False)
  return op


def _bucket_step(bucket: int) -> int:
  """Granularity of `size_bucket` around `bucket` (also the operator block size)."""
  return 1 << max(math.ceil(math.log2(bucket)) - 3, 0)


def band_width(bucket_h: int, bucket_w: int, block: int, low_res_len: int) -> int:
  """Static bound on the low-res window that one block of output rows/cols reads.

  Along an axis, output pixel i reads low-res indices near (i + 0.5) * L / long_side
  (long_side = the crop's longer side, which the buckets bound from below), at most
  3 taps wide; a block of `block` pixels spans ceil(block * L / long_side) + 3
  indices, plus one for rounding.
  """
  # The smallest side that maps to each bucket (every side <= 64 maps to 64).
  lo = max(1 if b <= 64 else b - _bucket_step(b) + 1 for b in (bucket_h, bucket_w))
  return min(low_res_len, -(-block * low_res_len // lo) + 4)


@functools.lru_cache(maxsize=1024)
def _banded_operator(out_len: int, resized_len: int, padded_len: int, model_size: int,
                     low_res_len: int, block: int, band: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """`_axis_operator` cut into blocks of `block` outputs, each with its input window.

  Returns:
    starts: (padded_len // block,) int32 first low-res index of each block's window.
    blocks: (padded_len // block, block, band) float32 operator entries on it.
  """
  op = _axis_operator(out_len, resized_len, padded_len, model_size, low_res_len)
  n_blocks = padded_len // block
  starts = np.zeros((n_blocks,), np.int32)
  blocks = np.zeros((n_blocks, block, band), np.float32)
  for b in range(n_blocks):
    rows = op[b * block:(b + 1) * block]
    nz = np.flatnonzero(rows.any(axis=0))
    start = min(int(nz[0]), low_res_len - band) if nz.size else 0
    if nz.size and nz[-1] >= start + band:  # `band_width` is a proven bound
      raise AssertionError(f"band {band} too narrow for block {b} of {out_len}/{padded_len}")
    starts[b] = start
    blocks[b] = rows[:, start:start + band]
  starts.setflags(write=False)
  blocks.setflags(write=False)
  return starts, blocks


def model_frame_points(points: np.ndarray, model_size: int) -> np.ndarray:
  """float64 input-frame points -> float32 points that embed exactly as upstream.

  Upstream hands float64 points to the prompt encoder, which computes
  (p + 0.5) / image_size in float64 and only then rounds to float32. samjax's prompt
  encoder takes float32 pixels and computes (p + 0.5) * (1 / image_size) in float32.
  For a power-of-two image_size we choose the float32 p whose float32 result equals
  upstream's normalised coordinate bit for bit (the subtraction and the power-of-two
  scalings below are exact in float32).
  """
  points = np.asarray(points, np.float64)
  s = int(model_size)
  if s & (s - 1):
    return points.astype(np.float32)
  normalised = ((points + 0.5) / s).astype(np.float32)
  return (normalised.astype(np.float64) * s - 0.5).astype(np.float32)


# ----------------------------------------------------------------------------------
# Device functions.
# ----------------------------------------------------------------------------------


def sam_decode(params, embeddings, points, labels, config: SamConfig, dtype):
  """Default decoder: SAM's prompt encoder + mask decoder, three masks per point.

  Args:
    params: SAM params.
    embeddings: (1, e, e, C) embedding of one crop.
    points: (B, 1, 2) float32 points in the model's input frame.
    labels: (B, 1) int32 labels (all 1).
    config, dtype: static model config and compute dtype.

  Returns:
    low-res logits (B, 3, 4e, 4e) float32 and predicted IoUs (B, 3) float32.
  """
  return decode_masks(params, embeddings, points, labels, config=config,
                      multimask_output=True, dtype=dtype)


def _upsample_blocks(low_res: jax.Array, rows, cols) -> List[jax.Array]:
  """(m, L, L) low-res logits -> crop-resolution logits as column blocks.

  Args:
    low_res: (m, L, L) logits.
    rows, cols: `_banded_operator` (starts, blocks) pairs for the two axes.

  Returns:
    list of (m, Hb, block_w) logits, left to right; padding rows/cols are 0.0.
  """
  hi = lax.Precision.HIGHEST  # no TF32/bf16 passes: thresholds need fp32 values
  (r_starts, r_blocks), (c_starts, c_blocks) = rows, cols
  band_h, band_w = r_blocks.shape[-1], c_blocks.shape[-1]
  t = jnp.concatenate([
      jnp.einsum("ia,mab->mib", r_blocks[r],
                 lax.dynamic_slice_in_dim(low_res, r_starts[r], band_h, axis=1),
                 precision=hi)
      for r in range(r_blocks.shape[0])], axis=1)
  return [jnp.einsum("mib,jb->mij",
                     lax.dynamic_slice_in_dim(t, c_starts[c], band_w, axis=2), c_blocks[c],
                     precision=hi)
          for c in range(c_blocks.shape[0])]


def _box_from_any(in_h: jax.Array, in_w: jax.Array) -> jax.Array:
  """`batched_mask_to_box` from per-row (m, H) and per-column (m, W) foreground flags."""
  return amg_utils.boxes_from_row_col_flags(in_h, in_w)


def _crop_stats(params, emb, points, point_valid, rows, cols, crop_box, orig_box, n_pad,
                thr, flags, *, config, dtype, decode_fn, mask_chunk):
  """Everything `_process_crop` decides, for one crop, at static shapes.

  Args:
    params: SAM params.
    emb: (e, e, C) crop embedding.
    points: (NB, ppb, 2) float32 model-frame points; batch b holds upstream's b-th
      `batch_iterator` batch.
    point_valid: (NB, ppb) bool, False for padding slots.
    rows, cols: `_banded_operator` (starts, blocks) of this crop's two axes.
    crop_box: (4,) int32 XYXY crop in the image; orig_box: (4,) int32 [0, 0, W, H].
    n_pad: () int32 number of padding pixels Hb * Wb - h * w.
    thr: (6,) float32 [iou, stability, hi, lo, nms, unused] thresholds.
    flags: (2,) bool [iou filter on, stability filter on].

  Returns:
    dict with low_res (N, L, L), iou (N,), stability (N,), boxes (N, 4) int32 (crop
    frame), order (N,) int32 (NMS output order first), n_keep (), batch_pass (NB,)
    int32 masks that passed the IoU and stability filters per point batch. N is
    NB * ppb * 3, mask m belongs to point m // 3 (upstream's flattening).
  """
  nb, ppb = points.shape[:2]
  labels = jnp.ones((ppb, 1), jnp.int32)

  def decode(p):
    return decode_fn(params, emb[None], p[:, None, :], labels, config, dtype)
  low_res, iou = lax.map(decode, points)
  n_per_point = low_res.shape[2]
  lr = low_res.shape[-1]
  low_res = low_res.reshape(-1, lr, lr).astype(jnp.float32)
  iou = iou.reshape(-1).astype(jnp.float32)
  n = iou.shape[0]
  valid = jnp.repeat(point_valid.reshape(-1), n_per_point)
  # Upstream compares float32 scores with Python floats in float32 (`thr` holds
  # the float32-rounded thresholds), filtering only when the threshold is > 0.
  cand = valid & jnp.where(flags[0], iou > thr[0], True)

  # Stability and boxes for the IoU survivors only: candidates first (stable, so
  # chunks follow mask order), then a loop whose trip count is the candidate count.
  perm = jnp.argsort(~cand, stable=True).astype(jnp.int32)
  n_cand = jnp.sum(cand, dtype=jnp.int32)
  mc = min(mask_chunk, n)

  def body(state):
    c, hi_cnt, lo_cnt, boxes = state
    start = jnp.minimum(c * mc, n - mc)
    idx = lax.dynamic_slice(perm, (start,), (mc,))
    blocks = _upsample_blocks(low_res[idx], rows, cols)
    count = lambda t: sum(jnp.sum(v > t, axis=(1, 2), dtype=jnp.int32) for v in blocks)
    positive = [v > MASK_THRESHOLD for v in blocks]
    in_h = functools.reduce(jnp.logical_or, [jnp.any(p, axis=2) for p in positive])
    in_w = jnp.concatenate([jnp.any(p, axis=1) for p in positive], axis=1)
    hi_cnt = hi_cnt.at[idx].set(count(thr[2]))
    lo_cnt = lo_cnt.at[idx].set(count(thr[3]))
    boxes = boxes.at[idx].set(_box_from_any(in_h, in_w))
    return c + 1, hi_cnt, lo_cnt, boxes

  zeros = jnp.zeros((n,), jnp.int32)
  _, hi_cnt, lo_cnt, boxes = lax.while_loop(
      lambda s: s[0] * mc < n_cand, body,
      (jnp.int32(0), zeros, zeros, jnp.zeros((n, 4), jnp.int32)))
  # Padding pixels are exactly 0.0: they were counted wherever 0 > threshold.
  hi_cnt = hi_cnt - jnp.where(0.0 > thr[2], n_pad, 0)
  lo_cnt = lo_cnt - jnp.where(0.0 > thr[3], n_pad, 0)
  stability = hi_cnt.astype(jnp.float32) / lo_cnt.astype(jnp.float32)
  passed = cand & jnp.where(flags[1], stability >= thr[1], True)
  near_edge = amg_utils.is_box_near_crop_edge(boxes, crop_box, orig_box)
  keep = passed & ~near_edge
  kept, order = amg_utils.box_nms(boxes, iou, thr[4], valid_mask=keep)
  return {
      "low_res": low_res, "iou": iou, "stability": stability, "boxes": boxes,
      "order": order, "n_keep": jnp.sum(kept, dtype=jnp.int32),
      "batch_pass": jnp.sum(passed.reshape(nb, -1), axis=1, dtype=jnp.int32),
  }


@functools.partial(jax.jit, static_argnames=("mesh", "config", "dtype", "decode_fn",
                                             "mask_chunk"))
def _crop_stats_sharded(params, emb, points, point_valid, rows, cols, crop_box, orig_box,
                        n_pad, thr, flags, *, mesh, config, dtype, decode_fn, mask_chunk):
  """`_crop_stats` for a (B, ...) batch of crops split over `mesh` (B % devices == 0)."""
  def local(params, *xs):
    fn = functools.partial(_crop_stats, params, thr=thr, flags=flags, config=config,
                           dtype=dtype, decode_fn=decode_fn, mask_chunk=mask_chunk)
    # Crops of one device run one after the other, which bounds peak memory.
    return lax.map(lambda args: fn(*args), xs)
  batch = P(DATA_AXIS)
  f = jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (batch,) * 8, out_specs=batch,
                    check_vma=False)
  return f(params, emb, points, point_valid, rows, cols, crop_box, orig_box, n_pad)


@functools.partial(jax.jit, static_argnames=("mesh", "pack", "mask_chunk"))
def _crop_masks_sharded(low_res, idx, rows, cols, *, mesh, pack, mask_chunk):
  """Survivor masks: (B, N, L, L), idx (B, C) -> (B, C, Wb, Hb) bool.

  Masks come transposed (column-major image order) so that the host's RLE, which
  runs over columns, reads each mask contiguously; computing the transposed product
  directly (operators swapped on the transposed low-res input) avoids transposing
  full-resolution arrays. With `pack` the last axis is bit-packed ((B, C, Wb, Hb / 8)
  uint8), which cuts the device-to-host transfer by 8 on accelerators.
  """
  def one(args):
    lr, i, r, c = args
    lr = jnp.swapaxes(lr[i], 1, 2)
    mc = math.gcd(mask_chunk, lr.shape[0])  # a power of two that divides the chunk

    def sub(x):
      positive = jnp.concatenate(_upsample_blocks(x, c, r), axis=2) > MASK_THRESHOLD
      return jnp.packbits(positive, axis=-1) if pack else positive
    out = lax.map(sub, lr.reshape(-1, mc, *lr.shape[1:]))
    return out.reshape(-1, *out.shape[2:])

  def local(*xs):
    return lax.map(one, xs)
  batch = P(DATA_AXIS)
  f = jax.shard_map(local, mesh=mesh, in_specs=(batch,) * 4, out_specs=batch,
                    check_vma=False)
  return f(low_res, idx, rows, cols)


@functools.partial(jax.jit, static_argnames=("mesh", "config", "dtype"))
def _encode_sharded(params, images, valid_hw, *, mesh, config, dtype):
  """Embeddings of (B, S, S, 3) padded crops, data-parallel over `mesh`."""
  def local(params, images, valid_hw):
    return encode_image(params, images, config, dtype, valid_hw=valid_hw)
  batch = P(DATA_AXIS)
  f = jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch), out_specs=batch,
                    check_vma=False)
  return f(params, images, valid_hw)


def compiled_functions() -> Dict[str, Any]:
  """The jitted kernels, e.g. to count compilations with `f._cache_size()`."""
  return {"encode": _encode_sharded, "crop_stats": _crop_stats_sharded,
          "crop_masks": _crop_masks_sharded}


# ----------------------------------------------------------------------------------
# Host-side helpers.
# ----------------------------------------------------------------------------------


def nms_host(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """`torchvision.ops.batched_nms` with one category, in NumPy (small inputs).

  Visits boxes by descending score with ties in index order (torchvision's stable
  sort), keeps each unsuppressed box and suppresses later boxes whose float32 IoU
  is > iou_threshold (compared in float64, as the C++ kernel does).

  Args:
    boxes: (n, 4) XYXY boxes (cast to float32).
    scores: (n,) scores (cast to float32).
    iou_threshold: Python float.

  Returns:
    int64 kept indices in output order (descending score).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  n = boxes.shape[0]
  if n == 0:
    return np.zeros((0,), np.int64)
  # -0.0 and 0.0 are equal to torch's sort; make them equal to NumPy's too.
  order = np.argsort(np.where(scores == 0, np.float32(0), -scores), kind="stable")
  x0, y0, x1, y1 = boxes.T
  areas = (x1 - x0) * (y1 - y0)
  suppressed = np.zeros(n, bool)
  keep = []
  zero = np.float32(0)
  with np.errstate(divide="ignore", invalid="ignore"):
    for pos, i in enumerate(order):
      if suppressed[i]:
        continue
      keep.append(i)
      rest = order[pos + 1:]
      rest = rest[~suppressed[rest]]
      if rest.size == 0:
        break
      w = np.maximum(zero, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
      h = np.maximum(zero, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
      inter = w * h
      iou = inter / ((areas[i] + areas[rest]) - inter)
      suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True
  return np.asarray(keep, np.int64)


def _mask_box(mask: np.ndarray) -> np.ndarray:
  """XYXY box (inclusive max) of one (H, W) mask as int64; zeros when empty."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return np.zeros(4, np.int64)
  cols = np.flatnonzero(mask.any(axis=0))
  return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def _check_image(image: Any, where: str) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    if type(image).__module__.split(".")[0] == "torch":
      image = image.detach().cpu().numpy()
    elif hasattr(image, "__array__"):
      image = np.asarray(image)
    else:
      raise ValueError(f"{where}: expected an HxWx3 uint8 numpy image, got "
                       f"{type(image).__name__}")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{where}: expected an HxWx3 uint8 RGB image, got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: expected a uint8 image (0..255), got dtype {image.dtype}; "
                     "convert with (img * 255).astype(np.uint8) if it is 0..1 floats")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{where}: empty image of shape {image.shape}")
  return image


class _Crop:
  """One crop of one image: host inputs for the device and its results."""

  def __init__(self, image_index: int, crop_index: int, box: List[int], layer: int,
               image: np.ndarray, grid: np.ndarray, transform: ResizeLongestSide):
    self.image_index = image_index
    self.crop_index = crop_index
    self.box = box
    self.layer = layer
    x0, y0, x1, y1 = box
    self.image_hw = image.shape[:2]
    self.hw = (y1 - y0, x1 - x0)
    self.resized = transform.apply_image(image[y0:y1, x0:x1, :])
    self.resized_hw = self.resized.shape[:2]
    # Upstream: grid * [[crop_w, crop_h]] in float64, then ResizeLongestSide coords.
    self.points = grid * np.array(self.hw)[None, ::-1]
    self.input_points = transform.apply_coords(self.points, self.hw)
    self.bucket = (size_bucket(self.hw[0]), size_bucket(self.hw[1]))
    self.result: Optional[Dict[str, Any]] = None


# ----------------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------------


class AutomaticMaskGenerator:
  """SAM automatic mask generation with the official options and outputs.

  Args:
    model: a `Predictor`, a `SamModel`, or a checkpoint path (Orbax dir or official
      .pth). None with `checkpoint` or a `use_default_sam_*` flag, else ViT-H.
    points_per_side: points along each side of the grid (points_per_side**2 prompts
      for the full image); exclusive with `point_grids`.
    points_per_batch: prompts decoded together. As upstream this also defines the
      batches whose emptiness decides the type quirk of `bbox` (see `generate`).
    pred_iou_thresh: keep masks whose predicted IoU is > this (only if > 0).
    stability_score_thresh: keep masks whose stability score is >= this (only if > 0).
    stability_score_offset: logit offset of the stability score's two thresholds.
    box_nms_thresh: box IoU above which NMS drops a mask within a crop.
    crop_n_layers: extra crop layers; layer i has (2**i)**2 crops.
    crop_nms_thresh: box IoU for NMS between crops (smaller crops preferred).
    crop_overlap_ratio: overlap of layer-1 crops as a fraction of the short side.
    crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
    point_grids: explicit per-layer (n, 2) grids in [0, 1] (x, y).
    min_mask_region_area: if > 0, fill holes and remove islands smaller than this
      many pixels (OpenCV), then NMS again.
    output_mode: "binary_mask" (bool HxW), "uncompressed_rle" or "coco_rle".
    checkpoint: checkpoint path (alternative to `model`).
    dtype: compute dtype (jnp.float32 or jnp.bfloat16).
    use_default_sam_h/l/b: official weights (downloaded once) when no model is given.
    device: one JAX device (or platform name such as "cpu", "gpu") to run on.
    devices: JAX devices to split work over (default: all local devices).
  """

  def __init__(self, model=None, points_per_side: Optional[int] = 32,
               points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
               stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
               box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[List[np.ndarray]] = None,
               min_mask_region_area: int = 0, output_mode: str = "binary_mask", *,
               checkpoint=None, dtype=jnp.float32, use_default_sam_h: bool = False,
               use_default_sam_l: bool = False, use_default_sam_b: bool = False,
               device=None, devices=None):
    from samjax.predictor import Predictor, load_model  # pylint: disable=import-outside-toplevel

    def integer(name, value, minimum):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
      if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
      return int(value)

    def real(name, value, lo=-math.inf, hi=math.inf):
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
          not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
      if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
      return float(value)

    if (points_per_side is None) == (point_grids is None):
      raise ValueError("exactly one of points_per_side or point_grids must be given "
                       f"(got points_per_side={points_per_side!r} and "
                       f"{'a' if point_grids is not None else 'no'} point_grids)")
    crop_n_layers = integer("crop_n_layers", crop_n_layers, 0)
    crop_n_points_downscale_factor = integer("crop_n_points_downscale_factor",
                                             crop_n_points_downscale_factor, 1)
    if points_per_side is not None:
      points_per_side = integer("points_per_side", points_per_side, 1)
      for i in range(crop_n_layers + 1):
        if int(points_per_side / crop_n_points_downscale_factor**i) < 1:
          raise ValueError(
              f"crop layer {i} would get no points: points_per_side={points_per_side} / "
              f"crop_n_points_downscale_factor**{i} < 1")
      grids = amg_utils.build_all_layer_point_grids(
          points_per_side, crop_n_layers, crop_n_points_downscale_factor)
    else:
      if isinstance(point_grids, np.ndarray) and point_grids.ndim == 2:
        raise ValueError("point_grids must be a list of (n, 2) arrays, one per crop layer "
                         "(wrap a single grid in a list)")
      grids = []
      for i, g in enumerate(point_grids):
        g = np.asarray(g, np.float64)
        if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
          raise ValueError(f"point_grids[{i}] must be a non-empty (n, 2) array of (x, y) "
                           f"in [0, 1], got shape {g.shape}")
        if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
          raise ValueError(f"point_grids[{i}] must lie in [0, 1] (normalised x, y)")
        grids.append(g)
      if len(grids) < crop_n_layers + 1:
        raise ValueError(f"point_grids has {len(grids)} grids but crop_n_layers="
                         f"{crop_n_layers} needs {crop_n_layers + 1} (one per layer)")
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of "
                       f"{list(OUTPUT_MODES)}")
    if output_mode == "coco_rle":
      from pycocotools import mask as _  # noqa: F401  pylint: disable=import-outside-toplevel
    min_mask_region_area = real("min_mask_region_area", min_mask_region_area, 0)
    if min_mask_region_area > 0:
      import cv2 as _  # noqa: F401  pylint: disable=import-outside-toplevel

    self.point_grids = grids
    self.points_per_side = points_per_side
    self.points_per_batch = integer("points_per_batch", points_per_batch, 1)
    self.pred_iou_thresh = real("pred_iou_thresh", pred_iou_thresh)
    self.stability_score_thresh = real("stability_score_thresh", stability_score_thresh)
    self.stability_score_offset = real("stability_score_offset", stability_score_offset)
    self.box_nms_thresh = real("box_nms_thresh", box_nms_thresh, 0.0, 1.0)
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = real("crop_nms_thresh", crop_nms_thresh, 0.0, 1.0)
    self.crop_overlap_ratio = real("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0)
    if self.crop_overlap_ratio >= 1.0:
      raise ValueError(f"crop_overlap_ratio must be < 1, got {crop_overlap_ratio}")
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode

    if isinstance(model, Predictor):
      self.predictor = model
    else:
      sam = load_model(model, checkpoint, None, dtype, use_default_sam_h, use_default_sam_l,
                       use_default_sam_b)
      self.predictor = Predictor(sam)
    self.model = self.predictor.model
    self.config: SamConfig = self.model.config
    self.transform = ResizeLongestSide(self.config.image_size)

    if devices is None and device is not None:
      resolved = _resolve_device(device)
      devices = None if resolved is None else [resolved]
    self.mesh = data_mesh(list(devices) if devices is not None else None)
    self.num_devices = int(self.mesh.devices.size)
    self._params = None  # replicated lazily, once
    platform = self.mesh.devices.flat[0].platform
    #: Crops per device per device call (bounds device memory; CPU gains nothing).
    self.crops_per_device = 1 if platform == "cpu" else 4
    self._stats_budget = _STATS_BUDGET.get(platform, _STATS_BUDGET_DEFAULT)
    # Host and device share memory on CPU: packing bits would only add work.
    self._pack_masks = platform != "cpu"
    #: The decoder, (params, emb, points, labels, config, dtype) -> (logits, iou).
    #: Tests substitute synthetic decoders here; it must be a hashable function.
    self.decode_fn: Callable = sam_decode

  # ------------------------------------------------------------------ public API
  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """Masks for one image.

    Args:
      image: (H, W, 3) uint8 RGB image.

    Returns:
      A list of records (official keys and order): `segmentation` (bool HxW array,
      or an RLE dict per `output_mode`), `area` (int pixels), `bbox` (XYWH list, the
      width/height measured to the inclusive max pixel, as upstream), `predicted_iou`
      (float), `point_coords` ([[x, y]] floats), `stability_score` (float) and
      `crop_box` (XYWH list). As upstream, `bbox` holds floats instead of ints when
      some point batch of some crop had no mask left after the score filters, and
      `crop_box` does when several crops were run and one of them kept no mask.
    """
    return self.generate_batch([_check_image(image, "generate")])[0]

  def generate_batch(self, images: Sequence[np.ndarray]) -> List[List[Dict[str, Any]]]:
    """`generate` for several images (sizes may differ), sharing device calls.

    The crops of all images are embedded in batched encoder calls split over the
    generator's devices, and each group of same-shaped crops runs the per-crop
    pipeline in one data-parallel call.

    Args:
      images: sequence of (H, W, 3) uint8 RGB images.

    Returns:
      One record list per image, each equal to `generate(image)`.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
      raise ValueError("generate_batch expects a list of images; use generate() for one")
    images = [_check_image(im, f"generate_batch: image {i}") for i, im in enumerate(images)]
    if not images:
      return []
    crops_by_image = []
    for i, image in enumerate(images):
      boxes, layers = amg_utils.generate_crop_boxes(image.shape[:2], self.crop_n_layers,
                                                    self.crop_overlap_ratio)
      crops_by_image.append([
          _Crop(i, k, box, layer, image, self.point_grids[layer], self.transform)
          for k, (box, layer) in enumerate(zip(boxes, layers))])
    self._run_crops([c for crops in crops_by_image for c in crops])
    return [self._finish_image(crops) for crops in crops_by_image]

  __call__ = generate

  # ------------------------------------------------------------------ device work
  def _replicated_params(self):
    if self._params is None:
      self._params = replicate(self.model.params, self.mesh)
    return self._params

  def _thresholds(self) -> Tuple[np.ndarray, np.ndarray]:
    # Python-float sums first (upstream adds mask_threshold and the offset as
    # floats), then float32 as torch rounds scalars compared with float32 tensors.
    thr = np.array([
        self.pred_iou_thresh, self.stability_score_thresh,
        MASK_THRESHOLD + self.stability_score_offset,
        MASK_THRESHOLD - self.stability_score_offset,
        0.0, 0.0], np.float32)
    # torchvision compares its float32 IoU with the double threshold.
    strict_f32 = amg_utils._strict_threshold_f32  # pylint: disable=protected-access
    thr[4] = strict_f32(self.box_nms_thresh)
    flags = np.array([self.pred_iou_thresh > 0.0, self.stability_score_thresh > 0.0])
    return thr, flags

  def _run_crops(self, crops: List[_Crop]) -> None:
    """Runs all crops through the device pipeline; fills each `crop.result`."""
    groups: Dict[Tuple, List[_Crop]] = collections.OrderedDict()
    for c in crops:
      n_batches = -(-len(c.points) // self.points_per_batch)
      groups.setdefault((n_batches,) + c.bucket, []).append(c)
    per_call = self.num_devices * self.crops_per_device
    calls = [g[i:i + per_call] for g in groups.values() for i in range(0, len(g), per_call)]
    # Three-stage pipeline: while the host post-processes call k-2, the device runs
    # call k; call k-1's scalars decide its survivor upsampling.
    dispatched, upsampling = collections.deque(), collections.deque()
    for call in calls:
      dispatched.append(self._dispatch_stats(call))
      if len(dispatched) > 1:
        upsampling.append(self._dispatch_masks(dispatched.popleft()))
      if len(upsampling) > 1:
        self._collect(upsampling.popleft())
    while dispatched:
      upsampling.append(self._dispatch_masks(dispatched.popleft()))
    while upsampling:
      self._collect(upsampling.popleft())

  def _dispatch_stats(self, crops: List[_Crop]) -> Dict[str, Any]:
    cfg = self.config
    s, lr = cfg.image_size, cfg.low_res_mask_size
    per_device = _pow2_ceil(-(-len(crops) // self.num_devices))
    b = self.num_devices * per_device
    # Padding slots repeat the last crop; their results are dropped.
    padded = crops + [crops[-1]] * (b - len(crops))
    n_batches = -(-len(crops[0].points) // self.points_per_batch)
    hb, wb = crops[0].bucket
    ppb = self.points_per_batch
    images = np.zeros((b, s, s, 3), np.uint8)
    valid_hw = np.zeros((b, 2), np.int32)
    points = np.zeros((b, n_batches * ppb, 2), np.float32)
    point_valid = np.zeros((b, n_batches * ppb), bool)
    block_h, block_w = _bucket_step(hb), _bucket_step(wb)
    band_h = band_width(hb, wb, block_h, lr)
    band_w = band_width(hb, wb, block_w, lr)
    rows = (np.zeros((b, hb // block_h), np.int32),
            np.zeros((b, hb // block_h, block_h, band_h), np.float32))
    cols = (np.zeros((b, wb // block_w), np.int32),
            np.zeros((b, wb // block_w, block_w, band_w), np.float32))
    crop_box = np.zeros((b, 4), np.int32)
    orig_box = np.zeros((b, 4), np.int32)
    n_pad = np.zeros((b,), np.int32)
    for i, c in enumerate(padded):
      rh, rw = c.resized_hw
      images[i, :rh, :rw] = c.resized
      valid_hw[i] = (rh, rw)
      n = len(c.input_points)
      points[i, :n] = model_frame_points(c.input_points, s)
      point_valid[i, :n] = True
      rows[0][i], rows[1][i] = _banded_operator(c.hw[0], rh, hb, s, lr, block_h, band_h)
      cols[0][i], cols[1][i] = _banded_operator(c.hw[1], rw, wb, s, lr, block_w, band_w)
      crop_box[i] = c.box
      orig_box[i] = (0, 0, c.image_hw[1], c.image_hw[0])
      n_pad[i] = hb * wb - c.hw[0] * c.hw[1]
    mesh = self.mesh
    params = self._replicated_params()
    emb = _encode_sharded(params, shard_batch(images, mesh), shard_batch(valid_hw, mesh),
                          mesh=mesh, config=cfg, dtype=self.model.dtype)
    rows, cols = shard_batch(rows, mesh), shard_batch(cols, mesh)
    mask_chunk = max(1, min(256, self._stats_budget // (hb * wb)))
    mask_chunk = 1 << (mask_chunk.bit_length() - 1)
    thr, flags = self._thresholds()
    out = _crop_stats_sharded(
        params, emb, shard_batch(points.reshape(b, n_batches, ppb, 2), mesh),
        shard_batch(point_valid.reshape(b, n_batches, ppb), mesh), rows, cols,
        shard_batch(crop_box, mesh), shard_batch(orig_box, mesh), shard_batch(n_pad, mesh),
        thr, flags, mesh=mesh, config=cfg, dtype=self.model.dtype, decode_fn=self.decode_fn,
        mask_chunk=mask_chunk)
    return {"crops": crops, "b": b, "out": out, "rows": rows, "cols": cols,
            "mask_chunk": mask_chunk}

  def _dispatch_masks(self, st: Dict[str, Any]) -> Dict[str, Any]:
    out = st.pop("out")
    low_res = out.pop("low_res")
    st["scalars"] = scalars = jax.device_get(out)  # round trip 1: scalars, NMS order
    n = scalars["iou"].shape[1]
    chunk = min(SURVIVOR_CHUNK, n)
    n_keep = scalars["n_keep"][:len(st["crops"])]
    n_chunks = -(-int(n_keep.max()) // chunk)
    order = scalars["order"]
    if n_chunks * chunk > n:
      order = np.concatenate([order, np.zeros((order.shape[0], n_chunks * chunk - n),
                                              order.dtype)], axis=1)
    st["packed"] = [
        _crop_masks_sharded(low_res, shard_batch(order[:, k * chunk:(k + 1) * chunk],
                                                 self.mesh),
                            st["rows"], st["cols"], mesh=self.mesh,
                            pack=self._pack_masks, mask_chunk=st["mask_chunk"])
        for k in range(n_chunks)]
    del st["rows"], st["cols"]
    return st

  def _collect(self, st: Dict[str, Any]) -> None:
    packed = jax.device_get(st["packed"])  # round trip 2: survivor masks
    sc = st["scalars"]
    for i, c in enumerate(st["crops"]):
      k = int(sc["n_keep"][i])
      kept = sc["order"][i, :k].astype(np.int64)
      h, w = c.hw
      x0, y0, x1, y1 = c.box
      img_h, img_w = c.image_hw
      # Masks in the image frame, stored transposed, (k, W, H) C-contiguous: each
      # mask's column-major flattening (the RLE order) is then contiguous.
      full = (h, w) == (img_h, img_w)
      full_t = (np.empty if full else np.zeros)((k, img_w, img_h), bool)
      for j, chunk in enumerate(packed):
        start = j * chunk.shape[1]
        if start >= k:
          break
        part = chunk[i, :k - start, :w]
        if self._pack_masks:
          part = np.unpackbits(part, axis=-1, count=h).view(bool)
        full_t[start:start + len(part), x0:x1, y0:y1] = part[:, :, :h]
      n_batches = -(-len(c.points) // self.points_per_batch)
      c.result = {
          "masks_t": full_t,
          "boxes": sc["boxes"][i][kept].astype(np.int64) + np.array([x0, y0, x0, y0]),
          "iou_preds": sc["iou"][i][kept],
          "stability_score": sc["stability"][i][kept],
          "points": c.points[kept // 3] + np.array([x0, y0], np.float64),
          # Upstream quirk: a point batch with no mask after the score filters gets
          # float32 zero boxes, and concatenation then makes all boxes float32.
          "float_boxes": bool(np.any(sc["batch_pass"][i][:n_batches] == 0)),
      }

  # ------------------------------------------------------------------ host work
  def _finish_image(self, crops: List[_Crop]) -> List[Dict[str, Any]]:
    """Concatenates crops, crop NMS, small-region postprocessing, records.

    Upstream run-length encodes every mask as soon as it is produced; the encoding
    of a mask is a function of its pixels, so encoding only the final masks (from
    the arrays we keep) gives the same records.
    """
    crops = sorted(crops, key=lambda c: c.crop_index)
    res = [c.result for c in crops]
    counts = [len(r["masks_t"]) for r in res]
    # (H, W) views, column-major like upstream's `rle_to_mask` output.
    masks = [m.T for r in res for m in r["masks_t"]]
    float_boxes = any(r["float_boxes"] for r in res)
    boxes = np.concatenate([r["boxes"] for r in res]).astype(
        np.float32 if float_boxes else np.int64)
    iou_preds = np.concatenate([r["iou_preds"] for r in res])
    stability = np.concatenate([r["stability_score"] for r in res])
    points = np.concatenate([r["points"] for r in res])
    # Upstream builds an empty crop's `crop_boxes` with torch.tensor([]) (float32),
    # which turns the concatenation float32.
    float_crops = len(crops) > 1 and min(counts) == 0
    crop_boxes = np.array([c.box for c, n in zip(crops, counts) for _ in range(n)],
                          np.float32 if float_crops else np.int64).reshape(-1, 4)

    if len(crops) > 1 and masks:
      # Prefer masks from smaller crops: score 1 / area in float32, ties (whole crops)
      # broken by concatenation order.
      cb = crop_boxes.astype(np.float32)
      scores = np.float32(1) / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
      keep = nms_host(boxes, scores, self.crop_nms_thresh)
      masks = [masks[i] for i in keep]
      boxes, iou_preds, stability = boxes[keep], iou_preds[keep], stability[keep]
      points, crop_boxes = points[keep], crop_boxes[keep]

    if self.min_mask_region_area > 0 and masks:
      keep, masks, boxes = self._postprocess_small_regions(masks, boxes)
      iou_preds, stability = iou_preds[keep], stability[keep]
      points, crop_boxes = points[keep], crop_boxes[keep]

    records = []
    for i, mask in enumerate(masks):
      if self.output_mode == "coco_rle":
        seg = _coco_rle(mask)
      elif self.output_mode == "binary_mask":
        seg = mask
      else:
        seg = amg_utils.mask_to_rle(mask)
      records.append({
          "segmentation": seg,
          "area": int(np.count_nonzero(mask)),  # == upstream's sum of the odd RLE runs
          "bbox": amg_utils.box_xyxy_to_xywh(boxes[i]).tolist(),
          "predicted_iou": float(iou_preds[i]),
          "point_coords": [points[i].tolist()],
          "stability_score": float(stability[i]),
          "crop_box": amg_utils.box_xyxy_to_xywh(crop_boxes[i]).tolist(),
      })
    return records

  def _postprocess_small_regions(self, masks, boxes):
    """Upstream `postprocess_small_regions`: holes, islands, then NMS on 0/1 scores.

    Returns the kept indices (NMS order), their masks, and their boxes (recomputed
    only for changed masks, as upstream).
    """
    new_masks, scores, new_boxes = [], [], []
    for mask in masks:
      mask, changed = amg_utils.remove_small_regions(mask, self.min_mask_region_area, "holes")
      unchanged = not changed
      mask, changed = amg_utils.remove_small_regions(mask, self.min_mask_region_area,
                                                     "islands")
      unchanged = unchanged and not changed
      new_masks.append(mask)
      # Unchanged masks win NMS ties over post-processed ones.
      scores.append(float(unchanged))
      new_boxes.append(_mask_box(mask))
    keep = nms_host(np.stack(new_boxes), np.asarray(scores, np.float32),
                    max(self.box_nms_thresh, self.crop_nms_thresh))
    boxes = boxes.copy()
    for i in keep:
      if scores[i] == 0.0:
        boxes[i] = new_boxes[i]
    return keep, [new_masks[i] if scores[i] == 0.0 else masks[i] for i in keep], boxes[keep]


def _coco_rle(mask: np.ndarray) -> Dict[str, Any]:
  """`coco_encode_rle(mask_to_rle(mask))` straight from the pixels (pycocotools' C
  encoder; same counts, hence the same string)."""
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8)))
  rle["counts"] = rle["counts"].decode("utf-8")
  return rle


def _resolve_device(device):
  """A jax.Device from a device or a platform string ("cpu", "gpu", "cuda:1", "tpu").

  Returns None (= all default devices, with a warning) for a platform JAX lacks here.
  """
  if isinstance(device, jax.Device):
    return device
  if isinstance(device, str):
    name, _, index = device.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    try:
      devs = jax.local_devices(backend=platform)
    except RuntimeError:
      # Code written for the official package says device="cuda"; on a machine without
      # that backend we run where JAX runs rather than refuse (and say so).
      import warnings
      warnings.warn(f"device {device!r} is not available to JAX; using the default "
                    f"devices ({jax.default_backend()}) instead", stacklevel=3)
      return None
    i = int(index) if index else 0
    if i >= len(devs):
      raise ValueError(f"device {device!r} does not exist ({len(devs)} {platform} devices)")
    return devs[i]
  if type(device).__module__.split(".")[0] == "torch":  # torch.device("cpu"), ...
    return _resolve_device(str(device))
  raise ValueError(f"cannot use {device!r} as a JAX device")


# Names used by the official package and the sssegmentation document.
SamAutomaticMaskGenerator = AutomaticMaskGenerator
SAMAutomaticMaskGenerator = AutomaticMaskGenerator
