"""Building blocks shared by the SAM modules.

Numerical traps handled here (each one is tested against the reference):
  * GELU is the exact erf form (`torch.nn.GELU()` default), not the tanh approximation.
  * LayerNorm statistics are computed in float32 even when activations are bf16.
  * The 2x2/stride-2 transposed convolution of the mask decoder is written as an einsum
    with the PyTorch kernel layout made explicit, which avoids `ConvTranspose`'s
    kernel-flip convention entirely.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as `torch.nn.GELU()`: x * 0.5 * (1 + erf(x / sqrt(2))) in float32.

  Written out rather than `jax.nn.gelu(approximate=False)`, which evaluates
  erfc(-x / sqrt(2)) in the input dtype: XLA expands erfc into three rational
  approximations plus an exp per element, and on a GPU that made the GELU of ViT-H's
  MLPs 16% of the encoder's time (measured on an H200). This is PyTorch's own formula
  (float32 math for 16-bit inputs, one rounding at the end), and a single cheap erf.
  """
  x32 = x.astype(jnp.float32)
  return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * 0.7071067811865476))).astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 statistics.

  Used for `nn.LayerNorm` (eps 1e-6 in the image encoder, 1e-5 in the two-way
  transformer) and for the channels-last `LayerNorm2d` (eps 1e-6).
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  name=name, precision=None)


class MLPBlock(nn.Module):
  """`lin1 -> act -> lin2`, as `segment_anything.modeling.common.MLPBlock`."""

  mlp_dim: int
  act: Callable[[jax.Array], jax.Array] = gelu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = dense(self.mlp_dim, "lin1", self.dtype, self.param_dtype)(x)
    x = self.act(x)
    return dense(dim, "lin2", self.dtype, self.param_dtype)(x)


class ConvTranspose2x2(nn.Module):
  """`nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)` in NHWC.

  With kernel == stride every input pixel writes its own 2x2 output block, so
  out[b, 2h+i, 2w+j, o] = sum_c x[b, h, w, c] * K[i, j, c, o] + bias[o].
  `kernel` is stored as (kh, kw, cin, cout); PyTorch stores (cin, cout, kh, kw).
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, cin = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, cin, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(b, 2 * h, 2 * w, self.features)  # (B, 2H, 2W, Cout)
    return y + bias.astype(self.dtype)
