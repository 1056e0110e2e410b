"""Bilinear resizing that matches `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)` (no antialiasing, even when shrinking).

`jax.image.resize` antialiases when downsampling, which the reference does not do, so
we build the two 1-D interpolation matrices with PyTorch's source-index formula and
apply them as matmuls (exact weights, MXU-friendly, no gathers).
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def interp_matrix(in_size: int, out_size: int, crop: int | None = None) -> np.ndarray:
  """(out_size, in_size) float32 matrix W with out = W @ in along one axis.

  Mirrors ATen's `upsample_bilinear2d` (align_corners=False): scale = in/out,
  src = max(scale * (dst + 0.5) - 0.5, 0), lambda = src - floor(src), and the upper
  neighbour is clamped to the last row.
  """
  del crop
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  # ATen computes the source index in float32 (accscalar_t for float inputs).
  src = np.maximum(np.float32(scale) * (dst.astype(np.float32) + np.float32(0.5))
                   - np.float32(0.5), np.float32(0.0)).astype(np.float32)
  i0 = np.floor(src).astype(np.int64)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = (src - i0).astype(np.float32)
  l0 = (np.float32(1.0) - l1).astype(np.float32)
  w = np.zeros((out_size, in_size), np.float32)
  np.add.at(w, (np.arange(out_size), i0), l0)
  np.add.at(w, (np.arange(out_size), i1), l1)
  return w


def resize_bilinear(x: jax.Array, out_hw: Tuple[int, int], axes: Tuple[int, int] = (-2, -1)
                    ) -> jax.Array:
  """Resizes the two spatial `axes` of `x` to `out_hw` (PyTorch bilinear semantics)."""
  ah, aw = (a % x.ndim for a in axes)
  wh = jnp.asarray(interp_matrix(x.shape[ah], int(out_hw[0])))
  ww = jnp.asarray(interp_matrix(x.shape[aw], int(out_hw[1])))
  x = jnp.moveaxis(x, (ah, aw), (-2, -1)).astype(jnp.float32)
  y = jnp.einsum("oh,...hw,pw->...op", wh, x, ww, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, (-2, -1), (ah, aw))
