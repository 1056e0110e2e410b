"""Predictor: official semantics, compile-once buckets, clear errors, pretrained cache,
and the functional layer under jit / vmap / grad."""

from __future__ import annotations

import functools
import http.server
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import samjax
from samjax import model as model_lib
from samjax.io import pretrained
from samjax.io.checkpoint import sha256_file


@pytest.fixture(scope="module")
def pred(tiny_ckpt):
  return samjax.Predictor.from_checkpoint(tiny_ckpt[1])


@pytest.fixture(scope="module")
def official(tiny_ckpt):
  from segment_anything import SamPredictor
  return SamPredictor(tiny_ckpt[2])


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)


def test_predict_matches_official_including_bgr(pred, official, image):
  official.set_image(image)
  pred.set_image(image[..., ::-1].copy(), image_format="BGR")
  kw = dict(point_coords=np.array([[30.0, 40.0], [200, 100]]), point_labels=np.array([1, 0]),
            box=np.array([10, 20, 220, 170]), multimask_output=True, return_logits=True)
  ours = pred.predict(**kw)
  ref = official.predict(**kw)
  for a, b in zip(ours, ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2e-4 * np.abs(b).max(), rtol=0)
  emb = pred.get_image_embedding()
  assert emb.shape == (1, 64, 16, 16)
  np.testing.assert_allclose(np.asarray(emb), official.get_image_embedding().numpy(), atol=1e-4)


def test_nothing_prompt_and_mask_only(pred, official, image):
  official.set_image(image)
  pred.set_image(image)
  for kw in (dict(), dict(mask_input=np.random.default_rng(1).normal(size=(1, 64, 64)))):
    a, b = pred.predict(**kw, multimask_output=False), official.predict(**kw,
                                                                        multimask_output=False)
    np.testing.assert_allclose(a[1], b[1], atol=1e-4)
    np.testing.assert_allclose(a[2], b[2], atol=1e-4 * np.abs(b[2]).max())


def test_one_to_eight_points_compile_once(pred, image):
  pred.set_image(image)
  decode = model_lib.compiled_functions()["decode"]
  upscale = model_lib.compiled_functions()["upscale"]
  pred.predict(np.array([[10.0, 10.0]]), np.array([1]))
  before = (decode._cache_size(), upscale._cache_size())
  rng = np.random.default_rng(0)
  for n in range(1, 9):
    pred.predict(rng.uniform(0, 180, (n, 2)), rng.integers(0, 2, n))
  assert (decode._cache_size(), upscale._cache_size()) == before
  # A second image of the same size does not recompile the encoder or the upscaler.
  encode = model_lib.compiled_functions()["encode"]
  n_enc = encode._cache_size()
  pred.set_image(image[::-1].copy())
  pred.predict(np.array([[10.0, 10.0]]), np.array([1]))
  assert encode._cache_size() == n_enc and upscale._cache_size() == before[1]
  # Nor does an image of another size (padding is data, not shape); only the final
  # upsample to the new original size compiles.
  pred.set_image(np.zeros((100, 77, 3), np.uint8))
  pred.predict(np.array([[10.0, 10.0]]), np.array([1]))
  assert encode._cache_size() == n_enc


@pytest.mark.parametrize("kwargs,match", [
    (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 1])),
     "point_labels has 2 entries but point_coords has 1 points"),
    (dict(point_coords=np.array([[1.0, 2.0]])), "given together"),
    (dict(point_coords=np.array([[np.nan, 2.0]]), point_labels=np.array([1])), "NaN"),
    (dict(point_coords=np.array([[np.inf, 2.0]]), point_labels=np.array([1])), "infinite"),
    (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), "Nx2"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
    (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([3])), "1 \\(foreground\\)"),
    (dict(box=np.array([1, 2, 3])), "box must be 4 numbers"),
    (dict(box=np.array([1, 2, 3, np.nan])), "NaN"),
    (dict(mask_input=np.zeros((1, 256, 256))), "mask_input must be 1x64x64"),
])
def test_predict_errors(pred, image, kwargs, match):
  pred.set_image(image)
  with pytest.raises(ValueError, match=match):
    pred.predict(**kwargs)


def test_image_errors_and_predict_before_set(tiny_ckpt):
  p = samjax.Predictor.from_checkpoint(tiny_ckpt[1])
  with pytest.raises(RuntimeError, match="set_image"):
    p.predict(np.array([[1.0, 1.0]]), np.array([1]))
  with pytest.raises(ValueError, match="HxWx3 uint8"):
    p.set_image(np.zeros((10, 10), np.uint8))
  with pytest.raises(ValueError, match="HxWx3"):
    p.set_image(np.zeros((10, 10, 4), np.uint8))
  with pytest.raises(ValueError, match="dtype float32"):
    p.set_image(np.zeros((10, 10, 3), np.float32))
  with pytest.raises(ValueError, match="empty image"):
    p.set_image(np.zeros((0, 10, 3), np.uint8))
  with pytest.raises(ValueError, match="image_format"):
    p.set_image(np.zeros((10, 10, 3), np.uint8), image_format="RGBA")


def test_predict_batch_torch_and_jax(pred, official, image):
  official.set_image(image)
  pred.set_image(image)
  boxes = np.array([[10, 10, 100, 100], [50, 60, 200, 170], [0, 0, 239, 179]], np.float32)
  tb = official.transform.apply_boxes_torch(torch.from_numpy(boxes), image.shape[:2])
  with torch.no_grad():
    ref = official.predict_torch(None, None, boxes=tb, multimask_output=False)
  ours_t = pred.predict_batch(None, None, boxes=tb, multimask_output=False)
  assert all(isinstance(x, torch.Tensor) for x in ours_t)
  ours_j = pred.predict_batch(boxes=pred.transform.apply_boxes_jax(jnp.asarray(boxes),
                                                                   image.shape[:2]),
                              multimask_output=False)
  assert isinstance(ours_j[0], jax.Array)
  for o in (ours_t, ours_j):
    assert tuple(o[0].shape) == tuple(ref[0].shape) == (3, 1, 180, 240)
    np.testing.assert_allclose(np.asarray(o[1]), ref[1].numpy(), atol=1e-4)
  with pytest.raises(ValueError, match="3 boxes but 2 point sets"):
    pred.predict_batch(np.zeros((2, 1, 2)), np.ones((2, 1)), boxes)


# ------------------------------------------------------------------ functional layer
def test_functional_vmap_equals_loop_and_jit(tiny_params, tiny_ckpt):
  cfg = tiny_ckpt[3]
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(1, 16, 16, cfg.prompt_embed_dim)), jnp.float32)
  pts = jnp.asarray(rng.uniform(0, 256, (5, 1, 2)), jnp.float32)
  lab = jnp.ones((5, 1), jnp.int32)

  @jax.jit
  def one(p, l):
    return samjax.decode_masks(tiny_params, emb, p[None], l[None], config=cfg)

  v = jax.vmap(one)(pts, lab)
  for i in range(5):
    lo, io = one(pts[i], lab[i])
    np.testing.assert_allclose(np.asarray(v[0][i]), np.asarray(lo), atol=1e-5)
    np.testing.assert_allclose(np.asarray(v[1][i]), np.asarray(io), atol=1e-6)
  batch = samjax.decode_masks(tiny_params, emb, pts, lab, config=cfg)
  np.testing.assert_allclose(np.asarray(batch[0]), np.asarray(v[0][:, 0]), atol=1e-5)


def test_functional_grad_matches_finite_differences(tiny_params, tiny_ckpt):
  cfg = tiny_ckpt[3]
  rng = np.random.default_rng(1)
  emb = jnp.asarray(rng.normal(size=(1, 16, 16, cfg.prompt_embed_dim)), jnp.float32)
  pts = jnp.asarray([[[100.0, 120.0]]])
  lab = jnp.ones((1, 1), jnp.int32)

  def loss_emb(e, params):
    lo, iou = samjax.decode_masks(params, e, pts, lab, config=cfg)
    return jnp.mean(jax.nn.sigmoid(lo)) + jnp.sum(iou)

  g_emb = jax.grad(loss_emb)(emb, tiny_params)
  g_par = jax.grad(loss_emb, argnums=1)(emb, tiny_params)
  # float32 central differences: eps trades truncation (O(eps^2)) against round-off
  # (~1e-7 * |loss| / eps); at 3e-3 both are below ~1e-3 relative.
  eps = 3e-3
  direction = jnp.asarray(rng.normal(size=emb.shape), jnp.float32)
  fd = (loss_emb(emb + eps * direction, tiny_params)
        - loss_emb(emb - eps * direction, tiny_params)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(g_emb, direction)), float(fd), rtol=3e-3)
  # A decoder parameter: the IoU head's last bias.
  path = ("mask_decoder", "iou_prediction_head", "layers_2", "bias")
  import flax
  flat = flax.traverse_util.flatten_dict(tiny_params)
  gflat = flax.traverse_util.flatten_dict(g_par)
  # Each IoU output adds 1 to the sum only for the 3 multimask outputs (index 1..3).
  np.testing.assert_allclose(np.asarray(gflat[path]), [0, 1, 1, 1], atol=1e-6)
  path = ("mask_decoder", "output_hypernetworks_mlps_1", "layers_2", "bias")
  d = np.zeros(flat[path].shape, np.float32)
  d[0] = 1.0

  def with_bias(delta):
    f = dict(flat)
    f[path] = flat[path] + delta
    return loss_emb(emb, flax.traverse_util.unflatten_dict(f))
  fd = (with_bias(eps * d) - with_bias(-eps * d)) / (2 * eps)
  np.testing.assert_allclose(float(gflat[path][0]), float(fd), rtol=3e-3, atol=1e-5)


# ------------------------------------------------------------------ pretrained cache
@pytest.fixture
def http_server(tmp_path):
  root = tmp_path / "srv"
  root.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  handler.log_message = lambda *a, **k: None
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()


def test_from_pretrained_downloads_verifies_caches(tiny_ckpt, http_server, monkeypatch, tmp_path):
  root, base = http_server
  pth = tiny_ckpt[0]
  (root / "sam_vit_b_01ec64.pth").write_bytes(pth.read_bytes())
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(pretrained.MODELS, "vit_b", pretrained.Pretrained(
      "tiny", f"{base}/sam_vit_b_01ec64.pth", sha256_file(pth)))
  p = samjax.Predictor.from_pretrained("vit_b")
  assert p.config.name == "tiny"
  assert not (tmp_path / "cache" / "sam_vit_b_01ec64.pth").exists()  # converted, .pth dropped
  # Second call is offline: the server is gone from the registry's point of view.
  monkeypatch.setitem(pretrained.MODELS, "vit_b", pretrained.Pretrained(
      "tiny", "http://127.0.0.1:9/sam_vit_b_01ec64.pth", sha256_file(pth)))
  samjax.Predictor.from_pretrained("vit_b")


def test_download_hash_mismatch_and_offline_message(tiny_ckpt, http_server, monkeypatch,
                                                     tmp_path):
  root, base = http_server
  (root / "sam_vit_l_0b3195.pth").write_bytes(b"not the weights")
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(pretrained.MODELS, "vit_l", pretrained.Pretrained(
      "vit_l", f"{base}/sam_vit_l_0b3195.pth", "0" * 64))
  with pytest.raises(pretrained.DownloadError, match="SHA-256"):
    pretrained.fetch("vit_l", progress=False)
  assert not any((tmp_path / "cache").glob("*.pth*"))  # nothing half-written left behind
  monkeypatch.setitem(pretrained.MODELS, "vit_l", pretrained.Pretrained(
      "vit_l", "http://127.0.0.1:9/sam_vit_l_0b3195.pth", "0" * 64))
  with pytest.raises(pretrained.DownloadError, match="from_checkpoint"):
    pretrained.fetch("vit_l", progress=False)


def test_cli_predict_writes_overlay(tiny_ckpt, tmp_path):
  import cv2
  from samjax.cli import main
  img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
  cv2.imwrite(str(tmp_path / "in.png"), img)
  out = tmp_path / "out.png"
  rc = main(["predict", str(tmp_path / "in.png"), "--checkpoint", str(tiny_ckpt[1]),
             "--point", "50,60", "--point", "100,80,0", "--box", "10,10,150,110",
             "--multimask", "--out", str(out), "--masks-out", str(tmp_path / "m.npz")])
  assert rc == 0
  pic = cv2.imread(str(out))
  assert pic.shape == (120, 160, 3) and not np.array_equal(pic, img[..., ::-1])
  z = np.load(tmp_path / "m.npz")
  assert z["masks"].shape == (3, 120, 160) and z["scores"].shape == (3,)
  assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tiny_ckpt[1]),
               "--out", str(out)]) == 2
