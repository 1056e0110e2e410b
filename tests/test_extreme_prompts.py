"""Prompts at the edges: labels outside {-1, 0, 1} match the official package (they are
not taken for padding), and prompts too large for the device are refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samjax
from samjax import model as model_lib


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
  from segment_anything import SamPredictor
  image = np.random.default_rng(4).integers(0, 256, (150, 210, 3), dtype=np.uint8)
  ours = samjax.Predictor.from_checkpoint(tiny_ckpt[1])
  ref = SamPredictor(tiny_ckpt[2])
  ours.set_image(image)
  ref.set_image(image)
  return ours, ref, image


@pytest.mark.parametrize("odd_label", [-2, -7, 2, 5])
def test_labels_outside_the_official_set_match_the_official(pair, odd_label):
  """The official embeds such a point by its position only; padding used to be -2."""
  ours, ref, image = pair
  coords = ours.transform.apply_coords(np.array([[[40.0, 50.0], [120.0, 90.0]]]),
                                       image.shape[:2])
  labels = np.array([[1, odd_label]])
  m, s, lg = ours.predict_batch(point_coords=coords, point_labels=labels)
  with torch.no_grad():
    rm, rs, rlg = ref.predict_torch(torch.as_tensor(coords, dtype=torch.float32),
                                    torch.as_tensor(labels))
  np.testing.assert_allclose(np.asarray(s), rs.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(lg), rlg.numpy(), atol=1e-3, rtol=1e-3)
  agree = (np.asarray(m) == rm.numpy()).mean()
  assert agree > 0.999, agree
  # And it is not the same as leaving the point out.
  _, s_one, _ = ours.predict_batch(point_coords=coords[:, :1], point_labels=labels[:, :1])
  assert not np.allclose(np.asarray(s_one), np.asarray(s))


def test_point_buckets_grow_linearly_for_large_prompts():
  assert [model_lib.point_bucket(n) for n in (1, 8, 9, 64, 65, 10_000)] == \
      [8, 8, 16, 64, 128, 10_048]


def test_prompts_too_large_for_the_device_fail_before_compiling(pair, monkeypatch):
  ours, _, _ = pair
  monkeypatch.setattr(model_lib.runtime_lib.mesh, "device_memory_bytes",
                      lambda device: 1 << 30)  # a 1 GiB device
  decode = model_lib.compiled_functions()["decode"]
  before = decode._cache_size()  # pylint: disable=protected-access
  pts = np.random.default_rng(0).uniform(0, 200, (5000, 2))
  with pytest.raises(ValueError, match="GiB for the decoder's attention"):
    ours.predict(point_coords=pts, point_labels=np.ones(5000, np.int64))
  assert decode._cache_size() == before  # pylint: disable=protected-access
