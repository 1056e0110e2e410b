"""Shared machinery: the run context, models on both sides, timing, parity statistics.

Both implementations always get the same weights (an official model with every tensor
randomized, converted in memory with `samjax.io.checkpoint.params_from_state_dict`) and the
same inputs, in one process, on the same device, so every ratio is like for like.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import numpy as np


# ----------------------------------------------------------------------------------------
# Precision modes. "float32" is true fp32 on both sides: JAX matmuls pinned to "highest"
# and PyTorch's TF32 switched off for matmuls *and* cuDNN convolutions (PyTorch allows TF32
# convolutions by default, which would quietly give it a cheaper patch embedding).
# "tf32" lets both sides use TF32 tensor cores (only differs from float32 on NVIDIA GPUs).
# "bfloat16" is samjax's bf16 compute dtype vs. PyTorch autocast; both keep fp32 weights
# and cast per op, and both keep LayerNorm/softmax statistics in fp32.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrecisionMode:
  name: str
  jax_dtype: str            # compute dtype passed to samjax
  jax_matmul_precision: Optional[str]  # jax.default_matmul_precision value (None: default)
  torch_autocast: bool      # run the official model under torch.autocast(bfloat16)
  torch_tf32: bool          # allow TF32 in PyTorch matmuls and cuDNN convolutions


MODES: Dict[str, PrecisionMode] = {
    "float32": PrecisionMode("float32", "float32", "highest", False, False),
    "tf32": PrecisionMode("tf32", "float32", "tensorfloat32", False, True),
    "bfloat16": PrecisionMode("bfloat16", "bfloat16", None, True, False),
}


# ----------------------------------------------------------------------------------------
# Run context.
# ----------------------------------------------------------------------------------------
class Context:
  """Options, devices, results and the error log of one benchmark run."""

  def __init__(self, args):
    import jax
    self.args = args
    self.t_start = time.perf_counter()
    self.jax_device = jax.devices()[0]
    self.on_gpu = self.jax_device.platform == "gpu"
    self.results: Dict[str, Any] = {
        "encoder": [], "prompt": [], "amg": [], "flops": {}, "peak": {}, "errors": [],
        "skipped": [], "notes": []}
    # Per-model cache of reference tensors shared between sections (e.g. the fp32
    # official embedding of image 0 is the prompt section's fixed embedding).
    self.cache: Dict[str, Dict[str, Any]] = {}
    self.torch = None
    self.torch_device = None

  # ------------------------------------------------------------------ torch
  def init_torch(self):
    """Imports torch after JAX has claimed its device (see __main__ for why)."""
    import torch
    from benchmarks import tv_shim
    self.torch = torch
    if tv_shim.install():
      self.results["notes"].append(
          "torchvision is not installed: segment_anything ran on benchmarks/tv_shim.py "
          "(pure-torch batched_nms, PIL resize); the official AMG's NMS is therefore not "
          "torchvision's C++ kernel")
      log("  torchvision missing: using benchmarks/tv_shim.py for segment_anything")
    if self.on_gpu:
      if not torch.cuda.is_available():
        raise RuntimeError("JAX runs on a GPU but torch.cuda is not available; a CPU-vs-GPU "
                           "comparison would be meaningless")
      self.torch_device = torch.device("cuda", 0)
    else:
      self.torch_device = torch.device("cpu")
      # PyTorch picks its own intra-op thread count; pin it to the cores we may use, which
      # is what XLA's CPU client uses too.
      torch.set_num_threads(cpu_count())
    return torch

  def torch_sync(self):
    if self.torch_device is not None and self.torch_device.type == "cuda":
      self.torch.cuda.synchronize()

  # ------------------------------------------------------------------ time budget
  def elapsed(self) -> float:
    return time.perf_counter() - self.t_start

  def out_of_time(self) -> bool:
    d = self.args.deadline_s
    return d is not None and d > 0 and self.elapsed() > d

  def skip(self, section: str, what: str, why: str):
    self.results["skipped"].append({"section": section, "what": what, "why": why})
    log(f"  SKIP {section}: {what} ({why})")

  def record_error(self, section: str, what: str, exc: BaseException):
    tb = traceback.format_exc(limit=12)
    self.results["errors"].append({"section": section, "what": what,
                                   "error": f"{type(exc).__name__}: {exc}"[:2000],
                                   "traceback": tb[-4000:]})
    log(f"  ERROR in {section} ({what}): {type(exc).__name__}: {str(exc)[:500]}")


@contextlib.contextmanager
def guarded(ctx: Context, section: str, what: str):
  """Runs a block; an exception is recorded and swallowed so later sections still run."""
  try:
    yield
  except KeyboardInterrupt:
    raise
  except BaseException as e:  # noqa: BLE001 - a benchmark must survive any one failure
    ctx.record_error(section, what, e)
    free_memory(ctx)


def log(msg: str):
  print(msg, flush=True)


def cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------
# Machine description.
# ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _mem_total_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def _git_commit() -> Optional[str]:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, timeout=5, cwd=here)
    commit = out.stdout.strip() or None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5, cwd=here)
    if commit and dirty.stdout.strip():
      commit += "+uncommitted changes"  # a copied working tree: HEAD alone would mislead
    return commit
  except Exception:  # noqa: BLE001 - no git on the benchmark machine is fine
    return None


def machine_info(ctx: Context) -> Dict[str, Any]:
  import jax
  import jaxlib
  info: Dict[str, Any] = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "cpu_model": _cpu_model(),
      "cpu_cores_usable": cpu_count(),
      "cpu_cores_total": os.cpu_count(),
      "mem_total_gib": _mem_total_gib(),
      # Other processes on the same cores distort CPU timings (PyTorch's OpenMP barriers
      # suffer most): record how busy the machine was.
      "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__,
      "jaxlib": getattr(jaxlib, "__version__", None),
      "jax_backend": jax.default_backend(),
      "jax_device": ctx.jax_device.device_kind,
      "jax_device_count": jax.device_count(),
      "numpy": np.__version__,
      "git_commit": _git_commit(),
  }
  for mod in ("flax", "orbax.checkpoint", "cv2", "torchvision"):
    try:
      m = __import__(mod, fromlist=["__version__"])
      info[mod] = getattr(m, "__version__", "installed")
    except Exception:  # noqa: BLE001
      info[mod] = None
  try:
    import segment_anything
    info["segment_anything"] = os.path.dirname(segment_anything.__file__)
  except Exception:  # noqa: BLE001
    info["segment_anything"] = None
  t = ctx.torch
  if t is not None:
    info["torch"] = t.__version__
    info["torch_threads"] = t.get_num_threads()
    info["torch_device"] = str(ctx.torch_device)
    if ctx.torch_device.type == "cuda":
      info["torch_device_name"] = t.cuda.get_device_name(0)
      info["torch_cuda"] = t.version.cuda
      info["gpu_mem_gib"] = round(t.cuda.get_device_properties(0).total_memory / 2**30, 1)
  return info


# ----------------------------------------------------------------------------------------
# Precision contexts.
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def jax_precision(mode: PrecisionMode):
  """Sets JAX's default matmul precision for tracing *and* for cache lookups.

  The setting is part of jit's cache key, so every call of a function compiled under
  it must run under it too, or it would be traced again at the default precision.
  """
  import jax
  if mode.jax_matmul_precision is None:
    yield
    return
  with jax.default_matmul_precision(mode.jax_matmul_precision):
    yield


def _set_torch_tf32(torch, allow: bool):
  # Only the long-standing switches are used: recent PyTorch refuses to mix them with its
  # newer `fp32_precision` attributes. A release that drops them must not stop the run.
  for setter in (lambda: torch.set_float32_matmul_precision("high" if allow else "highest"),
                 lambda: setattr(torch.backends.cudnn, "allow_tf32", allow)):
    try:
      setter()
    except Exception:  # noqa: BLE001
      pass


@contextlib.contextmanager
def torch_mode(ctx: Context, mode: PrecisionMode):
  """inference_mode + TF32 switches + optional bf16 autocast for the official model."""
  torch = ctx.torch
  _set_torch_tf32(torch, mode.torch_tf32)
  with contextlib.ExitStack() as stack:
    stack.enter_context(torch.inference_mode())
    if mode.torch_autocast:
      stack.enter_context(torch.autocast(device_type=ctx.torch_device.type,
                                         dtype=torch.bfloat16))
    yield


def jnp_dtype(mode: PrecisionMode):
  import jax.numpy as jnp
  return jnp.dtype(mode.jax_dtype)


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], sync: Callable[[Any], None], warmup: int, iters: int,
               time_cap_s: Optional[float] = None) -> Dict[str, Any]:
  """Times `fn` (which must return its output) with a device sync after every call.

  The first call is timed on its own: for a jitted JAX function it includes tracing and
  compilation, so `compile_s` = first call - steady-state median. `warmup` counts the
  first call. The timed loop stops early (after at least one call) once it has used
  `time_cap_s`, so a slow CPU configuration cannot stall the whole run.

  Returns a dict of seconds plus `out`, the last output (for the numerics).
  """
  t0 = time.perf_counter()
  out = fn()
  sync(out)
  first = time.perf_counter() - t0
  spent = first
  for _ in range(max(warmup, 1) - 1):
    if time_cap_s and spent > time_cap_s:
      break
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    spent += time.perf_counter() - t0
  times: List[float] = []
  loop_t = 0.0
  for _ in range(max(iters, 1)):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    dt = time.perf_counter() - t0
    times.append(dt)
    loop_t += dt
    if time_cap_s and loop_t > time_cap_s:
      break
  med = float(np.median(times))
  return {"first_call_s": first, "median_s": med, "mean_s": float(np.mean(times)),
          "min_s": float(np.min(times)), "iters": len(times),
          "compile_s": max(first - med, 0.0), "out": out}


def strip_out(t: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  """A timing dict without the output array (for JSON)."""
  if t is None:
    return None
  return {k: v for k, v in t.items() if k != "out"}


def jax_sync(x):
  import jax
  jax.block_until_ready(x)


# ----------------------------------------------------------------------------------------
# Numerics.
# ----------------------------------------------------------------------------------------
def to_f32(x) -> np.ndarray:
  """numpy float32 view of a jax array, torch tensor (bf16 included) or numpy array."""
  if hasattr(x, "detach"):  # torch: bf16 has no numpy dtype, go through float32
    x = x.detach().float().cpu().numpy()
  return np.asarray(np.asarray(x), np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.0) -> Dict[str, float]:
  """IoU of `a > t` vs `b > t`: pooled over all masks, and the worst single mask.

  a, b: (..., H, W); the leading axes index masks. Masks empty on both sides count as a
  perfect match.
  """
  ma = a.reshape(-1, *a.shape[-2:]) > threshold
  mb = b.reshape(-1, *b.shape[-2:]) > threshold
  inter = np.logical_and(ma, mb).sum(axis=(1, 2)).astype(np.float64)
  union = np.logical_or(ma, mb).sum(axis=(1, 2)).astype(np.float64)
  per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  pooled = inter.sum() / union.sum() if union.sum() > 0 else 1.0
  return {"iou": float(pooled), "min_iou": float(per.min()) if per.size else 1.0}


def compare(ours, ref, masks: bool = False) -> Dict[str, float]:
  """max |ours - ref|, that relative to max |ref|, mean abs error, and mask IoU if asked.

  Differences are taken in float32 (exact for the fp32/bf16 values compared, and half
  the memory of float64 on 64 x 3 x 1024 x 1024 upscaled logits); sums in float64.
  """
  a, r = to_f32(ours), to_f32(ref)
  if a.shape != r.shape:
    raise ValueError(f"shape mismatch: {a.shape} vs reference {r.shape}")
  err = np.abs(a - r)
  scale = max(float(np.abs(r).max()), 1e-12)
  out = {"max_abs": float(err.max()), "max_rel": float(err.max()) / scale,
         "mean_abs": float(err.mean(dtype=np.float64)), "ref_max": scale}
  del err
  if masks:
    out.update(mask_iou(a, r))
  return out


# ----------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Models:
  """One config on both sides, sharing randomized weights."""

  name: str
  config: Any
  official: Any        # segment_anything Sam on ctx.torch_device, fp32, eval
  params: Any          # samjax params (device arrays, fp32)
  setup_s: float = 0.0


def build_models(ctx: Context, name: str) -> Models:
  import jax
  from samjax import config as config_lib, reference
  from samjax.io import checkpoint
  t0 = time.perf_counter()
  cfg = config_lib.get_config(name)
  official = reference.randomize_(reference.build_official(cfg), seed=ctx.args.seed)
  params = checkpoint.params_from_state_dict(official.state_dict(), cfg)
  params = jax.device_put(params, ctx.jax_device)
  official = official.to(ctx.torch_device)
  jax.block_until_ready(params)
  return Models(name, cfg, official, params, time.perf_counter() - t0)


def free_memory(ctx: Context):
  """Drops collectable arrays and hands cached CUDA blocks back between sections."""
  gc.collect()
  if ctx.torch is not None and ctx.torch_device is not None and \
      ctx.torch_device.type == "cuda":
    ctx.torch.cuda.empty_cache()


def random_images(seed: int, n: int, size: int) -> np.ndarray:
  """(n, size, size, 3) float32 RGB in 0..255: full frames, so no padding is involved."""
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def supports_kwarg(fn, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def attention_impls(config, mode: PrecisionMode, requested: str) -> Optional[Dict[str, str]]:
  """Which attention kernels samjax's runtime resolves for the windowed and global blocks."""
  try:
    from samjax.runtime import Runtime
  except Exception:  # noqa: BLE001  (older samjax: no runtime)
    return None
  try:
    import jax
    rt = Runtime(config, dtype=jnp_dtype(mode), devices=jax.devices()[:1],
                 attention=None if requested in (None, "", "auto") else requested)
    return {"requested": requested, "global": rt.attention.global_attn,
            "window": rt.attention.window, "project_first": rt.attention.project_first}
  except Exception as e:  # noqa: BLE001
    return {"requested": requested, "error": f"{type(e).__name__}: {e}"[:300]}
