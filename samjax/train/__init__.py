"""Fine-tuning SAM on COCO-format instance data, and exporting the result to PyTorch.

Training follows the SAM paper's interactive recipe, per instance and per step:

  1. a first prompt: a point drawn uniformly from the ground-truth (GT) mask, or the
     GT box with every coordinate jittered by N(0, (0.1 * side)^2), clipped to 20 px;
  2. `prompt_iters - 1` corrections: a point drawn uniformly from the error region of
     the previous prediction (false negative -> positive point, false positive ->
     negative point), with the previous low-res logits fed back as `mask_input`.

A static share of each image's instance slots (`box_fraction`) starts from a box,
the rest from a point; which instance lands in which slot is random. The first
prediction of a single point uses the 3 multimask outputs and only the lowest-loss
one is backpropagated; boxes and multi-point prompts use the single-mask output.

Loss, per prediction: `20 * focal + 1 * dice` on the mask plus `1 * MSE(iou_pred,
actual IoU)` over every output mask (so the IoU head learns to rank all three). The
mask terms compare the decoder's low-res 4h x 4w logits with the GT area-downsampled
to that grid and binarised at 0.5 (`loss_resolution="low_res"`, the default), or the
logits upsampled bilinearly to the S x S model input frame with the GT in that frame
(`"input"`, 16x the pixels). Losses are averaged over valid instances and iterations.
The mask fed back is the chosen (lowest-loss) prediction, without gradient; unlike
the paper there are no extra iterations fed only the previous mask, and
`prompt_iters` is small (default 3 instead of 11) to keep steps cheap.

Validation (`evaluate`): one positive point at each GT mask's interior-most pixel
(most confident multimask output) and the tight GT box (single output); the best
checkpoint is the one with the highest mean of the two mIoUs.

Everything random is a pure function of (seed, step): the image order is one
permutation per epoch drawn from `(seed, epoch)`, instance choice and flips from
`(seed, sample index)`, prompts from `fold_in(PRNGKey(seed), step)`. A checkpoint
therefore only needs params, optimizer state and the step to resume bit-exactly;
the data cursor is stored next to them and checked on resume.

Layout of an output folder:

  OUT/run.json             model + training config, data fingerprints
  OUT/checkpoints/<step>/  Orbax CheckpointManager: last `keep_last` + best val mIoU
  OUT/log.json             training and validation curves (JSON)
  OUT/curves.png           the same, plotted
  OUT/best/                best params as a samjax checkpoint (`samjax.load_params`)

The package, one concern per module:

  config       TrainConfig (jax-free, read by the CLI), output folder names
  losses       focal, dice, mask IoU, SAM's min-over-outputs loss
  data         CocoInstances, Example / prepare_example, data order, host batches
  prompts      points from masks and error regions, box jitter (traceable)
  optim        init_params, learning-rate schedule, AdamW on the trainable parts
  step         the loss over prompt iterations and the compiled train step
  embeddings   a frozen encoder's embeddings, in memory or as an on-disk cache
  evaluation   EvalSet, build_eval_set, evaluate (point / box mIoU)
  checkpoints  the Orbax CheckpointManager, restore, resume checks
  plots        curves.png, progress bars
  loop         finetune, FinetuneResult
  export       export_torch (samjax checkpoint -> official .pth)

Compilation and placement go through `samjax.Runtime` (built from the model config,
`TrainConfig.dtype`, `TrainConfig.attention` and the mesh); nothing here jits the
encoder itself.

CLI: `samjax finetune ...` and `samjax export-torch CKPT OUT.pth` (samjax.cli.finetune,
samjax.cli.export_torch); `python -m samjax.train {finetune,export-torch} ...` is the
same. The public names below are imported on first use (PEP 562), so the command
line can read `samjax.train.config` without importing jax.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "samjax.train.config", "TRAINABLE_PARTS": "samjax.train.config",
    "DTYPES": "samjax.train.config", "LOSS_RESOLUTIONS": "samjax.train.config",
    "sigmoid_focal_loss": "samjax.train.losses", "dice_loss": "samjax.train.losses",
    "mask_iou": "samjax.train.losses", "sam_loss": "samjax.train.losses",
    "CocoInstances": "samjax.train.data", "Example": "samjax.train.data",
    "prepare_example": "samjax.train.data", "interior_point": "samjax.train.data",
    "PAD_LABEL": "samjax.train.prompts",
    "init_params": "samjax.train.optim", "trainable_labels": "samjax.train.optim",
    "learning_rate_schedule": "samjax.train.optim", "make_optimizer": "samjax.train.optim",
    "init_train_state": "samjax.train.step", "train_step_fn": "samjax.train.step",
    "make_runtime": "samjax.train.step",
    "compute_embeddings": "samjax.train.embeddings",
    "MAX_IN_MEMORY_EMBEDDINGS_GIB": "samjax.train.embeddings",
    "EvalSet": "samjax.train.evaluation", "build_eval_set": "samjax.train.evaluation",
    "evaluate": "samjax.train.evaluation",
    "plot_curves": "samjax.train.plots",
    "FinetuneResult": "samjax.train.loop", "finetune": "samjax.train.loop",
    "export_torch": "samjax.train.export",
    "main": "samjax.train.__main__",
}
# Older homes of the command-line functions (now samjax.cli.finetune / export_torch).
_CLI_ALIASES = {
    "add_finetune_arguments": ("samjax.cli.finetune", "add_arguments"),
    "train_config_from_args": ("samjax.cli.finetune", "train_config_from_args"),
    "run_finetune": ("samjax.cli.finetune", "run"),
    "add_export_torch_arguments": ("samjax.cli.export_torch", "add_arguments"),
    "run_export_torch": ("samjax.cli.export_torch", "run"),
}

__all__ = sorted(_EXPORTS) + sorted(_CLI_ALIASES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in _CLI_ALIASES:
    module, attr = _CLI_ALIASES[name]
    value = getattr(importlib.import_module(module), attr)
  else:
    raise AttributeError(f"module 'samjax.train' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
