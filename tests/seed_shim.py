"""The seed document's names (sssegmentation) backed by the *official* PyTorch package.

tests/test_seed_examples.py runs every seed example twice, once importing samjax and
once importing this shim, on the same randomized weights, and compares the results.
"""

from __future__ import annotations

import torch
from segment_anything import SamAutomaticMaskGenerator as _OfficialAMG
from segment_anything import SamPredictor as _OfficialPredictor
from segment_anything.utils.transforms import ResizeLongestSide as _OfficialResize

OFFICIAL_MODEL = None  # set by the test: an official Sam with the test weights


class ResizeLongestSide(_OfficialResize):
  applyimage = _OfficialResize.apply_image
  applycoords = _OfficialResize.apply_coords
  applyboxes = _OfficialResize.apply_boxes
  applycoordstorch = _OfficialResize.apply_coords_torch
  applyboxestorch = _OfficialResize.apply_boxes_torch


def _model():
  m = OFFICIAL_MODEL
  m.inference = m.forward
  return m


class SAMPredictor(_OfficialPredictor):
  def __init__(self, use_default_sam_h=False, use_default_sam_l=False, use_default_sam_b=False,
               device="cpu"):
    super().__init__(_model())
    self.transform = ResizeLongestSide(self.model.image_encoder.img_size)

  setimage = _OfficialPredictor.set_image

  def predicttorch(self, *a, **k):
    with torch.no_grad():
      return self.predict_torch(*a, **k)


class SAMAutomaticMaskGenerator(_OfficialAMG):
  def __init__(self, use_default_sam_h=False, use_default_sam_l=False, use_default_sam_b=False,
               device="cpu", **kwargs):
    super().__init__(_model(), **kwargs)
