"""samjax.transforms.ResizeLongestSide against the official segment_anything one."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from samjax.transforms import ResizeLongestSide

torch = pytest.importorskip("torch")
official = pytest.importorskip("segment_anything.utils.transforms")


@pytest.fixture(scope="module")
def ours():
  return ResizeLongestSide(1024)


@pytest.fixture(scope="module")
def ref():
  return official.ResizeLongestSide(1024)


def _smooth_and_noisy(rng, h, w, c):
  """Random image with both flat gradients and high-frequency noise.

  Pure noise alone would hide rounding differences in smooth regions, pure gradients
  would hide them at edges; mixing both exercises every filter tap.
  """
  yy, xx = np.mgrid[0:h, 0:w]
  grad = (xx * 255.0 / max(w - 1, 1) + yy * 97.0 / max(h - 1, 1)) % 256
  noise = rng.integers(0, 256, (h, w, c))
  mix = np.where(rng.random((h, w, 1)) < 0.5, grad[..., None], noise)
  return mix.astype(np.uint8)


@pytest.mark.parametrize("h,w", [(1, 1), (7, 300), (300, 7), (2, 3), (600, 900),
                                 (1500, 2000), (1024, 1024), (1200, 1800), (517, 333),
                                 (1023, 1025)])
def test_apply_image_bit_exact_rgb(ours, ref, h, w):
  img = _smooth_and_noisy(np.random.default_rng(h * 10007 + w), h, w, 3)
  got, want = ours.apply_image(img), ref.apply_image(img)
  assert got.dtype == np.uint8 and got.shape == want.shape
  assert max(got.shape[:2]) == 1024
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", [2, 64, 333])
@pytest.mark.parametrize("shape", [(40, 50, 1), (40, 50), (41, 23, 2), (33, 77, 4),
                                   (90, 60, 3)])
def test_apply_image_bit_exact_channels_and_targets(shape, target):
  img = _smooth_and_noisy(np.random.default_rng(sum(shape) + target), shape[0], shape[1],
                          shape[2] if len(shape) == 3 else 1)
  img = img.reshape(shape)
  got = ResizeLongestSide(target).apply_image(img)
  want = official.ResizeLongestSide(target).apply_image(img)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)


def test_apply_image_accepts_non_contiguous(ours, ref):
  img = _smooth_and_noisy(np.random.default_rng(3), 200, 150, 3)[::-1, ::2]
  np.testing.assert_array_equal(ours.apply_image(img), ref.apply_image(img))


@pytest.mark.parametrize("h,w", [(1, 1), (7, 300), (480, 640), (1500, 2000), (1023, 1025)])
def test_get_preprocess_shape_matches(h, w):
  for target in (1, 256, 1024):
    assert (ResizeLongestSide.get_preprocess_shape(h, w, target)
            == official.ResizeLongestSide.get_preprocess_shape(h, w, target))


@pytest.mark.parametrize("size", [(480, 640), (7, 300), (1500, 2000), (1, 1), (333, 517)])
def test_coords_and_boxes_numpy_match_official(ours, ref, size):
  rng = np.random.default_rng(size[0])
  for dtype in (np.float64, np.float32, np.int64):
    coords = (rng.random((3, 5, 2)) * size[::-1]).astype(dtype)
    got, want = ours.apply_coords(coords, size), ref.apply_coords(coords, size)
    assert got.dtype == np.float64 and got.shape == (3, 5, 2)
    np.testing.assert_array_equal(got, want)
    boxes = (rng.random((4, 4)) * (size[::-1] * 2)).astype(dtype)
    got, want = ours.apply_boxes(boxes, size), ref.apply_boxes(boxes, size)
    assert got.dtype == np.float64 and got.shape == (4, 4)
    np.testing.assert_array_equal(got, want)
  # Inputs are not modified in place.
  before = coords.copy()
  ours.apply_coords(coords, size)
  np.testing.assert_array_equal(coords, before)


@pytest.mark.parametrize("size", [(480, 640), (1500, 2000), (333, 517)])
def test_coords_and_boxes_torch_match_official(ours, ref, size):
  g = torch.Generator().manual_seed(size[1])
  coords = torch.rand((2, 7, 2), generator=g, dtype=torch.float64) * 2000
  got = ours.apply_coords_torch(coords, size)
  want = ref.apply_coords_torch(coords, size)
  assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
  assert torch.equal(got, want)
  boxes = torch.rand((5, 4), generator=g) * 2000
  got = ours.apply_boxes_torch(boxes, size)
  want = ref.apply_boxes_torch(boxes, size)
  assert got.shape == (5, 4) and torch.equal(got, want)
  ints = torch.randint(0, 2000, (3, 2), generator=g)
  assert torch.equal(ours.apply_coords_torch(ints, size), ref.apply_coords_torch(ints, size))
  # Original-size entries may be tensors, as when read from a torch predictor.
  assert torch.equal(ours.apply_coords_torch(coords, tuple(torch.tensor(size))),
                     ours.apply_coords_torch(coords, size))


def test_coords_torch_keeps_grad(ours):
  coords = torch.tensor([[10.0, 20.0]], requires_grad=True)
  out = ours.apply_coords_torch(coords, (480, 640))
  out.sum().backward()
  np.testing.assert_allclose(coords.grad.numpy(), [[1.6, 1.6]], rtol=1e-6)


@pytest.mark.parametrize("size", [(480, 640), (1500, 2000), (333, 517), (7, 300)])
def test_coords_and_boxes_jax_match_torch(ours, ref, size):
  import jax.numpy as jnp
  rng = np.random.default_rng(size[0] + 1)
  coords = (rng.random((4, 3, 2)) * 2000).astype(np.float32)
  got = ours.apply_coords_jax(jnp.asarray(coords), size)
  assert got.dtype == jnp.float32 and got.shape == (4, 3, 2)
  want = ref.apply_coords_torch(torch.from_numpy(coords), size).numpy()
  np.testing.assert_array_equal(np.asarray(got), want)
  boxes = (rng.random((6, 4)) * 2000).astype(np.float32)
  got = ours.apply_boxes_jax(boxes, size)
  want = ref.apply_boxes_torch(torch.from_numpy(boxes), size).numpy()
  assert got.shape == (6, 4)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_apply_image_torch_uses_hw():
  t = ResizeLongestSide(64)
  x = torch.rand(2, 3, 40, 100)
  y = t.apply_image_torch(x)
  assert y.shape == (2, 3, 26, 64)


def test_aliases(ours):
  img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ours.applyimage(img), ours.apply_image(img))
  pts = np.array([[1.0, 2.0]])
  np.testing.assert_array_equal(ours.applycoords(pts, (30, 40)), ours.apply_coords(pts, (30, 40)))
  bx = np.array([[1.0, 2.0, 3.0, 4.0]])
  np.testing.assert_array_equal(ours.applyboxes(bx, (30, 40)), ours.apply_boxes(bx, (30, 40)))
  assert torch.equal(ours.applycoordstorch(torch.tensor(pts), (30, 40)),
                     ours.apply_coords_torch(torch.tensor(pts), (30, 40)))
  assert torch.equal(ours.applyboxestorch(torch.tensor(bx), (30, 40)),
                     ours.apply_boxes_torch(torch.tensor(bx), (30, 40)))
  assert ResizeLongestSide.getpreprocessshape(30, 40, 1024) == (768, 1024)
  assert ours.getpreprocessshape(30, 40, 1024) == (768, 1024)
  assert ours.applyimagetorch(torch.rand(1, 3, 30, 40)).shape == (1, 3, 768, 1024)


@pytest.mark.parametrize("bad,fragment", [
    (np.zeros((10, 10, 3), np.float32), "float32"),
    (np.zeros((10, 10, 5), np.uint8), "(10, 10, 5)"),
    (np.zeros((2, 10, 10, 3), np.uint8), "(2, 10, 10, 3)"),
    (np.zeros((10,), np.uint8), "(10,)"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((1, 5000, 3), np.uint8), "aspect ratio"),
])
def test_apply_image_errors(ours, bad, fragment):
  with pytest.raises(ValueError) as info:
    ours.apply_image(bad)
  assert fragment in str(info.value)


def test_coord_and_box_errors(ours):
  with pytest.raises(ValueError, match=r"coords.*2.*\(4, 3\)"):
    ours.apply_coords(np.zeros((4, 3)), (10, 10))
  with pytest.raises(ValueError, match="coords"):
    ours.apply_coords_jax(np.zeros((4, 3)), (10, 10))
  with pytest.raises(ValueError, match="coords"):
    ours.apply_coords_torch(torch.zeros(4, 3), (10, 10))
  with pytest.raises(ValueError, match=r"boxes.*4.*\(2, 2\)"):
    ours.apply_boxes(np.zeros((2, 2)), (10, 10))
  with pytest.raises(ValueError, match="boxes"):
    ours.apply_boxes_jax(np.zeros((3, 5)), (10, 10))
  with pytest.raises(ValueError, match="boxes"):
    ours.apply_boxes_torch(torch.zeros(8), (10, 10))
  with pytest.raises(ValueError, match="original_size"):
    ours.apply_coords(np.zeros((1, 2)), (10, 10, 3))
  with pytest.raises(ValueError, match="target_length"):
    ResizeLongestSide(0)


def test_module_works_without_torch():
  """Importing and using the numpy/JAX paths must not need torch."""
  code = textwrap.dedent("""
      import sys
      sys.modules["torch"] = None  # Any `import torch` now raises ImportError.
      import numpy as np
      from samjax.transforms import ResizeLongestSide
      t = ResizeLongestSide(32)
      assert t.apply_image(np.zeros((10, 20, 3), np.uint8)).shape == (16, 32, 3)
      assert t.apply_boxes_jax(np.ones((1, 4)), (10, 20)).shape == (1, 4)
      print("ok")
  """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=repo, env=env)
  assert res.returncode == 0, res.stderr
  assert "ok" in res.stdout
