"""Checkpoints of a run: an Orbax CheckpointManager of {params, opt_state, step} + metadata.

Everything random is a pure function of (seed, step), so a checkpoint needs only the
train state and the step to resume bit-exactly; the metadata stored next to it (data
cursor, data fingerprint, trajectory settings) is checked on resume so that a
continuation is refused when it would not be the same run.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

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


def restore_latest_intact(mngr: ocp.CheckpointManager, like_state,
                          log_fn: Callable[[str], None] = print
                          ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
  """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

  A step that fails to restore (a truncated or corrupted file, e.g. after a crash
  or a full disk) is moved aside to `<checkpoints>/../damaged_checkpoints/<step>-<time>`
  (so that the step can be saved again) with a warning naming it, and the next
  older step is tried. Raises RuntimeError when checkpoints exist but none restores.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      state, meta = restore(mngr, step, like_state)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      continue
    if errors:
      damaged = [s for s in steps if s > step]
      aside = _move_aside(mngr, damaged)
      msg = (f"checkpoint step(s) {', '.join(map(str, damaged))} in {mngr.directory} "
             f"cannot be restored (damaged), resuming from step {step} instead; moved "
             f"to {aside}:\n  " + "\n  ".join(errors))
      warnings.warn(msg, RuntimeWarning, stacklevel=2)
      log_fn(f"warning: {msg}")
    return step, state, meta
  raise RuntimeError(f"no checkpoint in {mngr.directory} can be restored (all "
                     f"{len(steps)} damaged); remove the folder to start over, or choose "
                     "another output folder:\n  " + "\n  ".join(errors))


def _move_aside(mngr: ocp.CheckpointManager, steps) -> Path:
  directory = Path(mngr.directory)
  aside = directory.parent / "damaged_checkpoints"
  aside.mkdir(exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for step in steps:
    src = directory / str(step)
    if src.exists():
      shutil.move(str(src), str(aside / f"{step}-{stamp}"))
  mngr.reload()
  return aside


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
