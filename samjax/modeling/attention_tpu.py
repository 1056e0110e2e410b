"""Flash attention for TPUs (Pallas) over SAM's folded relative-position form.

`attention.folded_rel_pos_attention` turns the encoder's attention into plain
softmax(q' k'^T) v with q'/k' wider than v (the relative-position terms are extra
channels). `flash_attention_tpu` computes exactly that, tile by tile in VMEM, so the
(heads, N, N) logits never reach HBM.

Why a kernel of our own rather than `jax.experimental.pallas.ops.tpu.flash_attention`:
that kernel requires v's head dim to equal q/k's (v would be zero-padded from 64 to 256
channels in a global block, so the p @ v matmul would do 2x the MXU work of a 128-lane
v, 25% of the whole kernel), wants its own (B, heads, N, D) layout, and masks padded
keys only through segment ids (an extra (B, N, 128) int32 input). Here v keeps its own
width rounded up to 128 lanes, and padded keys are masked by position, statically.

Padding. Head dims are zero-padded to multiples of 128 lanes (a zero channel adds
nothing to q.k); the query sequence to a multiple of `block_q` (padded query rows are
sliced off) and the key sequence to a multiple of `block_k` (padded keys get a logit of
-inf, so exp() gives exactly 0: the result is the unpadded softmax, not an
approximation). A windowed block of the official models (N = 196) runs as 200 query
rows x 256 keys in one step: 1.3x the logical FLOPs, where 256 x 256 would be 1.7x.

Numerics: logits and softmax statistics in float32; p is cast to v's dtype for the
p @ v matmul (as `jax.nn.dot_product_attention` does); the 1/l normalisation is applied
once to the float32 accumulator. float32 inputs use Precision.HIGHEST matmuls.

Which kernel on TPU (the compile-time comparison behind TPU_DEFAULT), from
`python -m benchmarks.tpu_compile`: HBM temporaries / total FLOPs of `encode_image`, bf16,
batch 8, compiled for a v5e chip (15.75 GiB usable HBM) from a CPU host. These are the
compiler's figures, not timings; the kernel's FLOPs are those it executes, padding
included, as declared in its cost estimate.

  ViT-B b8 v5e   temp GB   TFLOP   (windowed / global kernel)
    einsum        11.7      3.43
    fold_xla       3.13     3.91
    flash/flash    1.80     4.07
    fold_xla/flash 2.42     3.87
  ViT-H b8 v5e
    einsum        34.8 (does not fit: RESOURCE_EXHAUSTED at compile)
    fold_xla      10.0     52.1
    flash/flash    4.35    53.9
    fold_xla/flash 6.28    51.5

(see the table printed by benchmarks/tpu_compile.py for every model, batch and chip.)

Global blocks: the flash kernel wins outright; fold_xla writes a (B, heads, 4096, 4096)
float32 logits tensor per global block (8.6 GB at ViT-H batch 8), the kernel none.
Windowed blocks: fold_xla materialises (B*25, heads, 196, 196) float32 logits per block
(0.5 GB at ViT-H batch 8, reused block to block) and runs the matmuls at 196 rows; the
kernel keeps the logits in VMEM at the cost of 200 x 256 padding. The kernel needs the
least HBM (it is the only choice that keeps ViT-H batch 8 under ~5 GB) and the least
HBM traffic, for 4% more MXU work at most; so TPU_DEFAULT takes it for both kinds.
fold_xla/flash (XLA windows, flash global) is the fallback when Pallas is unavailable
for windows only; einsum is never better on TPU.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

#: Kernel names for the image encoder's attention setting (`samjax.modeling.attention`)
#: that "auto" should pick on TPU for (windowed blocks, global blocks). "fold_tpu" is
#: `folded_rel_pos_attention` with `flash_attention_tpu` as its inner kernel.
TPU_DEFAULT = ("fold_tpu", "fold_tpu")
#: What to use where Pallas cannot be lowered (e.g. a JAX build without Mosaic): the
#: folded form through XLA for both kinds (fits ViT-H batch 8 on v5e, see above).
TPU_FALLBACK = ("fold_xla", "fold_xla")

LANES = 128  # TPU vector lane width: last dims of VMEM tiles are multiples of this.
SUBLANES = 8  # second-to-last dims are multiples of this (float32 tiles).

# Above this many (padded) tokens the keys are streamed in blocks (online softmax);
# up to it one block holds them all. 1024 keys x 256 channels bf16 is 0.5 MiB per
# buffer, well inside the 16 MiB scoped VMEM of a v5e core.
_SINGLE_BLOCK_MAX = 1024
_LONG_BLOCK_Q = 512
_LONG_BLOCK_K = 512
# Groups (batch x head) per grid step: up to this many logit elements per step, so
# that small windows do not pay a grid step's fixed overhead (~0.35 us) each.
_GROUP_LOGITS = 1 << 18
_MAX_GROUPS = 8


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def default_block_sizes(n: int, groups: int, block_q: Optional[int] = None,
                        block_k: Optional[int] = None) -> Tuple[int, int, int]:
  """(block_q, block_k, block_g) for `groups` = batch x heads sequences of n tokens.

  Untuned defaults from VMEM arithmetic (no TPU was available to time them): one key
  block up to _SINGLE_BLOCK_MAX tokens, else 512 x 512 tiles; small sequences batch
  several (batch, head) groups per grid step. Explicit block_q/block_k are kept.
  """
  nq, nk = _round_up(n, SUBLANES), _round_up(n, LANES)
  single = nq <= _SINGLE_BLOCK_MAX and nk <= _SINGLE_BLOCK_MAX
  bq = block_q or (nq if single else _LONG_BLOCK_Q)
  bk = block_k or (nk if single else _LONG_BLOCK_K)
  limit = max(1, min(_MAX_GROUPS, _GROUP_LOGITS // (bq * bk)))
  bg = max(g for g in range(1, limit + 1) if groups % g == 0)
  return bq, bk, bg


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *scratch, n_valid: int, block_k: int,
                  num_k_blocks: int, mask_keys: bool, precision):
  """One (groups, block_q) tile of queries against one block_k tile of keys.

  q_ref: (G, bq, Dp); k_ref: (G, bk, Dp); v_ref: (G, bk, Dvp); o_ref: (G, bq, Dvp).
  scratch (only with several key blocks): m, l (G, bq, 128) float32 running max and
  sum, replicated across lanes (a lane-dense layout); acc (G, bq, Dvp) float32.
  """
  kv = pl.program_id(2)
  groups = q_ref.shape[0]
  if num_k_blocks > 1:
    m_ref, l_ref, acc_ref = scratch

    @pl.when(kv == 0)
    def _init():
      m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  for g in range(groups):  # static: G small matmuls per step
    q, k, v = q_ref[g], k_ref[g], v_ref[g]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)  # (bq, bk)
    if mask_keys:
      # Padded keys get -inf: exp() is exactly 0. Every row has real keys in key
      # block 0, so the running max is finite from the first step on.
      col = kv * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      s = jnp.where(col < n_valid, s, -jnp.inf)
    if num_k_blocks == 1:
      m = jnp.max(s, axis=1, keepdims=True)
      p = jnp.exp(s - m)
      l = jnp.sum(p, axis=1, keepdims=True)
      o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
      o_ref[g] = (o / l).astype(o_ref.dtype)
      continue
    m_prev, l_prev = m_ref[g], l_ref[g]  # (bq, 128)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)  # rescales what was summed under the old max
    p = jnp.exp(s - m_next[:, :1])
    l_ref[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[g] = m_next
    o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)
    acc_ref[g] = acc_ref[g] * alpha[:, :1] + o

  if num_k_blocks > 1:
    @pl.when(kv == num_k_blocks - 1)
    def _store():
      for g in range(groups):
        o_ref[g] = (acc_ref[g] / l_ref[g][:, :1]).astype(o_ref.dtype)


def flash_attention_tpu(q2: jax.Array, k2: jax.Array, v: jax.Array, *,
                        block_q: Optional[int] = None, block_k: Optional[int] = None,
                        block_g: Optional[int] = None, interpret: bool = False) -> jax.Array:
  """softmax(q2 . k2^T) v per (batch, head), with no scaling, as a Pallas TPU kernel.

  Same layout as `attention.fold_kernel`'s inputs and output.

  Args:
    q2: (B, N, heads, D) queries (already scaled, relative terms folded in).
    k2: (B, N, heads, D) keys.
    v: (B, N, heads, Dv) values; Dv may differ from D.
    block_q: query rows per tile (a multiple of 8); default by `default_block_sizes`.
    block_k: keys per tile (a multiple of 128); N is padded up to a multiple of it and
      the padded keys are masked exactly.
    block_g: (batch, head) groups per grid step (must divide B * heads).
    interpret: run the kernel in the Pallas TPU interpreter (any backend, e.g. CPU
      tests). `pltpu.force_tpu_interpret_mode()` has the same effect for every call.

  Returns:
    (B, N, heads, Dv) in v's dtype.
  """
  if q2.ndim != 4 or k2.shape != q2.shape:
    raise ValueError(f"q2 and k2 must both be (B, N, heads, D); got {q2.shape} and "
                     f"{k2.shape}")
  b, n, h, d = q2.shape
  if v.ndim != 4 or v.shape[:3] != (b, n, h):
    raise ValueError(f"v must be (B, N, heads, Dv) = ({b}, {n}, {h}, Dv); got {v.shape}")
  dv = v.shape[-1]
  groups = b * h
  bq, bk, bg = default_block_sizes(n, groups, block_q, block_k)
  bg = block_g or bg
  if bq % SUBLANES or bk % LANES:
    raise ValueError(f"block_q must be a multiple of {SUBLANES} and block_k of {LANES}; "
                     f"got block_q={bq}, block_k={bk}")
  if groups % bg:
    raise ValueError(f"block_g={bg} must divide batch x heads = {groups}")
  dp, dvp = _round_up(d, LANES), _round_up(dv, LANES)
  nq, nk = _round_up(n, bq), _round_up(n, bk)

  def grouped(x, rows, width):  # (B, N, heads, C) -> (B*heads, rows, width), zero-padded
    x = jnp.swapaxes(x, 1, 2).reshape(groups, n, x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, rows - n), (0, width - x.shape[-1])))

  qg, kg, vg = grouped(q2, nq, dp), grouped(k2, nk, dp), grouped(v, nk, dvp)
  num_k_blocks = nk // bk
  f32 = jnp.float32 in (jnp.dtype(q2.dtype), jnp.dtype(v.dtype))
  kernel = functools.partial(
      _flash_kernel, n_valid=n, block_k=bk, num_k_blocks=num_k_blocks,
      mask_keys=nk > n, precision=lax.Precision.HIGHEST if f32 else None)
  scratch = []
  if num_k_blocks > 1:
    scratch = [pltpu.VMEM((bg, bq, LANES), jnp.float32),
               pltpu.VMEM((bg, bq, LANES), jnp.float32),
               pltpu.VMEM((bg, bq, dvp), jnp.float32)]
  itemsize = lambda x: jnp.dtype(x.dtype).itemsize
  # What the kernel executes, padding included (the compiler trusts this for the
  # custom call's cost_analysis); keys and values are re-read once per query tile.
  cost = pl.CostEstimate(
      flops=2 * groups * nq * nk * (dp + dvp), transcendentals=groups * nq * nk,
      bytes_accessed=(qg.size * itemsize(qg) +
                      (kg.size * itemsize(kg) + vg.size * itemsize(vg)) * (nq // bq) +
                      groups * nq * dvp * itemsize(v)))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, nq, dvp), v.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(groups // bg, nq // bq, num_k_blocks),
          in_specs=[pl.BlockSpec((bg, bq, dp), lambda g, i, j: (g, i, 0)),
                    pl.BlockSpec((bg, bk, dp), lambda g, i, j: (g, j, 0)),
                    pl.BlockSpec((bg, bk, dvp), lambda g, i, j: (g, j, 0))],
          out_specs=pl.BlockSpec((bg, bq, dvp), lambda g, i, j: (g, i, 0)),
          scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=pltpu.InterpretParams() if interpret else False,
      name="samjax_flash_attention",
  )(qg, kg, vg)
  out = out[:, :n, :dv].reshape(b, h, n, dv)
  return jnp.swapaxes(out, 1, 2)


def reference_attention(q2: jax.Array, k2: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q2 . k2^T) v in float32 with plain jnp: the kernel's specification.

  Shapes as `flash_attention_tpu`; returns float32 (B, N, heads, Dv).
  """
  s = jnp.einsum("bqnd,bknd->bnqk", q2.astype(jnp.float32), k2.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bnqk,bknd->bqnd", p, v.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)


def flops(n: int, groups: int, d: int, dv: int, block_q: Optional[int] = None,
          block_k: Optional[int] = None) -> int:
  """FLOPs the kernel executes for `groups` sequences of n tokens (padding included)."""
  bq, bk, _ = default_block_sizes(n, groups, block_q, block_k)
  return 2 * groups * _round_up(n, bq) * _round_up(n, bk) * (
      _round_up(d, LANES) + _round_up(dv, LANES))


__all__ = ["TPU_DEFAULT", "TPU_FALLBACK", "default_block_sizes", "flash_attention_tpu",
           "reference_attention", "flops"]
