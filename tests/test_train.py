"""Fine-tuning (samjax.train): losses, exact resume, frozen parts, export to PyTorch,
and the committed tiny model trained from scratch (tests/fixtures/tiny_trained).

Kept fast on a 2-core CPU: every run uses the tiny config, a 16-image synthetic
dataset and one shared compilation of the train step (the jit cache is keyed on the
trajectory-relevant TrainConfig fields only).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import samjax
from samjax import train as T
from samjax.train import prompts
from samjax.io.checkpoint import load_any, load_params, save_params
from samjax.data.synthetic import write_coco_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_trained"
# Point-prompt mIoU of the fixture on 40 fresh held-out synthetic images (seed 777),
# as measured when it was committed (see RECIPE.md); the test allows a margin.
FIXTURE_POINT_MIOU = 0.625
FIXTURE_BOX_MIOU = 0.693


# ----------------------------------------------------------------------------------------
# Losses against an independent numpy implementation.
# ----------------------------------------------------------------------------------------
def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_focal(x, t, alpha=0.25, gamma=2.0):
  p = _np_sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = np.where(t == 1, p, 1 - p)
  a_t = np.where(t == 1, alpha, 1 - alpha)
  return (a_t * (1 - p_t) ** gamma * ce).mean(axis=(-2, -1))


def _np_dice(x, t):
  p = _np_sigmoid(x)
  return 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)


def _np_iou(x, t):
  a, b = x > 0, t > 0.5
  union = (a | b).sum((-2, -1))
  return np.where(union > 0, (a & b).sum((-2, -1)) / np.maximum(union, 1), 1.0)


def test_losses_hand_computed():
  # All logits 0 -> p = 0.5 everywhere; 2 of 4 pixels are foreground.
  x = np.zeros((1, 2, 2), np.float32)
  t = np.array([[[1, 0], [1, 0]]], np.float32)
  # focal: CE = log 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25 (fg) / 0.75 (bg): mean of
  # log2 * 0.25 * {0.25, 0.75, 0.25, 0.75} = log2 * 0.125.
  np.testing.assert_allclose(T.sigmoid_focal_loss(x, t), [np.log(2) * 0.125], rtol=1e-6)
  # dice: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4.
  np.testing.assert_allclose(T.dice_loss(x, t), [0.4], rtol=1e-6)
  # IoU of (x > 0) = empty with a 2-pixel mask is 0; two empty masks count as 1.
  np.testing.assert_allclose(T.mask_iou(x, t), [0.0])
  np.testing.assert_allclose(T.mask_iou(x, np.zeros_like(t)), [1.0])
  # A confident correct prediction: focal and dice near 0, IoU 1.
  good = np.where(t > 0, 20.0, -20.0)
  assert float(T.sigmoid_focal_loss(good, t)[0]) < 1e-9
  np.testing.assert_allclose(T.mask_iou(good, t), [1.0])


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 3, 8, 8)).astype(np.float32)
  targets = (rng.random((5, 8, 8)) < 0.4).astype(np.float32)
  iou_pred = rng.random((5, 3)).astype(np.float32)
  t = targets[:, None]
  focal, dice, iou = _np_focal(logits, t), _np_dice(logits, t), _np_iou(logits, t)
  np.testing.assert_allclose(T.sigmoid_focal_loss(logits, t), focal, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(T.dice_loss(logits, t), dice, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(T.mask_iou(logits, t), iou, rtol=1e-6)
  # SAM loss: 20 focal + 1 dice of the min-loss mask, + MSE over all three IoU outputs.
  mask = 20 * focal + dice
  best = mask.argmin(1)
  want = mask[np.arange(5), best] + ((iou_pred - iou) ** 2).mean(1)
  got = T.sam_loss(logits, iou_pred, targets)
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  np.testing.assert_array_equal(got["best"], best)
  np.testing.assert_allclose(got["iou"], iou[np.arange(5), best], rtol=1e-6)
  # Only the chosen mask receives a gradient.
  g = jax.grad(lambda lg: T.sam_loss(lg, iou_pred, targets)["loss"].sum())(logits)
  g = np.asarray(g)
  for i in range(5):
    for m in range(3):
      assert (np.abs(g[i, m]).sum() > 0) == (m == best[i])


def test_losses_match_optax():
  """optax's focal and dice losses are ours to fp32 rounding, not bit for bit.

  This is why samjax.train.losses keeps its own (a fine-tuning step must stay
  bit-identical); see its docstring.
  """
  optax = pytest.importorskip("optax")
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 4, (64, 3, 32, 32)).astype(np.float32))
  t = jnp.asarray((rng.random((64, 1, 32, 32)) < 0.4).astype(np.float32))
  tb = jnp.broadcast_to(t, logits.shape)
  ours = np.asarray(T.sigmoid_focal_loss(logits, t))
  lib = np.asarray(optax.sigmoid_focal_loss(logits, tb, alpha=0.25, gamma=2.0)
                   .mean(axis=(-2, -1)))
  np.testing.assert_allclose(ours, lib, rtol=1e-6, atol=0)
  # (2 I + 1) / (P + T + 1) = (I + 1/2) / ((P + T) / 2 + 1/2): optax's smooth=0.5.
  ours_d = np.asarray(T.dice_loss(logits, t))
  lib_d = np.asarray(optax.losses.dice_loss(logits[..., None], tb[..., None], smooth=0.5,
                                            axis=(-3, -2)))
  np.testing.assert_allclose(ours_d, lib_d, rtol=1e-6, atol=0)
  # The values are not bit-identical (if they ever become so, switch to optax) ...
  assert not (np.array_equal(ours, lib) and np.array_equal(ours_d, lib_d))
  # ... and the cross-entropy term, equal in value, is not in its gradient.
  ce_ours = lambda x: (jnp.maximum(x, 0.0) - x * tb + jnp.log1p(jnp.exp(-jnp.abs(x)))).sum()
  ce_lib = lambda x: optax.sigmoid_binary_cross_entropy(x, tb).sum()
  assert float(ce_ours(logits)) == float(ce_lib(logits))
  assert not np.array_equal(jax.grad(ce_ours)(logits), jax.grad(ce_lib)(logits))


def test_point_sampling_is_uniform_over_the_mask():
  mask = np.zeros((1, 8, 8), bool)
  mask[0, 2, 3] = mask[0, 5, 6] = mask[0, 7, 0] = True
  keys = jax.random.split(jax.random.PRNGKey(0), 300)
  xy = np.asarray(jax.vmap(lambda k: prompts.sample_from_mask(k, mask)[0][0])(keys))
  hits = {tuple(p) for p in xy.astype(int)}
  assert hits == {(3, 2), (6, 5), (0, 7)}
  counts = np.unique(xy[:, 0], return_counts=True)[1]
  assert counts.min() > 60  # ~100 each
  _, _, ok = prompts.sample_from_mask(keys[0], np.zeros((1, 8, 8), bool))
  assert not bool(ok[0])


def test_public_names_and_jax_free_cli():
  import importlib
  import inspect
  import pkgutil
  import subprocess
  import sys
  for m in pkgutil.iter_modules(T.__path__):
    importlib.import_module(f"samjax.train.{m.name}")
  for name in T.__all__:  # no submodule shadows a public name of the package
    assert not inspect.ismodule(getattr(T, name)), name
  # The finetune / export-torch parsers (defaults from samjax.train.config) need no jax.
  code = ("import argparse, sys\n"
          "from samjax.cli import export_torch, finetune\n"
          "for m in (finetune, export_torch):\n"
          "  m.add_arguments(argparse.ArgumentParser())\n"
          "bad = [m for m in ('jax', 'numpy', 'flax', 'optax') if m in sys.modules]\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ----------------------------------------------------------------------------------------
# A toy fine-tuning run: improves, resumes exactly, leaves frozen parts alone.
# ----------------------------------------------------------------------------------------
TOY = T.TrainConfig(train="decoder", lr=2e-3, warmup_steps=2, total_steps=16,
                    batch_size=4, instances_per_image=4, prompt_iters=2, eval_every=8,
                    save_every=4, keep_last=2, log_every=2, seed=3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """Datasets, initial params (fixture with fresh output heads), an uninterrupted run."""
  d = tmp_path_factory.mktemp("toy")
  train_json = write_coco_dataset(str(d / "train"), 16, seed=11)
  val_json = write_coco_dataset(str(d / "val"), 8, seed=12)
  config, params = load_params(FIXTURE)
  params = jax.tree_util.tree_map(np.asarray, params)
  # New output heads (mask hypernetworks, IoU head) on the trained model: the kind of
  # change decoder-only fine-tuning is for, and one that it measurably repairs in a
  # few steps (the intact model itself has little left to gain on this data).
  fresh = T.init_params(config, seed=5)["mask_decoder"]
  params["mask_decoder"] = {
      k: fresh[k] if k.startswith(("output_hypernetworks_mlps", "iou_prediction_head")) else v
      for k, v in params["mask_decoder"].items()}
  init_dir = save_params(params, config, d / "init")
  train, val = T.CocoInstances(train_json), T.CocoInstances(val_json)
  run = T.finetune(TOY, config, params, train, d / "uninterrupted", val_data=val,
                   progress=False, log_fn=lambda s: None)
  return dict(dir=d, config=config, params=params, init_dir=init_dir, train=train, val=val,
              train_json=train_json, val_json=val_json, run=run)


def test_finetune_improves_validation_miou(toy):
  run = toy["run"]
  assert run.finished and run.step == TOY.total_steps
  start = run.log["eval"][0]
  assert start["step"] == 0
  assert [r["step"] for r in run.log["eval"]] == [0, 8, 16]
  assert run.best_metrics["miou"] > start["miou"] + 0.1, run.log["eval"]
  assert run.log["eval"][-1]["point_miou"] > start["point_miou"], run.log["eval"]
  # The exported best params are the best checkpoint's, loadable by samjax.
  config, best = load_params(run.best_dir)
  assert config == toy["config"]
  assert run.best_step in (8, 16)
  if run.best_step == 16:
    for a, b in zip(jax.tree_util.tree_leaves(best), jax.tree_util.tree_leaves(run.params)):
      np.testing.assert_array_equal(a, b)
  out = toy["dir"] / "uninterrupted"
  assert (out / "log.json").exists() and (out / "curves.png").stat().st_size > 1000


def test_frozen_parts_do_not_change(toy):
  init, final = toy["params"], toy["run"].params
  for part in ("image_encoder", "prompt_encoder"):
    for a, b in zip(jax.tree_util.tree_leaves(init[part]),
                    jax.tree_util.tree_leaves(final[part])):
      np.testing.assert_array_equal(a, b)  # bit-identical
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(init["mask_decoder"]),
      jax.tree_util.tree_leaves(final["mask_decoder"]))]
  # Most of the decoder moves; not necessarily all of it: a multimask output that is
  # never the lowest-loss one gets no gradient (only weight decay on its matrices).
  assert sum(changed) > 0.8 * len(changed)
  # Frozen parts have no optimizer state at all: set_to_zero keeps none.
  labels = T.trainable_labels(init, "decoder")
  assert set(jax.tree_util.tree_leaves(labels["image_encoder"])) == {"frozen"}


class _Kill(Exception):
  pass


def test_interrupted_run_resumes_exactly(toy):
  out = toy["dir"] / "interrupted"
  # 1) The CLI, stopped cleanly after 5 steps (it checkpoints step 5 before leaving).
  argv = ["finetune", "--data", toy["train_json"], "--val-data", toy["val_json"],
          "--checkpoint", str(toy["init_dir"]), "--out", str(out), "--train", "decoder",
          "--lr", "2e-3", "--warmup-steps", "2", "--steps", "16", "--batch-size", "4",
          "--instances-per-image", "4", "--prompt-iters", "2", "--seed", "3",
          "--eval-every", "8", "--save-every", "4", "--keep-last", "2", "--log-every", "2",
          "--max-steps-this-run", "5", "--no-progress"]
  assert T.main(argv) == 0
  # 2) Resumed at step 5 and killed at step 10 (not a checkpoint step): the newest
  #    checkpoint is step 8, so steps 9 and 10 are lost and will be replayed.
  def kill_at_10(step, metrics):
    if step == 10:
      raise _Kill()
  with pytest.raises(_Kill):
    T.finetune(TOY, toy["config"], toy["params"], toy["train"], out, val_data=toy["val"],
               progress=False, log_fn=lambda s: None, callback=kill_at_10)
  # 3) Resumed from step 8 to the end.
  seen = []
  res = T.finetune(TOY, toy["config"], toy["params"], toy["train"], out, val_data=toy["val"],
                   progress=False, log_fn=lambda s: None,
                   callback=lambda step, m: seen.append(step))
  assert seen == list(range(9, 17))
  assert res.finished and res.step == toy["run"].step == 16
  ref = toy["run"]
  for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(res.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)  # same data, prompts, optimizer state
  losses = lambda log: {r["step"]: r["loss"] for r in log["train"] if r["step"] % 2 == 0}
  assert losses(res.log) == losses(ref.log)
  assert [r["miou"] for r in res.log["eval"]] == [r["miou"] for r in ref.log["eval"]]
  # Resuming with different trajectory settings is refused.
  with pytest.raises(ValueError, match="cannot resume"):
    T.finetune(T.TrainConfig(**{**TOY.to_dict(), "lr": 1e-3, "total_steps": 20}),
               toy["config"], toy["params"], toy["train"], out, val_data=toy["val"],
               progress=False, log_fn=lambda s: None)


# ----------------------------------------------------------------------------------------
# Export to PyTorch.
# ----------------------------------------------------------------------------------------
def test_export_torch_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  from samjax import reference
  from samjax.data.synthetic import make_synthetic_image
  pth = tmp_path / "tiny_trained.pth"
  assert T.main(["export-torch", str(FIXTURE), str(pth)]) == 0
  assert T.main(["export-torch", str(FIXTURE), str(pth)]) == 2  # no silent overwrite
  config, params = load_params(FIXTURE)
  model = reference.build_official(config)
  model.load_state_dict(torch.load(str(pth), weights_only=True))  # strict

  image, masks, _ = make_synthetic_image(np.random.default_rng(5), 256)
  ys, xs = np.nonzero(masks[0])
  point = np.array([[[xs[len(xs) // 2], ys[len(ys) // 2]]]], np.float32)
  box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)
  emb = samjax.encode_image(params, image[None], config)
  ours_p = samjax.decode_masks(params, emb, point, np.ones((1, 1), np.int32), config=config)
  ours_b = samjax.decode_masks(params, emb, None, None, box, config=config,
                               multimask_output=False)
  with torch.no_grad():
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    t_emb = model.image_encoder(model.preprocess(x))
    pe = model.prompt_encoder.get_dense_pe()
    outs = []
    for pts, bx, multi in (((torch.from_numpy(point), torch.ones(1, 1, dtype=torch.int)),
                            None, True), (None, torch.from_numpy(box), False)):
      sparse, dense = model.prompt_encoder(points=pts, boxes=bx, masks=None)
      outs.append(model.mask_decoder(t_emb, pe, sparse, dense, multimask_output=multi))

  def close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), ref.numpy().astype(np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max()

  close(emb, t_emb.permute(0, 2, 3, 1))
  for (ours_m, ours_i), (ref_m, ref_i) in zip((ours_p, ours_b), outs):
    close(ours_m, ref_m)
    close(ours_i, ref_i)
  # ... and back: the .pth converts to exactly the same params.
  config2, params2 = load_any(pth)
  assert config2 == config
  flat = lambda p: dict(jax.tree_util.tree_flatten_with_path(p)[0])
  a, b = flat(params), flat(params2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


# ----------------------------------------------------------------------------------------
# The committed tiny model.
# ----------------------------------------------------------------------------------------
def test_committed_tiny_model_segments_held_out_images(tmp_path):
  config, trained = load_params(FIXTURE)
  assert config == samjax.tiny
  # Fresh images with a seed no training or validation run used.
  val = T.CocoInstances(write_coco_dataset(str(tmp_path / "heldout"), 40, seed=777))
  eval_set = T.build_eval_set(val, config)
  assert len(eval_set) > 100
  got = T.evaluate(trained, config, eval_set)
  rand = T.evaluate(T.init_params(config, seed=0), config, eval_set)  # the training init
  print(f"held-out mIoU: trained point {got['point_miou']:.4f} box {got['box_miou']:.4f}; "
        f"random init point {rand['point_miou']:.4f} box {rand['box_miou']:.4f}")
  assert got["point_miou"] >= rand["point_miou"] + 0.2
  assert got["box_miou"] >= rand["box_miou"] + 0.2
  assert got["point_miou"] >= FIXTURE_POINT_MIOU - 0.05
  assert got["box_miou"] >= FIXTURE_BOX_MIOU - 0.05
