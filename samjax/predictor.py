"""`Predictor`: set an image once, then ask for masks from points, boxes and masks.

Semantics, argument names and output shapes follow the official `SamPredictor`
(`set_image`, `predict`, `predict_torch` -> `predict_batch`, `get_image_embedding`,
`reset_image`); the sssegmentation names of the seed document work as aliases.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from samjax.config import SamConfig
from samjax.interop import is_torch, to_numpy, to_torch_like
from samjax.io.images import check_rgb_image
from samjax.model import SamModel, check_batched_prompts, check_finite
from samjax.transforms import ResizeLongestSide


def _default_flag(use_default_sam_h, use_default_sam_l, use_default_sam_b) -> Optional[str]:
  flags = [n for n, f in (("vit_h", use_default_sam_h), ("vit_l", use_default_sam_l),
                          ("vit_b", use_default_sam_b)) if f]
  if len(flags) > 1:
    raise ValueError(f"choose one default model, got {flags}")
  return flags[0] if flags else None


def load_model(model=None, checkpoint=None, model_type=None, dtype=jnp.float32,
               use_default_sam_h=False, use_default_sam_l=False, use_default_sam_b=False,
               attention=None) -> SamModel:
  """Resolves the many ways of naming a model into a SamModel.

  `model` may be a SamModel, a Predictor, or a path (Orbax dir or official .pth);
  `checkpoint` a path; the `use_default_sam_*` flags or `model_type` alone mean the
  official weights (downloaded once, verified, cached). `attention` sets the encoder's
  kernels of a newly loaded model (see `SamModel`).
  """
  from samjax.io import checkpoint as ckpt_lib, pretrained
  if isinstance(model, SamModel):
    return model
  if hasattr(model, "model") and isinstance(getattr(model, "model"), SamModel):
    return model.model
  if isinstance(model, (str, os.PathLike)):
    checkpoint = model
  elif model is not None:
    raise TypeError(f"cannot make a SAM model from {type(model).__name__}")
  default = _default_flag(use_default_sam_h, use_default_sam_l, use_default_sam_b)
  if checkpoint is None:
    name = default or model_type or pretrained.DEFAULT_MODEL
    checkpoint = pretrained.fetch(name)
  config, params = ckpt_lib.load_any(checkpoint, model_type=model_type)
  return SamModel(config, params, dtype=dtype, attention=attention)


class Predictor:
  """Interactive SAM: one image embedding, many prompt queries.

  Args:
    model: a SamModel, an Orbax checkpoint dir or an official `.pth` path. When None,
      the official weights named by `use_default_sam_h/l/b` (default ViT-H) are
      downloaded once and cached (see `samjax.io.pretrained`).
    dtype: compute dtype (jnp.float32 or jnp.bfloat16); params stay float32.
    attention: encoder attention kernels (a name, "WINDOWED/GLOBAL" or an
      `AttentionConfig`; default SAMJAX_ATTENTION_IMPL or "auto"), see
      `samjax.modeling.attention`.
    device: accepted for compatibility with the official/seed signatures and ignored:
      JAX runs on its default device.
  """

  def __init__(self, model=None, *, checkpoint=None, model_type=None, dtype=jnp.float32,
               use_default_sam_h: bool = False, use_default_sam_l: bool = False,
               use_default_sam_b: bool = False, device: Any = None, attention=None):
    del device
    self.model = load_model(model, checkpoint, model_type, dtype, use_default_sam_h,
                            use_default_sam_l, use_default_sam_b, attention=attention)
    self.transform = ResizeLongestSide(self.model.config.image_size)
    self.reset_image()

  # -------------------------------------------------------------------- constructors
  @classmethod
  def from_checkpoint(cls, path, dtype=jnp.float32, model_type=None, attention=None
                      ) -> "Predictor":
    """From a samjax Orbax checkpoint dir or an official `.pth` (converted in memory)."""
    return cls(checkpoint=path, dtype=dtype, model_type=model_type, attention=attention)

  @classmethod
  def from_pretrained(cls, name: str = "vit_h", dtype=jnp.float32, attention=None
                      ) -> "Predictor":
    """Official weights ("vit_b", "vit_l", "vit_h"): downloaded, verified, cached."""
    from samjax.io import pretrained
    return cls(checkpoint=pretrained.fetch(name), dtype=dtype, attention=attention)

  @property
  def config(self) -> SamConfig:
    return self.model.config

  @property
  def device(self) -> str:
    return self.model.device

  # -------------------------------------------------------------------- image
  def reset_image(self) -> None:
    self.is_image_set = False
    self.features = None
    self.original_size = None
    self.input_size = None

  def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
    """Computes the embedding of an HxWx3 uint8 image (RGB unless image_format="BGR")."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = check_rgb_image(image, "set_image")
    if image_format != self.model.image_format:
      image = image[..., ::-1]
    resized = self.transform.apply_image(image)
    self._set_resized(resized, image.shape[:2])

  def _set_resized(self, resized_hwc: np.ndarray, original_size) -> None:
    self.reset_image()
    self.features = self.model.encode_resized([resized_hwc])
    self.original_size = tuple(int(v) for v in original_size)
    self.input_size = tuple(int(v) for v in resized_hwc.shape[:2])
    self.is_image_set = True

  def set_torch_image(self, transformed_image, original_image_size) -> None:
    """BCHW already-resized image (torch or numpy), as the official method."""
    x = to_numpy(transformed_image)
    s = self.config.image_size
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or max(x.shape[2:]) != s:
      raise ValueError(f"set_torch_image input must be 1x3xHxW with long side {s}, got "
                       f"{x.shape}")
    self._set_resized(x[0].transpose(1, 2, 0), original_image_size)

  def get_image_embedding(self) -> jax.Array:
    """The current embedding in the official layout (1, C, h, w).

    `predictor.features` holds the same values channels-last (1, h, w, C), the layout
    `samjax.decode_masks` takes.
    """
    self._require_image()
    return jnp.transpose(self.features, (0, 3, 1, 2))

  def _require_image(self):
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

  # -------------------------------------------------------------------- prompts
  def predict(self, point_coords: Optional[np.ndarray] = None,
              point_labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
              mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
              return_logits: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks for one prompt set, coordinates in original-image pixels.

    Args:
      point_coords: (N, 2) xy pixels, or None.
      point_labels: (N,) 1 foreground / 0 background, or None.
      box: (4,) or (1, 4) xyxy pixels, or None.
      mask_input: (1, h, w) low-res logits from a previous call (h = w = 256 for the
        official models), or None.
      multimask_output: return 3 candidate masks instead of 1.
      return_logits: return float logits instead of bool masks.

    Returns:
      masks (C, H, W) bool (or float32 logits), scores (C,) float32,
      low_res_logits (C, h, w) float32, as numpy arrays.
    """
    self._require_image()
    coords = labels = boxes = masks_in = None
    if point_coords is not None or point_labels is not None:
      if point_coords is None or point_labels is None:
        raise ValueError("point_coords and point_labels must be given together")
      coords = to_numpy(point_coords, np.float64)
      labels = to_numpy(point_labels)
      if coords.ndim != 2 or coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be Nx2 (x, y) pixels, got shape {coords.shape}")
      if labels.ndim != 1 or labels.shape[0] != coords.shape[0]:
        raise ValueError(f"point_labels has {labels.size} entries but point_coords has "
                         f"{coords.shape[0]} points")
      if coords.shape[0] == 0:
        raise ValueError("point_coords is empty; pass None for no points")
      check_finite(coords, "point_coords")
      if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got "
                         f"{np.unique(labels).tolist()}")
      coords = self.transform.apply_coords(coords, self.original_size)
      coords, labels = coords[None].astype(np.float32), labels[None].astype(np.int32)
    if box is not None:
      b = to_numpy(box, np.float64)
      if b.size != 4:
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got shape {b.shape}")
      check_finite(b, "box")
      boxes = self.transform.apply_boxes(b.reshape(1, 4), self.original_size).astype(np.float32)
    if mask_input is not None:
      m = self.config.low_res_mask_size
      masks_in = to_numpy(mask_input, np.float32)
      if masks_in.shape not in ((1, m, m), (m, m)):
        raise ValueError(f"mask_input must be 1x{m}x{m} low-res logits (e.g. logits[i][None] "
                         f"from a previous predict), got shape {masks_in.shape}")
      check_finite(masks_in, "mask_input")
      masks_in = masks_in.reshape(1, m, m)
    masks, iou, low_res = self._predict_input_frame(coords, labels, boxes, masks_in,
                                                    multimask_output, return_logits)
    return np.asarray(masks[0]), np.asarray(iou[0]), np.asarray(low_res[0])

  def _predict_input_frame(self, coords, labels, boxes, masks_in, multimask_output,
                           return_logits):
    low_res, iou = self.model.decode(self.features, coords, labels, boxes, masks_in,
                                     multimask_output)
    masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size,
                                         return_logits=return_logits)
    return masks, iou, low_res

  def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False):
    """Batched prompts in the model's input frame (the official `predict_torch`).

    Args:
      point_coords: (B, N, 2) input-frame xy (use `transform.apply_coords*`), or None.
      point_labels: (B, N), or None.
      boxes: (B, 4) input-frame xyxy (use `transform.apply_boxes*`), or None.
      mask_input: (B, 1, h, w) low-res logits, or None.

    Returns:
      masks (B, C, H, W), iou_predictions (B, C), low_res_logits (B, C, h, w): jax
      arrays, or torch tensors when the inputs were torch tensors.
    """
    self._require_image()
    use_torch = any(is_torch(x) for x in (point_coords, point_labels, boxes, mask_input))
    pts = to_numpy(point_coords, np.float32)
    lab = to_numpy(point_labels, np.int32)
    bx = to_numpy(boxes, np.float32)
    mi = to_numpy(mask_input, np.float32)
    check_batched_prompts(pts, lab, bx, mi, self.config, "predict_batch")
    if mi is not None and mi.ndim == 4:
      mi = mi[:, 0]
    out = self._predict_input_frame(pts, lab, bx, mi, multimask_output, return_logits)
    return tuple(to_torch_like(x, use_torch) for x in out)

  # -------------------------------------------------------------------- seed aliases
  setimage = set_image
  settorchimage = set_torch_image
  predicttorch = predict_batch
  predict_torch = predict_batch
  getimageembedding = get_image_embedding
  resetimage = reset_image


# Names used by the sssegmentation document and the official package.
SAMPredictor = Predictor
SamPredictor = Predictor
