"""Device kernels of the automatic mask generator, and the host-side operators they use.

Device design (per group of crops that share shapes):

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
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from samjax.amg import utils as amg_utils
from samjax.config import SamConfig
from samjax.functional import decode_masks
from samjax.modeling import MASK_THRESHOLD
from samjax.resize import interp_matrix


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


@functools.partial(jax.jit, static_argnames=("rt", "decode_fn", "mask_chunk"))
def crop_stats(params, emb, points, point_valid, rows, cols, crop_box, orig_box, n_pad, thr,
               flags, *, rt, decode_fn, mask_chunk):
  """`_crop_stats` for a (B, ...) batch of crops split over `rt`'s mesh (B % devices == 0).

  `rt` is the generator's `samjax.runtime.Runtime` (config, dtype, mesh).
  """
  def local(params, *xs):
    fn = functools.partial(_crop_stats, params, thr=thr, flags=flags, config=rt.config,
                           dtype=rt.dtype, decode_fn=decode_fn, mask_chunk=mask_chunk)
    # Crops of one device run one after the other, which bounds peak memory.
    return lax.map(lambda args: fn(*args), xs)
  f = rt.shard_map(local, in_specs=("replicated",) + ("batch",) * 8, out_specs="batch")
  return f(params, emb, points, point_valid, rows, cols, crop_box, orig_box, n_pad)


@functools.partial(jax.jit, static_argnames=("rt", "pack", "mask_chunk"))
def crop_masks(low_res, idx, rows, cols, *, rt, pack, mask_chunk):
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
  f = rt.shard_map(local, in_specs=("batch",) * 4, out_specs="batch")
  return f(low_res, idx, rows, cols)


def compiled_functions() -> Dict[str, Any]:
  """The jitted functions, e.g. to count compilations with `f._cache_size()`.

  "encode" is the runtime's (the generator embeds crops through its Runtime).
  """
  from samjax.runtime import engine  # pylint: disable=import-outside-toplevel
  return {"encode": engine.compiled_functions()["encode"], "crop_stats": crop_stats,
          "crop_masks": crop_masks}
