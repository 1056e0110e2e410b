"""Automatic mask generation under extreme settings: memory follows the work that is
needed, and a setting that cannot fit the device is refused before compiling."""

from __future__ import annotations

import numpy as np
import pytest

import samjax
from samjax.amg import generator as G
from samjax.amg import kernels as K


@pytest.fixture(scope="module")
def predictor():
  return samjax.Predictor.from_checkpoint("tests/fixtures/tiny_trained")


def _image(h=160, w=220, seed=0):
  from samjax.data.synthetic import make_synthetic_image
  return np.asarray(make_synthetic_image(np.random.default_rng(seed), (h, w))[0], np.uint8)


def test_huge_points_per_batch_decodes_only_the_points(predictor):
  """A single batch is as wide as its points: points_per_batch=100000 with 16 points
  decodes 64 slots, not 100000, and gives the records of points_per_batch=64."""
  image = _image()
  kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
  big = samjax.AutomaticMaskGenerator(predictor, points_per_batch=100000, **kw)
  small = samjax.AutomaticMaskGenerator(predictor, points_per_batch=64, **kw)
  crops = [G._Crop(0, 0, [0, 0, image.shape[1], image.shape[0]], 0, image,  # pylint: disable=protected-access
                   big.point_grids[0], big.transform)]
  assert big._device_batch(1, crops) == 64  # pylint: disable=protected-access
  a, b = big.generate(image), small.generate(image)
  assert len(a) == len(b) > 0
  for ra, rb in zip(a, b):
    np.testing.assert_array_equal(ra["segmentation"], rb["segmentation"])
    assert ra["predicted_iou"] == rb["predicted_iou"] and ra["bbox"] == rb["bbox"]


def test_settings_too_large_for_the_device_fail_before_compiling(predictor, monkeypatch):
  image = _image()
  monkeypatch.setattr(G, "device_memory_bytes", lambda device: 1 << 30)  # a 1 GiB device
  gen = samjax.AutomaticMaskGenerator(predictor, points_per_side=128)
  stats = K.compiled_functions()["crop_stats"]
  before = stats._cache_size()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"GiB of low-res logits.*lower points_per_side"):
    gen.generate(image)
  assert stats._cache_size() == before  # pylint: disable=protected-access


def test_crop_layers_keep_crop_sized_masks(predictor):
  """Masks of every crop are held at the crop's size until the records are built (the
  full-image copy of each crop's masks is what made crop layers cost crops x image)."""
  image = _image(180, 260, seed=3)
  gen = samjax.AutomaticMaskGenerator(predictor, points_per_side=4, crop_n_layers=1,
                                      pred_iou_thresh=0.0, stability_score_thresh=0.0)
  seen = []
  finish = gen._finish_image  # pylint: disable=protected-access

  def spy(crops):
    seen.extend((c.hw, c.result["masks_t"].shape[1:]) for c in crops)
    return finish(crops)
  gen._finish_image = spy  # pylint: disable=protected-access
  records = gen.generate(image)
  assert records and len(seen) == 5
  for (h, w), stored in seen:
    assert stored == (w, h)
  for r in records:
    assert r["segmentation"].shape == image.shape[:2]
