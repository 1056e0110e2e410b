"""Whether a GPU attention kernel runs on a given device, asked once per shape.

cuDNN's fused attention depends on the GPU generation, the cuDNN version and the
shapes; the only reliable answer is to compile and run a tiny call. A definite answer
("this kernel is unsupported here": a compile or lowering error) is cached per (kernel,
shape, dtype, device kind); a transient failure (out of memory, a busy or lost
device) is not cached, so the next runtime built asks again.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from samjax.config import SamConfig
from samjax.modeling import attention as attn

_CACHE: Dict[Tuple, bool] = {}

#: Substrings of XLA errors that say "not now", not "never".
TRANSIENT_ERRORS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "UNAVAILABLE",
                    "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")


class TransientProbeError(RuntimeError):
  """A kernel probe failed for a reason that may go away (e.g. the device is full)."""


def probe(key: Tuple, fn: Callable[[], jax.Array], device: jax.Device) -> bool:
  """Whether `fn()` (a tiny jitted call) compiles and runs on `device`; cached per key.

  Raises:
    TransientProbeError: the call failed in a way that says nothing about support.
  """
  key = key + (device.platform, getattr(device, "device_kind", ""))
  if key in _CACHE:
    return _CACHE[key]
  try:
    with jax.default_device(device), jax.ensure_compile_time_eval():
      jax.block_until_ready(fn())
    _CACHE[key] = True
  except Exception as e:  # pylint: disable=broad-except
    text = f"{type(e).__name__}: {e}"
    if any(t in text for t in TRANSIENT_ERRORS):
      raise TransientProbeError(text[:500]) from e
    _CACHE[key] = False  # unsupported shape/dtype/cuDNN version/JAX version
  return _CACHE[key]


def _shapes(config: SamConfig, windowed: bool) -> Tuple[int, int, int, Tuple[int, int]]:
  """(tokens, heads, head_dim, grid) of one attention group of `config`'s encoder."""
  side = config.window_size if windowed else config.image_size // config.patch_size
  heads = config.encoder_num_heads
  return side * side, heads, config.encoder_embed_dim // heads, (side, side)


def gpu_kernel_runs(kernel: str, windowed: bool, config: SamConfig, dtype,
                    device: jax.Device) -> bool:
  """Whether GPU attention `kernel` runs for `config`'s block kind on `device`."""
  n, heads, hd, grid = _shapes(config, windowed)
  dt = jnp.dtype(dtype)
  if kernel == "cudnn":
    def fn():
      q = jnp.zeros((1, n, heads, hd), dt)
      bias = jnp.zeros((1, heads, n, n), dt)
      return jax.jit(lambda q, b: jax.nn.dot_product_attention(
          q, q, q, bias=b, implementation="cudnn"))(q, bias)
    return probe(("cudnn", n, heads, hd, dt.name), fn, device)
  if kernel in ("fold", "fold_mla"):
    if kernel == "fold_mla" and attn.cudnn_mla() is None:
      return False
    inner = "mla" if kernel == "fold_mla" else "cudnn"
    qk = attn.fold_qk_dim(hd, grid)

    def fn():
      q = jnp.zeros((1, n, heads, qk), dt)
      v = jnp.zeros((1, n, heads, hd), dt)
      return jax.jit(lambda q, v: attn.fold_kernel(q, q, v, inner))(q, v)
    return probe(("fold", inner, n, heads, qk, hd, dt.name), fn, device)
  return True  # portable XLA


def gpu_prober(config: SamConfig, dtype, device: jax.Device,
               ) -> Callable[[str, bool], bool]:
  """(kernel, windowed) -> runs?, for `attention.resolve`; transient failures warn."""
  def runs(kernel: str, windowed: bool) -> bool:
    try:
      return gpu_kernel_runs(kernel, windowed, config, dtype, device)
    except TransientProbeError as e:
      warnings.warn(f"could not probe attention kernel {kernel!r} on {device} ({e}); "
                    "not using it this time", RuntimeWarning, stacklevel=3)
      return False
  return runs
