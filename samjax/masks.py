"""Binary masks on the host: boxes, and COCO run-length encoding (RLE).

One implementation of each small conversion, used by the generator, the bulk job,
the drawing helpers and the synthetic dataset:

* `mask_to_box`: (..., H, W) masks -> (..., 4) XYXY boxes, max coordinates
  inclusive (the official `batched_mask_to_box` convention), zeros for empty masks.
* `encode_rle` / `decode_rle`: (H, W) mask <-> COCO RLE with `counts` as a str, so
  it is JSON-ready. Compressed RLE goes through pycocotools' C code; uncompressed
  RLE (`counts` a list of run lengths) decodes in NumPy like the reference's
  `rle_to_mask`.
* `to_coco_rle`: any COCO segmentation (binary mask, uncompressed or compressed
  RLE, polygons) -> compressed RLE with str counts.
* `segmentation_to_mask`: any of those -> (H, W) bool mask.

pycocotools is imported on first use, so this module needs only NumPy.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

Rle = Dict[str, Any]


def mask_to_box(masks: Any) -> np.ndarray:
  """XYXY boxes around masks, with inclusive max coordinates.

  Args:
    masks: (..., H, W) masks; nonzero is foreground.

  Returns:
    (..., 4) int64 [x0, y0, x1, y1] in pixels; [0, 0, 0, 0] for an empty mask.
  """
  masks = np.asarray(masks)
  if masks.ndim < 2:
    raise ValueError(f"masks must have shape (..., H, W), got {masks.shape}")
  masks = masks.astype(bool, copy=False)
  h, w = masks.shape[-2:]
  lead = masks.shape[:-2]
  if masks.size == 0:
    return np.zeros(lead + (4,), np.int64)
  rows = masks.any(axis=-1)  # (..., H)
  cols = masks.any(axis=-2)  # (..., W)
  top = rows.argmax(axis=-1)
  bottom = h - 1 - rows[..., ::-1].argmax(axis=-1)
  left = cols.argmax(axis=-1)
  right = w - 1 - cols[..., ::-1].argmax(axis=-1)
  boxes = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
  boxes[~rows.any(axis=-1)] = 0
  return boxes


def _mask_utils():
  from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
  return mask_utils


def _str_counts(rle: Rle) -> Rle:
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_rle(mask: Any) -> Rle:
  """(H, W) mask (nonzero is foreground) -> compressed COCO RLE with str counts.

  A bool mask that is already column-major (e.g. a transposed view, as the generator
  holds them) is encoded without a copy.
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"encode_rle takes one (H, W) mask, got shape {mask.shape}")
  flags = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
  return _str_counts(_mask_utils().encode(np.asfortranarray(flags)))


def is_uncompressed_rle(seg: Any) -> bool:
  """Whether `seg` is an RLE dict whose counts are a list of run lengths."""
  return isinstance(seg, dict) and isinstance(seg.get("counts"), (list, tuple))


def decode_rle(rle: Rle) -> np.ndarray:
  """COCO RLE (compressed or uncompressed) -> (H, W) bool mask.

  Uncompressed RLE (runs over the column-major flattening, starting with background,
  summing to H * W) is expanded in NumPy and comes back as a transposed view of a
  column-major buffer, like the reference's `rle_to_mask`.
  """
  if not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
    raise ValueError(f"not an RLE dict with 'size' and 'counts': {type(rle).__name__}")
  h, w = (int(v) for v in rle["size"])
  if is_uncompressed_rle(rle):
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
      raise ValueError(f"RLE counts sum to {int(counts.sum())}, size {h}x{w} needs {h * w}")
    parity = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(parity, counts).reshape(w, h).transpose()
  return _mask_utils().decode({"size": [h, w], "counts": rle["counts"]}).astype(bool)


def to_coco_rle(segmentation: Any, size: Optional[Sequence[int]] = None) -> Rle:
  """Any COCO segmentation -> compressed RLE {"size": [H, W], "counts": str}.

  Args:
    segmentation: an (H, W) binary mask, an uncompressed RLE (list counts), a
      compressed RLE (str or bytes counts), or COCO polygons (a list of
      [x0, y0, x1, y1, ...] lists, merged into one mask).
    size: (H, W) the segmentation must have; needed for polygons.

  Raises:
    ValueError: an unsupported segmentation, or one whose size is not `size`.
  """
  mask_utils = None
  if isinstance(segmentation, np.ndarray):
    rle = encode_rle(segmentation)
  elif is_uncompressed_rle(segmentation):
    h, w = (int(v) for v in segmentation["size"])
    mask_utils = _mask_utils()
    rle = _str_counts(mask_utils.frPyObjects(
        {"size": [h, w], "counts": list(segmentation["counts"])}, h, w))
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    rle = _str_counts(segmentation)
  elif isinstance(segmentation, (list, tuple)) and all(
      isinstance(p, (list, tuple, np.ndarray)) for p in segmentation):
    if size is None:
      raise ValueError("polygons need the image size (size=(H, W))")
    h, w = (int(v) for v in size)
    mask_utils = _mask_utils()
    polys = [[float(v) for v in p] for p in segmentation]
    if not polys:
      return encode_rle(np.zeros((h, w), bool))
    rle = _str_counts(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
  else:
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
  if size is not None and rle["size"] != [int(size[0]), int(size[1])]:
    raise ValueError(f"mask size {rle['size']} does not match image size "
                     f"{[int(size[0]), int(size[1])]}")
  return rle


def segmentation_to_mask(segmentation: Any, size: Optional[Sequence[int]] = None
                         ) -> np.ndarray:
  """Any COCO segmentation (see `to_coco_rle`) or (H, W) array -> (H, W) bool mask."""
  if isinstance(segmentation, dict):
    mask = decode_rle(segmentation)
    if size is not None and mask.shape != (int(size[0]), int(size[1])):
      raise ValueError(f"mask size {list(mask.shape)} does not match image size "
                       f"{[int(size[0]), int(size[1])]}")
    return mask
  if isinstance(segmentation, (list, tuple)):
    return decode_rle(to_coco_rle(segmentation, size))
  mask = np.asarray(segmentation)
  if mask.ndim != 2:
    raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
  return mask.astype(bool, copy=False)


def rle_area(rle: Rle) -> int:
  """Foreground pixel count of a COCO RLE (compressed or uncompressed)."""
  if is_uncompressed_rle(rle):
    return int(sum(rle["counts"][1::2]))
  return int(_mask_utils().area(rle))


def rle_bbox(rle: Rle) -> List[float]:
  """COCO XYWH box of an RLE's foreground, in pixels (width = x1 - x0 + 1)."""
  if is_uncompressed_rle(rle):
    rle = to_coco_rle(rle)
  return [float(v) for v in _mask_utils().toBbox(rle)]
