"""The train step: interactive prompting, the loss, and its compiled update.

Per instance and step: a first prompt (a point in the GT mask, or the jittered GT
box), then `prompt_iters - 1` corrections, each a point in the error region of the
previous prediction with the previous low-res logits fed back as `mask_input`. The
step is compiled by the `Runtime` (`rt.jit`), and encodes images with `rt.encoder`,
so the kernels and shardings are the runtime's.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from samjax.config import SamConfig
from samjax.resize import resize_bilinear
from samjax.runtime import Runtime
from samjax.train.config import TRAINABLE_PARTS, TrainConfig
from samjax.train.losses import sam_loss
from samjax.train.optim import make_optimizer
from samjax.train.prompts import (PAD_LABEL, error_region, jitter_boxes, sample_from_mask,
                                  valid_region)

# optax 0.2.8 deprecates global_norm for tree.norm (which global_norm now calls);
# the floor, optax 0.1.5, has only global_norm.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_runtime(config: SamConfig, tc: TrainConfig, mesh: Optional[Mesh] = None) -> Runtime:
  """The Runtime of a run: `tc`'s compute dtype and attention kernels over `mesh`."""
  return Runtime(config, dtype=tc.compute_dtype, attention=tc.attention, mesh=mesh)


def group_losses(params, emb, gt, valid_hw, boxes, key, *, use_box: bool, rt: Runtime,
                 tc: TrainConfig) -> Dict[str, jax.Array]:
  """Interactive prompting of one group of instances; per-instance mean losses.

  Args:
    emb: (n, h, w, C) image embedding of each instance's image.
    gt: (n, S, S) bool GT masks in the input frame.
    valid_hw: (n, 2); boxes: (n, 4) tight GT boxes.
    use_box: the first prompt is a noisy box (else a point in the mask).

  Returns:
    dict of (n,) arrays: loss, focal, dice, iou_mse (means over the prompt
    iterations) and iou_first, iou_last (actual IoU of the chosen mask of the first
    and the last iteration).
  """
  config = rt.config
  n, s = gt.shape[0], config.image_size
  if tc.loss_resolution == "low_res":
    f = s // config.low_res_mask_size
    r = config.low_res_mask_size
    target = gt.astype(jnp.float32).reshape(n, r, f, r, f).mean(axis=(2, 4)) >= 0.5
  else:
    target = gt

  def losses(logits, iou_pred):
    if tc.loss_resolution == "input":
      logits = resize_bilinear(logits, (s, s))
    return sam_loss(logits, iou_pred, target.astype(jnp.float32), tc.focal_weight,
                    tc.dice_weight, tc.iou_weight, tc.focal_alpha, tc.focal_gamma)

  def chosen_low_res(logits, best):
    return jax.lax.stop_gradient(jnp.take_along_axis(logits, best[:, None, None, None],
                                                     axis=1)[:, 0])

  k_first, k_iters = jax.random.split(key)
  n_points = tc.prompt_iters - (1 if use_box else 0)
  points = jnp.zeros((n, max(n_points, 1), 2), jnp.float32)
  labels = jnp.full((n, max(n_points, 1)), PAD_LABEL, jnp.int32)
  box = None
  if use_box:
    box = jitter_boxes(k_first, boxes, valid_hw, tc)
  else:
    xy, _, ok = sample_from_mask(k_first, gt)
    points = points.at[:, 0].set(xy)
    labels = labels.at[:, 0].set(jnp.where(ok, 1, PAD_LABEL))
  dec = functools.partial(rt.decoder, params, emb)
  logits, iou_pred = dec(points if n_points else None, labels if n_points else None, box,
                         None, multimask_output=not use_box)
  first = losses(logits, iou_pred)
  stats = {k: first[k] for k in ("loss", "focal", "dice", "iou_mse")}
  iou_first = first["iou"]
  prev = chosen_low_res(logits, first["best"])
  valid = valid_region(valid_hw, s)
  flat_gt = gt.reshape(n, -1)

  def correction(carry, xs):
    points, labels, prev = carry
    it_key, slot = xs
    err = error_region(resize_bilinear(prev, (s, s)), gt, valid)
    xy, idx, ok = sample_from_mask(it_key, err)
    # A point in a false negative (GT pixel) is positive, in a false positive negative.
    lab = jnp.where(ok, jnp.take_along_axis(flat_gt, idx[:, None], axis=1)[:, 0]
                    .astype(jnp.int32), PAD_LABEL)
    points = jax.lax.dynamic_update_index_in_dim(points, xy[:, None], slot, axis=1)
    labels = jax.lax.dynamic_update_index_in_dim(labels, lab[:, None], slot, axis=1)
    logits, iou_pred = dec(points, labels, box, prev, multimask_output=False)
    out = losses(logits, iou_pred)
    step_stats = {k: out[k] for k in ("loss", "focal", "dice", "iou_mse", "iou")}
    return (points, labels, chosen_low_res(logits, out["best"])), step_stats

  if tc.prompt_iters > 1:
    first_slot = 0 if use_box else 1
    xs = (jax.random.split(k_iters, tc.prompt_iters - 1),
          jnp.arange(first_slot, first_slot + tc.prompt_iters - 1))
    _, more = jax.lax.scan(correction, (points, labels, prev), xs)
    stats = {k: (stats[k] + more[k].sum(axis=0)) / tc.prompt_iters for k in stats}
    iou_last = more["iou"][-1]
  else:
    iou_last = iou_first
  stats["iou_first"] = iou_first
  stats["iou_last"] = iou_last
  return stats


def loss_fn(params, batch, key, rt: Runtime, tc: TrainConfig):
  """Mean loss over valid instance slots, and metrics.

  Args:
    params: full SAM params (frozen parts are wrapped in stop_gradient here).
    batch: `train_batch` arrays: valid_hw (B, 2), gt (B, K, S, S) uint8, boxes
      (B, K, 4), inst_valid (B, K), and images (B, S, S, 3) uint8 or embeddings
      (B, h, w, C).
    key: PRNG key of this step.
    rt: the run's Runtime (encoder, decoder, dtype).

  Returns:
    (loss scalar, metrics dict of scalars).
  """
  parts = TRAINABLE_PARTS[tc.train]
  # Frozen parts are constants: no backward pass through them at all.
  params = {k: (v if k in parts else jax.lax.stop_gradient(v)) for k, v in params.items()}
  valid_hw = batch["valid_hw"]
  if "images" in batch:
    emb = rt.encoder(params, batch["images"], valid_hw)
  else:
    emb = batch["embeddings"].astype(tc.compute_dtype)
  k = batch["inst_valid"].shape[1]
  gt = batch["gt"].astype(bool)
  nb = tc.num_box_slots
  rep = lambda x: jnp.repeat(x[:, None], k, axis=1)  # per image -> per instance slot
  emb_i, hw_i = rep(emb), rep(valid_hw)
  groups = []
  if nb > 0:
    groups.append((True, slice(0, nb)))
  if nb < k:
    groups.append((False, slice(nb, k)))
  keys = jax.random.split(key, len(groups))
  flat = lambda x, sl: x[:, sl].reshape(-1, *x.shape[2:])
  stats, weights = [], []
  for g_key, (use_box, sl) in zip(keys, groups):
    st = group_losses(params, flat(emb_i, sl), flat(gt, sl), flat(hw_i, sl),
                      flat(batch["boxes"], sl), g_key, use_box=use_box, rt=rt, tc=tc)
    stats.append(st)
    weights.append(flat(batch["inst_valid"], sl).astype(jnp.float32))
  w = jnp.concatenate(weights)
  denom = jnp.maximum(w.sum(), 1.0)
  metrics = {name: jnp.sum(jnp.concatenate([st[name] for st in stats]) * w) / denom
             for name in stats[0]}
  metrics["instances"] = w.sum()
  return metrics["loss"], metrics


def train_step_fn(tc: TrainConfig, rt: Runtime):
  """Compiled (state, batch) -> (state, metrics); state = {params, opt_state, step}.

  The state is replicated and donated, the batch split over the runtime's mesh.
  """
  # Eval/save/log settings do not enter the step: runs differing only in them (e.g. a
  # resumed run started from the CLI) share one compilation.
  return _compiled_train_step(tc.trajectory_only(), rt)


@functools.lru_cache(maxsize=16)
def _compiled_train_step(tc: TrainConfig, rt: Runtime):
  tx = make_optimizer(tc)
  base_key = jax.random.PRNGKey(tc.seed)

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], batch, key, rt, tc)
    parts = TRAINABLE_PARTS[tc.train]
    metrics["grad_norm"] = _global_norm({k: v for k, v in grads.items() if k in parts})
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return rt.jit(step_fn, in_specs=("replicated", "batch"),
                out_specs=("replicated", "replicated"), donate_argnums=(0,))


def init_train_state(params, tc: TrainConfig, rt: Runtime) -> Dict[str, Any]:
  """Fresh {params, opt_state, step} replicated over the runtime's mesh."""
  params = rt.replicate(jax.tree_util.tree_map(jnp.asarray, params))
  init = rt.jit(make_optimizer(tc).init, in_specs=("replicated",), out_specs="replicated")
  return {"params": params, "opt_state": init(params),
          "step": rt.replicate(jnp.zeros((), jnp.int32))}
