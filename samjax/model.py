"""`SamModel`: params + config + compiled functions, with the official `Sam` surface.

This is what `Predictor.model` is. It offers the reference's attributes that user code
touches (`image_encoder.img_size`, `mask_threshold`, `image_format`, `device`) and the
batched multi-image call (`model(batched_input, multimask_output)`, alias `inference`).

Compilation happens in the model's `Runtime` (`samjax.runtime`), keyed by config,
dtype, attention kernels and devices; every function here calls it at static shapes.
Images are padded to the S x S frame on the host (the valid size travels as data), so
encoding compiles once per batch-size bucket; prompt counts and prompt batches are padded to buckets
(`point_bucket`, `batch_bucket`); only the final upsampling to the original image
size compiles once per distinct original size.
"""

from __future__ import annotations

import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from samjax import runtime as runtime_lib
from samjax.interop import is_torch, to_numpy, to_torch_like
from samjax.config import SamConfig
from samjax.modeling import MASK_THRESHOLD, PAD_LABEL

MIN_POINT_BUCKET = 8


#: Above this many slots, point buckets grow linearly (multiples of it) instead of
#: doubling: the decoder's token attention costs slots^2, so doubling 10,000 points to
#: 16,384 slots would need 2.7x the memory of the points themselves.
LINEAR_POINT_BUCKET = 64


def point_bucket(n: int) -> int:
  """Padded number of point slots: 8, 16, 32, 64, then multiples of 64.

  1..8 points share one compilation; large prompts waste fewer than 64 slots.
  """
  if n > LINEAR_POINT_BUCKET:
    return -(-n // LINEAR_POINT_BUCKET) * LINEAR_POINT_BUCKET
  b = MIN_POINT_BUCKET
  while b < n:
    b *= 2
  return b


def batch_bucket(n: int) -> int:
  """Padded prompt-batch size: the next power of two."""
  b = 1
  while b < n:
    b *= 2
  return b


def compiled_functions():
  """The jitted functions (the runtime's), e.g. to count compilations."""
  return runtime_lib.compiled_functions()


class SamModel:
  """A loaded SAM: config, params (on device), compute dtype and attention kernels.

  Args:
    config: model config.
    params: SAM params.
    dtype: compute dtype.
    attention: encoder attention kernels (see `samjax.modeling.attention`); None =
      SAMJAX_ATTENTION_IMPL or "auto", resolved for the device.
    device: the JAX device to run on (default: the first local device).
  """

  mask_threshold: float = MASK_THRESHOLD
  image_format: str = "RGB"

  def __init__(self, config: SamConfig, params, dtype=jnp.float32, attention=None,
               device: Optional[jax.Device] = None):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    #: The setting as requested (other runtimes built from this model re-resolve it).
    self.attention_request = attention
    self.runtime = runtime_lib.Runtime(config, dtype=self.dtype, attention=attention,
                                       devices=[device or jax.local_devices()[0]])
    self.params = self.runtime.place(params)
    self.image_encoder = types.SimpleNamespace(img_size=config.image_size)
    self.prompt_encoder = types.SimpleNamespace(
        input_image_size=(config.image_size, config.image_size),
        image_embedding_size=(config.embedding_size, config.embedding_size),
        mask_input_size=(config.low_res_mask_size, config.low_res_mask_size))

  @property
  def device(self) -> str:
    """Torch device string for code that builds torch tensors for us ("cpu").

    samjax converts such tensors through host memory; JAX places the computation on
    its own default device regardless.
    """
    return "cpu"

  # -------------------------------------------------------------------- primitives
  def encode_padded(self, images: np.ndarray, valid_hw: np.ndarray) -> jax.Array:
    """images (B, S, S, 3) uint8/float zero-padded, valid_hw (B, 2) -> (B, e, e, C)."""
    b = images.shape[0]
    bb = batch_bucket(b)
    if bb != b:
      images = np.concatenate([images, np.zeros((bb - b, *images.shape[1:]), images.dtype)])
      valid_hw = np.concatenate([valid_hw, np.tile(valid_hw[-1:], (bb - b, 1))])
    emb = self.runtime.encode(self.params, images, valid_hw)
    return emb[:b]

  def encode_resized(self, images: Sequence[np.ndarray]) -> jax.Array:
    """List of resized (h, w, 3) images (long side == S) -> (B, e, e, C) embeddings."""
    s = self.config.image_size
    batch = np.zeros((len(images), s, s, 3), np.float32)
    hw = np.zeros((len(images), 2), np.int32)
    for i, im in enumerate(images):
      h, w = im.shape[:2]
      if h > s or w > s:
        raise ValueError(f"image {i} is {h}x{w}; resized images must fit in {s}x{s} "
                         "(use predictor.transform.apply_image first)")
      batch[i, :h, :w] = im
      hw[i] = (h, w)
    return self.encode_padded(batch, hw)

  def decode(self, embeddings, points=None, labels=None, boxes=None, mask_input=None,
             multimask_output: bool = True) -> Tuple[jax.Array, jax.Array]:
    """Bucketed decode. Inputs in the input frame, numpy; outputs sliced to B."""
    b = next((x.shape[0] for x in (points, boxes, mask_input) if x is not None), 1)
    bb = batch_bucket(b)

    def pad_b(x):
      if x is None or x.shape[0] == bb:
        return x
      return np.concatenate([x, np.repeat(x[-1:], bb - x.shape[0], axis=0)])
    if points is not None:
      n = points.shape[1]
      nb = point_bucket(n)
      self._check_decoder_memory(bb, nb + 2)
      # The official embeds every label other than -1/0/1 by its position only, as
      # label 2 is here; PAD_LABEL (-2) marks our padding slots, so a user's label is
      # never taken for padding.
      labels = np.where(np.isin(labels, (-1, 0, 1)), labels, 2).astype(np.int32)
      points = np.concatenate([points, np.zeros((b, nb - n, 2), np.float32)], 1)
      labels = np.concatenate([labels, np.full((b, nb - n), PAD_LABEL, np.int32)], 1)
    args = [pad_b(x) for x in (points, labels, boxes, mask_input)]
    args = [None if x is None else jnp.asarray(x) for x in args]
    low_res, iou = self.runtime.decode(self.params, embeddings, *args,
                                       multimask_output=multimask_output)
    return low_res[:b], iou[:b]

  def _check_decoder_memory(self, prompts: int, tokens: int) -> None:
    """A clear error, before compiling, for prompts whose attention cannot fit.

    The decoder's token self-attention holds (prompts, heads, T, T) float32 scores
    (plus the softmax of them) per layer, with T = point slots + output tokens.
    """
    cfg = self.config
    t = tokens + cfg.num_multimask_outputs + 2
    need = 2 * prompts * cfg.decoder_num_heads * t * t * 4
    have = runtime_lib.mesh.device_memory_bytes(self.runtime.mesh.devices.flat[0])
    if need > 0.6 * have:
      raise ValueError(
          f"{prompts} prompt(s) of {tokens - 2} point slots need about {need / 2**30:.1f} "
          f"GiB for the decoder's attention, more than 60% of the {have / 2**30:.1f} GiB "
          "this device has; use fewer points per prompt or fewer prompts per call")

  def postprocess_masks(self, low_res, input_size, original_size, return_logits=True):
    """Low-res logits -> original-size logits (or bool masks if not return_logits)."""
    return self.runtime.upscale(jnp.asarray(low_res), input_size, original_size,
                                return_logits)

  def preprocess(self, x):
    """(3, h, w) or (h, w, 3) image -> normalised, padded (S, S, 3) float32 (reference-style)."""
    from samjax.functional import normalize_images
    x = to_numpy(x, np.float32)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
      x = x.transpose(1, 2, 0)
    return normalize_images(jnp.asarray(x[None]), self.config)[0]

  # -------------------------------------------------------------------- batched call
  def __call__(self, batched_input: List[Dict[str, Any]], multimask_output: bool
               ) -> List[Dict[str, Any]]:
    """The official `Sam.forward`: several images, each with its own prompts.

    Args:
      batched_input: list of dicts with `image` (3xHxW resized image, torch/numpy),
        `original_size` (H, W), and optional `point_coords` (BxNx2, input frame),
        `point_labels` (BxN), `boxes` (Bx4, input frame), `mask_inputs` (Bx1xhxw).
      multimask_output: 3 masks per prompt if True, else 1.

    Returns:
      list of dicts with `masks` (BxCxHxW bool), `iou_predictions` (BxC),
      `low_res_logits` (BxCx4hx4w); torch tensors when the inputs were torch tensors.
    """
    if not isinstance(batched_input, (list, tuple)) or not batched_input:
      raise ValueError("batched_input must be a non-empty list of dicts")
    images, use_torch = [], False
    for i, rec in enumerate(batched_input):
      if "image" not in rec or "original_size" not in rec:
        raise ValueError(f"batched_input[{i}] needs 'image' and 'original_size'")
      use_torch |= is_torch(rec["image"])
      im = to_numpy(rec["image"])
      if im.ndim != 3 or im.shape[0] != 3:
        raise ValueError(f"batched_input[{i}]['image'] must be 3xHxW, got {im.shape}")
      images.append(im.transpose(1, 2, 0).astype(np.float32))
    emb = self.encode_resized(images)
    outputs = []
    for i, rec in enumerate(batched_input):
      points = to_numpy(rec.get("point_coords"), np.float32)
      labels = to_numpy(rec.get("point_labels"), np.int32)
      boxes = to_numpy(rec.get("boxes"), np.float32)
      masks_in = to_numpy(rec.get("mask_inputs"), np.float32)
      check_batched_prompts(points, labels, boxes, masks_in, self.config, f"batched_input[{i}]")
      if masks_in is not None:
        masks_in = masks_in[:, 0]
      low_res, iou = self.decode(emb[i:i + 1], points, labels, boxes, masks_in,
                                 multimask_output)
      masks = self.postprocess_masks(low_res, images[i].shape[:2],
                                     tuple(int(v) for v in rec["original_size"]),
                                     return_logits=False)
      out = {"masks": masks, "iou_predictions": iou, "low_res_logits": low_res}
      outputs.append({k: to_torch_like(v, use_torch) for k, v in out.items()})
    return outputs

  forward = __call__
  inference = __call__


def check_finite(x: Optional[np.ndarray], name: str) -> None:
  if x is not None and not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")


def check_batched_prompts(points, labels, boxes, mask_input, config: SamConfig, where: str):
  """Validates BxNx2 points, BxN labels, Bx4 boxes, Bx1xhxw (or Bxhxw) mask inputs."""
  if (points is None) != (labels is None):
    raise ValueError(f"{where}: point_coords and point_labels must be given together")
  b = None
  if points is not None:
    if points.ndim != 3 or points.shape[-1] != 2:
      raise ValueError(f"{where}: point_coords must be BxNx2, got shape {points.shape}")
    if labels.shape != points.shape[:2]:
      raise ValueError(f"{where}: point_labels has shape {labels.shape} but point_coords has "
                       f"{points.shape[0]}x{points.shape[1]} points")
    check_finite(points, f"{where}: point_coords")
    b = points.shape[0]
  if boxes is not None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
      raise ValueError(f"{where}: boxes must be Bx4, got shape {boxes.shape}")
    check_finite(boxes, f"{where}: boxes")
    if b is not None and boxes.shape[0] != b:
      raise ValueError(f"{where}: {boxes.shape[0]} boxes but {b} point sets")
    b = boxes.shape[0]
  if mask_input is not None:
    m = config.low_res_mask_size
    if mask_input.ndim == 3:
      mask_input = mask_input[:, None]
    if mask_input.ndim != 4 or mask_input.shape[1:] != (1, m, m):
      raise ValueError(f"{where}: mask_input must be Bx1x{m}x{m} low-res logits, got shape "
                       f"{mask_input.shape}")
    check_finite(mask_input, f"{where}: mask_input")
    if b is not None and mask_input.shape[0] != b:
      raise ValueError(f"{where}: {mask_input.shape[0]} mask inputs but {b} prompts")
