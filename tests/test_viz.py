"""samjax.viz: cv2 overlays and headless matplotlib helpers."""

import numpy as np
import pytest

from samjax import viz

# pycocotools' Cython decode trips a NumPy 2 deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _image(h=120, w=160):
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 60)], -1).astype(np.uint8)


def _masks(h=120, w=160):
  m = np.zeros((2, h, w), bool)
  m[0, 20:60, 30:90] = True
  m[1, 70:110, 100:150] = True
  return m


def test_overlay_shape_dtype_and_no_mutation():
  img = _image()
  before = img.copy()
  out = viz.overlay(img, _masks())
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(img, before)


def test_overlay_colors_masks_only_inside():
  img, masks = _image(), _masks()
  out = viz.overlay(img, masks, alpha=0.5)
  # Interior pixels (away from the contour stroke) are blended with a colour.
  assert (out[30:50, 40:80] != img[30:50, 40:80]).any(axis=-1).all()
  assert (out[80:100, 110:140] != img[80:100, 110:140]).any(axis=-1).all()
  # Far from every mask nothing changes.
  outside = ~np.zeros(img.shape[:2], bool)
  outside[15:65, 25:95] = False
  outside[65:115, 95:155] = False
  np.testing.assert_array_equal(out[outside], img[outside])
  # The two masks get different colours (on a flat grey image to isolate the colour).
  grey = np.full_like(img, 128)
  g = viz.overlay(grey, masks).astype(int)
  assert np.abs(g[40, 60] - g[90, 125]).sum() > 30


def test_overlay_alpha_one_paints_solid_and_seed_is_deterministic():
  img, masks = _image(), _masks()
  a = viz.overlay(img, masks, alpha=1.0, seed=3)
  b = viz.overlay(img, masks, alpha=1.0, seed=3)
  c = viz.overlay(img, masks, alpha=1.0, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  interior = a[30:50, 40:80].reshape(-1, 3)
  assert (interior == interior[0]).all()  # One flat colour.
  np.testing.assert_array_equal(viz.overlay(img, masks, alpha=0.0)[40, 60], img[40, 60])


def test_overlay_accepts_logits_lists_and_batched_shapes():
  img, masks = _image(), _masks()
  ref = viz.overlay(img, masks)
  logits = np.where(masks, 5.0, -5.0).astype(np.float32)
  np.testing.assert_array_equal(viz.overlay(img, logits), ref)
  np.testing.assert_array_equal(viz.overlay(img, list(masks)), ref)
  np.testing.assert_array_equal(viz.overlay(img, masks[None]), ref)  # (1, N, H, W)
  np.testing.assert_array_equal(viz.overlay(img, None), img)
  np.testing.assert_array_equal(viz.overlay(img, []), img)


def test_overlay_points_and_boxes():
  img = np.zeros((100, 100, 3), np.uint8)
  out = viz.overlay(img, None, points=[[20, 30], [70, 60], [50, 50]], labels=[1, 0, -1])
  assert tuple(out[30, 20]) == (0, 255, 0)  # Positive: green.
  assert tuple(out[60, 70]) == (255, 0, 0)  # Negative: red.
  np.testing.assert_array_equal(out[50, 50], 0)  # Padding label: not drawn.
  # White ring around the dot.
  ring = out[30, 10:20]
  assert (ring == 255).all(axis=-1).any()
  out = viz.overlay(img, None, boxes=np.array([10, 15, 80, 90]))
  assert tuple(out[15, 50]) == (0, 255, 0) and tuple(out[50, 10]) == (0, 255, 0)
  assert tuple(out[50, 50]) == (0, 0, 0)  # Box is an outline, not filled.
  # Points default to positive labels.
  out = viz.overlay(img, None, points=np.array([[40.4, 40.6]]))
  assert tuple(out[41, 40]) == (0, 255, 0)


def test_overlay_errors():
  img = _image()
  with pytest.raises(ValueError, match="uint8"):
    viz.overlay(img.astype(np.float32), _masks())
  with pytest.raises(ValueError, match="masks"):
    viz.overlay(img, np.zeros((2, 10, 10), bool))
  with pytest.raises(ValueError, match="labels"):
    viz.overlay(img, None, points=[[1, 2]], labels=[1, 0])


def test_overlay_anns_orders_by_area_and_decodes_rle():
  from pycocotools import mask as mask_utils
  img = np.full((60, 60, 3), 100, np.uint8)
  big = np.zeros((60, 60), bool)
  big[5:55, 5:55] = True
  small = np.zeros((60, 60), bool)
  small[25:35, 25:35] = True
  anns = [{"segmentation": small, "area": 100}, {"segmentation": big, "area": 2500}]
  out = viz.overlay_anns(img, anns, alpha=1.0)
  # Big is drawn first (colour 0), small on top (colour 1): centre shows colour 1.
  pal = viz._palette(2, 0)
  np.testing.assert_array_equal(out[30, 30], pal[1])
  np.testing.assert_array_equal(out[10, 10], pal[0])
  rle = mask_utils.encode(np.asfortranarray(small.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode()
  rle_anns = [{"segmentation": rle, "area": 100}, {"segmentation": big, "area": 2500}]
  np.testing.assert_array_equal(viz.overlay_anns(img, rle_anns, alpha=1.0), out)
  np.testing.assert_array_equal(viz.overlay_anns(img, []), img)
  # output_mode="uncompressed_rle" draws the same.
  flat = small.ravel(order="F").astype(np.int8)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
  un_anns = [{"segmentation": {"size": [60, 60], "counts": np.diff(bounds).tolist()},
              "area": 100}, {"segmentation": big, "area": 2500}]
  np.testing.assert_array_equal(viz.overlay_anns(img, un_anns, alpha=1.0), out)


def test_overlay_takes_torch_tensors():
  torch = pytest.importorskip("torch")
  img, masks = _image(), _masks()
  want = viz.overlay(img, masks, points=[[20, 30]], boxes=[10, 15, 80, 90])
  got = viz.overlay(torch.from_numpy(img), torch.from_numpy(masks).requires_grad_(False),
                    points=torch.tensor([[20.0, 30.0]], requires_grad=True),
                    boxes=torch.tensor([10, 15, 80, 90]))
  np.testing.assert_array_equal(got, want)


def test_matplotlib_helpers_headless():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  img, masks = _image(), _masks()
  fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
  try:
    ax.imshow(img)
    viz.show_mask(masks[0], ax)
    viz.show_mask(masks[1][None], ax, random_color=True, rng=np.random.default_rng(0))
    viz.show_points(np.array([[20, 30], [70, 60]]), np.array([1, 0]), ax)
    viz.show_box(np.array([10, 15, 80, 90]), ax)
    assert len(ax.images) == 3 and len(ax.collections) == 2 and len(ax.patches) == 1
    layer = ax.images[1].get_array()
    assert layer.shape == (120, 160, 4)
    np.testing.assert_allclose(layer[40, 60], [30 / 255, 144 / 255, 1.0, 0.6])
    assert layer[0, 0, 3] == 0
    anns = [{"segmentation": m, "area": int(m.sum())} for m in masks]
    plt.sca(ax)
    assert viz.show_anns(anns) is not None  # ax=None -> current Axes.
    assert viz.show_anns([], ax) is None
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    assert rgba.ndim == 3 and rgba.std() > 0
  finally:
    plt.close(fig)
