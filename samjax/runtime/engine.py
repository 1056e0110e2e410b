"""`Runtime`: where and how SAM runs, and the one place that compiles it.

A Runtime is a frozen, hashable description of a program's setting: the model config,
the compute dtype, the resolved attention kernels and the device mesh (plus,
optionally, a sharding of the parameters). Every compiled function of samjax takes
it as a static argument, so changing any part of it compiles a new program instead
of silently reusing the old one. The Predictor, `SamModel`, the automatic mask
generator, the bulk job and fine-tuning all run through a Runtime: it places the
parameters, splits batches over the mesh, and owns the compiled encode / decode /
upscale; no other module jits the image encoder.

Kernel choice: `attention=` takes an `AttentionConfig`, a kernel name or a
"WINDOWED/GLOBAL" pair (see `samjax.modeling.attention`). "auto" is resolved here for
the platform of the runtime's devices (a Runtime over TPU devices of a topology
description resolves TPU kernels even on a CPU host); fused GPU kernels are probed
once on the target GPU. When `attention` is None, the SAMJAX_ATTENTION_IMPL
environment variable, read once here at construction, names the default (kernels
that cannot run on the runtime's platform are then ignored with a warning).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samjax.config import SamConfig
from samjax.functional import decode_masks, encode_image, upscale_masks
from samjax.modeling import MASK_THRESHOLD
from samjax.modeling import attention as attn
from samjax.modeling import kernel_probe as kernels
from samjax.runtime import mesh as mesh_lib

ENV_ATTENTION = "SAMJAX_ATTENTION_IMPL"

Spec = Any  # "replicated" | "batch" | a NamedSharding, or a pytree prefix of those


def default_attention() -> attn.AttentionConfig:
  """The attention setting named by SAMJAX_ATTENTION_IMPL, else "auto"."""
  env = os.environ.get(ENV_ATTENTION, "").strip()
  try:
    return attn.AttentionConfig.parse(env or None)
  except ValueError as e:
    raise ValueError(f"{ENV_ATTENTION}={env!r}: {e}") from None


def _runnable_on(setting: attn.AttentionConfig, platform: str) -> attn.AttentionConfig:
  """`setting` with the kernels that cannot run on `platform` replaced by "auto"."""
  platform = attn.platform_name(platform)
  parts = []
  for windowed in (True, False):
    k = setting.kernel(windowed)
    foreign = (k in attn.GPU_KERNELS and platform != "gpu") or \
              (k in attn.TPU_KERNELS and platform != "tpu")
    if foreign:
      warnings.warn(f"{ENV_ATTENTION} names {k!r}, which cannot run on {platform}; "
                    "using 'auto' for those blocks", RuntimeWarning, stacklevel=4)
    parts.append("auto" if foreign else k)
  return attn.AttentionConfig(parts[0], parts[1], setting.project_first)


class Runtime:
  """Model config + dtype + attention kernels + device mesh: one compiled setting.

  Args:
    config: model config.
    dtype: compute dtype (parameters stay as they are, float32).
    attention: kernel setting; None = SAMJAX_ATTENTION_IMPL or "auto".
    devices: devices of the 1-D data mesh (default: this process's local devices).
    mesh: a mesh to use instead (its first axis splits batches).
    param_sharding: sharding of the parameters (default: replicated over the mesh).

  Attributes:
    attention: the resolved `AttentionConfig` (no "auto" left).
    platform: "cpu", "gpu" or "tpu".
    num_devices: devices a batch is split over.
  """

  def __init__(self, config: SamConfig, *, dtype=jnp.float32, attention=None,
               devices: Optional[Sequence[jax.Device]] = None, mesh: Optional[Mesh] = None,
               param_sharding=None):
    if mesh is not None and devices is not None:
      raise ValueError("give devices or mesh, not both")
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.mesh = mesh if mesh is not None else mesh_lib.data_mesh(devices)
    self.param_sharding = param_sharding
    device = self.mesh.devices.flat[0]
    self.platform = attn.platform_name(device.platform)
    requested = attention
    if requested is None:
      setting = _runnable_on(default_attention(), self.platform)
    else:
      setting = attn.AttentionConfig.parse(requested)
      attn.check_platform(setting, self.platform)
    probe = None
    if self.platform == "gpu" and _can_run_on(device):
      probe = kernels.gpu_prober(config, self.dtype, device)
      for windowed in (True, False):
        k = setting.kernel(windowed)
        if k in attn.GPU_KERNELS and not probe(k, windowed):
          raise ValueError(f"attention kernel {k!r} does not run on {device.device_kind} "
                           f"for {config.name} in {self.dtype.name}; use 'auto'")
    self.attention = attn.resolve(setting, self.platform, self.dtype, probe)
    self._key = (config, self.dtype.name, self.attention, self.mesh, param_sharding)

  # A Runtime is a static argument of every compiled function: equal settings share
  # compilations, and any difference (kernels included) is a different program.
  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, Runtime) and self._key == other._key

  def __repr__(self):
    return (f"Runtime({self.config.name}, {self.dtype.name}, attention={self.attention}, "
            f"{self.num_devices} {self.platform} device(s))")

  def replace(self, **changes) -> "Runtime":
    """A Runtime with some settings changed (attention is re-resolved)."""
    kw = dict(dtype=self.dtype, attention=self.attention, mesh=self.mesh,
              param_sharding=self.param_sharding)
    kw.update(changes)
    if "devices" in changes:
      kw.pop("mesh")
    return Runtime(changes.get("config", self.config), **{k: v for k, v in kw.items()
                                                          if k != "config"})

  # ------------------------------------------------------------------ layout
  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  @property
  def replicated(self) -> NamedSharding:
    return mesh_lib.replicated(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    return mesh_lib.batch_sharded(self.mesh)

  def sharding(self, spec: Spec):
    """NamedSharding(s) for a spec: "replicated", "batch", a sharding, or a pytree."""
    def one(s):
      if s == "replicated":
        return self.replicated
      if s == "batch":
        return self.batch_sharding
      if s == "params":
        return self.param_sharding or self.replicated
      return s
    return jax.tree_util.tree_map(one, spec, is_leaf=lambda s: isinstance(s, str))

  def place(self, tree):
    """Puts a pytree (e.g. params) on the mesh: the param sharding, or replicated."""
    return jax.device_put(tree, self.param_sharding or self.replicated)

  def replicate(self, tree):
    """Puts a pytree on every device of the mesh."""
    return jax.device_put(tree, self.replicated)

  def shard(self, tree):
    """Splits each array's leading axis over the mesh (must divide evenly)."""
    return mesh_lib.shard_batch(tree, self.mesh)

  # ------------------------------------------------------------------ traceable parts
  def encoder(self, params, images: jax.Array, valid_hw: Optional[jax.Array] = None
              ) -> jax.Array:
    """`encode_image` with this runtime's dtype and kernels, for use inside a trace.

    Over several devices with replicated parameters the batch is split by hand
    (`shard_map`): every device runs the single-device program on its own images.
    Pallas TPU kernels cannot be partitioned automatically, and this keeps the
    per-device program the one a single device compiles.
    """
    fn = lambda p, x, hw: encode_image(p, x, self.config, self.dtype, valid_hw=hw,
                                       attention=self.attention)
    if self.num_devices == 1 or self.param_sharding is not None:
      return fn(params, images, valid_hw)
    if valid_hw is None:
      return self.shard_map(lambda p, x: fn(p, x, None), in_specs=("replicated", "batch"),
                            out_specs="batch")(params, images)
    return self.shard_map(fn, in_specs=("replicated", "batch", "batch"),
                          out_specs="batch")(params, images, valid_hw)

  def decoder(self, params, embeddings, points=None, labels=None, boxes=None,
              mask_input=None, *, multimask_output: bool = True):
    """`decode_masks` with this runtime's dtype, for use inside a trace."""
    return decode_masks(params, embeddings, points, labels, boxes, mask_input,
                        config=self.config, multimask_output=multimask_output,
                        dtype=self.dtype)

  # ------------------------------------------------------------------ compiled
  def encode(self, params, images, valid_hw) -> jax.Array:
    """Embeddings of padded images, data-parallel over the mesh.

    Args:
      params: SAM params (placed with `place`, or host arrays).
      images: (B, S, S, 3) uint8/float images zero-padded to the model frame.
      valid_hw: (B, 2) int sizes of the real image in each.

    Returns:
      (B, e, e, C) embeddings in the compute dtype, split over the mesh.
    """
    images, valid_hw = np.asarray(images), np.asarray(valid_hw, np.int32)
    b = images.shape[0]
    m = self.num_devices
    if b % m:
      images = mesh_lib.pad_to_multiple(images, m)
      valid_hw = mesh_lib.pad_to_multiple(valid_hw, m)
    emb = _encode(params, *self.shard((images, valid_hw)), rt=self)
    return emb if emb.shape[0] == b else emb[:b]

  def decode(self, params, embeddings, points=None, labels=None, boxes=None,
             mask_input=None, *, multimask_output: bool = True) -> Tuple[jax.Array, jax.Array]:
    """Compiled `decoder` on the runtime's devices (inputs as given, not split)."""
    return _decode(params, embeddings, points, labels, boxes, mask_input, rt=self,
                   multimask_output=bool(multimask_output))

  def upscale(self, low_res, input_size, original_size, return_logits: bool = True):
    """Compiled `upscale_masks` (+ threshold unless `return_logits`)."""
    return _upscale(low_res, config=self.config,
                    input_size=tuple(int(v) for v in input_size),
                    original_size=tuple(int(v) for v in original_size),
                    return_logits=bool(return_logits))

  def jit(self, fn: Callable, *, in_specs: Sequence[Spec], out_specs: Spec,
          donate_argnums: Tuple[int, ...] = (), static_argnames: Tuple[str, ...] = ()):
    """`jax.jit(fn)` with the runtime's shardings ("replicated" / "batch" / "params").

    For programs built around the model (a train step, an evaluation), which call
    `encoder` / `decoder` inside.
    """
    return jax.jit(fn, in_shardings=tuple(self.sharding(s) for s in in_specs),
                   out_shardings=self.sharding(out_specs), donate_argnums=donate_argnums,
                   static_argnames=static_argnames)

  def shard_map(self, fn: Callable, *, in_specs: Sequence[str], out_specs: Any):
    """`jax.shard_map(fn)` over the data axis: "replicated" -> P(), "batch" -> P(data)."""
    spec = lambda s: P() if s == "replicated" else P(mesh_lib.DATA_AXIS)
    return jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(spec(s) for s in in_specs),
                         out_specs=jax.tree_util.tree_map(spec, out_specs),
                         check_vma=False)

  # ------------------------------------------------------------------ ahead of time
  def abstract_params(self):
    """ShapeDtypeStructs of the params, placed like `place` would (no memory used)."""
    from samjax.io.checkpoint import param_shapes  # pylint: disable=import-outside-toplevel
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    sharding = self.param_sharding or self.replicated
    flat = {tuple(k.split("/")): jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
            for k, s in param_shapes(self.config).items()}
    return traverse_util.unflatten_dict(flat)

  def lower_encode(self, batch: int):
    """`jax.stages.Lowered` of `encode` for a batch (a multiple of the device count)."""
    s = self.config.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8, sharding=self.batch_sharding)
    hw = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=self.batch_sharding)
    return _encode.lower(self.abstract_params(), images, hw, rt=self)

  def lower_decode(self, prompts: int, points: int = 1, multimask_output: bool = True):
    """`jax.stages.Lowered` of `decode` for one embedding and `prompts` point prompts."""
    e, c = self.config.embedding_size, self.config.prompt_embed_dim
    rep = self.replicated
    emb = jax.ShapeDtypeStruct((1, e, e, c), self.dtype, sharding=rep)
    pts = jax.ShapeDtypeStruct((prompts, points, 2), jnp.float32, sharding=rep)
    lab = jax.ShapeDtypeStruct((prompts, points), jnp.int32, sharding=rep)
    return _decode.lower(self.abstract_params(), emb, pts, lab, None, None, rt=self,
                         multimask_output=multimask_output)


def _can_run_on(device: jax.Device) -> bool:
  """Whether `device` belongs to a live backend of this process (not a topology stub)."""
  try:
    return device in jax.devices(device.platform)
  except RuntimeError:
    return False


# ----------------------------------------------------------------------------------------
# The compiled functions (module level: every Runtime with the same key shares them).
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("rt",))
def _encode(params, images, valid_hw, *, rt: Runtime):
  emb = rt.encoder(params, images, valid_hw)
  return jax.lax.with_sharding_constraint(emb, rt.batch_sharding)


@functools.partial(jax.jit, static_argnames=("rt", "multimask_output"))
def _decode(params, embeddings, points, labels, boxes, mask_input, *, rt: Runtime,
            multimask_output):
  return rt.decoder(params, embeddings, points, labels, boxes, mask_input,
                    multimask_output=multimask_output)


@functools.partial(jax.jit, static_argnames=("config", "input_size", "original_size",
                                             "return_logits"))
def _upscale(low_res, *, config, input_size, original_size, return_logits):
  masks = upscale_masks(low_res, input_size, original_size, config)
  return masks if return_logits else masks > MASK_THRESHOLD


def compiled_functions():
  """The jitted functions, e.g. to count compilations with `f._cache_size()`."""
  return {"encode": _encode, "decode": _decode, "upscale": _upscale}
