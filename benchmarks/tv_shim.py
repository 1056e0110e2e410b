"""A stand-in for the four torchvision functions `segment_anything` imports.

`segment_anything` imports torchvision at package import time (NMS for the automatic
mask generator, a PIL resize for `ResizeLongestSide.apply_image`), so on a machine with
PyTorch but without torchvision the whole official package, model included, would fail
to import. The benchmark then installs this module under the `torchvision` names. It is
used only if `import torchvision` fails, and the run records that it was used (the
official AMG's NMS is then this vectorised-greedy version instead of torchvision's C++
kernel; the results are the same up to the order of exactly tied scores).
"""

from __future__ import annotations

import sys
import types

import numpy as np


def box_area(boxes):
  """(N, 4) xyxy -> (N,) areas, as `torchvision.ops.box_area`."""
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes, scores, iou_threshold: float):
  """Greedy NMS: indices kept, by decreasing score; a box is dropped if IoU > threshold."""
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)
  order = torch.argsort(scores, descending=True)
  b = boxes[order].double()
  area = box_area(b)
  lt = torch.maximum(b[:, None, :2], b[None, :, :2])
  rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  iou = (inter / (area[:, None] + area[None, :] - inter)).cpu().numpy()
  n = iou.shape[0]
  removed = np.zeros(n, bool)
  keep = []
  for i in range(n):
    if removed[i]:
      continue
    keep.append(i)
    removed |= iou[i] > iou_threshold
  return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def batched_nms(boxes, scores, idxs, iou_threshold: float):
  """NMS within each category `idxs`, by offsetting categories apart (torchvision's trick)."""
  import torch
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  return nms(boxes + offsets[:, None], scores, iou_threshold)


def to_pil_image(pic):
  """HxWx3 uint8 numpy -> PIL image (the only use in segment_anything)."""
  from PIL import Image
  return Image.fromarray(np.asarray(pic))


def resize(img, size):
  """PIL image -> PIL image of `size` = (h, w), bilinear, as torchvision does for PIL."""
  from PIL import Image
  h, w = size
  return img.resize((w, h), Image.BILINEAR)


def install() -> bool:
  """Registers the stand-in if torchvision cannot be imported. Returns True if it did."""
  try:
    import torchvision  # noqa: F401
    return False
  except Exception:  # noqa: BLE001 - missing, or built for another torch
    pass
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]
  tv = types.ModuleType("torchvision")
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")
  tr = types.ModuleType("torchvision.transforms")
  fn = types.ModuleType("torchvision.transforms.functional")
  boxes.batched_nms, boxes.box_area, boxes.nms = batched_nms, box_area, nms
  ops.boxes, ops.batched_nms, ops.box_area, ops.nms = boxes, batched_nms, box_area, nms
  fn.resize, fn.to_pil_image = resize, to_pil_image
  tr.functional = fn
  tv.ops, tv.transforms = ops, tr
  tv.__version__ = "benchmarks.tv_shim"
  sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
                      "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
  return True
