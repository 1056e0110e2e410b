"""Two-way transformer of the mask decoder (mirrors `modeling/transformer.py`).

Tokens are (B, T, C); image keys are (B, h*w, C). `token_mask` (B, T) marks real
prompt tokens; absent slots (bucket padding) are excluded as attention *keys*, which
makes the output for the real tokens identical to running without the padding.
LayerNorm eps is 1e-5 here (PyTorch's default), unlike 1e-6 in the image encoder.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.modeling.common import LayerNorm, MLPBlock, dense

Dtype = Any


class Attention(nn.Module):
  """Attention with optional down-projection of the internal width."""

  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               key_mask: Optional[jax.Array] = None) -> jax.Array:
    c = q.shape[-1]
    internal = c // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the internal width {internal}")
    nh, hd = self.num_heads, internal // self.num_heads
    d = lambda n, name: dense(n, name, self.dtype, self.param_dtype)
    q = d(internal, "q_proj")(q).reshape(*q.shape[:2], nh, hd)  # (B, Nq, heads, hd)
    k = d(internal, "k_proj")(k).reshape(*k.shape[:2], nh, hd)  # (B, Nk, heads, hd)
    v = d(internal, "v_proj")(v).reshape(*v.shape[:2], nh, hd)
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(hd))
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(*attn.shape[:1], -1, internal)
    return d(c, "out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
  """Self-attn on tokens, token->image, MLP on tokens, image->token."""

  num_heads: int
  mlp_dim: int
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: LayerNorm(1e-5, name=name, **kw)
    self_attn = Attention(self.num_heads, 1, name="self_attn", **kw)
    if self.skip_first_layer_pe:
      queries = self_attn(queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries, token_mask)
    queries = ln("norm1")(queries)

    q = queries + query_pe
    k = keys + key_pe
    queries = queries + Attention(self.num_heads, self.attention_downsample_rate,
                                  name="cross_attn_token_to_image", **kw)(q, k, keys)
    queries = ln("norm2")(queries)

    # The decoder MLP uses ReLU (TwoWayTransformer's default activation).
    queries = queries + MLPBlock(self.mlp_dim, act=jax.nn.relu, name="mlp", **kw)(queries)
    queries = ln("norm3")(queries)

    q = queries + query_pe
    k = keys + key_pe
    keys = keys + Attention(self.num_heads, self.attention_downsample_rate,
                            name="cross_attn_image_to_token", **kw)(k, q, queries, token_mask)
    keys = ln("norm4")(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """Returns (queries (B, T, C), keys (B, h*w, C))."""

  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
               point_embedding: jax.Array,
               token_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """image_embedding (B, h, w, C), image_pe (B or 1, h, w, C), point_embedding (B, T, C)."""
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = jnp.broadcast_to(image_pe, (b, h, w, c)).reshape(b, h * w, c).astype(self.dtype)
    point_embedding = point_embedding.astype(self.dtype)
    queries = point_embedding
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.num_heads, self.mlp_dim, self.attention_downsample_rate,
          skip_first_layer_pe=(i == 0), name=f"layers_{i}", **kw)(
              queries, keys, point_embedding, key_pe, token_mask)
    q = queries + point_embedding
    k = keys + key_pe
    queries = queries + Attention(self.num_heads, self.attention_downsample_rate,
                                  name="final_attn_token_to_image", **kw)(q, k, keys)
    queries = LayerNorm(1e-5, name="norm_final_attn", **kw)(queries)
    return queries, keys
