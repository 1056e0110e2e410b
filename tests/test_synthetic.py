"""samjax.data.synthetic: scene generator, COCO writer/loader and CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from samjax.data import synthetic
from samjax.data import (CATEGORIES, load_coco_instances, make_synthetic_image,
                         mask_to_polygons, write_coco_dataset)

pytest.importorskip("pycocotools")

# pycocotools' Cython decode trips a NumPy 2 deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_make_synthetic_image_contract():
  n_inst = 0
  for seed in range(12):
    image, masks, cats = make_synthetic_image(np.random.default_rng(seed), size=96,
                                              max_objects=6)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert len(masks) == len(cats) <= 6
    assert set(cats) <= {c["id"] for c in CATEGORIES}
    for m in masks:
      assert m.shape == (96, 96) and m.dtype == bool and m.sum() >= 30
    n_inst += len(masks)
    if masks:
      # Occlusion resolved: every pixel belongs to at most one instance.
      assert np.stack(masks).sum(0).max() <= 1
  assert n_inst >= 12  # Not degenerate.
  image, masks, _ = make_synthetic_image(0, size=(64, 80), max_objects=0)
  assert image.shape == (64, 80, 3) and masks == []


def test_make_synthetic_image_is_deterministic():
  a = make_synthetic_image(np.random.default_rng(7), size=64)
  b = make_synthetic_image(np.random.default_rng(7), size=64)
  c = make_synthetic_image(np.random.default_rng(8), size=64)
  np.testing.assert_array_equal(a[0], b[0])
  assert len(a[1]) == len(b[1]) and a[2] == b[2]
  for ma, mb in zip(a[1], b[1]):
    np.testing.assert_array_equal(ma, mb)
  assert not np.array_equal(a[0], c[0])


def test_masks_are_exactly_the_visible_pixels(monkeypatch):
  """Each mask = own footprint minus the footprints of all later objects."""
  footprints = []
  real = synthetic._shape_mask

  def recording(*args, **kwargs):
    m = real(*args, **kwargs)
    footprints.append(m.astype(bool))
    return m

  monkeypatch.setattr(synthetic, "_shape_mask", recording)
  occluded = 0
  for seed in range(15):
    footprints.clear()
    _, masks, _ = make_synthetic_image(seed, size=64, max_objects=6, min_area=0)
    # An empty footprint is immediately redrawn; only the redraw is painted.
    feet = [f for f in footprints if f.any()]
    assert len(feet) == len(masks)
    for k, (m, f) in enumerate(zip(masks, feet)):
      later = np.zeros_like(f)
      for g in feet[k + 1:]:
        later |= g
      np.testing.assert_array_equal(m, f & ~later)
      occluded += int((f & later).any())
    if masks:
      assert np.stack(masks).sum(0).max() <= 1  # Disjoint.
  assert occluded >= 3  # The scenes do contain occlusions.


def test_min_area_drops_small_instances():
  for seed in range(10):
    _, all_masks, all_cats = make_synthetic_image(seed, size=64, min_area=0)
    _, kept, cats = make_synthetic_image(seed, size=64, min_area=30)
    big = [i for i, m in enumerate(all_masks) if m.sum() >= 30]
    assert len(kept) == len(big) and cats == [all_cats[i] for i in big]
    for m, i in zip(kept, big):
      np.testing.assert_array_equal(m, all_masks[i])


def _generated(seed, num_images, size):
  """The masks write_coco_dataset generates (same per-image seeding)."""
  children = np.random.SeedSequence(seed).spawn(num_images)
  return [make_synthetic_image(np.random.default_rng(c), size) for c in children]


@pytest.mark.parametrize("rle", [False, True])
def test_coco_roundtrip(tmp_path, rle):
  from pycocotools.coco import COCO
  ann_path = write_coco_dataset(str(tmp_path), num_images=6, seed=3, size=96, rle=rle)
  assert os.path.isfile(ann_path)
  with open(ann_path) as f:
    data = json.load(f)
  assert {c["id"] for c in data["categories"]} == {1, 2, 3}
  assert len(data["images"]) == 6
  assert all(os.path.isfile(tmp_path / "images" / im["file_name"]) for im in data["images"])
  ids = [a["id"] for a in data["annotations"]]
  assert len(set(ids)) == len(ids) and min(ids) >= 1
  for a in data["annotations"]:
    assert a["iscrowd"] == 0 and a["area"] >= 30 and len(a["bbox"]) == 4
    assert isinstance(a["segmentation"], dict if rle else (list, dict))
  if not rle:
    n_poly = sum(isinstance(a["segmentation"], list) for a in data["annotations"])
    assert n_poly >= 0.8 * len(data["annotations"])

  coco = COCO(ann_path)  # Loads with the stock pycocotools API.
  assert len(coco.getAnnIds()) == len(ids)

  expected = _generated(3, 6, 96)
  loaded = list(load_coco_instances(ann_path))
  assert len(loaded) == 6
  for (image, masks), (gimage, gmasks, gcats) in zip(loaded, expected):
    np.testing.assert_array_equal(image, gimage)  # PNG is lossless.
    assert masks.dtype == bool and masks.shape == (len(gmasks), 96, 96)
    for m, g in zip(masks, gmasks):
      iou = (m & g).sum() / (m | g).sum()
      assert iou > 0.9
      if rle:
        np.testing.assert_array_equal(m, g)
  # Polygons are traced so that they rasterise back exactly (see mask_to_polygons).
  for (_, masks), (_, gmasks, _) in zip(loaded, expected):
    for m, g in zip(masks, gmasks):
      np.testing.assert_array_equal(m, g)
  # bbox and area describe the visible pixels.
  a = data["annotations"][0]
  g = expected[a["image_id"] - 1][1][0]
  ys, xs = np.nonzero(g)
  assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
  assert a["area"] == g.sum()


def test_write_is_deterministic_and_prefix_stable(tmp_path):
  p1 = write_coco_dataset(str(tmp_path / "a"), 3, seed=11, size=64)
  p2 = write_coco_dataset(str(tmp_path / "b"), 3, seed=11, size=64)
  p3 = write_coco_dataset(str(tmp_path / "c"), 4, seed=11, size=64)
  with open(p1, "rb") as f1, open(p2, "rb") as f2:
    assert f1.read() == f2.read()
  for name in ("000001.png", "000002.png", "000003.png"):
    b1 = (tmp_path / "a" / "images" / name).read_bytes()
    assert b1 == (tmp_path / "b" / "images" / name).read_bytes()
    assert b1 == (tmp_path / "c" / "images" / name).read_bytes()
  p4 = write_coco_dataset(str(tmp_path / "d"), 3, seed=12, size=64)
  with open(p1) as f1, open(p4) as f4:
    assert json.load(f1)["annotations"] != json.load(f4)["annotations"]


def test_polygons_and_hole_fallback(tmp_path, monkeypatch):
  from pycocotools import mask as mask_utils
  ring = np.zeros((40, 40), bool)
  ring[5:35, 5:35] = True
  ring[15:25, 15:25] = False
  blob = np.zeros((40, 40), bool)
  blob[2:4, 36:39] = True  # Tiny 2x3 block: still a valid (>= 4 vertex) polygon.
  blob[30:38, 0:3] = True  # Second component of the same instance.
  for m in (ring, blob):
    polys = mask_to_polygons(m)
    assert all(len(p) >= 8 for p in polys)
    dec = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 40, 40)))
    if m is blob:
      np.testing.assert_array_equal(dec.astype(bool), m)
    else:  # Polygons cannot carry the hole: it gets filled.
      assert dec[20, 20] == 1
  image = np.zeros((40, 40, 3), np.uint8)
  monkeypatch.setattr(synthetic, "make_synthetic_image",
                      lambda *a, **k: (image, [ring, blob], [1, 2]))
  path = write_coco_dataset(str(tmp_path), 1, seed=0, size=40)
  with open(path) as f:
    segs = [a["segmentation"] for a in json.load(f)["annotations"]]
  assert isinstance(segs[0], dict) and isinstance(segs[1], list)  # RLE for the ring.
  (_, masks), = load_coco_instances(path, str(tmp_path / "images"))
  np.testing.assert_array_equal(masks[0], ring)
  np.testing.assert_array_equal(masks[1], blob)


def test_cli(tmp_path):
  out = tmp_path / "ds"
  assert synthetic.main(["--out", str(out), "--num-images", "2", "--seed", "5",
                         "--size", "48"]) == 0
  with open(out / "annotations.json") as f:
    assert len(json.load(f)["images"]) == 2
  # The `python -m` form, in a fresh interpreter.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  res = subprocess.run([sys.executable, "-m", "samjax.data.synthetic", "--out",
                        str(tmp_path / "m"), "--num-images", "1", "--seed", "1",
                        "--size", "32", "--rle"], capture_output=True, text=True,
                       timeout=120, cwd=repo, env=env)
  assert res.returncode == 0, res.stderr
  assert "RuntimeWarning" not in res.stderr
  assert os.path.isfile(tmp_path / "m" / "images" / "000001.png")
