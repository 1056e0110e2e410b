"""`finetune`: the training loop, with validation, checkpoints, logs and the best export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from samjax.config import SamConfig
from samjax.io.files import atomic_write
from samjax.io.prefetch import prefetch_map
from samjax.train import checkpoints
from samjax.train.config import (BEST_DIR, CHECKPOINT_DIR, LOG_FILE, PLOT_FILE, RUN_FILE,
                                 TrainConfig)
from samjax.train.data import DataOrder, dataset_fingerprint, train_batch
from samjax.train.embeddings import cached_embeddings, compute_embeddings
from samjax.train.evaluation import build_eval_set, evaluate
from samjax.train.optim import learning_rate_schedule
from samjax.train.plots import plot_curves, progress_bar
from samjax.train.step import init_train_state, make_runtime, train_step_fn


# A run stops when its first this-many steps had not a single valid instance.
EMPTY_CHECK_STEPS = 4


@dataclasses.dataclass
class FinetuneResult:
  """What `finetune` returns.

  Attributes:
    step: steps completed (== total_steps unless stopped by `max_steps_this_run`).
    finished: the run reached total_steps (and exported `best_dir`).
    params: params after the last step (host numpy tree).
    best_step / best_metrics: checkpoint with the highest validation mIoU (None
      without validation data).
    best_dir: exported samjax checkpoint of the best params (None until finished).
    log: the training log (also in OUT/log.json).
  """

  step: int
  finished: bool
  params: Any
  best_step: Optional[int]
  best_metrics: Optional[Dict[str, float]]
  best_dir: Optional[Path]
  log: Dict[str, Any]


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def finetune(tc: TrainConfig, config: SamConfig, params, train_data, out_dir: str | os.PathLike,
             *, val_data=None, resume: bool = True, max_steps_this_run: Optional[int] = None,
             mesh=None, embedding_cache_dir: Optional[str | os.PathLike] = None,
             progress: bool = True, init_source: str = "", log_fn: Callable[[str], None] = print,
             callback: Optional[Callable[[int, Dict[str, float]], None]] = None
             ) -> FinetuneResult:
  """Fine-tunes (or trains) SAM; resumable and exactly reproducible.

  Args:
    tc: training hyper-parameters.
    config: model config of `params`.
    params: initial params (ignored, except for their structure, when resuming).
    train_data: `CocoInstances` or any sequence of (image uint8 (H, W, 3), masks bool
      (N, H, W)); images without instances must not be in it.
    out_dir: output folder (see `samjax.train` for its layout).
    val_data: validation dataset of the same kind, or None.
    resume: continue from the latest checkpoint in `out_dir/checkpoints` if any;
      with False an existing checkpoint is an error (never silently overwritten).
    max_steps_this_run: stop (after saving a checkpoint) once this many steps ran in
      this call; a later call with `resume=True` continues from there.
    mesh: data mesh (default: all local devices); batch_size must divide over it.
    embedding_cache_dir: with a frozen encoder, keep the embeddings in a .npy
      memmap here (reused across runs) instead of in memory.
    progress: tqdm progress bars.
    init_source: description of the initial params, recorded in run.json.
    log_fn: where status lines go.
    callback: called as callback(step, metrics) after every completed step (after
      its checkpoint, if any); metrics are host floats. An exception raised there
      aborts the run like a kill would: resuming replays from the last checkpoint.

  Returns:
    FinetuneResult.
  """
  out = Path(out_dir)
  rt = make_runtime(config, tc, mesh)
  n_dev = rt.num_devices
  if tc.batch_size % n_dev:
    raise ValueError(f"batch_size {tc.batch_size} does not split over {n_dev} devices")
  # Everything about the data is checked before anything is written to `out`.
  for data in (train_data, val_data):
    if data is not None and getattr(data, "validated", True) is False:
      data.validate()  # a CocoInstances built with validate=False
  order = DataOrder(len(train_data), tc.seed)
  data_fp = dataset_fingerprint(train_data)
  # The first steps' batches (host only, images not encoded) must hold an instance.
  n_check = min(EMPTY_CHECK_STEPS, tc.total_steps)
  if n_check and not any(train_batch(train_data, order, s, tc, config, None)["inst_valid"].any()
                         for s in range(n_check)):
    raise ValueError(
        f"training would see no valid instance in its first {n_check} step(s) "
        f"({n_check * tc.batch_size} images): every mask of the sampled images is empty "
        "(or vanishes when resized to the model input); check the training data")
  out.mkdir(parents=True, exist_ok=True)

  mngr = checkpoints.checkpoint_manager(out / CHECKPOINT_DIR, tc.keep_last)
  try:
    state = init_train_state(params, tc, rt)
    start = 0
    log: Dict[str, Any] = {"train_config": tc.to_dict(), "model_config": config.to_dict(),
                           "train": [], "eval": [], "runs": []}
    latest = mngr.latest_step()
    if latest is not None:
      if not resume:
        raise FileExistsError(f"{out} already has checkpoints (latest step {latest}); resume "
                              "it or choose another output folder")
      _, state, meta = checkpoints.restore_latest_intact(mngr, state, log_fn)
      checkpoints.check_resume(meta, tc, config, len(train_data), data_fp)
      start = int(meta["step"])
      if (out / LOG_FILE).exists():
        log = json.loads((out / LOG_FILE).read_text())
        # Records written after the checkpoint will be produced again, identically.
        log["train"] = [r for r in log["train"] if r["step"] <= start]
        log["eval"] = [r for r in log["eval"] if r["step"] <= start]
      log_fn(f"resuming {out} at step {start} of {tc.total_steps}")
    atomic_write(out / RUN_FILE, json.dumps({
        "train_config": tc.to_dict(), "model_config": config.to_dict(), "init": init_source,
        "train_data": {"images": len(train_data), "fingerprint": data_fp},
        "val_data": None if val_data is None else {"images": len(val_data),
                                                   "fingerprint": dataset_fingerprint(val_data)},
        "devices": n_dev}, indent=2) + "\n")

    # Frozen encoder: embeddings once per image, computed with the (fixed) encoder.
    train_emb = val_emb = None
    eval_set = build_eval_set(val_data, config, tc.val_max_images) if val_data is not None \
        else None
    if tc.encoder_frozen:
      train_emb = cached_embeddings(state["params"], train_data, tc, rt, embedding_cache_dir,
                                    progress, "train", log_fn)
      if eval_set is not None:
        val_emb = compute_embeddings(state["params"], eval_set.images, config,
                                     batch_size=tc.eval_batch_size, runtime=rt)

    steps_per_epoch = math.ceil(len(train_data) / tc.batch_size)
    eval_every = tc.eval_every or steps_per_epoch

    def run_eval(step: int) -> Optional[Dict[str, float]]:
      if eval_set is None:
        return None
      t0 = time.time()
      r = evaluate(state["params"], config, eval_set, embeddings=val_emb,
                   batch_size=tc.eval_batch_size, runtime=rt)
      rec = {"step": step, **r, "eval_s": round(time.time() - t0, 2)}
      log["eval"].append(rec)
      log_fn(f"step {step}: val point mIoU {r['point_miou']:.4f}, box mIoU "
             f"{r['box_miou']:.4f} ({r['instances']} instances)")
      return r

    def save(step: int, metrics: Optional[Dict[str, float]]) -> None:
      meta = checkpoints.checkpoint_meta(step, tc, config, len(train_data), data_fp, metrics)
      checkpoints.save(mngr, step, state, meta, metrics)

    def write_log():
      atomic_write(out / LOG_FILE, json.dumps(log, indent=1) + "\n")
      try:
        plot_curves(log, out / PLOT_FILE)
      except Exception as e:  # pylint: disable=broad-except
        # A plotting problem must never kill a training run.
        log_fn(f"warning: could not plot curves: {e}")

    if start == 0:
      save(0, run_eval(0))
      write_log()

    step_fn = train_step_fn(tc, rt)
    schedule = learning_rate_schedule(tc)
    last = tc.total_steps if max_steps_this_run is None else min(
        tc.total_steps, start + max_steps_this_run)
    log["runs"].append({"start_step": start, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    # The batch of step s + 1 is built in a thread while step s runs.
    batches = prefetch_map(lambda s: train_batch(train_data, order, s, tc, config, train_emb),
                           range(start, last), ahead=1, name="samjax-train-batches")
    bar = progress_bar(total=tc.total_steps, initial=start, desc="finetune", unit="step",
                       enabled=progress)
    t_run = time.time()
    t_win, win_steps, pending = time.time(), 0, []
    step = start
    try:
      while step < last:
        batch = rt.shard(next(batches))
        state, metrics = step_fn(state, batch)
        step += 1
        win_steps += 1
        pending.append((step, metrics))
        at_eval = eval_set is not None and (step % eval_every == 0 or step == tc.total_steps)
        at_save = at_eval or step % tc.save_every == 0 or step == last or step == tc.total_steps
        if step % tc.log_every == 0 or at_save:
          host = _host([m for _, m in pending])
          dt = max(time.time() - t_win, 1e-9)
          for (s, _), m in zip(pending, host):
            if s % tc.log_every == 0 or s == step:
              rec = {"step": s, **{k: float(v) for k, v in m.items()},
                     "lr": float(schedule(s - 1)), "steps_per_s": win_steps / dt,
                     "images_per_s": win_steps * tc.batch_size / dt,
                     "wall_s": round(time.time() - t_run, 2)}
              log["train"].append(rec)
          bar.set_postfix(loss=f"{rec['loss']:.4f}", iou=f"{rec['iou_last']:.3f}",
                          img_s=f"{rec['images_per_s']:.1f}")
          t_win, win_steps, pending = time.time(), 0, []
        bar.update(1)
        if at_save:
          r = run_eval(step) if at_eval else None
          save(step, r)
          write_log()
          t_win = time.time()  # exclude eval/save time from the throughput
        if callback is not None:
          callback(step, {k: float(v) for k, v in _host(metrics).items()})
    finally:
      bar.close()
      batches.close()
    log["runs"][-1].update({"end_step": step, "wall_s": round(time.time() - t_run, 2)})
    write_log()

    best_step, best_metrics, best_dir = None, None, None
    finished = step >= tc.total_steps
    if eval_set is not None:
      best_step = mngr.best_step()
      best_metrics = mngr.metrics(best_step) if best_step is not None else None
    if finished:
      if best_step is not None and best_step != step:
        best_params = checkpoints.restore(mngr, best_step, state)[0]["params"]
      else:
        best_step = best_step if best_step is not None else step
        best_params = state["params"]
      from samjax.io.checkpoint import save_params  # pylint: disable=import-outside-toplevel
      best_dir = save_params(_host(best_params), config, out / BEST_DIR, overwrite=True,
                             metadata={"trained_by": "samjax.train", "step": int(best_step),
                                       "val_metrics": best_metrics, "init": init_source,
                                       "train_config": tc.to_dict()})
      log["best"] = {"step": int(best_step), "metrics": best_metrics, "dir": str(best_dir)}
      write_log()
      log_fn(f"done: best step {best_step} {best_metrics or ''} -> {best_dir}")
    return FinetuneResult(step, finished, _host(state["params"]), best_step, best_metrics,
                          best_dir, log)
  finally:
    mngr.close()
