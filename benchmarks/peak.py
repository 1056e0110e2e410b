"""The chip's dense matmul rate, measured in the same run (the MFU denominator).

A datasheet peak assumes boost clocks and perfect kernels; a large square matmul is
what the hardware actually sustains, so MFU against it says how far the encoder is from
"as fast as a matmul can go" on this very machine.
"""

from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np

from benchmarks.common import Context, log


def _jax_matmul_rate(n: int, dtype: str, precision, reps: int) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
  # Scaled so that x @ b keeps x's magnitude: the chain needs no rescaling between
  # matmuls, so nothing but matmuls is timed (cuBLAS accumulates in fp32 regardless).
  b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(dt)

  @jax.jit
  def chain(a, b):
    return jax.lax.fori_loop(0, reps, lambda _, x: jnp.matmul(x, b, precision=precision), a)

  jax.block_until_ready(chain(a, b))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    times.append(time.perf_counter() - t0)
  t = min(times)
  del a, b
  return {"n": n, "reps": reps, "dtype": dtype, "precision": str(precision),
          "seconds": t, "tflops": 2.0 * n ** 3 * reps / t / 1e12}


def _torch_matmul_rate(ctx: Context, n: int, reps: int) -> Dict[str, Any]:
  torch = ctx.torch
  dev = ctx.torch_device
  g = torch.Generator(device=dev).manual_seed(0)
  a = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
  b = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
  with torch.inference_mode():
    for _ in range(2):
      a @ b
    ctx.torch_sync()
    t0 = time.perf_counter()
    for _ in range(reps):
      c = a @ b
    ctx.torch_sync()
    t = time.perf_counter() - t0
  del a, b, c
  return {"n": n, "reps": reps, "dtype": "bfloat16", "seconds": t,
          "tflops": 2.0 * n ** 3 * reps / t / 1e12}


def run(ctx: Context) -> Dict[str, Any]:
  """bf16 (fp32 accumulation) and true-fp32 matmul rates; GPU by default, tiny on CPU."""
  import jax
  n = 8192 if ctx.on_gpu else 1024
  reps = 20 if ctx.on_gpu else 2
  out: Dict[str, Any] = {}
  out["jax_bf16"] = _jax_matmul_rate(n, "bfloat16", None, reps)
  log(f"  jax bf16 {n}^3 matmul: {out['jax_bf16']['tflops']:.1f} TFLOP/s")
  out["jax_fp32"] = _jax_matmul_rate(n, "float32", jax.lax.Precision.HIGHEST,
                                     max(reps // 4, 1))
  log(f"  jax fp32 (highest) {n}^3 matmul: {out['jax_fp32']['tflops']:.1f} TFLOP/s")
  if ctx.torch is not None:
    out["torch_bf16"] = _torch_matmul_rate(ctx, n, reps)
    log(f"  torch bf16 {n}^3 matmul: {out['torch_bf16']['tflops']:.1f} TFLOP/s")
  return out
