"""Longest-side resizing of images, points and boxes (SAM's input transform).

`ResizeLongestSide` reproduces `segment_anything.utils.transforms.ResizeLongestSide`
without needing torch: the official `apply_image` is torchvision's
`resize(to_pil_image(image), size)`, and for PIL inputs torchvision simply calls
`PIL.Image.resize(..., BILINEAR)`, so calling Pillow directly yields the same bytes.
The coordinate transforms come in three flavours (numpy float64, JAX float32, torch
float32) because the official code and the example scripts mix all of them.

Coordinates are always (x, y) in pixels of the original image; sizes are (H, W).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# Pillow >= 9.1 moved the filter constants into an enum; older ones only have the
# module-level alias.
_BILINEAR = getattr(getattr(Image, "Resampling", Image), "BILINEAR")


def _size_hw(original_size: Sequence[Any]) -> Tuple[int, int]:
  """Returns (H, W) as Python ints, accepting numpy/torch/jax scalars."""
  if len(original_size) != 2:
    raise ValueError(f"original_size must be (H, W), got {tuple(original_size)!r}")
  h, w = (int(s) for s in original_size)
  if h <= 0 or w <= 0:
    raise ValueError(f"original_size must be positive, got (H, W) = ({h}, {w})")
  return h, w


def _check_last_dim(shape: Tuple[int, ...], n: int, what: str) -> None:
  if len(shape) == 0 or shape[-1] != n:
    raise ValueError(f"{what} must have {n} values in the last dimension, got shape "
                     f"{tuple(shape)}")


class ResizeLongestSide:
  """Resizes so that the longer image side equals `target_length` (keeps aspect).

  Attributes:
    target_length: length in pixels of the longer side after resizing (1024 for SAM).
  """

  def __init__(self, target_length: int) -> None:
    if int(target_length) <= 0:
      raise ValueError(f"target_length must be a positive int, got {target_length!r}")
    self.target_length = int(target_length)

  # ------------------------------------------------------------------ shapes

  @staticmethod
  def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
    """Output (H, W) for an (oldh, oldw) input whose long side becomes `long_side_length`.

    Same float arithmetic and round-half-up as the official code, so sizes (and hence
    the scale factors used for coordinates) agree exactly.
    """
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return (int(newh + 0.5), int(neww + 0.5))

  def _scales(self, original_size: Sequence[Any]) -> Tuple[float, float]:
    """(x_scale, y_scale) as Python floats (float64), computed like the official code."""
    old_h, old_w = _size_hw(original_size)
    new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
    return new_w / old_w, new_h / old_h

  # ------------------------------------------------------------------ images

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """Resizes a uint8 image with Pillow's (antialiased) bilinear filter.

    Args:
      image: uint8 array of shape (H, W, C) with C in {1, 2, 3, 4} (or (H, W)).
        C=3 is what SAM expects (RGB).

    Returns:
      uint8 array of shape (H', W', C) where max(H', W') == target_length, bit-for-bit
      equal to the official `apply_image`. As in the official code a single-channel
      input ((H, W) or (H, W, 1)) comes back as (H', W'), since Pillow's "L" mode
      has no channel axis.

    Raises:
      ValueError: if `image` is not a non-empty uint8 (H, W[, C<=4]) array, or the
        aspect ratio is so extreme that the short side would round to 0 pixels.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (
        arr.ndim == 3 and not 1 <= arr.shape[2] <= 4):
      raise ValueError("apply_image expects a uint8 image of shape (H, W, C) with C in "
                       f"1..4 (normally (H, W, 3) RGB); got dtype {arr.dtype} and shape "
                       f"{arr.shape}")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
      raise ValueError(f"apply_image got an empty image of shape {arr.shape}")
    new_h, new_w = self.get_preprocess_shape(h, w, self.target_length)
    if new_h == 0 or new_w == 0:
      raise ValueError(f"Image of size {h}x{w} would be resized to {new_h}x{new_w}: "
                       "aspect ratio too extreme for target_length "
                       f"{self.target_length}")
    if arr.ndim == 3 and arr.shape[2] == 1:
      arr = arr[:, :, 0]
    # fromarray infers the same mode as torchvision's to_pil_image (L/LA/RGB/RGBA);
    # the mode matters because Pillow resizes LA/RGBA with premultiplied alpha.
    pil = Image.fromarray(np.ascontiguousarray(arr))
    return np.array(pil.resize((new_w, new_h), _BILINEAR))

  def apply_image_torch(self, image: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Resizes a float (B, C, H, W) torch batch with antialiased bilinear interpolation.

    Like the official method this need not match `apply_image` exactly. Unlike the
    official method (which reads the target size from `image.shape[0:2]`, i.e. B and
    C) the size is computed from H and W, as the sssegmentation port does.
    """
    import torch  # Lazy: torch is optional for samjax.
    from torch.nn import functional as F

    if not isinstance(image, torch.Tensor) or image.ndim != 4:
      raise ValueError("apply_image_torch expects a (B, C, H, W) torch.Tensor, got "
                       f"{type(image).__name__} with shape {tuple(getattr(image, 'shape', ()))}")
    target = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
    return F.interpolate(image, target, mode="bilinear", align_corners=False, antialias=True)

  # ------------------------------------------------------------------ numpy coords

  def apply_coords(self, coords: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
    """Scales (x, y) pixel coordinates from `original_size` to the resized image.

    Args:
      coords: array-like of shape (..., 2), (x, y) in original-image pixels.
      original_size: (H, W) of the original image.

    Returns:
      float64 array of shape (..., 2) (a new array; the input is not modified).
    """
    out = np.array(coords, dtype=np.float64, copy=True)
    _check_last_dim(out.shape, 2, "coords")
    sx, sy = self._scales(original_size)
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out

  def apply_boxes(self, boxes: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
    """Scales XYXY boxes from `original_size` to the resized image.

    Args:
      boxes: array-like of shape (..., 4), (x0, y0, x1, y1) in original pixels.
      original_size: (H, W) of the original image.

    Returns:
      float64 array of shape (B, 4), B = number of boxes (leading dims flattened, as
      in the official code).
    """
    boxes = np.asarray(boxes)
    _check_last_dim(boxes.shape, 4, "boxes")
    return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

  # ------------------------------------------------------------------ JAX coords

  def apply_coords_jax(self, coords: jax.Array, original_size: Sequence[int]) -> jax.Array:
    """JAX version of `apply_coords`: float32 (..., 2) output.

    `original_size` must be concrete (Python/numpy ints), so under `jit` pass it as a
    static argument. Results equal `apply_coords_torch` bit for bit (both multiply in
    float32 by the float32-rounded scale).
    """
    coords = jnp.asarray(coords, dtype=jnp.float32)
    _check_last_dim(coords.shape, 2, "coords")
    sx, sy = self._scales(original_size)
    return coords * jnp.asarray([sx, sy], dtype=jnp.float32)

  def apply_boxes_jax(self, boxes: jax.Array, original_size: Sequence[int]) -> jax.Array:
    """JAX version of `apply_boxes`: float32 (B, 4) output."""
    boxes = jnp.asarray(boxes, dtype=jnp.float32)
    _check_last_dim(boxes.shape, 4, "boxes")
    return self.apply_coords_jax(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

  # ------------------------------------------------------------------ torch coords

  def apply_coords_torch(self, coords: "torch.Tensor",  # noqa: F821
                         original_size: Sequence[int]) -> "torch.Tensor":  # noqa: F821
    """Torch version of `apply_coords`: float32 (..., 2) tensor on `coords`' device.

    Non-tensor inputs are converted with `torch.as_tensor`. Unlike the official
    version (deepcopy + in-place writes) this also works on tensors that require grad.
    """
    import torch  # Lazy: torch is optional for samjax.

    coords = torch.as_tensor(coords)
    _check_last_dim(tuple(coords.shape), 2, "coords")
    sx, sy = self._scales(original_size)
    out = coords.to(torch.float32)
    # The official code multiplies the float32 tensor by a Python float; torch rounds
    # that scalar to float32 first, so a float32 scale tensor gives identical bits.
    scale = torch.tensor([sx, sy], dtype=torch.float32, device=out.device)
    return out * scale

  def apply_boxes_torch(self, boxes: "torch.Tensor",  # noqa: F821
                        original_size: Sequence[int]) -> "torch.Tensor":  # noqa: F821
    """Torch version of `apply_boxes`: float32 (B, 4) tensor."""
    import torch  # Lazy: torch is optional for samjax.

    boxes = torch.as_tensor(boxes)
    _check_last_dim(tuple(boxes.shape), 4, "boxes")
    return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

  # Spellings used by sssegmentation's SAM port (and documents derived from it).
  applyimage = apply_image
  applyimagetorch = apply_image_torch
  applycoords = apply_coords
  applyboxes = apply_boxes
  applycoordstorch = apply_coords_torch
  applyboxestorch = apply_boxes_torch
  getpreprocessshape = get_preprocess_shape

  def __repr__(self) -> str:
    return f"ResizeLongestSide(target_length={self.target_length})"
