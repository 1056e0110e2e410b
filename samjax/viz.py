"""Drawing SAM prompts and masks.

Two families:
  * `show_mask`, `show_points`, `show_box`, `show_anns`: matplotlib helpers that draw
    on an existing Axes, like the ones in the official notebooks. matplotlib is
    imported inside them so `samjax` itself does not need it.
  * `overlay`, `overlay_anns`: return a new uint8 (H, W, 3) RGB image with masks,
    contours, points and boxes burnt in, using only numpy and OpenCV (for servers,
    tests and bulk jobs where matplotlib is unavailable or too slow).

Coordinates are (x, y) in pixels of the image being drawn on; boxes are XYXY.
"""

from __future__ import annotations

import colorsys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from samjax.interop import to_numpy
from samjax.io.images import check_rgb_image
from samjax.masks import segmentation_to_mask

# The official notebooks' colours, so figures look the same as upstream ones.
_MASK_RGBA = np.array([30 / 255, 144 / 255, 255 / 255, 0.6])
_POS_RGB = (0, 255, 0)
_NEG_RGB = (255, 0, 0)
_BOX_RGB = (0, 255, 0)
_WHITE = (255, 255, 255)


# ---------------------------------------------------------------------- matplotlib


def show_mask(mask: Any, ax: Any, random_color: bool = False,
              rng: Optional[np.random.Generator] = None) -> Any:
  """Draws one mask as a translucent colour layer on `ax`.

  Args:
    mask: (H, W) mask, or any shape ending in (H, W) with a single mask in it
      (e.g. (1, H, W)); non-zero means inside.
    ax: matplotlib Axes.
    random_color: use a random colour (alpha 0.6) instead of the notebooks' blue.
    rng: generator for the random colour (default: numpy's global one, like upstream).

  Returns:
    The AxesImage that was added.
  """
  m = to_numpy(mask)
  h, w = m.shape[-2:]
  if m.size != h * w:
    raise ValueError(f"show_mask draws a single mask, got shape {m.shape}")
  if random_color:
    rgb = (rng.random(3) if rng is not None else np.random.random(3))
    color = np.concatenate([rgb, [0.6]])
  else:
    color = _MASK_RGBA
  layer = (m.reshape(h, w, 1) != 0) * color.reshape(1, 1, 4)
  return ax.imshow(layer)


def show_points(coords: Any, labels: Any, ax: Any, marker_size: float = 375) -> None:
  """Draws positive (label 1, green star) and negative (label 0, red star) points.

  Args:
    coords: (N, 2) array of (x, y) pixel coordinates.
    labels: (N,) array of labels; labels other than 0/1 (e.g. -1 padding) are skipped.
    ax: matplotlib Axes.
    marker_size: matplotlib scatter size in points^2.
  """
  coords = to_numpy(coords).reshape(-1, 2)
  labels = to_numpy(labels).reshape(-1)
  if len(labels) != len(coords):
    raise ValueError(f"got {len(coords)} points but {len(labels)} labels")
  for value, color in ((1, "green"), (0, "red")):
    pts = coords[labels == value]
    ax.scatter(pts[:, 0], pts[:, 1], color=color, marker="*", s=marker_size,
               edgecolor="white", linewidth=1.25)


def show_box(box: Any, ax: Any) -> Any:
  """Draws one XYXY box (pixels) as a green outline on `ax`; returns the patch."""
  from matplotlib.patches import Rectangle

  x0, y0, x1, y1 = (float(v) for v in to_numpy(box).reshape(4))
  return ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, edgecolor="green",
                                facecolor=(0, 0, 0, 0), lw=2))


def show_anns(anns: Sequence[Dict[str, Any]], ax: Any = None,
              rng: Optional[np.random.Generator] = None) -> Any:
  """Draws automatic-mask-generator output (list of dicts) in random colours.

  Larger masks are drawn first so that small ones stay visible on top.

  Args:
    anns: records with a 'segmentation' (bool (H, W) array or COCO RLE dict) and
      optionally 'area'.
    ax: matplotlib Axes; the current one (`plt.gca()`) if None.
    rng: generator for the colours (default: numpy's global one, like upstream).

  Returns:
    The AxesImage that was added, or None when `anns` is empty.
  """
  if len(anns) == 0:
    return None
  if ax is None:
    import matplotlib.pyplot as plt
    ax = plt.gca()
  masks = [_ann_mask(a) for a in _sorted_by_area(anns)]
  h, w = masks[0].shape
  layer = np.zeros((h, w, 4))
  for m in masks:
    rgb = rng.random(3) if rng is not None else np.random.random(3)
    layer[m] = np.concatenate([rgb, [0.35]])
  # Keep the limits the image set; the RGBA layer must not rescale the axes.
  ax.set_autoscale_on(False)
  return ax.imshow(layer)


# ---------------------------------------------------------------------- numpy/cv2


def _palette(n: int, seed: int) -> np.ndarray:
  """(n, 3) uint8 bright, well separated colours; deterministic in `seed`.

  Hues step by the golden ratio from a seed-dependent start, which keeps neighbours
  in the list far apart on the colour wheel for any n.
  """
  start = np.random.default_rng(seed).random()
  cols = [colorsys.hsv_to_rgb((start + i * 0.618033988749895) % 1.0, 0.75, 1.0)
          for i in range(n)]
  return np.round(np.array(cols, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def _stack_masks(masks: Any, hw: Tuple[int, int]) -> np.ndarray:
  """Returns (N, H, W) bool. Non-bool masks are thresholded at > 0 (SAM logits)."""
  if masks is None:
    return np.zeros((0,) + hw, bool)
  if isinstance(masks, (list, tuple)):
    if len(masks) == 0:
      return np.zeros((0,) + hw, bool)
    masks = np.stack([to_numpy(m) for m in masks])
  m = to_numpy(masks)
  if m.ndim < 2 or m.shape[-2:] != hw:
    raise ValueError(f"masks must have shape (..., {hw[0]}, {hw[1]}) to match the "
                     f"image, got {m.shape}")
  m = m.reshape((-1,) + hw)
  return m if m.dtype == bool else m > 0


def _line_width(hw: Tuple[int, int]) -> int:
  # ~2 px at 500-1000 px images; scale so strokes stay visible on large photos.
  return max(1, int(round(min(hw) / 400)))


def overlay(image: Any, masks: Any = None, points: Any = None, labels: Any = None,
            boxes: Any = None, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
  """Draws masks, points and boxes over an image without matplotlib.

  Args:
    image: uint8 RGB image, (H, W, 3) (an (H, W) grey image is also accepted).
    masks: None, a list of (H, W) masks, or an array of shape (..., H, W), e.g.
      (N, H, W) from `predict` or (B, C, H, W) from a batched predictor. Bool masks
      are used as is; numeric ones are thresholded at > 0 (SAM logits / 0-1 masks).
      Masks are painted in order, so later masks cover earlier ones.
    points: (N, 2) (x, y) pixel coordinates (or (..., 2), flattened).
    labels: (N,) point labels: 1 draws a green dot, 0 a red dot, others (e.g. -1
      padding) are skipped. Defaults to all 1.
    boxes: (4,) or (..., 4) XYXY boxes in pixels, drawn as green rectangles.
    alpha: opacity of the mask colour in [0, 1].
    seed: picks the mask colours; the same seed gives the same colours.

  Returns:
    New uint8 (H, W, 3) RGB image; `image` is not modified.
  """
  # A fresh C-contiguous copy: OpenCV draws into it in place.
  img = np.array(check_rgb_image(image, "overlay", allow_gray=True), order="C")
  hw = img.shape[:2]
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  m = _stack_masks(masks, hw)
  lw = _line_width(hw)

  colors = _palette(len(m), seed)
  for mask, color in zip(m, colors):
    if not mask.any():
      continue
    # Blend in float then round, so alpha=0/1 reproduce the image/colour exactly.
    blended = img[mask].astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
    img[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST,
                                   cv2.CHAIN_APPROX_NONE)
    # Contours in the full-strength colour delimit touching masks of similar hue.
    cv2.drawContours(img, contours, -1, tuple(int(c) for c in color), lw)

  if boxes is not None:
    for x0, y0, x1, y1 in to_numpy(boxes).reshape(-1, 4).astype(np.float64):
      cv2.rectangle(img, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))),
                    _BOX_RGB, lw + 1)

  if points is not None:
    pts = to_numpy(points).reshape(-1, 2).astype(np.float64)
    labs = (np.ones(len(pts), np.int64) if labels is None
            else to_numpy(labels).reshape(-1).astype(np.int64))
    if len(labs) != len(pts):
      raise ValueError(f"got {len(pts)} points but {len(labs)} labels")
    radius = max(3, 3 * lw + 2)
    for (x, y), lab in zip(pts, labs):
      if lab not in (0, 1):
        continue
      center = (int(round(x)), int(round(y)))
      # White ring first, so the dot stays visible on green/red masks.
      cv2.circle(img, center, radius + max(2, lw + 1), _WHITE, -1, lineType=cv2.LINE_AA)
      cv2.circle(img, center, radius, _POS_RGB if lab == 1 else _NEG_RGB, -1,
                 lineType=cv2.LINE_AA)
  return img


def _ann_mask(ann: Dict[str, Any]) -> np.ndarray:
  """The bool (H, W) mask of an annotation (bool array or COCO RLE)."""
  seg = ann["segmentation"]
  return segmentation_to_mask(seg if isinstance(seg, dict) else to_numpy(seg))


def _sorted_by_area(anns: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  def area(a):
    return a["area"] if "area" in a else int(_ann_mask(a).sum())
  return sorted(anns, key=area, reverse=True)


def overlay_anns(image: Any, anns: Sequence[Dict[str, Any]], alpha: float = 0.5,
                 seed: int = 0) -> np.ndarray:
  """`overlay` for automatic-mask-generator output.

  Args:
    image: uint8 (H, W, 3) RGB image.
    anns: records with 'segmentation' (bool (H, W) array or COCO RLE dict) and
      optionally 'area'. Drawn largest first so small masks stay on top.
    alpha, seed: as in `overlay`.

  Returns:
    New uint8 (H, W, 3) RGB image.
  """
  masks = [_ann_mask(a) for a in _sorted_by_area(anns)]
  return overlay(image, masks, alpha=alpha, seed=seed)
