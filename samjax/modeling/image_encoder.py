"""ViT image encoder of SAM (mirrors `segment_anything/modeling/image_encoder.py`).

Layout is NHWC throughout. Parameter names follow the PyTorch attribute names
(`patch_embed/proj`, `pos_embed`, `blocks_3/attn/qkv`, `neck_0` ...), so that the
checkpoint converter is a few generic rules.
"""

from __future__ import annotations

import os

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.modeling.common import LayerNorm, MLPBlock

Dtype = Any


def window_partition(x: jax.Array, window_size: int) -> Tuple[jax.Array, Tuple[int, int]]:
  """(B, H, W, C) -> (B * num_windows, ws, ws, C), zero-padding H, W up to multiples of ws.

  The padded tokens are zeros *after* norm1, exactly as the reference, and they take
  part in attention unmasked (the reference does not mask them either).
  """
  b, h, w, c = x.shape
  pad_h = (window_size - h % window_size) % window_size
  pad_w = (window_size - w % window_size) % window_size
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
  return x, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, dropping the padding."""
  hp, wp = pad_hw
  h, w = hw
  b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
  x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w, :]


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative position table gathered to (q_size, k_size, head_dim).

  SAM always runs at its native resolution, so the table already has 2*size-1 rows
  (the reference's linear re-interpolation branch never triggers); a mismatch is an
  error rather than a silent resample.
  """
  max_rel_dist = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] != max_rel_dist:
    raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, expected "
                     f"{max_rel_dist} for a {q_size}x{k_size} attention grid")
  q_coords = jnp.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = jnp.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel_pos[rel.astype(jnp.int32)]


_PROBES = {}


def _probe(key, fn) -> bool:
  """Whether `fn()` (a tiny jitted call) compiles and runs; cached per key.

  Run outside any trace, so an unsupported kernel/shape/cuDNN version falls back to a
  portable path instead of failing at compile time.
  """
  if key not in _PROBES:
    try:
      with jax.ensure_compile_time_eval():
        jax.block_until_ready(fn())
      _PROBES[key] = True
    except Exception:  # unsupported shape/dtype/cuDNN version/JAX version
      _PROBES[key] = False
  return _PROBES[key]


def _cudnn_attention_works(n_tokens: int, heads: int, head_dim: int, dtype) -> bool:
  """Whether cuDNN flash attention with a (1, heads, N, N) bias runs for these shapes."""
  def fn():
    q = jnp.zeros((1, n_tokens, heads, head_dim), dtype)
    bias = jnp.zeros((1, heads, n_tokens, n_tokens), dtype)
    return jax.jit(lambda q, b: jax.nn.dot_product_attention(
        q, q, q, bias=b, implementation="cudnn"))(q, bias)
  return _probe(("cudnn", n_tokens, heads, head_dim, jnp.dtype(dtype).name), fn)


def _cudnn_mla():
  """JAX's cuDNN attention entry point that allows a value head dim != the query's.

  `jax.nn.dot_product_attention` requires equal head dims; the cuDNN wrapper underneath
  does not (cuDNN >= 9.10 on Hopper). It is private API, so it is looked up defensively
  and probed before use.
  """
  try:
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention
  except Exception:  # moved or removed in this JAX version
    return None
  return dot_product_attention


def _fold_works(kernel: str, n_tokens: int, heads: int, qk_dim: int, v_dim: int, dtype) -> bool:
  def fn():
    q = jnp.zeros((1, n_tokens, heads, qk_dim), dtype)
    v = jnp.zeros((1, n_tokens, heads, v_dim), dtype)
    return jax.jit(lambda q, v: _fold_kernel(q, q, v, kernel))(q, v)
  return _probe(("fold", kernel, n_tokens, heads, qk_dim, v_dim, jnp.dtype(dtype).name), fn)


def _fold_kernel(q2: jax.Array, k2: jax.Array, v: jax.Array, kernel: str) -> jax.Array:
  """softmax(q2 . k2) v with no further scaling; q2/k2 may be wider than v."""
  d, dv = q2.shape[-1], v.shape[-1]
  if kernel == "mla":
    return _cudnn_mla()(q2, k2, v, scale=1.0)
  v2 = jnp.pad(v, ((0, 0),) * 3 + ((0, d - dv),)) if d > dv else v
  out = jax.nn.dot_product_attention(q2, k2, v2, scale=1.0, implementation=kernel)
  return out[..., :dv]


def folded_rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array,
                             rel_w: jax.Array, grid: Tuple[int, int], scale: float,
                             kernel: str) -> jax.Array:
  """Attention with the decomposed relative-position terms folded into q and k.

  The reference adds rel_h[q, kh(k)] + rel_w[q, kw(k)] to the scaled logits. That is a
  dot product: q' = [scale*q, rel_h[q, :], rel_w[q, :]] and k' = [k, onehot(kh(k)),
  onehot(kw(k))] give q'.k' = scale*q.k + rel_h[q, kh] + rel_w[q, kw]. So a fused
  flash-attention kernel computes the exact function without the (heads, N, N) bias
  ever being written to memory (4 GiB per global block of a ViT-H batch of 8).
  q'/k' are zero-padded to a multiple of 8 channels (cuDNN's requirement).

  q, k, v: (B, N, heads, hd); rel_h: (B, N, heads, gh); rel_w: (B, N, heads, gw) with
  N = gh * gw; kernel: "xla" or "cudnn" (v zero-padded to q' width), or "mla" (cuDNN
  with v at its own width).
  """
  b, n, nh, _ = q.shape
  gh, gw = grid
  dt = q.dtype
  onehot = jnp.concatenate([jnp.repeat(jnp.eye(gh, dtype=dt), gw, axis=0),
                            jnp.tile(jnp.eye(gw, dtype=dt), (gh, 1))], axis=-1)  # (N, gh+gw)
  k_extra = jnp.broadcast_to(onehot[None, :, None, :], (b, n, nh, gh + gw))
  q2 = jnp.concatenate([q * jnp.asarray(scale, dt), rel_h.astype(dt), rel_w.astype(dt)], -1)
  k2 = jnp.concatenate([k, k_extra], -1)
  pad = (-q2.shape[-1]) % 8
  if pad:
    q2 = jnp.pad(q2, ((0, 0),) * 3 + ((0, pad),))
    k2 = jnp.pad(k2, ((0, 0),) * 3 + ((0, pad),))
  return _fold_kernel(q2, k2, v, kernel)


ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "fold", "fold_mla", "fold_xla")

# What "auto" tries on NVIDIA GPUs in 16-bit compute, in order, per block kind; the first
# kernel whose probe compiles and runs wins, "einsum" if none does.
# Measured on an H200, ViT-H batch 8 bf16 (benchmarks/gpu_run.sh, 2026-11-28): fold_mla
# 68.4 img/s, fold/fold_mla 67.8, fold 66.8, cudnn/fold_mla 66.7, fold/cudnn 61.7,
# cudnn (additive bias) 61.0; official PyTorch 22.4.
AUTO_GPU_PREFERENCE = {"window": ("fold_mla", "fold", "cudnn"),
                       "global": ("fold_mla", "fold", "cudnn")}


def split_attention_impl(impl: str) -> Tuple[str, str]:
  """"A" -> (A, A); "A/B" -> (A for windowed blocks, B for global blocks)."""
  parts = impl.split("/") if isinstance(impl, str) else [impl]
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or any(p not in ATTENTION_IMPLS for p in parts):
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS} or 'WINDOWED/GLOBAL' "
                     f"(e.g. 'cudnn/xla'), got {impl!r}")
  return parts[0], parts[1]


def fold_qk_dim(head_dim: int, grid: Tuple[int, int]) -> int:
  """Channel width of q'/k' in `folded_rel_pos_attention` (a multiple of 8)."""
  d = head_dim + grid[0] + grid[1]
  return d + (-d) % 8


def kernel_works(impl: str, n_tokens: int, heads: int, head_dim: int, dtype,
                 grid: Tuple[int, int]) -> bool:
  """Whether a GPU attention kernel compiles and runs for this shape (probed once)."""
  if impl == "cudnn":
    return _cudnn_attention_works(n_tokens, heads, head_dim, dtype)
  if impl in ("fold", "fold_mla"):
    if impl == "fold_mla" and _cudnn_mla() is None:
      return False
    return _fold_works("mla" if impl == "fold_mla" else "cudnn", n_tokens, heads,
                       fold_qk_dim(head_dim, grid), head_dim, dtype)
  return True  # einsum, xla, fold_xla: portable XLA


PORTABLE_IMPLS = ("einsum", "xla", "fold_xla")

# Windowed blocks: project q/k/v before partitioning (qkv on the real tokens only, the
# padding's q/k/v are the bias; fewer FLOPs, but the partition then copies 3x the
# channels), or partition the normalised tokens first as the reference does. None: by
# backend, as measured: project first on GPUs (the configuration of the H200 numbers in
# the README), partition first elsewhere (4% faster for ViT-B fp32 on a 2-core CPU,
# where the copies cost more than the padding's FLOPs).
PROJECT_BEFORE_PARTITION = None


def _project_before_partition() -> bool:
  if PROJECT_BEFORE_PARTITION is not None:
    return bool(PROJECT_BEFORE_PARTITION)
  return jax.default_backend() == "gpu"


def resolve_attention_impl(impl: str, n_tokens: int, heads: int, head_dim: int, dtype,
                           windowed: bool = False, grid: Optional[Tuple[int, int]] = None
                           ) -> str:
  """The attention kernel a block uses.

  `impl` names one kernel for all blocks or "WINDOWED/GLOBAL", one per block kind; an
  explicit name is used as is. "auto" tries, in order, the environment variable
  SAMJAX_ATTENTION_IMPL (same syntax; e.g. what a benchmark found fastest on this
  machine), then on NVIDIA GPUs in bf16/fp16 the kernels of AUTO_GPU_PREFERENCE[kind];
  a GPU kernel is taken only where it applies (GPU, 16-bit compute) and its one-time
  probe runs. Otherwise (CPU, TPU, float32) it is the explicit-logits "einsum" path.
  """
  kind = 0 if windowed else 1
  choice = split_attention_impl(impl)[kind]
  if choice != "auto":
    return choice
  if grid is None:
    side = int(round(n_tokens ** 0.5))
    grid = (side, n_tokens // side)
  fast_gpu = (jax.default_backend() == "gpu" and
              jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))
  candidates = []
  env = os.environ.get("SAMJAX_ATTENTION_IMPL", "").strip()
  if env:
    candidates.append(split_attention_impl(env)[kind])
  if fast_gpu:
    candidates += AUTO_GPU_PREFERENCE["window" if windowed else "global"]
  for cand in candidates:
    if cand in PORTABLE_IMPLS:
      return cand
    if cand != "auto" and fast_gpu and kernel_works(cand, n_tokens, heads, head_dim, dtype,
                                                    grid):
      return cand
  return "einsum"


class Linear(nn.Module):
  """`nn.Dense` (same parameters, same arithmetic) that can leave the bias for later.

  `Linear(f)(x, add_bias=False)` returns `(x @ kernel, bias)`: on GPUs the windowed
  attention projects only the real tokens and adds the bias after zero-padding, which
  reproduces the reference's projection of zero padding tokens (0 @ W + b == b) without
  computing it (see PROJECT_BEFORE_PARTITION).
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, add_bias: bool = True):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias if add_bias else (y, bias)


class Attention(nn.Module):
  """Multi-head self-attention with decomposed relative position bias (MViTv2).

  Takes the whole (B, H, W, C) token grid. With `window_size > 0` it attends within
  non-overlapping windows of the zero-padded grid, as the reference's Block does with
  window_partition -> Attention -> window_unpartition. The output projection always runs
  on the H*W real tokens (the padding's outputs are dropped first); on GPUs the qkv
  projection does too (the padding's q/k/v are exactly the qkv bias, as in the
  reference), which saves 1 - (64/70)^2 = 16% of those two matmuls on the official
  models (see PROJECT_BEFORE_PARTITION).

  `attention_impl` picks the kernel; all compute the same function:
    * "einsum": explicit logits in float32 (exact reference order; CPU/TPU default),
    * "xla" / "cudnn": `jax.nn.dot_product_attention` with the relative-position
      terms passed as an additive bias; "cudnn" is fused flash attention on NVIDIA
      GPUs (never materialises the softmax in HBM). "auto" chooses per backend/dtype.
    * "fold" / "fold_mla" / "fold_xla": the relative-position terms folded into q and k
      (see `folded_rel_pos_attention`), so a fused kernel needs no (N, N) bias at all:
      cuDNN with v zero-padded to the q/k width, cuDNN with v at its own width (private
      JAX entry point, Hopper + cuDNN >= 9.10), or portable XLA.
    * "WINDOWED/GLOBAL", e.g. "cudnn/fold_mla": one choice per block kind.
  """

  num_heads: int
  input_size: Tuple[int, int]
  window_size: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    grid_hw = x.shape[1:3]
    c = x.shape[-1]
    ws = self.window_size
    pad_hw = None
    if ws > 0 and not _project_before_partition():
      x, pad_hw = window_partition(x, ws)
      qkv = Linear(3 * c, self.dtype, self.param_dtype, name="qkv")(x)
    else:
      qkv, qkv_bias = Linear(3 * c, self.dtype, self.param_dtype, name="qkv")(x, add_bias=False)
      if ws > 0:
        qkv, pad_hw = window_partition(qkv, ws)
      qkv = qkv + qkv_bias
    out = self._attend(qkv)
    if ws > 0:
      out = window_unpartition(out, ws, pad_hw, grid_hw)
    return Linear(c, self.dtype, self.param_dtype, name="proj")(out)

  def _attend(self, qkv: jax.Array) -> jax.Array:
    """(B', h, w, 3C) projected tokens of one attention group -> (B', h, w, C)."""
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    nh = self.num_heads
    hd = c // nh
    qkv = qkv.reshape(b, h * w, 3, nh, hd)  # (B, N, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                           (2 * self.input_size[0] - 1, hd), self.param_dtype)
    rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                           (2 * self.input_size[1] - 1, hd), self.param_dtype)
    rh = get_rel_pos(h, h, rel_pos_h).astype(self.dtype)  # (qh, kh, hd)
    rw = get_rel_pos(w, w, rel_pos_w).astype(self.dtype)  # (qw, kw, hd)
    # The reference adds q (unscaled) . R to the scaled logits.
    r_q = q.reshape(b, h, w, nh, hd)
    impl = resolve_attention_impl(self.attention_impl, h * w, nh, hd, self.dtype,
                                  windowed=self.window_size > 0, grid=(h, w))
    if impl.startswith("fold"):
      # Relative terms in q's own (B, N, heads, k) layout, to be folded into q/k.
      rel_h = jnp.einsum("byxnd,ykd->byxnk", r_q, rh, preferred_element_type=jnp.float32)
      rel_w = jnp.einsum("byxnd,xkd->byxnk", r_q, rw, preferred_element_type=jnp.float32)
      kernel = {"fold": "cudnn", "fold_mla": "mla", "fold_xla": "xla"}[impl]
      out = folded_rel_pos_attention(q, k, v, rel_h.reshape(b, h * w, nh, h),
                                     rel_w.reshape(b, h * w, nh, w), (h, w), hd ** -0.5, kernel)
      return out.reshape(b, h, w, c)
    # (B, heads, qh, qw, kh) and (B, heads, qh, qw, kw)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", r_q, rh, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", r_q, rw, preferred_element_type=jnp.float32)
    if impl == "einsum":
      logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k,
                          preferred_element_type=jnp.float32)  # (B, heads, N, N)
      logits = logits.reshape(b, nh, h, w, h, w)
      logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
      logits = logits.reshape(b, nh, h * w, h * w)
      attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bnqk,bknd->bqnd", attn, v)
    elif impl in ("xla", "cudnn"):
      bias = (rel_h[..., :, None] + rel_w[..., None, :])
      bias = bias.reshape(b, nh, h * w, h * w).astype(q.dtype)
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5,
                                         implementation=impl)
    else:
      raise ValueError(f"unknown attention_impl {impl!r}")
    return out.reshape(b, h, w, c)


class Block(nn.Module):
  """Pre-norm transformer block; windowed attention when `window_size > 0`."""

  num_heads: int
  mlp_ratio: float
  window_size: int
  input_size: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    shortcut = x
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="norm1")(x)
    attn_size = self.input_size if self.window_size == 0 else (self.window_size,) * 2
    x = Attention(self.num_heads, attn_size, self.window_size, self.dtype,
                  self.param_dtype, self.attention_impl, name="attn")(x)
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
  attention_impl: str = "auto"

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
                self.dtype, self.param_dtype, self.attention_impl, name=f"blocks_{i}")(x)
      self.sow("intermediates", f"blocks_{i}", x)
    x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="neck_0")(x)
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="neck_1")(x)
    x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="neck_2")(x)
    x = LayerNorm(1e-6, self.dtype, self.param_dtype, name="neck_3")(x)
    return x
