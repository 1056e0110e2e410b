"""Parity of `samjax.amg.utils` with `segment_anything.utils.amg` and torchvision NMS.

Integer outputs (boxes, RLEs, crop boxes, keep indices) must match exactly; float
outputs (stability scores, point grids) match exactly too, since both sides perform
the same IEEE operations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
amg = pytest.importorskip("segment_anything.utils.amg")

from samjax.amg import utils as A  # noqa: E402


def _blob_masks(rng, n, h, w, n_blobs=3):
  """(n, h, w) bool masks made of random rectangles and discs, with edge cases."""
  yy, xx = np.mgrid[:h, :w]
  masks = np.zeros((n, h, w), bool)
  for i in range(n):
    for _ in range(rng.integers(1, n_blobs + 1)):
      if rng.random() < 0.5:
        # Starts may lie outside the mask so that rectangles touch the borders.
        y0, x0 = rng.integers(-h // 4, h), rng.integers(-w // 4, w)
        masks[i, max(y0, 0):y0 + rng.integers(1, h // 2 + 2),
              max(x0, 0):x0 + rng.integers(1, w // 2 + 2)] = True
      else:
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, h // 3 + 2)
        masks[i] |= (yy - cy)**2 + (xx - cx)**2 <= r * r
  # Edge cases: empty, full, single pixels in each corner, border lines, noise.
  extra = np.zeros((9, h, w), bool)
  extra[1] = True
  extra[2, 0, 0] = True
  extra[3, -1, -1] = True
  extra[4, 0, -1] = True
  extra[4, -1, 0] = True
  extra[5, :, 0] = True
  extra[6, -1, :] = True
  extra[7] = rng.random((h, w)) < 0.5
  extra[8] = ~extra[7]
  return np.concatenate([masks, extra])


# ---------------------------------------------------------------------------------
# Grids and crops.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 16, 32, 64])
def test_build_point_grid(n):
  got = A.build_point_grid(n)
  ref = amg.build_point_grid(n)
  assert got.dtype == ref.dtype and got.shape == ref.shape == (n * n, 2)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("args", [(32, 0, 1), (32, 2, 2), (16, 3, 2), (32, 1, 3),
                                  (7, 2, 2)])
def test_build_all_layer_point_grids(args):
  got = A.build_all_layer_point_grids(*args)
  ref = amg.build_all_layer_point_grids(*args)
  assert len(got) == len(ref)
  for g, r in zip(got, ref):
    np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("im_size", [(1500, 2250), (2250, 1500), (480, 640),
                                     (1024, 1024), (333, 777), (17, 31)])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", [512 / 1500, 0.0, 0.5])
def test_generate_crop_boxes(im_size, n_layers, overlap):
  got = A.generate_crop_boxes(im_size, n_layers, overlap)
  ref = amg.generate_crop_boxes(im_size, n_layers, overlap)
  assert got == ref
  assert all(type(v) is int for box in got[0] for v in box)  # noqa: E721


def test_box_xyxy_to_xywh():
  rng = np.random.default_rng(0)
  for _ in range(20):
    box = rng.integers(0, 1000, 4)
    ref = amg.box_xyxy_to_xywh(torch.as_tensor(box)).tolist()
    got = A.box_xyxy_to_xywh(box)
    assert got.tolist() == ref
    assert got.dtype == box.dtype
  boxes = rng.integers(0, 1000, (5, 4))
  got = A.box_xyxy_to_xywh(boxes)
  for b, g in zip(boxes, got):
    assert g.tolist() == amg.box_xyxy_to_xywh(torch.as_tensor(b)).tolist()


# ---------------------------------------------------------------------------------
# RLE.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (23, 37), (64, 48)])
def test_rle_roundtrip_against_reference(hw):
  rng = np.random.default_rng(hash(hw) % 2**32)
  masks = _blob_masks(rng, 12, *hw) if min(hw) > 1 else rng.random((16,) + hw) < 0.5
  if min(hw) == 1:
    masks[0] = False
    masks[1] = True
  ref = amg.mask_to_rle_pytorch(torch.as_tensor(masks))
  batch = A.mask_to_rle_batch(masks)
  assert batch == ref
  for m, r in zip(masks, ref):
    got = A.mask_to_rle(m)
    assert got == r
    assert all(type(c) is int for c in got["counts"])  # noqa: E721 (JSON-able)
    dec = A.rle_to_mask(got)
    assert dec.dtype == bool
    np.testing.assert_array_equal(dec, amg.rle_to_mask(r))
    np.testing.assert_array_equal(dec, m)
    assert A.area_from_rle(got) == amg.area_from_rle(r) == int(m.sum())
  assert A.mask_to_rle_batch(np.zeros((0,) + hw, bool)) == []


def test_coco_encode_rle():
  pytest.importorskip("pycocotools")
  rng = np.random.default_rng(1)
  for m in _blob_masks(rng, 4, 40, 56):
    rle = A.mask_to_rle(m)
    got = A.coco_encode_rle(rle)
    ref = amg.coco_encode_rle(amg.mask_to_rle_pytorch(torch.as_tensor(m[None]))[0])
    assert got == ref
    assert isinstance(got["counts"], str)


def test_mask_to_rle_large_is_fast():
  # A 1500x2250 mask (a typical photo) must encode in well under a second.
  import time
  rng = np.random.default_rng(2)
  m = np.zeros((1500, 2250), bool)
  m[200:900, 300:1700] = rng.random((700, 1400)) < 0.9
  t = time.perf_counter()
  rle = A.mask_to_rle(m)
  dt = time.perf_counter() - t
  assert rle == amg.mask_to_rle_pytorch(torch.as_tensor(m[None]))[0]
  assert dt < 1.0


# ---------------------------------------------------------------------------------
# Small-region removal.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("thresh", [1, 5, 30, 200, 10_000])
def test_remove_small_regions(mode, thresh):
  rng = np.random.default_rng(thresh)
  masks = _blob_masks(rng, 10, 48, 64, n_blobs=6)
  # Speckle some masks so there are many tiny holes and islands.
  masks[:5] ^= rng.random((5, 48, 64)) < 0.03
  for m in masks:
    got, changed = A.remove_small_regions(m, thresh, mode)
    ref, ref_changed = amg.remove_small_regions(m, thresh, mode)
    assert changed == ref_changed
    assert got.dtype == bool
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------
# Stability score and mask boxes.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("thr,offset", [(0.0, 1.0), (0.0, 0.5), (0.3, 0.1), (-1.0, 2.0)])
def test_calculate_stability_score(thr, offset):
  rng = np.random.default_rng(3)
  logits = (rng.standard_normal((2, 5, 24, 40)) * 4).astype(np.float32)
  # Values exactly on the thresholds, and a mask with an empty union (0 / 0).
  logits[0, 0] = np.round(logits[0, 0])
  logits[0, 1, :, :7] = np.float32(thr + offset)
  logits[0, 1, :, 7:14] = np.float32(thr - offset)
  logits[1, 0] = -100.0
  logits[1, 1] = 100.0
  ref = amg.calculate_stability_score(torch.as_tensor(logits), thr, offset).numpy()
  assert np.isnan(ref[1, 0])
  got = jax.jit(A.calculate_stability_score, static_argnums=(1, 2))(logits, thr, offset)
  assert got.dtype == jnp.float32 and got.shape == (2, 5)
  np.testing.assert_array_equal(np.asarray(got), ref)
  got_np = A.calculate_stability_score_np(logits, thr, offset)
  assert got_np.dtype == np.float32
  np.testing.assert_array_equal(got_np, ref)


@pytest.mark.parametrize("shape", [(31, 45), (13, 31, 45), (2, 11, 31, 45), (0, 31, 45)])
def test_batched_mask_to_box(shape):
  rng = np.random.default_rng(4)
  h, w = shape[-2:]
  n = int(np.prod(shape[:-2]))
  masks = _blob_masks(rng, max(n - 9, 1), h, w)[:n] if n else np.zeros(shape, bool)
  masks = masks.reshape(shape)
  ref = amg.batched_mask_to_box(torch.as_tensor(masks)).numpy()
  got = np.asarray(jax.jit(A.batched_mask_to_box)(masks))
  assert got.dtype == np.int32 and got.shape == shape[:-2] + (4,)
  np.testing.assert_array_equal(got, ref)
  got_np = A.batched_mask_to_box_np(masks)
  assert got_np.dtype == np.int64
  np.testing.assert_array_equal(got_np, ref)
  if n:
    flat = masks.reshape(-1, h, w)
    assert (got.reshape(-1, 4)[~flat.any(axis=(1, 2))] == 0).all()


# ---------------------------------------------------------------------------------
# Crop-frame helpers.
# ---------------------------------------------------------------------------------


def _crops():
  crops, layers = A.generate_crop_boxes((600, 900), 2, 512 / 1500)
  assert sorted(set(layers)) == [0, 1, 2]
  return crops


def test_is_box_near_crop_edge():
  rng = np.random.default_rng(5)
  orig_box = [0, 0, 900, 600]
  f = jax.jit(A.is_box_near_crop_edge)
  for crop in _crops():
    x0, y0, x1, y1 = crop
    cw, ch = x1 - x0, y1 - y0
    # Random boxes in crop coordinates, plus boxes at distances 19..21 from each
    # crop edge (both sides of the inclusive atol=20 boundary).
    a = rng.integers(0, cw, (64, 2))
    b = rng.integers(0, ch, (64, 2))
    boxes = np.stack([a.min(1), b.min(1), a.max(1), b.max(1)], 1)
    special = []
    for d in (0, 19, 20, 21, 40):
      mid = [cw // 4, ch // 4, cw // 2, ch // 2]
      for k, v in enumerate([d, d, cw - d, ch - d]):
        box = list(mid)
        box[k] = v
        special.append(box)
    boxes = np.concatenate([boxes, np.array(special)]).astype(np.int32)
    ref = amg.is_box_near_crop_edge(torch.as_tensor(boxes, dtype=torch.int64), crop,
                                    orig_box).numpy()
    got = np.asarray(f(boxes, jnp.asarray(crop), jnp.asarray(orig_box)))
    np.testing.assert_array_equal(got, ref)
    # Static (list) crop boxes give the same answer.
    got_static = np.asarray(A.is_box_near_crop_edge(jnp.asarray(boxes), crop, orig_box))
    np.testing.assert_array_equal(got_static, ref)
    if crop == [0, 0, 900, 600]:
      assert not ref.any()  # the full image has no crop-only edges
    else:
      assert ref.any() and not ref.all()


def test_uncrop_boxes_points_masks():
  rng = np.random.default_rng(6)
  for crop in _crops():
    boxes = rng.integers(0, 300, (7, 4))
    boxes3 = rng.integers(0, 300, (2, 7, 4))
    for bx in (boxes, boxes3):
      ref = amg.uncrop_boxes_xyxy(torch.as_tensor(bx), crop).numpy()
      got = np.asarray(A.uncrop_boxes_xyxy(jnp.asarray(bx, jnp.int32), crop))
      np.testing.assert_array_equal(got, ref)
    pts = rng.random((7, 2)) * 300
    pts3 = rng.random((2, 7, 2)) * 300
    for p in (pts, pts3):
      ref = amg.uncrop_points(torch.as_tensor(p), crop).numpy()
      got = np.asarray(A.uncrop_points(jnp.asarray(p, jnp.float32), jnp.asarray(crop)))
      # Device side is float32; upstream keeps the host float64 points.
      np.testing.assert_allclose(got, ref, rtol=1e-6)
    x0, y0, x1, y1 = crop
    masks = rng.random((3, y1 - y0, x1 - x0)) < 0.5
    ref = amg.uncrop_masks(torch.as_tensor(masks), crop, 600, 900).numpy()
    got = np.asarray(A.uncrop_masks(jnp.asarray(masks), jnp.asarray(crop), 600, 900))
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------
# NMS.
# ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_keep"))
def _nms(boxes, scores, valid, iou_threshold, max_keep=None):
  return A.box_nms(boxes, scores, iou_threshold, valid, max_keep)


def _random_boxes(rng, n, span=256, max_wh=96, integer=True):
  xy = rng.uniform(0, span, (n, 2))
  wh = rng.uniform(1, max_wh, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1)
  if integer:
    boxes = np.floor(boxes)  # AMG boxes are integer pixel coordinates
  return boxes.astype(np.float32)


def _ref_nms(boxes, scores, thr):
  return torchvision.ops.batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores),
                                     torch.zeros(len(boxes)), iou_threshold=thr).numpy()


@pytest.mark.parametrize("n", [1, 5, 64, 700])
@pytest.mark.parametrize("thr", [0.7, 0.3])
@pytest.mark.parametrize("ties", [False, True])
def test_box_nms_matches_torchvision(n, thr, ties):
  rng = np.random.default_rng(n * 7 + int(thr * 10) + ties)
  boxes = _random_boxes(rng, n)
  # Duplicate a third of the boxes (jittered) so suppression chains are long.
  dup = rng.integers(0, n, n // 3)
  boxes[n - n // 3:] = boxes[dup] + rng.integers(-3, 4, (n // 3, 4))
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  if ties:
    # Few distinct values, like the generator's crop NMS (1 / crop area) and
    # postprocess NMS (0 / 1 scores).
    scores = rng.integers(0, 4, n).astype(np.float32) / 3
  else:
    scores = rng.random(n).astype(np.float32)
  ref = _ref_nms(boxes, scores, thr)
  keep, order = _nms(boxes, scores, np.ones(n, bool), iou_threshold=thr)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(keep)), np.sort(ref))
  assert sorted(np.asarray(order).tolist()) == list(range(n))


def test_box_nms_large_n_vanilla_path():
  # N > 1000 takes torchvision's per-class path, which re-sorts the kept indices
  # with an unstable sort: the kept set matches; the order matches for unique scores.
  rng = np.random.default_rng(11)
  n = 1500
  boxes = _random_boxes(rng, n, span=400)
  scores = rng.random(n).astype(np.float32)
  ref = _ref_nms(boxes, scores, 0.5)
  keep, order = _nms(boxes, scores, np.ones(n, bool), iou_threshold=0.5)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
  scores_t = (rng.integers(0, 3, n) / 2).astype(np.float32)
  ref = _ref_nms(boxes, scores_t, 0.5)
  keep, _ = _nms(boxes, scores_t, np.ones(n, bool), iou_threshold=0.5)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(keep)), np.sort(ref))


@pytest.mark.parametrize("ties", [False, True])
def test_box_nms_row_path_equals_dense_path(monkeypatch, ties):
  """Above NMS_DENSE_MAX boxes the IoU rows are computed as needed (memory O(N), not
  N^2): the same kept set and order as the dense matrix, bit for bit."""
  rng = np.random.default_rng(21 + ties)
  n = 900
  boxes = _random_boxes(rng, n, span=300)
  scores = ((rng.integers(0, 4, n) / 3) if ties else rng.random(n)).astype(np.float32)
  valid = rng.random(n) > 0.1
  dense = _nms(boxes, scores, valid, iou_threshold=0.6)
  monkeypatch.setattr(A, "NMS_DENSE_MAX", 16)
  rows = _nms(boxes, scores, valid, iou_threshold=0.6)
  for a, b in zip(dense, rows):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The row path never builds an (N, N) array.
  jaxpr = jax.make_jaxpr(lambda b, s, v: A.box_nms(b, s, 0.6, valid_mask=v))(
      jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid))
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  for sub in jaxpr.jaxpr.eqns:
    for p in sub.params.values():
      if hasattr(p, "jaxpr"):
        shapes |= {tuple(v.aval.shape) for e in p.jaxpr.eqns for v in e.outvars}
  assert (n, n) not in shapes


def test_box_nms_float_boxes():
  rng = np.random.default_rng(12)
  n = 300
  boxes = _random_boxes(rng, n, integer=False)
  scores = rng.random(n).astype(np.float32)
  for thr in (0.7, 0.5):
    ref = _ref_nms(boxes, scores, thr)
    keep, order = _nms(boxes, scores, np.ones(n, bool), iou_threshold=thr)
    np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)


def test_box_nms_invalid_entries_and_max_keep():
  rng = np.random.default_rng(13)
  n = 256
  boxes = _random_boxes(rng, n, span=128)
  scores = rng.random(n).astype(np.float32)
  valid = rng.random(n) < 0.6
  # Give invalid entries the best scores: they must neither be kept nor suppress.
  scores[~valid] += 1.0
  idx = np.flatnonzero(valid)
  ref = idx[_ref_nms(boxes[idx], scores[idx], 0.7)]
  keep, order = _nms(boxes, scores, valid, iou_threshold=0.7)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
  assert not np.asarray(keep)[~valid].any()
  # Invalid entries come last in `order`.
  assert not valid[np.asarray(order)[valid.sum():]].any()
  for cap in (1, 10, len(ref), len(ref) + 5):
    keep_c, order_c = _nms(boxes, scores, valid, iou_threshold=0.7, max_keep=cap)
    np.testing.assert_array_equal(A.nms_kept_indices(keep_c, order_c), ref[:cap])
  none_valid = np.zeros(n, bool)
  keep0, _ = _nms(boxes, scores, none_valid, iou_threshold=0.7)
  assert not np.asarray(keep0).any()


def test_box_nms_degenerate_and_threshold_rounding():
  # Zero-area boxes give NaN IoUs in torchvision (0 / 0) and suppress nothing.
  boxes = np.array([[5, 5, 5, 9], [5, 5, 5, 9], [0, 0, 10, 10], [0, 0, 0, 0],
                    [0, 0, 0, 0], [1, 1, 9, 9]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
  ref = _ref_nms(boxes, scores, 0.5)
  keep, order = _nms(boxes, scores, np.ones(6, bool), iou_threshold=0.5)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
  # IoU = 1 / 10 is float32(0.1) = 0.10000000149 > 0.1 (double): torchvision
  # suppresses, which a naive float32 comparison would not.
  boxes = np.array([[0, 0, 10, 1], [0, 0, 1, 1]], np.float32)
  scores = np.array([1.0, 0.5], np.float32)
  for thr in (0.1, 0.7):
    ref = _ref_nms(boxes, scores, thr)
    keep, order = _nms(boxes, scores, np.ones(2, bool), iou_threshold=thr)
    np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
  assert _ref_nms(boxes, scores, 0.1).tolist() == [0]
  # A traced threshold (compared in float32) still works under jit.
  rng = np.random.default_rng(15)
  boxes = _random_boxes(rng, 128, span=96)
  scores = rng.random(128).astype(np.float32)
  keep, order = jax.jit(A.box_nms)(boxes, scores, 0.7)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), _ref_nms(boxes, scores, 0.7))
  # N = 0 is allowed.
  keep, order = A.box_nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.7)
  assert keep.shape == order.shape == (0,)


def test_box_nms_crop_style_scores():
  # The generator's crop NMS: scores = 1 / crop area, so whole crops tie and the
  # result depends on stable tie-breaking by position.
  rng = np.random.default_rng(14)
  crops = _crops()
  crop_t = torch.as_tensor(crops)
  per_crop = 40
  boxes, crop_of = [], []
  for c, (x0, y0, x1, y1) in enumerate(crops):
    xs = rng.integers(x0, x1, (per_crop, 2))
    ys = rng.integers(y0, y1, (per_crop, 2))
    boxes.append(np.stack([xs.min(1), ys.min(1), xs.max(1) + 1, ys.max(1) + 1], 1))
    crop_of += [c] * per_crop
  boxes = np.concatenate(boxes).astype(np.float32)
  # Copy some boxes to other crops so that ties across crops get suppressed.
  boxes[per_crop::3] = boxes[:len(boxes[per_crop::3])]
  crop_boxes = crop_t[crop_of]
  scores = (1 / torchvision.ops.box_area(crop_boxes)).numpy()
  ref = _ref_nms(boxes, scores, 0.7)
  keep, order = _nms(boxes, scores, np.ones(len(boxes), bool), iou_threshold=0.7)
  np.testing.assert_array_equal(A.nms_kept_indices(keep, order), ref)
