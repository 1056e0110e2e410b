"""Prompt sampling inside the train step: points from masks or error regions, noisy boxes.

All traceable (jax.numpy, static shapes); randomness comes from the step's key.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from samjax.train.config import TrainConfig

PAD_LABEL = -2  # absent point slot, masked exactly by the prompt encoder


def sample_from_mask(key, mask: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """A uniformly drawn pixel of each mask.

  Args:
    key: PRNG key.
    mask: (n, S, S) bool.

  Returns:
    xy (n, 2) float32 pixel coordinates, the flat index (n,) int32 of the pixel, and
    ok (n,) bool: whether the mask had a pixel (an empty one yields pixel 0).
  """
  n, s = mask.shape[0], mask.shape[-1]
  flat = mask.reshape(n, -1)
  # Inverse-CDF sampling: one uniform per mask instead of one per pixel (Gumbel-max
  # over S*S pixels costs more than the decoder on a CPU). The r-th set pixel, with r
  # uniform in [0, count), is the number of prefix counts <= r.
  counts = jnp.cumsum(flat.astype(jnp.int32), axis=-1)
  total = counts[:, -1]
  r = jnp.floor(jax.random.uniform(key, (n,)) * total).astype(jnp.int32)
  r = jnp.minimum(r, jnp.maximum(total - 1, 0))
  idx = jnp.sum(counts <= r[:, None], axis=-1)
  idx = jnp.where(total > 0, idx, 0)  # an empty mask yields pixel 0 and ok=False
  xy = jnp.stack([idx % s, idx // s], axis=-1).astype(jnp.float32)
  return xy, idx, total > 0


def jitter_boxes(key, boxes: jax.Array, valid_hw: jax.Array, tc: TrainConfig) -> jax.Array:
  """Noisy boxes: each coordinate + N(0, (box_noise * side)^2), clipped to the limit.

  Args:
    key: PRNG key.
    boxes: (n, 4) xyxy boxes in input-frame pixels.
    valid_hw: (n, 2) un-padded image size; the noisy boxes stay inside it.
    tc: `box_noise` and `box_noise_max` (pixels).

  Returns:
    (n, 4) float32 xyxy boxes (x0 <= x1, y0 <= y1).
  """
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  std = tc.box_noise * jnp.stack([w, h, w, h], axis=-1)
  noise = jnp.clip(jax.random.normal(key, boxes.shape) * std, -tc.box_noise_max,
                   tc.box_noise_max)
  hi = jnp.stack([valid_hw[:, 1], valid_hw[:, 0]] * 2, axis=-1).astype(jnp.float32) - 1
  b = jnp.clip(boxes + noise, 0.0, hi)
  return jnp.stack([jnp.minimum(b[:, 0], b[:, 2]), jnp.minimum(b[:, 1], b[:, 3]),
                    jnp.maximum(b[:, 0], b[:, 2]), jnp.maximum(b[:, 1], b[:, 3])], axis=-1)


def valid_region(valid_hw: jax.Array, s: int) -> jax.Array:
  """(n, S, S) bool: pixels inside the un-padded image of size valid_hw (n, 2)."""
  rows = jnp.arange(s)[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(s)[None, None, :] < valid_hw[:, 1, None, None]
  return rows & cols


def error_region(prev_logits: jax.Array, gt: jax.Array, valid: jax.Array) -> jax.Array:
  """Where the previous prediction is wrong: false negatives and false positives.

  Args:
    prev_logits: (n, S, S) previous mask logits, upsampled to the input frame.
    gt: (n, S, S) bool GT masks.
    valid: (n, S, S) bool un-padded region (false positives on padding don't count).

  Returns:
    (n, S, S) bool.
  """
  pred = prev_logits > 0
  return (gt & ~pred) | (pred & ~gt & valid)
