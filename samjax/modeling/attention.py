"""The image encoder's attention: the function, its kernels, and the kernel setting.

SAM's encoder attention is multi-head self-attention with decomposed relative
positions (MViTv2), inside 14x14 windows of the zero-padded token grid or over the
whole grid (global blocks). Every kernel here computes that same function:

* "einsum": explicit logits in float32, in the reference's order (the CPU default).
* "xla" / "cudnn": `jax.nn.dot_product_attention` with the relative-position terms
  passed as an additive (heads, N, N) bias; "cudnn" is fused flash attention on
  NVIDIA GPUs.
* "fold" / "fold_mla" / "fold_xla" / "fold_tpu": the relative-position terms folded
  into q and k (`folded_rel_pos_attention`), so a fused kernel needs no (N, N) bias at
  all: cuDNN with v zero-padded to the q/k width, cuDNN with v at its own width
  (private JAX entry point, Hopper + cuDNN >= 9.10), portable XLA, or the Pallas TPU
  flash kernel of `samjax.modeling.attention_tpu`.

Which kernel runs is configuration: an `AttentionConfig` (one kernel per block kind,
plus where the windowed blocks project q/k/v), a frozen, hashable value that is part
of every compile key. "auto" parts are resolved for the platform the program is
compiled for: by the runtime from its devices (`samjax.runtime`), or, inside a user's
own `jax.jit`, by `jax.lax.platform_dependent`, so a program lowered for a TPU from a
CPU host gets the TPU's kernels. Nothing here reads the environment or global state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Dtype = Any

KERNELS = ("einsum", "xla", "cudnn", "fold", "fold_mla", "fold_xla", "fold_tpu")
#: Kernels that only compile on NVIDIA GPUs / on TPUs; the rest are portable XLA.
GPU_KERNELS = ("cudnn", "fold", "fold_mla")
TPU_KERNELS = ("fold_tpu",)
PORTABLE_KERNELS = ("einsum", "xla", "fold_xla")

# What "auto" tries on NVIDIA GPUs in 16-bit compute, in order, per block kind; the
# first kernel that runs wins. Measured on an H200, ViT-H batch 8 bf16
# (benchmarks/gpu_run.sh, 2026-11-28): fold_mla 68.4 img/s, fold/fold_mla 67.8, fold
# 66.8, cudnn/fold_mla 66.7, fold/cudnn 61.7, cudnn (additive bias) 61.0; official 22.4.
AUTO_GPU_PREFERENCE = ("fold_mla", "fold", "cudnn")

# TPUs: the Pallas flash kernel over the folded form (`attention_tpu`) for both block
# kinds. Compiled for a v5e chip from a CPU host (benchmarks/tpu_compile.py; compiler
# figures, not timings), ViT-H bf16 batch 8 needs 4.35 GB of HBM temporaries with it,
# 10.0 GB with the folded form through XLA ("fold_xla", which writes a (B, heads, 4096,
# 4096) float32 logits tensor per global block) and 34.8 GB with explicit einsum logits
# (does not compile on a 15.75 GB chip); ViT-B: 1.80 / 3.13 / 11.7 GB. The kernel costs
# at most 4% more MXU work (padding). See `attention_tpu`'s docstring for the table.
AUTO_TPU = ("fold_tpu", "fold_tpu")

#: Platforms whose names `jax.lax.platform_dependent` knows, and ours for them.
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention kernel each kind of encoder block uses.

  Attributes:
    window: kernel of the windowed blocks (one of KERNELS, or "auto").
    global_attn: kernel of the global blocks (one of KERNELS, or "auto").
    project_first: windowed blocks project q/k/v before partitioning into windows (qkv
      on the real tokens only; the padding's q/k/v are the qkv bias, exactly as in the
      reference, which saves 1 - (64/70)^2 = 16% of those matmuls on the official
      models but copies 3x the channels), or partition the normalised tokens first as
      the reference does. None: by platform, as measured: first on GPUs (the
      configuration of the README's H200 numbers), after elsewhere (4% faster for
      ViT-B fp32 on a 2-core CPU, where the copies cost more than the padding's FLOPs).

  The string forms "A" (both kinds) and "WINDOWED/GLOBAL" (e.g. "fold/fold_mla") are
  accepted wherever an AttentionConfig is (`AttentionConfig.parse`).
  """

  window: str = "auto"
  global_attn: str = "auto"
  project_first: Optional[bool] = None

  def __post_init__(self):
    for name in ("window", "global_attn"):
      value = getattr(self, name)
      if value != "auto" and value not in KERNELS:
        raise ValueError(f"attention kernel {value!r} ({name} blocks) is not one of "
                         f"{('auto',) + KERNELS}; a 'WINDOWED/GLOBAL' pair such as "
                         "'einsum/fold_xla' picks one per block kind")
    if self.project_first not in (None, True, False):
      raise ValueError(f"project_first must be None, True or False, got "
                       f"{self.project_first!r}")

  @classmethod
  def parse(cls, spec: Union[None, str, "AttentionConfig"]) -> "AttentionConfig":
    """An AttentionConfig from None ("auto"), a name, "WINDOWED/GLOBAL", or itself."""
    if isinstance(spec, AttentionConfig):
      return spec
    if spec is None:
      return cls()
    if not isinstance(spec, str):
      raise ValueError(f"attention must be a kernel name, 'WINDOWED/GLOBAL' or an "
                       f"AttentionConfig, got {spec!r}")
    parts = [p.strip() for p in spec.split("/")]
    if len(parts) == 1:
      parts *= 2
    if len(parts) != 2:
      raise ValueError(f"attention {spec!r}: expected a kernel name or 'WINDOWED/GLOBAL' "
                       f"with kernels from {('auto',) + KERNELS}")
    return cls(parts[0], parts[1])

  def kernel(self, windowed: bool) -> str:
    return self.window if windowed else self.global_attn

  @property
  def resolved(self) -> bool:
    """No "auto" left: the program this setting compiles to is fully determined."""
    return "auto" not in (self.window, self.global_attn) and self.project_first is not None

  def __str__(self) -> str:
    kernels = self.window if self.window == self.global_attn else \
        f"{self.window}/{self.global_attn}"
    if self.project_first is None:
      return kernels
    return f"{kernels} (project {'before' if self.project_first else 'after'} partition)"


def platform_name(platform: str) -> str:
  """"cpu", "gpu" or "tpu" for a JAX platform or device-platform name."""
  return _PLATFORM_ALIASES.get(platform, platform)


def resolve(attention: AttentionConfig, platform: str, dtype,
            gpu_kernel_runs: Optional[Callable[[str, bool], bool]] = None) -> AttentionConfig:
  """Fills the "auto" parts of `attention` for `platform` ("cpu", "gpu", "tpu").

  Args:
    attention: the requested setting (explicit kernels are kept as they are).
    platform: the platform the program is compiled for.
    dtype: compute dtype; fused GPU kernels are chosen for 16-bit compute only.
    gpu_kernel_runs: (kernel, windowed) -> whether that GPU kernel compiles and runs
      for this model on the target GPU (the runtime's probe). None: nothing is known
      about the GPU (e.g. lowering from a CPU host), so "auto" takes the portable
      folded kernel there.

  Returns:
    A resolved AttentionConfig.
  """
  platform = platform_name(platform)
  sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)

  def pick(windowed: bool) -> str:
    choice = attention.kernel(windowed)
    if choice != "auto":
      return choice
    if platform == "tpu":
      return AUTO_TPU[1 - windowed]
    if platform == "gpu" and sixteen_bit:
      if gpu_kernel_runs is None:
        return "fold_xla"
      for cand in AUTO_GPU_PREFERENCE:
        if gpu_kernel_runs(cand, windowed):
          return cand
    return "einsum"

  project_first = attention.project_first
  if project_first is None:
    project_first = platform == "gpu"
  return AttentionConfig(pick(True), pick(False), project_first)


def check_platform(attention: AttentionConfig, platform: str) -> None:
  """Raises a clear error if an explicitly named kernel cannot run on `platform`."""
  platform = platform_name(platform)
  for windowed in (True, False):
    k = attention.kernel(windowed)
    need = "gpu" if k in GPU_KERNELS else "tpu" if k in TPU_KERNELS else None
    if need is not None and need != platform:
      raise ValueError(f"attention kernel {k!r} runs on {need.upper()}s only; this program "
                       f"is compiled for {platform}. Use 'auto' or one of "
                       f"{PORTABLE_KERNELS}.")


# ----------------------------------------------------------------------------------------
# Window partitioning and relative positions (the reference's helpers).
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------
def cudnn_mla():
  """JAX's cuDNN attention entry point that allows a value head dim != the query's.

  `jax.nn.dot_product_attention` requires equal head dims; the cuDNN wrapper underneath
  does not (cuDNN >= 9.10 on Hopper). It is private API, so it is looked up defensively
  and probed before use.
  """
  try:
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention
  except Exception:  # moved or removed in this JAX version  pylint: disable=broad-except
    return None
  return dot_product_attention


def fold_kernel(q2: jax.Array, k2: jax.Array, v: jax.Array, kernel: str) -> jax.Array:
  """softmax(q2 . k2) v with no further scaling; q2/k2 may be wider than v.

  kernel: "xla" or "cudnn" (v zero-padded to q2's width), "mla" (cuDNN with v at its
  own width), or "tpu" (Pallas TPU flash attention).
  """
  d, dv = q2.shape[-1], v.shape[-1]
  if kernel == "mla":
    return cudnn_mla()(q2, k2, v, scale=1.0)
  if kernel == "tpu":
    from samjax.modeling import attention_tpu  # pylint: disable=import-outside-toplevel
    return attention_tpu.flash_attention_tpu(q2, k2, v)
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
  N = gh * gw; kernel: see `fold_kernel`.
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
  return fold_kernel(q2, k2, v, kernel)


def fold_qk_dim(head_dim: int, grid: Tuple[int, int]) -> int:
  """Channel width of q'/k' in `folded_rel_pos_attention` (a multiple of 8)."""
  d = head_dim + grid[0] + grid[1]
  return d + (-d) % 8


_FOLD_KERNELS = {"fold": "cudnn", "fold_mla": "mla", "fold_xla": "xla", "fold_tpu": "tpu"}


def attend(qkv: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, num_heads: int,
           kernel: str, dtype) -> jax.Array:
  """One attention group: (B', h, w, 3C) projected tokens -> (B', h, w, C).

  Args:
    qkv: projected tokens of a window (or of the whole grid), channels [q | k | v].
    rel_pos_h, rel_pos_w: (2h-1, hd) and (2w-1, hd) relative position tables.
    num_heads: heads; hd = C / num_heads.
    kernel: one of KERNELS (resolved, not "auto").
    dtype: compute dtype.
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  nh = num_heads
  hd = c // nh
  qkv = qkv.reshape(b, h * w, 3, nh, hd)  # (B, N, 3, heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  rh = get_rel_pos(h, h, rel_pos_h).astype(dtype)  # (qh, kh, hd)
  rw = get_rel_pos(w, w, rel_pos_w).astype(dtype)  # (qw, kw, hd)
  # The reference adds q (unscaled) . R to the scaled logits.
  r_q = q.reshape(b, h, w, nh, hd)
  if kernel.startswith("fold"):
    # Relative terms in q's own (B, N, heads, k) layout, to be folded into q/k.
    rel_h = jnp.einsum("byxnd,ykd->byxnk", r_q, rh, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("byxnd,xkd->byxnk", r_q, rw, preferred_element_type=jnp.float32)
    out = folded_rel_pos_attention(q, k, v, rel_h.reshape(b, h * w, nh, h),
                                   rel_w.reshape(b, h * w, nh, w), (h, w), hd ** -0.5,
                                   _FOLD_KERNELS[kernel])
    return out.reshape(b, h, w, c)
  # (B, heads, qh, qw, kh) and (B, heads, qh, qw, kw)
  rel_h = jnp.einsum("byxnd,ykd->bnyxk", r_q, rh, preferred_element_type=jnp.float32)
  rel_w = jnp.einsum("byxnd,xkd->bnyxk", r_q, rw, preferred_element_type=jnp.float32)
  if kernel == "einsum":
    logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k,
                        preferred_element_type=jnp.float32)  # (B, heads, N, N)
    logits = logits.reshape(b, nh, h, w, h, w)
    logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
    logits = logits.reshape(b, nh, h * w, h * w)
    attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v)
  elif kernel in ("xla", "cudnn"):
    bias = (rel_h[..., :, None] + rel_w[..., None, :])
    bias = bias.reshape(b, nh, h * w, h * w).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5,
                                       implementation=kernel)
  else:
    raise ValueError(f"unknown attention kernel {kernel!r}")
  return out.reshape(b, h, w, c)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype, add_bias: bool = True):
  """`nn.Dense` arithmetic: x @ kernel (+ bias) in `dtype`."""
  x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + bias if add_bias else (y, bias)


def attention_block(x: jax.Array, qkv_kernel: jax.Array, qkv_bias: jax.Array,
                    proj_kernel: jax.Array, proj_bias: jax.Array, rel_pos_h: jax.Array,
                    rel_pos_w: jax.Array, *, num_heads: int, window_size: int,
                    kernel: str, project_first: bool, dtype) -> jax.Array:
  """The reference's `Attention` (with Block's window partitioning) as a pure function.

  Args:
    x: (B, H, W, C) normalised tokens.
    qkv_kernel, qkv_bias: (C, 3C), (3C,) projection; proj_kernel, proj_bias: (C, C), (C,).
    rel_pos_h, rel_pos_w: relative position tables of the attention grid.
    num_heads: heads.
    window_size: 0 for global attention, else the window side.
    kernel: resolved kernel name; project_first: see `AttentionConfig`.
    dtype: compute dtype.

  Returns:
    (B, H, W, C).
  """
  grid_hw = x.shape[1:3]
  ws = window_size
  pad_hw = None
  if ws > 0 and not project_first:
    x, pad_hw = window_partition(x, ws)
    qkv = _dense(x, qkv_kernel, qkv_bias, dtype)
  else:
    # The output projection always runs on the H*W real tokens; here the qkv
    # projection does too: the padding's q/k/v are exactly the qkv bias.
    qkv, bias = _dense(x, qkv_kernel, qkv_bias, dtype, add_bias=False)
    if ws > 0:
      qkv, pad_hw = window_partition(qkv, ws)
    qkv = qkv + bias
  out = attend(qkv, rel_pos_h, rel_pos_w, num_heads, kernel, dtype)
  if ws > 0:
    out = window_unpartition(out, ws, pad_hw, grid_hw)
  return _dense(out, proj_kernel, proj_bias, dtype)


@dataclasses.dataclass(frozen=True)
class PerPlatform:
  """Resolved settings for each platform a program may be lowered for.

  What a module gets when "auto" must be decided where the program is compiled, not
  where it is traced (e.g. `encode_image` inside a user's own `jax.jit`).
  """

  cpu: AttentionConfig
  gpu: AttentionConfig
  tpu: AttentionConfig

  @classmethod
  def of(cls, attention: AttentionConfig, dtype,
         gpu_kernel_runs: Optional[Callable[[str, bool], bool]] = None) -> "PerPlatform":
    """`attention` resolved for each platform (GPU kernels probed if a prober is given).

    Without a prober (no GPU in this process) the GPU branch takes the portable folded
    kernel: cuDNN kernels cannot even be traced where cuDNN is absent.
    """
    return cls(resolve(attention, "cpu", dtype), resolve(attention, "gpu", dtype,
                                                         gpu_kernel_runs),
               resolve(attention, "tpu", dtype))


def attention_for_platform(attention: Union[AttentionConfig, PerPlatform], windowed: bool,
                           dtype) -> Callable[..., jax.Array]:
  """`attention_block` with the kernel setting resolved where the program is compiled.

  A resolved AttentionConfig gives the one function. Otherwise (a `PerPlatform`, or an
  AttentionConfig with "auto" parts, resolved without GPU probes) each platform gets
  its own branch through `jax.lax.platform_dependent`: all branches are traced, only
  the target platform's is lowered.
  """
  def block(choice: AttentionConfig):
    return functools.partial(attention_block, kernel=choice.kernel(windowed),
                             project_first=choice.project_first, dtype=dtype)
  if isinstance(attention, AttentionConfig):
    if attention.resolved:
      return block(attention)
    attention = PerPlatform.of(attention, dtype)
  if attention.cpu == attention.gpu == attention.tpu:
    return block(attention.cpu)
  cpu, gpu, tpu = block(attention.cpu), block(attention.gpu), block(attention.tpu)

  def by_platform(*args, **kw):
    return jax.lax.platform_dependent(
        *args, cpu=lambda *a: cpu(*a, **kw), cuda=lambda *a: gpu(*a, **kw),
        rocm=lambda *a: gpu(*a, **kw), tpu=lambda *a: tpu(*a, **kw),
        default=lambda *a: cpu(*a, **kw))
  return by_platform
