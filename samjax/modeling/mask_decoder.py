"""Mask decoder (mirrors `segment_anything/modeling/mask_decoder.py`)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.modeling.common import ConvTranspose2x2, LayerNorm, dense, gelu
from samjax.modeling.transformer import TwoWayTransformer

Dtype = Any


class MLP(nn.Module):
  """`layers_0 .. layers_{n-1}` Dense layers with ReLU between them."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = dense(self.output_dim if last else self.hidden_dim, f"layers_{i}", self.dtype,
                self.param_dtype)(x)
      if not last:
        x = jax.nn.relu(x)
    return x


class MaskDecoder(nn.Module):
  """Predicts masks and their IoU from image and prompt embeddings."""

  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
               sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
               multimask_output: bool,
               token_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Decodes masks.

    Args:
      image_embeddings: (1 or B, h, w, C); a single embedding is shared by all prompts.
      image_pe: (h, w, C) dense positional encoding.
      sparse_prompt_embeddings: (B, T, C).
      dense_prompt_embeddings: (B, h, w, C).
      multimask_output: static; True -> the 3 multimask outputs, False -> the single one.
      token_mask: (B, T) bool, False for absent prompt slots.

    Returns:
      masks (B, M, 4h, 4w) float32 logits, iou_pred (B, M) float32.
    """
    c = self.transformer_dim
    n_masks = self.num_multimask_outputs + 1
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    iou_token = nn.Embed(1, c, param_dtype=self.param_dtype, name="iou_token").embedding
    mask_tokens = nn.Embed(n_masks, c, param_dtype=self.param_dtype, name="mask_tokens").embedding
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(jnp.float32)
    output_tokens = jnp.broadcast_to(output_tokens[None], (b, 1 + n_masks, c))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(jnp.float32)], 1)
    if token_mask is not None:
      token_mask = jnp.concatenate([jnp.ones((b, 1 + n_masks), bool), token_mask], axis=1)

    src = image_embeddings.astype(self.dtype) + dense_prompt_embeddings.astype(self.dtype)
    _, h, w, _ = src.shape
    hs, src = TwoWayTransformer(self.transformer_depth, self.transformer_num_heads,
                                self.transformer_mlp_dim, self.attention_downsample_rate,
                                name="transformer", **kw)(src, image_pe[None], tokens,
                                                          token_mask)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + n_masks, :]

    src = src.reshape(b, h, w, c)
    x = ConvTranspose2x2(c // 4, name="output_upscaling_0", **kw)(src)
    x = gelu(LayerNorm(1e-6, name="output_upscaling_1", **kw)(x))
    x = gelu(ConvTranspose2x2(c // 8, name="output_upscaling_3", **kw)(x))  # (B, 4h, 4w, C/8)

    hyper_in = jnp.stack([
        MLP(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(mask_tokens_out[:, i])
        for i in range(n_masks)], axis=1)  # (B, M, C/8)
    masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, x, preferred_element_type=jnp.float32)
    # The IoU head is small and scores are thresholded: keep it in float32.
    iou_pred = MLP(self.iou_head_hidden_dim, n_masks, self.iou_head_depth,
                   name="iou_prediction_head", dtype=jnp.float32,
                   param_dtype=self.param_dtype)(iou_token_out.astype(jnp.float32))
    if multimask_output:
      return masks[:, 1:], iou_pred[:, 1:]
    return masks[:, :1], iou_pred[:, :1]
