"""Prompt encoder (mirrors `segment_anything/modeling/prompt_encoder.py`).

Prompts are in the model's input frame (pixels of the resized, padded image_size x
image_size image). Static shapes: a batch always carries N point slots; slots whose
label is `PAD_LABEL` are absent and are masked out of every attention downstream, so
padding a prompt to a bucket size leaves the result unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samjax.modeling.common import LayerNorm, gelu

Dtype = Any

#: Label of a padding slot that is not a prompt at all (masked out of attention).
PAD_LABEL = -2
#: The official "not a point" label (embedded with `not_a_point_embed`).
NOT_A_POINT = -1


class PositionEmbeddingRandom(nn.Module):
  """Random Fourier features of normalised coordinates. Always float32."""

  num_pos_feats: int = 64

  def setup(self):
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix", nn.initializers.normal(1.0),
        (2, self.num_pos_feats), jnp.float32)

  def _pe_encoding(self, coords: jax.Array) -> jax.Array:
    """coords (..., 2) in [0, 1] -> (..., 2 * num_pos_feats)."""
    coords = 2 * coords.astype(jnp.float32) - 1
    coords = coords @ self.positional_encoding_gaussian_matrix.astype(jnp.float32)
    coords = 2 * np.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def dense(self, size: Tuple[int, int]) -> jax.Array:
    """PE of every cell centre of an (h, w) grid -> (h, w, C)."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    yy, xx = jnp.meshgrid(y, x, indexing="ij")
    return self._pe_encoding(jnp.stack([xx, yy], axis=-1))

  def with_coords(self, coords: jax.Array, image_size: Tuple[int, int]) -> jax.Array:
    """coords (..., 2) as (x, y) pixels of an (H, W) image -> (..., C)."""
    scale = jnp.array([1.0 / image_size[1], 1.0 / image_size[0]], jnp.float32)
    return self._pe_encoding(coords.astype(jnp.float32) * scale)

  def __call__(self, size):
    return self.dense(size)


class PromptEncoder(nn.Module):
  """Encodes points, boxes and masks into sparse and dense embeddings."""

  embed_dim: int = 256
  image_embedding_size: Tuple[int, int] = (64, 64)
  input_image_size: Tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
    # Flax names list entries `point_embeddings_0..3`, matching `point_embeddings.0..3`.
    emb = lambda n: nn.Embed(n, self.embed_dim, param_dtype=self.param_dtype)
    self.point_embeddings = [emb(1) for _ in range(4)]
    self.not_a_point_embed = emb(1)
    self.no_mask_embed = emb(1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c4 = self.mask_in_chans // 4
    self.mask_downscaling_0 = nn.Conv(c4, (2, 2), strides=(2, 2), padding="VALID", **kw)
    self.mask_downscaling_1 = LayerNorm(1e-6, **kw)
    self.mask_downscaling_3 = nn.Conv(self.mask_in_chans, (2, 2), strides=(2, 2),
                                      padding="VALID", **kw)
    self.mask_downscaling_4 = LayerNorm(1e-6, **kw)
    self.mask_downscaling_6 = nn.Conv(self.embed_dim, (1, 1), **kw)

  def get_dense_pe(self) -> jax.Array:
    """(h, w, C) float32 positional encoding of the image embedding grid."""
    return self.pe_layer.dense(self.image_embedding_size)

  def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    """points (B, N, 2) xy, labels (B, N) -> (B, N + pad, C) float32."""
    points = points.astype(jnp.float32) + 0.5  # shift to the pixel centre
    labels = labels.astype(jnp.int32)
    if pad:
      b = points.shape[0]
      points = jnp.concatenate([points, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
      labels = jnp.concatenate([labels, jnp.full((b, 1), NOT_A_POINT, jnp.int32)], axis=1)
    pe = self.pe_layer.with_coords(points, self.input_image_size)
    lab = labels[..., None]
    w = lambda e: e.embedding[0].astype(jnp.float32)
    out = jnp.where(lab == NOT_A_POINT, w(self.not_a_point_embed), pe)
    out = out + jnp.where(lab == 0, w(self.point_embeddings[0]), 0.0)
    out = out + jnp.where(lab == 1, w(self.point_embeddings[1]), 0.0)
    return jnp.where(lab <= PAD_LABEL, 0.0, out)

  def embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """boxes (B, 4) as x0, y0, x1, y1 -> (B, 2, C) float32 corner embeddings."""
    coords = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
    pe = self.pe_layer.with_coords(coords, self.input_image_size)
    corner = jnp.stack([self.point_embeddings[2].embedding[0],
                        self.point_embeddings[3].embedding[0]]).astype(jnp.float32)
    return pe + corner

  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """masks (B, 4h, 4w) logits -> (B, h, w, C)."""
    x = masks[..., None].astype(self.dtype)
    x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
    x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
    return self.mask_downscaling_6(x)

  def __call__(self, points: Optional[jax.Array], labels: Optional[jax.Array],
               boxes: Optional[jax.Array] = None, masks: Optional[jax.Array] = None,
               batch_size: Optional[int] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Embeds prompts.

    Args:
      points: (B, N, 2) xy in the input frame, or None.
      labels: (B, N) int: 1 foreground, 0 background, -1 not-a-point, -2 absent slot.
      boxes: (B, 4) xyxy in the input frame, or None.
      masks: (B, 4h, 4w) low-resolution mask logits, or None.
      batch_size: B when no prompt carries it (official default 1).

    Returns:
      sparse (B, T, C) float32, token_mask (B, T) bool (False = absent slot),
      dense (B, h, w, C).
    """
    if points is not None:
      bs = points.shape[0]
    elif boxes is not None:
      bs = boxes.shape[0]
    elif masks is not None:
      bs = masks.shape[0]
    else:
      bs = batch_size or 1
    if self.is_initializing():
      # Create every parameter whatever prompts `init` was called with.
      for e in (*self.point_embeddings, self.not_a_point_embed, self.no_mask_embed):
        e(jnp.zeros((1,), jnp.int32))
      self.embed_masks(jnp.zeros((1, *(4 * s for s in self.image_embedding_size))))
    parts, valid = [], []
    if points is not None:
      pe = self.embed_points(points, labels, pad=boxes is None)
      parts.append(pe)
      lab = labels.astype(jnp.int32)
      if boxes is None:
        lab = jnp.concatenate([lab, jnp.full((bs, 1), NOT_A_POINT, jnp.int32)], axis=1)
      valid.append(lab > PAD_LABEL)
    if boxes is not None:
      parts.append(self.embed_boxes(boxes))
      valid.append(jnp.ones((bs, 2), bool))
    if parts:
      sparse = jnp.concatenate(parts, axis=1)
      token_mask = jnp.concatenate(valid, axis=1)
    else:
      sparse = jnp.zeros((bs, 0, self.embed_dim), jnp.float32)
      token_mask = jnp.zeros((bs, 0), bool)
    if masks is not None:
      dense = self.embed_masks(masks)
    else:
      h, w = self.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed.embedding[0].astype(self.dtype),
                               (bs, h, w, self.embed_dim))
    return sparse, token_mask, dense
