"""Checkpoints of a run: an Orbax CheckpointManager of {params, opt_state, step} + metadata.

Everything random is a pure function of (seed, step), so a checkpoint needs only the
train state and the step to resume bit-exactly; the metadata stored next to it (data
cursor, data fingerprint, trajectory settings) is checked on resume so that a
continuation is refused when it would not be the same run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from samjax.config import SamConfig
from samjax.train.config import TrainConfig


def best_metric(metrics) -> float:
  """What "best" means among checkpoints: the validation mIoU."""
  return float(metrics["miou"])


class _NoMetricsWarningFilter(logging.Filter):
  """Drops orbax's warning for checkpoints saved between validations (no metrics)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


def checkpoint_manager(directory: Path, keep_last: int) -> ocp.CheckpointManager:
  """Keeps the last `keep_last` checkpoints and the one with the best validation mIoU."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoMetricsWarningFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_NoMetricsWarningFilter())
  cm = checkpoint_managers
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep_last),
      cm.BestN(get_metric_fn=best_metric, reverse=False, n=1,
               keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=best_metric, best_mode="max",
      enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(directory.absolute(), item_names=("state", "meta"),
                               options=options)


def checkpoint_meta(step: int, tc: TrainConfig, config: SamConfig, num_train_images: int,
                    data_fingerprint: str, metrics: Optional[Dict[str, float]]
                    ) -> Dict[str, Any]:
  """The JSON metadata saved with the state of `step` (read back by `check_resume`)."""
  return {"step": step, "samples_seen": step * tc.batch_size,
          "epoch": step * tc.batch_size // num_train_images,
          "epoch_position": step * tc.batch_size % num_train_images,
          "num_train_images": num_train_images, "data_fingerprint": data_fingerprint,
          "rng": {"seed": tc.seed, "scheme": "prompts: fold_in(PRNGKey(seed), step); data: "
                  "numpy default_rng([seed, 1, epoch]) / ([seed, 2, sample])"},
          "train_config": tc.trajectory_dict(), "model_config": config.to_dict(),
          "metrics": metrics}


def save(mngr: ocp.CheckpointManager, step: int, state, meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]]) -> None:
  """Saves the train state and its metadata synchronously (done when this returns)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like_state):
  """(state, meta) of `step`, with arrays placed like those of `like_state`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  return got["state"], got["meta"]


def check_resume(meta, tc: TrainConfig, config: SamConfig, n_images: int, fp: str) -> None:
  """Raises ValueError, listing every difference, unless `meta` is this run's."""
  problems = []
  saved = meta.get("train_config", {})
  for k, v in tc.trajectory_dict().items():
    if k in saved and saved[k] != v:
      problems.append(f"{k}: checkpoint {saved[k]!r}, now {v!r}")
  if meta.get("model_config") != config.to_dict():
    problems.append("model config differs")
  if meta.get("num_train_images") != n_images or meta.get("data_fingerprint") != fp:
    problems.append(f"training data differs ({meta.get('num_train_images')} images, "
                    f"fingerprint {meta.get('data_fingerprint')}; now {n_images}, {fp})")
  if problems:
    raise ValueError("cannot resume: the run was started with other settings, so the "
                     "continuation would not be the same run:\n  " + "\n  ".join(problems))
