"""Pure functions over (params, arrays) for JAX research code.

Everything here is traceable: call it inside your own `jax.jit`, `jax.vmap` or
`jax.grad`. `config` and `multimask_output` are static (hashable) arguments.

Coordinates are in the model's input frame: pixels of the image after
`ResizeLongestSide` (long side == config.image_size), *not* the original image.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from samjax.config import SamConfig
from samjax.modeling import Sam, postprocess_masks, preprocess
from samjax.modeling.attention import AttentionConfig, PerPlatform

Dtype = Any


@functools.lru_cache(maxsize=32)
def _module(config: SamConfig, dtype, attention=AttentionConfig()) -> Sam:
  return Sam(config, dtype=dtype, attention=attention)


def _gpu_prober(config: SamConfig, dtype):
  """The GPU kernel probe for "auto", where this process has a GPU to ask."""
  if jax.default_backend() != "gpu":
    return None  # lowering for a GPU elsewhere: the portable kernels are chosen
  from samjax.modeling import kernel_probe as kernels  # pylint: disable=import-outside-toplevel
  return kernels.gpu_prober(config, dtype, jax.devices("gpu")[0])


def normalize_images(images: jax.Array, config: SamConfig,
                     valid_hw: Optional[jax.Array] = None) -> jax.Array:
  """Normalises and zero-pads images to the model frame.

  Args:
    images: (B, h, w, 3) RGB values in 0..255 with h, w <= image_size. If `valid_hw`
      is given the images are already padded to (B, S, S, 3) and only the top-left
      valid_hw[b] = (h, w) pixels are real; the rest is zeroed after normalisation.
      This lets one compiled function serve every image size.
    config: model config.
    valid_hw: optional (B, 2) int array.

  Returns:
    (B, S, S, 3) float32, as `Sam.preprocess` of the reference.
  """
  x = preprocess(images, config)
  s = config.image_size
  if valid_hw is not None:
    rows = jnp.arange(s)[None, :, None] < valid_hw[:, 0, None, None]
    cols = jnp.arange(s)[None, None, :] < valid_hw[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x


def encode_image(params, images: jax.Array, config: SamConfig, dtype: Dtype = jnp.float32,
                 valid_hw: Optional[jax.Array] = None, attention="auto", *,
                 attention_impl=None) -> jax.Array:
  """Image embeddings.

  Args:
    params: SAM params (`load_params(...)[1]`).
    images: (B, h, w, 3) resized RGB images, 0..255, long side == config.image_size
      (or padded S x S images together with `valid_hw`, see `normalize_images`).
    config: model config (static).
    dtype: compute dtype, e.g. jnp.bfloat16 (params stay as they are).
    valid_hw: see `normalize_images`.
    attention: the encoder's attention kernels (static): an `AttentionConfig`, a kernel
      name, or a "WINDOWED/GLOBAL" pair (see `samjax.modeling.attention`; all compute
      the same function). "auto" is resolved for the platform the program is compiled
      for (`jax.lax.platform_dependent`): explicit einsum attention on CPUs, the
      folded form through XLA on TPUs, cuDNN flash attention with the relative
      positions folded into q/k on NVIDIA GPUs in bf16/fp16.
    attention_impl: older name of `attention`.

  Returns:
    (B, S/16, S/16, C) embeddings in `dtype`.
  """
  if attention_impl is not None:
    attention = attention_impl
  setting = AttentionConfig.parse(attention)
  if not setting.resolved:
    setting = PerPlatform.of(setting, dtype, _gpu_prober(config, dtype))
  x = normalize_images(images, config, valid_hw)
  module = _module(config, dtype, setting)
  return module.apply({"params": params}, x, method=Sam.embed_image)


def decode_masks(params, embeddings: jax.Array, points: Optional[jax.Array] = None,
                 labels: Optional[jax.Array] = None, boxes: Optional[jax.Array] = None,
                 mask_input: Optional[jax.Array] = None, *, config: SamConfig,
                 multimask_output: bool = True, dtype: Dtype = jnp.float32
                 ) -> Tuple[jax.Array, jax.Array]:
  """Masks for a batch of prompts on one (or B) image embeddings.

  Args:
    params: SAM params.
    embeddings: (1, h, w, C) shared by all prompts, or (B, h, w, C).
    points: (B, N, 2) xy in the input frame, or None.
    labels: (B, N) int: 1 foreground, 0 background, -1 not-a-point, -2 absent slot
      (padding that is ignored exactly).
    boxes: (B, 4) xyxy in the input frame, or None.
    mask_input: (B, 4h, 4w) low-res logits from a previous prediction, or None.
    config: model config (static).
    multimask_output: static; 3 masks if True else 1.
    dtype: compute dtype.

  Returns:
    low_res_logits (B, M, 4h, 4w) float32, iou_predictions (B, M) float32.
  """
  return _module(config, dtype).apply({"params": params}, embeddings, points, labels, boxes,
                                      mask_input, multimask_output, method=Sam.predict)


def upscale_masks(low_res_logits: jax.Array, input_size: Tuple[int, int],
                  original_size: Tuple[int, int], config: SamConfig) -> jax.Array:
  """(..., 4h, 4w) logits -> (..., H, W) logits at the original image size (static sizes)."""
  return postprocess_masks(low_res_logits, tuple(input_size), tuple(original_size), config)
