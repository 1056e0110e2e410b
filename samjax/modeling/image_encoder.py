"""ViT image encoder of SAM (mirrors `segment_anything/modeling/image_encoder.py`).

Layout is NHWC throughout. Parameter names follow the PyTorch attribute names
(`patch_embed/proj`, `pos_embed`, `blocks_3/attn/qkv`, `neck_0` ...), so that the
checkpoint converter is a few generic rules.
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.modeling.attention import AttentionConfig, attention_for_platform
from samjax.modeling.common import LayerNorm, MLPBlock

Dtype = Any


class _DenseParams(nn.Module):
  """The parameters of an `nn.Dense` (same names, shapes and initialisers), unapplied.

  The attention's arithmetic is a pure function (`attention.attention_block`) so that
  its kernel can be chosen per platform; this keeps the checkpoint layout
  (`attn/qkv/kernel`, `attn/qkv/bias`, ...) of the reference's `nn.Linear`s.
  """

  in_features: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.in_features, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return kernel, bias


class Attention(nn.Module):
  """Multi-head self-attention with decomposed relative position bias (MViTv2).

  Takes the whole (B, H, W, C) token grid. With `window_size > 0` it attends within
  non-overlapping windows of the zero-padded grid, as the reference's Block does with
  window_partition -> Attention -> window_unpartition. `attention` picks the kernel
  and the projection order (see `samjax.modeling.attention`); all compute the same
  function.
  """

  num_heads: int
  input_size: Tuple[int, int]
  window_size: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Any = AttentionConfig()  # or attention.PerPlatform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    hd = c // self.num_heads
    qkv_kernel, qkv_bias = _DenseParams(c, 3 * c, self.param_dtype, name="qkv")()
    proj_kernel, proj_bias = _DenseParams(c, c, self.param_dtype, name="proj")()
    rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                           (2 * self.input_size[0] - 1, hd), self.param_dtype)
    rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                           (2 * self.input_size[1] - 1, hd), self.param_dtype)
    fn = attention_for_platform(self.attention, self.window_size > 0, self.dtype)
    return fn(x, qkv_kernel, qkv_bias, proj_kernel, proj_bias, rel_pos_h, rel_pos_w,
              num_heads=self.num_heads, window_size=self.window_size)


class Block(nn.Module):
  """Pre-norm transformer block; windowed attention when `window_size > 0`."""

  num_heads: int
  mlp_ratio: float
  window_size: int
  input_size: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Any = AttentionConfig()  # or attention.PerPlatform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    shortcut = x
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="norm1")(x)
    attn_size = self.input_size if self.window_size == 0 else (self.window_size,) * 2
    x = Attention(self.num_heads, attn_size, self.window_size, self.dtype,
                  self.param_dtype, self.attention, name="attn")(x)
    x = shortcut + x
    mlp = MLPBlock(int(c * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp")
    return x + mlp(LayerNorm(1e-6, self.dtype, self.param_dtype, name="norm2")(x))


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection: (B, S, S, 3) -> (B, S/p, S/p, embed_dim)."""

  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   param_dtype=self.param_dtype, name="proj")(x.astype(self.dtype))


class ImageEncoderViT(nn.Module):
  """SAM's ViT backbone and neck.

  Input: normalised, padded images (B, S, S, 3) float32 with S = image_size.
  Output: image embeddings (B, S/16, S/16, prompt_embed_dim).
  """

  image_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: Tuple[int, ...] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Any = AttentionConfig()  # or attention.PerPlatform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    grid = self.image_size // self.patch_size
    if x.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"image encoder expects (B, {self.image_size}, {self.image_size}, 3) "
                       f"inputs, got {tuple(x.shape)}")
    p = self.patch_size
    x = PatchEmbed(p, self.embed_dim, self.dtype, self.param_dtype, name="patch_embed")(x)
    pos_embed = self.param("pos_embed", nn.initializers.zeros,
                           (1, grid, grid, self.embed_dim), self.param_dtype)
    x = x + pos_embed.astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio,
                0 if i in self.global_attn_indexes else self.window_size, (grid, grid),
                self.dtype, self.param_dtype, self.attention, name=f"blocks_{i}")(x)
      self.sow("intermediates", f"blocks_{i}", x)
    x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="neck_0")(x)
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="neck_1")(x)
    x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="neck_2")(x)
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="neck_3")(x)
    return x
