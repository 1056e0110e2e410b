"""SAM's training losses; each reduces the last two axes, i.e. one value per mask.

Why not `optax.sigmoid_focal_loss` / `optax.losses.dice_loss` (optax 0.2.8): they
compute the same functions, but not to the same bits, and a fine-tuning step must stay
bit-identical across refactorings. `tests/test_train.py::test_losses_match_optax`
measures the gap:

* focal: optax computes (1 - p_t)^gamma in log space (`logsumexp` of log-sigmoids),
  which is more accurate where p_t ~ 1 (ours cancels to 0 there) but, on random
  64 x 3 masks of 32^2 / 256^2 pixels, changes the last bit of 26% / 7% of the
  per-mask means (relative difference < 1e-7). Its cross-entropy term alone,
  `optax.sigmoid_binary_cross_entropy`, gives our values bit for bit on hard labels,
  yet not our gradients: its log-sigmoid derivative is formed differently, so about
  half of the logit gradients move by an ulp.
* dice: `dice_loss(smooth=0.5)` is algebraically ours ((I + s) / ((P + T) / 2 + s) =
  (2 I + 1) / (P + T + 1)), but evaluated in another order: 17% of the values differ
  in the last bit (relative difference < 1.2e-7).
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Focal loss of mask logits, averaged over pixels.

  Args:
    logits: (..., H, W) logits.
    targets: (..., H, W) in {0, 1} (or soft labels in [0, 1]).
    alpha: weight of the positive class (negatives get 1 - alpha); < 0 disables it.
    gamma: focusing exponent on (1 - p_t).

  Returns:
    (...) float32.
  """
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  # Stable BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)).
  ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  p_t = p * t + (1.0 - p) * (1.0 - t)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
  return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array, eps: float = 1.0) -> jax.Array:
  """Soft Dice loss `1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`, p = sigmoid.

  Args:
    logits: (..., H, W); targets: (..., H, W) in [0, 1].

  Returns:
    (...) float32.
  """
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  num = 2.0 * (p * t).sum(axis=(-2, -1)) + eps
  den = p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + eps
  return 1.0 - num / den


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """IoU of `logits > 0` with `targets > 0.5`; two empty masks count as IoU 1.

  Args:
    logits: (..., H, W); targets: (..., H, W).

  Returns:
    (...) float32.
  """
  pred = logits > 0
  gt = targets > 0.5
  inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def sam_loss(logits: jax.Array, iou_pred: jax.Array, targets: jax.Array,
             focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
             focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Dict[str, jax.Array]:
  """SAM's per-prediction loss, with the min-loss choice among multimask outputs.

  Args:
    logits: (N, M, H, W) mask logits (M = 1 or the 3 multimask outputs).
    iou_pred: (N, M) predicted IoUs.
    targets: (N, H, W) GT masks in {0, 1} on the same grid as `logits`.

  Returns:
    dict of (N,) arrays: `loss` (focal_weight * focal + dice_weight * dice of the
    lowest-loss mask, plus iou_weight * IoU MSE averaged over all M outputs), its
    parts `focal`, `dice`, `iou_mse`, the actual `iou` of the chosen mask, and
    `best` (int index of the chosen mask).
  """
  t = targets[:, None]
  focal = sigmoid_focal_loss(logits, t, focal_alpha, focal_gamma)  # (N, M)
  dice = dice_loss(logits, t)
  mask_loss = focal_weight * focal + dice_weight * dice
  best = jnp.argmin(mask_loss, axis=1)
  iou_true = jax.lax.stop_gradient(mask_iou(logits, t))
  iou_mse = jnp.mean(jnp.square(iou_pred.astype(jnp.float32) - iou_true), axis=1)
  pick = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]
  return {"loss": pick(mask_loss) + iou_weight * iou_mse, "focal": pick(focal),
          "dice": pick(dice), "iou_mse": iou_mse, "iou": pick(iou_true), "best": best}
