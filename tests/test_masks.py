"""samjax.masks against pycocotools, the official amg helpers and a brute-force box."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samjax import masks as M

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def random_masks(seed: int, shape=(6, 23, 17)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = rng.random(shape) < rng.uniform(0.0, 0.6, shape[:-2] + (1, 1))
  out[..., 0, :, :] = False  # An empty mask.
  if shape[-3] > 1:
    out[..., 1, :, :] = False
    out[..., 1, 4, 7] = True  # A single pixel.
  return out


def brute_box(mask: np.ndarray) -> list[int]:
  ys, xs = np.nonzero(mask)
  return [0, 0, 0, 0] if ys.size == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]


def test_mask_to_box_matches_brute_force_and_the_reference():
  masks = random_masks(0, (2, 5, 23, 17))
  boxes = M.mask_to_box(masks)
  assert boxes.shape == (2, 5, 4) and boxes.dtype == np.int64
  for idx in np.ndindex(masks.shape[:2]):
    assert boxes[idx].tolist() == brute_box(masks[idx]), idx
  assert M.mask_to_box(masks[0, 3]).tolist() == brute_box(masks[0, 3])  # A single (H, W).
  assert M.mask_to_box(masks.astype(np.float32) * 0.5).tolist() == boxes.tolist()  # nonzero
  assert M.mask_to_box(np.zeros((3, 0, 4), bool)).shape == (3, 4)
  torch = pytest.importorskip("torch")
  amg = pytest.importorskip("segment_anything.utils.amg")
  ref = amg.batched_mask_to_box(torch.as_tensor(masks)).numpy()
  np.testing.assert_array_equal(boxes, ref)


def uncompressed(mask: np.ndarray) -> dict:
  """COCO uncompressed RLE written out by hand (column-major runs from background)."""
  flat = mask.ravel(order="F").astype(np.int8)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
  counts = np.diff(bounds).tolist()
  return {"size": list(mask.shape), "counts": ([0] + counts) if flat[0] else counts}


def test_rle_round_trips_and_formats():
  for m in random_masks(1):
    rle = M.encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [23, 17]
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert rle["counts"] == ref["counts"].decode("ascii")
    np.testing.assert_array_equal(M.decode_rle(rle), m)
    un = uncompressed(m)
    dec = M.decode_rle(un)
    assert dec.dtype == bool and not dec.flags.c_contiguous  # Column-major, like upstream.
    np.testing.assert_array_equal(dec, m)
    for seg in (m, m.astype(np.uint8), un, rle, dict(rle, counts=rle["counts"].encode())):
      assert M.to_coco_rle(seg, (23, 17)) == rle
      np.testing.assert_array_equal(M.segmentation_to_mask(seg), m)
    assert M.rle_area(rle) == M.rle_area(un) == int(m.sum())
    assert M.rle_bbox(rle) == M.rle_bbox(un) == mask_utils.toBbox(ref).tolist()
  # Column-major bool views (what the generator holds) encode as they are.
  m = random_masks(2)[3]
  assert M.encode_rle(np.asfortranarray(m)) == M.encode_rle(m)


def test_uncompressed_rle_matches_the_reference():
  torch = pytest.importorskip("torch")
  amg = pytest.importorskip("segment_anything.utils.amg")
  masks = random_masks(3)
  for m, ref in zip(masks, amg.mask_to_rle_pytorch(torch.as_tensor(masks))):
    assert M.to_coco_rle(ref) == amg.coco_encode_rle(ref)
    np.testing.assert_array_equal(M.decode_rle(ref), amg.rle_to_mask(ref))
    np.testing.assert_array_equal(M.decode_rle(ref), m)


def test_polygons():
  square = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]
  tri = [[10.0, 1.0, 14.0, 1.0, 12.0, 5.0]]
  rle = M.to_coco_rle(square + tri, size=(9, 16))
  ref = mask_utils.merge(mask_utils.frPyObjects(square + tri, 9, 16))
  assert rle == {"size": [9, 16], "counts": ref["counts"].decode("ascii")}
  np.testing.assert_array_equal(M.segmentation_to_mask(square + tri, (9, 16)),
                                mask_utils.decode(ref).astype(bool))
  assert not M.segmentation_to_mask([], (4, 5)).any()
  with pytest.raises(ValueError, match="size"):
    M.to_coco_rle(square)


def test_errors():
  m = np.zeros((4, 5), bool)
  with pytest.raises(ValueError, match="does not match image size"):
    M.to_coco_rle(M.encode_rle(m), size=(5, 4))
  with pytest.raises(ValueError, match="does not match image size"):
    M.segmentation_to_mask(M.encode_rle(m), size=(5, 4))
  with pytest.raises(ValueError, match="unsupported segmentation"):
    M.to_coco_rle(42)
  with pytest.raises(ValueError, match="sum to"):
    M.decode_rle({"size": [4, 5], "counts": [3, 4]})
  with pytest.raises(ValueError, match=r"\(H, W\)"):
    M.encode_rle(np.zeros((2, 4, 5), bool))
  with pytest.raises(ValueError):
    M.mask_to_box(np.zeros(5, bool))
