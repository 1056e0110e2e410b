"""Parameters and optimizer: random init, the learning-rate schedule, AdamW on trainable parts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samjax.config import SamConfig
from samjax.train.config import TRAINABLE_PARTS, TrainConfig


@functools.lru_cache(maxsize=8)
def _init_fn(config: SamConfig):
  # Compiling init costs as much as a forward pass: compile once per config. This
  # compiles the parameter initialiser (its forward pass on dummy inputs only fixes
  # shapes and is dead code), not a program that encodes images.
  from samjax.modeling import Sam  # pylint: disable=import-outside-toplevel
  model = Sam(config)
  s, e = config.image_size, config.low_res_mask_size
  return jax.jit(lambda key: model.init(
      key, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1), jnp.int32),
      jnp.zeros((1, 4)), jnp.zeros((1, e, e)))["params"])


def init_params(config: SamConfig, seed: int = 0):
  """Random Flax initialisation of a SAM model (numpy float32 tree)."""
  return jax.tree_util.tree_map(np.asarray, _init_fn(config)(jax.random.PRNGKey(seed)))


def trainable_labels(params, train: str):
  """Same tree as `params` with "train" / "frozen" leaves, by top-level part."""
  parts = TRAINABLE_PARTS[train]
  return {name: jax.tree_util.tree_map(lambda _, lab=("train" if name in parts else "frozen"):
                                       lab, sub)
          for name, sub in params.items()}


def learning_rate_schedule(tc: TrainConfig):
  """Linear warmup 0 -> lr, then cosine decay to lr * end_lr_ratio at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
      decay_steps=tc.total_steps, end_value=tc.lr * tc.end_lr_ratio)


def make_optimizer(tc: TrainConfig):
  """AdamW (+ global-norm clipping) on the trainable parts, `set_to_zero` on the rest."""
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  inner = [optax.clip_by_global_norm(tc.grad_clip_norm)] if tc.grad_clip_norm > 0 else []
  inner.append(optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.multi_transform(
      {"train": optax.chain(*inner), "frozen": optax.set_to_zero()},
      functools.partial(trainable_labels, train=tc.train))
