"""Module-by-module and end-to-end parity with the official PyTorch SAM.

Tolerances: in fp32 with matmul precision "highest" both sides compute the same
formulas in float32 but sum in different orders, so errors are float32 rounding noise
amplified by depth: we require max |ours - ref| <= 1e-4 * max|ref| (measured values are
~1e-6 relative, see the printed table). bf16 is compared after thresholding (IoU) and
with a loose relative bound, because a bf16 mantissa alone is 4e-3 relative.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

import samjax
from samjax.modeling import Sam, postprocess_masks, preprocess
from conftest import parity_stats

REL_TOL = 1e-4


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _rand_images(rng, n, size):
  return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _torch_embed(model, images_nhwc):
  with torch.no_grad():
    x = torch.stack([model.preprocess(torch.from_numpy(im).permute(2, 0, 1))
                     for im in images_nhwc])
    return model.image_encoder(x).numpy()


def test_image_encoder_tiny(tiny_ckpt, tiny_params, record):
  _, _, tmodel, cfg = tiny_ckpt
  images = _rand_images(np.random.default_rng(0), 2, cfg.image_size)
  ref = _torch_embed(tmodel, images)
  ours = Sam(cfg).apply({"params": tiny_params}, preprocess(jnp.asarray(images), cfg),
                        method=Sam.embed_image)
  s = parity_stats(_nchw(ours), ref)
  record("image encoder, tiny (windowed+padded, global) fp32", **s)
  assert s["max_rel"] < REL_TOL


def _prompt_cases(rng, cfg, b=3):
  s = cfg.image_size
  pts = rng.uniform(0, s, (b, 3, 2)).astype(np.float32)
  lab = np.array([[1, 0, 1], [1, 1, -1], [0, 1, 1]], np.int64)[:b]
  boxes = np.sort(rng.uniform(0, s, (b, 2, 2)), axis=1).reshape(b, 4).astype(np.float32)
  masks = rng.normal(0, 4, (b, 1, cfg.low_res_mask_size, cfg.low_res_mask_size)
                     ).astype(np.float32)
  return {
      "points only": dict(points=(pts, lab), boxes=None, masks=None),
      "boxes only": dict(points=None, boxes=boxes, masks=None),
      "points+boxes": dict(points=(pts, lab), boxes=boxes, masks=None),
      "points+masks": dict(points=(pts, lab), boxes=None, masks=masks),
      "masks only": dict(points=None, boxes=None, masks=masks),
      "nothing": dict(points=None, boxes=None, masks=None),
  }


def _t(x):
  return None if x is None else torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize("case", ["points only", "boxes only", "points+boxes", "points+masks",
                                  "masks only", "nothing"])
def test_prompt_encoder(tiny_ckpt, tiny_params, record, case):
  _, _, tmodel, cfg = tiny_ckpt
  c = _prompt_cases(np.random.default_rng(1), cfg)[case]
  pts = c["points"]
  with torch.no_grad():
    sp, de = tmodel.prompt_encoder(points=None if pts is None else (_t(pts[0]), _t(pts[1])),
                                   boxes=_t(c["boxes"]), masks=_t(c["masks"]))
  sp_j, tm_j, de_j = Sam(cfg).apply(
      {"params": tiny_params}, None if pts is None else jnp.asarray(pts[0]),
      None if pts is None else jnp.asarray(pts[1]), c["boxes"],
      None if c["masks"] is None else jnp.asarray(c["masks"][:, 0]), method=Sam.encode_prompts)
  assert np.asarray(tm_j).all()
  s1 = parity_stats(sp_j, sp.numpy())
  s2 = parity_stats(_nchw(de_j), de.expand(sp.shape[0], -1, -1, -1).numpy()
                    if de.shape[0] != sp.shape[0] else de.numpy())
  record(f"prompt encoder, {case}: sparse", **s1)
  record(f"prompt encoder, {case}: dense", **s2)
  assert s1["max_rel"] < REL_TOL and s2["max_rel"] < REL_TOL


def test_dense_positional_encoding(tiny_ckpt, tiny_params):
  _, _, tmodel, cfg = tiny_ckpt
  ref = tmodel.prompt_encoder.get_dense_pe().numpy()
  ours = Sam(cfg).apply({"params": tiny_params}, method=Sam.get_dense_pe)
  assert parity_stats(np.asarray(ours).transpose(2, 0, 1)[None], ref)["max_abs"] < 1e-5


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", ["points only", "boxes only", "points+boxes", "points+masks"])
def test_mask_decoder(tiny_ckpt, tiny_params, record, multimask, case):
  _, _, tmodel, cfg = tiny_ckpt
  rng = np.random.default_rng(2)
  emb = _torch_embed(tmodel, _rand_images(rng, 1, cfg.image_size))
  c = _prompt_cases(rng, cfg)[case]
  pts = c["points"]
  with torch.no_grad():
    sp, de = tmodel.prompt_encoder(points=None if pts is None else (_t(pts[0]), _t(pts[1])),
                                   boxes=_t(c["boxes"]), masks=_t(c["masks"]))
    lm, iou = tmodel.mask_decoder(torch.from_numpy(emb), tmodel.prompt_encoder.get_dense_pe(),
                                  sp, de, multimask)
  lm_j, iou_j = Sam(cfg).apply(
      {"params": tiny_params}, jnp.asarray(emb.transpose(0, 2, 3, 1)),
      None if pts is None else jnp.asarray(pts[0]), None if pts is None else jnp.asarray(pts[1]),
      c["boxes"], None if c["masks"] is None else jnp.asarray(c["masks"][:, 0]), multimask,
      method=Sam.predict)
  s = parity_stats(lm_j, lm.numpy(), threshold=0.0)
  si = parity_stats(iou_j, iou.numpy())
  record(f"mask decoder, {case}, multimask={multimask}: logits", **s)
  record(f"mask decoder, {case}, multimask={multimask}: iou", **si)
  assert s["max_rel"] < REL_TOL and si["max_rel"] < REL_TOL
  assert s["mask_iou"] > 0.999


def test_padding_slots_do_not_change_the_result(tiny_ckpt, tiny_params):
  """Absent point slots (label -2, used for bucket padding) are exactly invisible."""
  from samjax.modeling import PAD_LABEL
  _, _, tmodel, cfg = tiny_ckpt
  rng = np.random.default_rng(3)
  emb = jnp.asarray(rng.normal(size=(1, 16, 16, cfg.prompt_embed_dim)).astype(np.float32))
  pts = rng.uniform(0, 256, (2, 2, 2)).astype(np.float32)
  lab = np.array([[1, 0], [1, 1]])
  pad_pts = np.concatenate([pts, rng.uniform(0, 256, (2, 3, 2)).astype(np.float32)], 1)
  pad_lab = np.concatenate([lab, np.full((2, 3), PAD_LABEL)], 1)
  f = lambda p, l: Sam(cfg).apply({"params": tiny_params}, emb, jnp.asarray(p), jnp.asarray(l),
                                  method=Sam.predict)
  (a, ia), (b, ib) = f(pts, lab), f(pad_pts, pad_lab)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ia), np.asarray(ib), rtol=0, atol=1e-6)


@pytest.mark.parametrize("orig_hw", [(400, 300), (150, 200), (256, 256)],
                         ids=["long side above model size", "below", "equal"])
def test_full_model_with_postprocess(tiny_ckpt, tiny_params, record, orig_hw):
  """Official `Sam.forward` (resize, preprocess, encode, decode, postprocess) vs ours."""
  from segment_anything.utils.transforms import ResizeLongestSide
  _, _, tmodel, cfg = tiny_ckpt
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (*orig_hw, 3), dtype=np.uint8)
  tf = ResizeLongestSide(cfg.image_size)
  resized = tf.apply_image(image)
  pts = rng.uniform(0, 1, (2, 2, 2)) * np.array(orig_hw[::-1])
  lab = np.array([[1, 0], [1, 1]])
  pts_in = tf.apply_coords(pts, orig_hw).astype(np.float32)
  with torch.no_grad():
    out = tmodel([{"image": torch.from_numpy(resized).permute(2, 0, 1).contiguous(),
                   "original_size": orig_hw, "point_coords": torch.from_numpy(pts_in),
                   "point_labels": torch.from_numpy(lab)}], multimask_output=True)[0]
    ref_logits = tmodel.postprocess_masks(out["low_res_logits"], resized.shape[:2],
                                          orig_hw).numpy()
  model = Sam(cfg)
  x = preprocess(jnp.asarray(resized[None]), cfg)
  emb = model.apply({"params": tiny_params}, x, method=Sam.embed_image)
  lm, iou = model.apply({"params": tiny_params}, emb, jnp.asarray(pts_in), jnp.asarray(lab),
                        method=Sam.predict)
  logits = postprocess_masks(lm, resized.shape[:2], orig_hw, cfg)
  s = parity_stats(logits, ref_logits, threshold=0.0)
  record(f"full model + postprocess to {orig_hw[0]}x{orig_hw[1]}, fp32", **s)
  assert s["max_rel"] < REL_TOL and s["mask_iou"] > 0.999
  np.testing.assert_array_equal(np.asarray(logits) > 0, out["masks"].numpy())
  assert parity_stats(iou, out["iou_predictions"].numpy())["max_rel"] < REL_TOL


def test_bf16_compute(tiny_ckpt, tiny_params, record):
  """bf16 activations, fp32 params: measured and bounded (IoU >= 0.97)."""
  _, _, tmodel, cfg = tiny_ckpt
  rng = np.random.default_rng(5)
  images = _rand_images(rng, 2, cfg.image_size)
  ref_emb = _torch_embed(tmodel, images)
  pts = rng.uniform(0, 256, (2, 2, 2)).astype(np.float32)
  lab = np.array([[1, 0], [1, 1]])
  with torch.no_grad():
    sp, de = tmodel.prompt_encoder(points=(_t(pts), _t(lab)), boxes=None, masks=None)
    ref_lm, ref_iou = tmodel.mask_decoder(torch.from_numpy(ref_emb[:1]),
                                          tmodel.prompt_encoder.get_dense_pe(), sp, de, True)
  model = Sam(cfg, dtype=jnp.bfloat16)
  emb = model.apply({"params": tiny_params}, preprocess(jnp.asarray(images), cfg),
                    method=Sam.embed_image)
  assert emb.dtype == jnp.bfloat16
  se = parity_stats(_nchw(emb.astype(jnp.float32)), ref_emb)
  lm, iou = model.apply({"params": tiny_params}, emb[:1], jnp.asarray(pts), jnp.asarray(lab),
                        method=Sam.predict)
  assert lm.dtype == jnp.float32 and iou.dtype == jnp.float32
  sm = parity_stats(lm, ref_lm.numpy(), threshold=0.0)
  si = parity_stats(iou, ref_iou.numpy())
  record("image encoder, tiny, bf16 compute", **se)
  record("encoder+decoder, tiny, bf16 compute: logits", **sm)
  record("encoder+decoder, tiny, bf16 compute: iou", **si)
  assert se["max_rel"] < 0.1
  assert sm["mask_iou"] >= 0.97
  assert si["max_abs"] < 0.05


@pytest.mark.slow
def test_image_encoder_vit_b_full_size(tmp_path, record):
  """The real ViT-B shapes: 1024x1024 input, 64x64 tokens padded to 70x70 windows."""
  from samjax import reference
  from samjax.io.checkpoint import convert_checkpoint, load_params
  torch.set_num_threads(max(1, torch.get_num_threads()))
  pth = tmp_path / "sam_vit_b_random.pth"
  tmodel = reference.save_random_checkpoint(samjax.vit_b, pth, seed=7)
  cfg = convert_checkpoint(pth, tmp_path / "orbax")
  assert cfg.name == "vit_b"
  _, params = load_params(tmp_path / "orbax")
  images = _rand_images(np.random.default_rng(6), 1, 1024)
  ref = _torch_embed(tmodel, images)
  del tmodel
  ours = jax.jit(lambda p, x: Sam(cfg).apply({"params": p}, preprocess(x, cfg),
                                             method=Sam.embed_image))(params, jnp.asarray(images))
  s = parity_stats(_nchw(ours), ref)
  record("image encoder, ViT-B 1024x1024, fp32", **s)
  assert s["max_rel"] < REL_TOL


@pytest.mark.parametrize("impl,label", [
    ("xla", "dot_product_attention+bias path"),
    ("fold_xla", "rel-pos folded into q/k path"),
    ("einsum/fold_xla", "einsum windows + folded global"),
])
def test_fused_attention_formulation_matches(tiny_ckpt, tiny_params, record, impl, label):
  """The formulations behind the GPU fast paths, run by XLA on any backend: "xla" is
  the bias form handed to cuDNN by "cudnn", "fold_xla" the folded q/k form of "fold" and
  "fold_mla"; a "WINDOWED/GLOBAL" pair mixes them per block kind."""
  _, _, tmodel, cfg = tiny_ckpt
  images = _rand_images(np.random.default_rng(8), 1, cfg.image_size)
  ref = _torch_embed(tmodel, images)
  ours = samjax.encode_image(tiny_params, jnp.asarray(images), cfg, attention_impl=impl)
  s = parity_stats(_nchw(ours), ref)
  record(f"image encoder, tiny, {label} fp32", **s)
  assert s["max_rel"] < REL_TOL


@pytest.mark.parametrize("project_first", [True, False])
def test_windowed_projection_order(tiny_ckpt, tiny_params, record, project_first):
  """Both layouts of the windowed blocks (q/k/v projected before the window partition,
  as on GPUs, or after it, as on CPUs) compute the reference function."""
  from samjax.modeling.attention import AttentionConfig
  setting = AttentionConfig("einsum", "einsum", project_first)
  _, _, tmodel, cfg = tiny_ckpt
  images = _rand_images(np.random.default_rng(9), 1, cfg.image_size)
  ref = _torch_embed(tmodel, images)
  ours = samjax.encode_image(tiny_params, jnp.asarray(images), cfg, attention=setting)
  # The setting really switches the path: the qkv matmul sees only the real 16x16
  # tokens when projecting first, and also the padded 28x28 windows when partitioning
  # first.
  jaxpr = jax.make_jaxpr(lambda p, x: samjax.encode_image(p, x, cfg, attention=setting))(
      tiny_params, jnp.asarray(images))
  qkv_inputs = {e.invars[0].aval.shape for e in jaxpr.jaxpr.eqns
                if e.primitive.name == "dot_general"
                and e.invars[1].aval.shape[-1] == 3 * cfg.encoder_embed_dim}
  padded = any(s[1:3] == (cfg.window_size, cfg.window_size) for s in qkv_inputs)
  assert padded == (not project_first), qkv_inputs
  s = parity_stats(_nchw(ours), ref)
  order = "projected before" if project_first else "projected after"
  record(f"image encoder, tiny, windowed q/k/v {order} partition, fp32", **s)
  assert s["max_rel"] < REL_TOL


def test_attention_setting_is_validated(tiny_params):
  cfg = samjax.get_config("tiny")
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  for bad in ("flash", "cudnn/xla/einsum", "/xla", 3):
    with pytest.raises(ValueError, match="attention"):
      samjax.encode_image(tiny_params, images, cfg, attention=bad)


def test_auto_attention_per_platform():
  """"auto" is resolved for the platform the program is compiled for."""
  from samjax.modeling import attention as A
  auto = A.AttentionConfig()
  for dt in (jnp.float32, jnp.bfloat16):
    assert A.resolve(auto, "cpu", dt) == A.AttentionConfig("einsum", "einsum", False)
    assert A.resolve(auto, "tpu", dt) == A.AttentionConfig(*A.AUTO_TPU, False)
  assert A.resolve(auto, "gpu", jnp.float32) == A.AttentionConfig("einsum", "einsum", True)
  # No GPU to probe (lowering from a CPU host): the portable folded kernel.
  assert A.resolve(auto, "cuda", jnp.bfloat16).global_attn == "fold_xla"
  # With a probe, the measured preference order, skipping what does not run.
  runs = lambda k, windowed: k == "fold" or (k == "cudnn" and windowed)
  assert A.resolve(auto, "gpu", jnp.bfloat16, runs) == A.AttentionConfig("fold", "fold", True)
  assert A.resolve(A.AttentionConfig.parse("einsum/auto"), "gpu", jnp.bfloat16, runs) == \
      A.AttentionConfig("einsum", "fold", True)
  assert A.fold_qk_dim(80, (64, 64)) == 208 and A.fold_qk_dim(80, (14, 14)) == 112
