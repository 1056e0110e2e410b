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
rows x 256 keys in one step: 1.3x the logits of 196 x 196, where 256 x 256 would be
1.7x.

Numerics: logits and softmax statistics in float32; p is cast to v's dtype for the
p @ v matmul (as `jax.nn.dot_product_attention` does); the 1/l normalisation is applied
once to the float32 accumulator. float32 inputs use Precision.HIGHEST matmuls.

Which kernel on TPU. `python -m benchmarks.tpu_compile` compiles `encode_image` (bf16)
for a v5e chip from a CPU host (XLA's TPU compiler via `jax.experimental.topologies`;
libtpu 0.0.42.1, jax 0.10.2). Batch 8; COMPILE-TIME figures, not timings: HBM
temporaries in GB of 1e9 bytes (`memory_analysis`), TFLOPs and GB accessed
(`cost_analysis`; for this kernel its own declared cost, padding included). XLA gives
a v5e 15.75 GiB (16.9 GB) of HBM for a program.

                          ViT-B                    ViT-H
  windowed/global     temp   TFLOP  GB acc.    temp   TFLOP  GB acc.
  einsum             26.46 needed: no fit     37.39 needed: no fit
  xla (bias)         20.01 needed: no fit     28.80 needed: no fit
  fold_xla            7.11   11.17   176      10.00   52.13   513
  fold_tpu/fold_xla   7.27   11.38   165       9.68   52.92   438
  fold_xla/fold_tpu   2.02   11.15   117       4.25   51.56   428
  fold_tpu            1.63   11.36   105       2.11   52.35   354

Global blocks: the kernel wins outright. fold_xla writes a (B, heads, 4096, 4096)
float32 logits tensor per global block (8.6 GB at ViT-H batch 8); the kernel keeps
the logits in VMEM, which takes ViT-H's temporaries from 10.0 to 4.3 GB on its own.
Windowed blocks: fold_xla's (B * 25, heads, 196, 196) logits are small (0.5 GB at
ViT-H batch 8), and the kernel pays for its 200 x 256 padding and its padded,
transposed copies of q/k/v; still, with the kernel for global blocks, running the
windowed blocks through it too cuts the temporaries again (ViT-H 4.25 -> 2.11 GB,
ViT-B 2.02 -> 1.63 GB) and the bytes accessed by 17% / 10%, for 1.5% / 1.9% more
FLOPs (the padding). On these figures the encoder is bound by HBM traffic, not the
MXU (ViT-H: 354 GB / 820 GB/s = 0.43 s vs 52 TFLOP / 197 TFLOP/s = 0.27 s), so the
kernel is the choice for both kinds: TPU_DEFAULT. The explicit einsum does not fit a
v5e at batch 8 (and reads 3-5x the bytes where it fits). The windowed choice is the
close one: on a v6e at batch 8, and at batch 1 on either chip, the two windowed
options need the same temporaries (within 0.2 GB) and XLA's reads up to 10% fewer
bytes for ViT-B (18.6 vs 20.1 GB at batch 1 on v5e), while the kernel reads fewer for
ViT-H; only timings on a chip can settle that, so the kernel stays the default for
the memory it saves at batch 8. Block sizes are untuned (no TPU to time them on).
Every model / batch / chip: the table printed by benchmarks/tpu_compile.py.
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
                  num_k_blocks: int, mask_keys: bool, qk_precision, pv_precision):
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
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=qk_precision,
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
                          precision=pv_precision, preferred_element_type=jnp.float32)
      o_ref[g] = (o / l).astype(o_ref.dtype)
      continue
    m_prev, l_prev = m_ref[g], l_ref[g]  # (bq, 128)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)  # rescales what was summed under the old max
    p = jnp.exp(s - m_next[:, :1])
    l_ref[g] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[g] = m_next
    o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                        precision=pv_precision, preferred_element_type=jnp.float32)
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
    interpret: run the kernel in the Pallas TPU interpreter (`pltpu.InterpretParams`:
      on any backend, grid step by grid step; uninitialised VMEM reads give NaN), e.g.
      for CPU tests. `pltpu.force_tpu_interpret_mode()` does this for every call.

  Returns:
    (B, N, heads, Dv) in v's dtype.
  """
  if q2.ndim != 4 or k2.shape != q2.shape or k2.dtype != q2.dtype:
    raise ValueError(f"q2 and k2 must both be (B, N, heads, D) of one dtype; got "
                     f"{q2.shape} {q2.dtype} and {k2.shape} {k2.dtype}")
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
  # Explicit either way: a global jax_default_matmul_precision of "highest" (as the
  # tests set) would otherwise ask Mosaic for fp32 contraction of bf16 operands, which
  # it rejects. Each matmul's operands share a dtype (p is cast to v's).
  precision = lambda dt: (lax.Precision.HIGHEST if jnp.dtype(dt) == jnp.float32 else
                          lax.Precision.DEFAULT)
  kernel = functools.partial(
      _flash_kernel, n_valid=n, block_k=bk, num_k_blocks=num_k_blocks, mask_keys=nk > n,
      qk_precision=precision(q2.dtype), pv_precision=precision(v.dtype))
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
