"""`TrainConfig`: the hyper-parameters of a fine-tuning run, and the output layout.

Importing this module imports neither jax nor numpy, so the command line can build
`samjax finetune --help` (whose defaults are read from here) without them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

TRAINABLE_PARTS = {
    "decoder": ("mask_decoder",),
    "prompt_decoder": ("prompt_encoder", "mask_decoder"),
    "all": ("image_encoder", "prompt_encoder", "mask_decoder"),
}
DTYPES = ("float32", "bfloat16")  # names of jax.numpy compute dtypes
LOSS_RESOLUTIONS = ("low_res", "input")

# Layout of a fine-tuning output folder (see `samjax.train`).
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_FILE = "log.json"
PLOT_FILE = "curves.png"
RUN_FILE = "run.json"

# Fields that do not change the sequence of parameters: they are neither checked on
# resume nor part of the train step's compile key.
_NOT_TRAJECTORY = ("eval_every", "save_every", "keep_last", "log_every", "val_max_images",
                   "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of a fine-tuning run (hashable: used as a jit cache key).

  Attributes:
    train: what trains: "decoder" (mask decoder only), "prompt_decoder" (prompt
      encoder + mask decoder) or "all". Frozen parts receive no updates at all; with
      a frozen image encoder embeddings are computed once per image and cached.
    lr: peak learning rate of AdamW.
    warmup_steps: linear warmup from 0 to `lr`, then cosine decay to
      `lr * end_lr_ratio` at `total_steps`.
    total_steps: optimizer steps of the whole run.
    end_lr_ratio: final learning rate over peak.
    weight_decay: AdamW decoupled weight decay (matrices only; biases, norms are not
      decayed).
    grad_clip_norm: `optax.clip_by_global_norm` threshold over the trainable
      gradients; 0 disables clipping.
    adam_b1, adam_b2: Adam moment decay rates.
    batch_size: images per step (split over the devices of the data mesh).
    instances_per_image: instance slots per image; images with fewer instances are
      padded with masked slots, images with more contribute a random subset.
    prompt_iters: predictions per instance and step: 1 first prompt + corrections.
    box_fraction: share of each image's instance slots whose first prompt is a box.
    box_noise: std of the box jitter as a fraction of the box side.
    box_noise_max: maximal box jitter, in input-frame pixels.
    focal_weight, dice_weight, iou_weight: loss weights (SAM paper: 20, 1, 1).
    focal_alpha, focal_gamma: focal loss parameters.
    loss_resolution: "low_res" (4h x 4w logits vs downsampled GT) or "input"
      (upsampled logits vs GT in the S x S model input frame).
    dtype: compute dtype, "float32" or "bfloat16" (params and optimizer state stay
      float32; losses are computed in float32).
    attention: the image encoder's attention kernels, as `samjax.Runtime` takes them:
      "auto" (resolved for the devices of the run), a kernel name, or
      "WINDOWED/GLOBAL" (see `samjax.modeling.attention`). Every kernel computes the
      same function, but not to the same bits, so it is part of the trajectory.
    seed: seeds data order, instance choice, flips and prompt sampling.
    eval_every: validate every this many steps; 0 = once per epoch. Always at the
      first and last step.
    save_every: checkpoint every this many steps (plus every validation step and
      the last step).
    keep_last: checkpoints kept besides the best one by validation mIoU.
    log_every: steps between training-loss log records.
    hflip: random horizontal flips (needs `train="all"`: cached embeddings of a
      frozen encoder cannot be flipped).
    val_max_images: validate on the first N validation images only (None: all).
    eval_batch_size: images per encoder call during validation / caching.
  """

  train: str = "decoder"
  lr: float = 1e-4
  warmup_steps: int = 50
  total_steps: int = 1000
  end_lr_ratio: float = 0.01
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  batch_size: int = 4
  instances_per_image: int = 8
  prompt_iters: int = 3
  box_fraction: float = 0.5
  box_noise: float = 0.1
  box_noise_max: float = 20.0
  focal_weight: float = 20.0
  dice_weight: float = 1.0
  iou_weight: float = 1.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  loss_resolution: str = "low_res"
  dtype: str = "float32"
  attention: str = "auto"
  seed: int = 0
  eval_every: int = 0
  save_every: int = 500
  keep_last: int = 3
  log_every: int = 10
  hflip: bool = False
  val_max_images: Optional[int] = None
  eval_batch_size: int = 8

  def __post_init__(self):
    if self.train not in TRAINABLE_PARTS:
      raise ValueError(f"train must be one of {sorted(TRAINABLE_PARTS)}, got {self.train!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.loss_resolution not in LOSS_RESOLUTIONS:
      raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, got "
                       f"{self.loss_resolution!r}")
    # The kernel names themselves are checked by the Runtime, which knows the devices.
    if not isinstance(self.attention, str) or not self.attention.strip():
      raise ValueError(f"attention must be 'auto', a kernel name or 'WINDOWED/GLOBAL', got "
                       f"{self.attention!r}")
    for name in ("total_steps", "batch_size", "instances_per_image", "prompt_iters",
                 "save_every", "keep_last", "log_every", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"warmup_steps must be in [0, total_steps), got {self.warmup_steps}")
    if not 0.0 <= self.box_fraction <= 1.0:
      raise ValueError(f"box_fraction must be in [0, 1], got {self.box_fraction}")
    if self.eval_every < 0:
      raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
    if self.hflip and self.train != "all":
      raise ValueError("hflip needs train='all': a frozen image encoder's embeddings are "
                       "cached per image and cannot be flipped")

  @property
  def compute_dtype(self):
    """The jax.numpy dtype named by `dtype` (jnp.float32 or jnp.bfloat16)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return getattr(jnp, self.dtype)

  @property
  def num_box_slots(self) -> int:
    """Instance slots per image whose first prompt is a box (static)."""
    return int(round(self.instances_per_image * self.box_fraction))

  @property
  def encoder_frozen(self) -> bool:
    return "image_encoder" not in TRAINABLE_PARTS[self.train]

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def trajectory_dict(self) -> Dict[str, Any]:
    """The fields that determine the sequence of parameters (checked on resume)."""
    return {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAJECTORY}

  def trajectory_only(self) -> "TrainConfig":
    """This config with the non-trajectory fields at their defaults.

    The compile key of the train step: runs differing only in eval/save/log settings
    (e.g. a resumed run started from the CLI) share one compilation.
    """
    default = TrainConfig()
    return dataclasses.replace(self, **{k: getattr(default, k) for k in _NOT_TRAJECTORY})
