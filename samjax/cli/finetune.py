"""`samjax finetune`: fine-tune (or train) SAM on COCO instance data.

Building the parser reads the defaults from `samjax.train.config`, which imports
neither jax nor numpy; the training code is imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from samjax.cli._common import add_compute_arguments, positive_int
from samjax.train.config import LOSS_RESOLUTIONS, TRAINABLE_PARTS, TrainConfig

HELP = "fine-tune SAM on COCO-format instance masks"
DESCRIPTION = (
    "Fine-tune (or train from scratch) SAM on COCO instance annotations with the SAM "
    "paper's interactive recipe: a first point or noisy box per instance, then "
    "corrections sampled from the error region. The output folder holds Orbax "
    "checkpoints (resumable bit-exactly), log.json, curves.png and best/, the params "
    "with the highest validation mIoU as a samjax checkpoint.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Arguments of `samjax finetune`."""
  d = TrainConfig()
  g = parser.add_argument_group("data")
  g.add_argument("--data", required=True, metavar="ANNOTATIONS.json",
                 help="COCO instance annotations of the training set (polygons or RLE)")
  g.add_argument("--images", default=None, metavar="DIR",
                 help="training images folder (default: images/ next to --data)")
  g.add_argument("--val-data", default=None, metavar="ANNOTATIONS.json",
                 help="COCO annotations of the validation set (mIoU per eval interval)")
  g.add_argument("--val-images", default=None, metavar="DIR")
  g = parser.add_argument_group("model")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="INIT",
                   help="initial weights: official .pth or samjax Orbax directory")
  src.add_argument("--from-scratch", action="store_true",
                   help="random initialisation of --model (e.g. tiny)")
  g.add_argument("--model", default=None,
                 help="model type: config for --from-scratch (default tiny), or the "
                      "expected type of a .pth --checkpoint")
  g.add_argument("--init-seed", type=int, default=0, help="seed of --from-scratch init")
  parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
  g = parser.add_argument_group("training")
  g.add_argument("--train", choices=sorted(TRAINABLE_PARTS), default=d.train,
                 help="what trains (default: %(default)s = mask decoder only)")
  g.add_argument("--steps", type=positive_int, default=d.total_steps, help="total steps")
  g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                 help="images per step")
  g.add_argument("--instances-per-image", type=positive_int, default=d.instances_per_image)
  g.add_argument("--lr", type=float, default=d.lr)
  g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
  g.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio)
  g.add_argument("--weight-decay", type=float, default=d.weight_decay)
  g.add_argument("--grad-clip", type=float, default=d.grad_clip_norm,
                 help="global-norm gradient clipping (0: off)")
  g.add_argument("--prompt-iters", type=positive_int, default=d.prompt_iters,
                 help="first prompt + error-region corrections per instance")
  g.add_argument("--box-fraction", type=float, default=d.box_fraction,
                 help="share of instances whose first prompt is a noisy box")
  g.add_argument("--loss-resolution", choices=LOSS_RESOLUTIONS, default=d.loss_resolution)
  add_compute_arguments(g)  # --dtype, --attention
  g.add_argument("--hflip", action="store_true", help="random horizontal flips (--train all)")
  g.add_argument("--seed", type=int, default=d.seed)
  g = parser.add_argument_group("schedule and output")
  g.add_argument("--eval-every", type=int, default=d.eval_every,
                 help="steps between validations (0: once per epoch)")
  g.add_argument("--save-every", type=positive_int, default=d.save_every)
  g.add_argument("--keep-last", type=positive_int, default=d.keep_last,
                 help="checkpoints kept besides the best one")
  g.add_argument("--log-every", type=positive_int, default=d.log_every)
  g.add_argument("--val-max-images", type=positive_int, default=None)
  g.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size)
  g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                 help="continue from OUT's latest checkpoint if there is one (default); "
                      "--no-resume refuses to touch a folder with checkpoints")
  g.add_argument("--max-steps-this-run", type=positive_int, default=None,
                 help="stop (after a checkpoint) once this many steps ran in this call")
  g.add_argument("--embedding-cache", default=None, metavar="DIR",
                 help="with a frozen encoder, keep image embeddings in DIR (memmap)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


# TrainConfig field -> the flag that sets it, so that its errors name the flag.
_FLAGS = {"total_steps": "--steps", "warmup_steps": "--warmup-steps",
          "end_lr_ratio": "--end-lr-ratio", "weight_decay": "--weight-decay",
          "grad_clip_norm": "--grad-clip", "batch_size": "--batch-size",
          "instances_per_image": "--instances-per-image", "prompt_iters": "--prompt-iters",
          "box_fraction": "--box-fraction", "loss_resolution": "--loss-resolution",
          "eval_every": "--eval-every", "save_every": "--save-every",
          "keep_last": "--keep-last", "log_every": "--log-every",
          "eval_batch_size": "--eval-batch-size", "val_max_images": "--val-max-images",
          "hflip": "--hflip", "train": "--train", "dtype": "--dtype",
          "attention": "--attention", "lr": "--lr", "seed": "--seed"}
_FIELD_RE = re.compile(r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b")


def _check_steps(args: argparse.Namespace) -> None:
  """--steps against --warmup-steps, in the flags' own words."""
  if args.warmup_steps < 0:
    raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
  if args.warmup_steps >= args.steps:
    default = TrainConfig().warmup_steps
    raise ValueError(f"--steps {args.steps} is too few: the learning-rate warmup takes "
                     f"--warmup-steps {args.warmup_steps} (default {default}), and training "
                     "needs at least one step after it; give --steps more than "
                     "--warmup-steps, or fewer --warmup-steps")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
  """The TrainConfig named by the parsed `samjax finetune` arguments.

  Without --attention, $SAMJAX_ATTENTION_IMPL (else "auto") is read here, once, so
  that the run's config (run.json, checkpoints, the resume check) records it.

  Raises:
    ValueError: a bad value, named by its flag (`--steps`, not `total_steps`).
  """
  _check_steps(args)
  attention = args.attention
  if attention is None:
    from samjax.runtime.engine import ENV_ATTENTION  # pylint: disable=import-outside-toplevel
    attention = os.environ.get(ENV_ATTENTION, "").strip() or "auto"
  try:
    return _train_config(args, attention)
  except ValueError as e:
    raise ValueError(_FIELD_RE.sub(lambda m: _FLAGS[m.group(1)], str(e))) from None


def _train_config(args: argparse.Namespace, attention: str) -> TrainConfig:
  return TrainConfig(
      train=args.train, lr=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
      end_lr_ratio=args.end_lr_ratio, weight_decay=args.weight_decay,
      grad_clip_norm=args.grad_clip, batch_size=args.batch_size,
      instances_per_image=args.instances_per_image, prompt_iters=args.prompt_iters,
      box_fraction=args.box_fraction, loss_resolution=args.loss_resolution, dtype=args.dtype,
      attention=attention, seed=args.seed, eval_every=args.eval_every,
      save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
      hflip=args.hflip, val_max_images=args.val_max_images,
      eval_batch_size=args.eval_batch_size)


def run(args: argparse.Namespace) -> int:
  """`samjax finetune`: returns the process exit status (2 for input errors)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from samjax.config import get_config
  from samjax.io.checkpoint import CheckpointError, load_any
  from samjax.train import CocoInstances, finetune, init_params
  try:
    tc = train_config_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    if args.from_scratch:
      config = get_config(args.model or "tiny")
      params = init_params(config, args.init_seed)
      source = f"random init of {config.name} (seed {args.init_seed})"
    else:
      config, params = load_any(args.checkpoint, model_type=args.model)
      params = jax.tree_util.tree_map(np.asarray, params)
      source = str(Path(args.checkpoint).absolute())
    train_data = CocoInstances(args.data, args.images)
    val_data = CocoInstances(args.val_data, args.val_images) if args.val_data else None
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from samjax.train.plots import matplotlib_missing
  no_plot = matplotlib_missing()
  if no_plot:
    print(f"warning: {no_plot}", file=sys.stderr)
  print(f"finetune: {config.name} ({source}), train={tc.train}, {len(train_data)} training "
        f"images" + (f", {len(val_data)} validation images" if val_data else "")
        + f", {jax.device_count()} device(s)", file=sys.stderr)
  t0 = time.time()
  try:
    res = finetune(tc, config, params, train_data, args.out, val_data=val_data,
                   resume=args.resume, max_steps_this_run=args.max_steps_this_run,
                   embedding_cache_dir=args.embedding_cache, progress=not args.no_progress,
                   init_source=source, log_fn=lambda s: print(s, file=sys.stderr))
  except (FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  status = "finished" if res.finished else "stopped"
  print(f"{status} at step {res.step}/{tc.total_steps} in {time.time() - t0:.0f} s"
        + (f"; best params: {res.best_dir}" if res.best_dir else ""), file=sys.stderr)
  return 0
