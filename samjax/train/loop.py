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

CLI: `python -m samjax.train finetune ...` and `python -m samjax.train export-torch
CKPT OUT.pth` (also wired as `samjax finetune` / `samjax export-torch`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from samjax import mesh as mesh_lib
from samjax.config import SamConfig
from samjax.functional import decode_masks, encode_image
from samjax.resize import resize_bilinear
from samjax.transforms import ResizeLongestSide

TRAINABLE_PARTS = {
    "decoder": ("mask_decoder",),
    "prompt_decoder": ("prompt_encoder", "mask_decoder"),
    "all": ("image_encoder", "prompt_encoder", "mask_decoder"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOSS_RESOLUTIONS = ("low_res", "input")
PAD_LABEL = -2  # absent point slot, masked exactly by the prompt encoder
# Beyond this a frozen encoder's embeddings must go to an on-disk cache (ViT-B/L/H
# embeddings are 4 MiB per image).
MAX_IN_MEMORY_EMBEDDINGS_GIB = 16.0

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_FILE = "log.json"
PLOT_FILE = "curves.png"
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------
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
    return DTYPES[self.dtype]

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
    skip = {"eval_every", "save_every", "keep_last", "log_every", "val_max_images",
            "eval_batch_size"}
    return {k: v for k, v in self.to_dict().items() if k not in skip}


# ----------------------------------------------------------------------------------------
# Losses (all reduce the last two axes, i.e. one value per mask).
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Data: COCO reading and preparation in the model input frame.
# ----------------------------------------------------------------------------------------
class CocoInstances:
  """Random access to a COCO instance-segmentation file.

  `dataset[i]` is `(image uint8 (H, W, 3) RGB, masks bool (N, H, W))` for the i-th
  image (sorted by id) that has at least one non-crowd instance; polygons, RLE and
  uncompressed RLE are all decoded by pycocotools.
  """

  def __init__(self, annotations_json: str | os.PathLike,
               image_dir: Optional[str | os.PathLike] = None):
    from pycocotools.coco import COCO
    self.annotations_json = str(annotations_json)
    if image_dir is None:
      image_dir = Path(self.annotations_json).absolute().parent / "images"
    self.image_dir = str(image_dir)
    if not os.path.isfile(self.annotations_json):
      raise FileNotFoundError(f"annotation file not found: {self.annotations_json}")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
      self.coco = COCO(self.annotations_json)
    self.image_ids = []
    self._anns: Dict[int, List[int]] = {}
    for image_id in sorted(self.coco.getImgIds()):
      anns = [a["id"] for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
              if not a.get("iscrowd", 0)]
      if anns:
        self.image_ids.append(image_id)
        self._anns[image_id] = anns
    h = hashlib.sha256()
    with open(self.annotations_json, "rb") as f:
      while block := f.read(1 << 20):
        h.update(block)
    self.fingerprint = h.hexdigest()[:16]

  def __len__(self) -> int:
    return len(self.image_ids)

  def image(self, i: int) -> np.ndarray:
    from PIL import Image
    info = self.coco.loadImgs(self.image_ids[i])[0]
    with Image.open(os.path.join(self.image_dir, info["file_name"])) as im:
      return np.array(im.convert("RGB"))

  def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
    image = self.image(i)
    info = self.coco.loadImgs(self.image_ids[i])[0]
    h, w = image.shape[:2]
    if (info["height"], info["width"]) != (h, w):
      raise ValueError(f"{info['file_name']} is {h}x{w} but the annotations say "
                       f"{info['height']}x{info['width']}")
    anns = self.coco.loadAnns(self._anns[self.image_ids[i]])
    masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns])
    return image, masks


def _dataset_image(dataset, i: int) -> np.ndarray:
  return dataset.image(i) if hasattr(dataset, "image") else dataset[i][0]


def _dataset_fingerprint(dataset) -> str:
  return getattr(dataset, "fingerprint", f"len{len(dataset)}")


@dataclasses.dataclass
class Example:
  """One image and its instances in the S x S model input frame.

  Attributes:
    image: (S, S, 3) uint8, resized so the long side is S, zero-padded.
    valid_hw: (h, w) of the un-padded part.
    masks: (N, S, S) bool GT masks (instances that vanish when resized dropped).
    boxes: (N, 4) float32 tight xyxy boxes in input-frame pixels (inclusive).
  """

  image: np.ndarray
  valid_hw: Tuple[int, int]
  masks: np.ndarray
  boxes: np.ndarray


def prepare_example(image: np.ndarray, masks: np.ndarray, image_size: int,
                    hflip: bool = False) -> Example:
  """Resizes an image (Pillow bilinear, as the predictor) and its masks (nearest)."""
  if hflip:
    image, masks = image[:, ::-1], masks[:, :, ::-1]
  h0, w0 = image.shape[:2]
  h, w = ResizeLongestSide.get_preprocess_shape(h0, w0, image_size)
  img = np.zeros((image_size, image_size, 3), np.uint8)
  img[:h, :w] = ResizeLongestSide(image_size).apply_image(np.ascontiguousarray(image))
  out = np.zeros((len(masks), image_size, image_size), bool)
  for j, m in enumerate(masks):
    m = np.ascontiguousarray(m, np.uint8)
    out[j, :h, :w] = m if (h, w) == (h0, w0) else cv2.resize(
        m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
  keep = out.any(axis=(1, 2))
  out = out[keep]
  boxes = np.zeros((len(out), 4), np.float32)
  for j, m in enumerate(out):
    ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    boxes[j] = (xs[0], ys[0], xs[-1], ys[-1])
  return Example(img, (h, w), out, boxes)


def interior_point(mask: np.ndarray) -> Tuple[float, float]:
  """(x, y) of the pixel farthest from the mask's boundary (image border counts)."""
  padded = np.pad(mask.astype(np.uint8), 1)
  dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
  y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
  return float(x), float(y)


class _DataOrder:
  """Which image (and flip / instance choice) the k-th sample of the run is.

  Epoch e visits all images in the order `permutation(seed, e)`; the sample index
  is `step * batch_size + j`, so the order depends on nothing but the seed.
  """

  def __init__(self, n: int, seed: int):
    if n == 0:
      raise ValueError("the training set has no image with an instance")
    self.n, self.seed = n, seed
    self._perms: Dict[int, np.ndarray] = {}

  def image_index(self, sample: int) -> int:
    epoch, pos = divmod(sample, self.n)
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
    return int(self._perms[epoch][pos])

  def sample_rng(self, sample: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, 2, sample])


def _train_batch(dataset, order: _DataOrder, step: int, tc: TrainConfig, config: SamConfig,
                 embeddings: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
  """Host arrays for one step; a pure function of (dataset, seed, step)."""
  b, k, s = tc.batch_size, tc.instances_per_image, config.image_size
  out = {"valid_hw": np.zeros((b, 2), np.int32), "gt": np.zeros((b, k, s, s), np.uint8),
         "boxes": np.zeros((b, k, 4), np.float32), "inst_valid": np.zeros((b, k), bool)}
  if embeddings is None:
    out["images"] = np.zeros((b, s, s, 3), np.uint8)
  else:
    out["embeddings"] = np.zeros((b, *embeddings.shape[1:]), np.float32)
  for j in range(b):
    sample = step * b + j
    idx = order.image_index(sample)
    rng = order.sample_rng(sample)
    flip = bool(tc.hflip and rng.random() < 0.5)
    image, masks = dataset[idx]
    ex = prepare_example(image, masks, s, flip)
    chosen = rng.permutation(len(ex.masks))[:k]
    n = len(chosen)
    out["valid_hw"][j] = ex.valid_hw
    out["gt"][j, :n] = ex.masks[chosen]
    out["boxes"][j, :n] = ex.boxes[chosen]
    out["inst_valid"][j, :n] = True
    if embeddings is None:
      out["images"][j] = ex.image
    else:
      out["embeddings"][j] = embeddings[idx]
  return out


# ----------------------------------------------------------------------------------------
# Parameters and optimizer.
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _init_fn(config: SamConfig):
  # Compiling init costs as much as a forward pass: compile once per config.
  from samjax.modeling import Sam
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
  import optax
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
      decay_steps=tc.total_steps, end_value=tc.lr * tc.end_lr_ratio)


def make_optimizer(tc: TrainConfig):
  """AdamW (+ global-norm clipping) on the trainable parts, `set_to_zero` on the rest."""
  import optax
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  inner = [optax.clip_by_global_norm(tc.grad_clip_norm)] if tc.grad_clip_norm > 0 else []
  inner.append(optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.multi_transform(
      {"train": optax.chain(*inner), "frozen": optax.set_to_zero()},
      functools.partial(trainable_labels, train=tc.train))


# ----------------------------------------------------------------------------------------
# The jitted train step.
# ----------------------------------------------------------------------------------------
def _sample_from_mask(key, mask: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Uniform pixel of each (S, S) mask -> xy (n, 2) float32, flat index, any (n,)."""
  n, s = mask.shape[0], mask.shape[-1]
  flat = mask.reshape(n, -1)
  # Inverse-CDF sampling: one uniform per mask instead of one per pixel (Gumbel-max
  # over S*S pixels costs more than the decoder on a CPU). The r-th set pixel, with r
  # uniform in [0, count), is the number of prefix counts <= r.
  counts = jnp.cumsum(flat.astype(jnp.int32), axis=-1)
  total = counts[:, -1]
  r = jnp.floor(jax.random.uniform(key, (n,)) * total).astype(jnp.int32)
  r = jnp.minimum(r, jnp.maximum(total - 1, 0))
  idx = jnp.sum(counts <= r[:, None], axis=-1)
  idx = jnp.where(total > 0, idx, 0)  # an empty mask yields pixel 0 and ok=False
  xy = jnp.stack([idx % s, idx // s], axis=-1).astype(jnp.float32)
  return xy, idx, total > 0


def _jitter_boxes(key, boxes: jax.Array, valid_hw: jax.Array, tc: TrainConfig) -> jax.Array:
  """Noisy boxes: each coordinate + N(0, (box_noise * side)^2), clipped to the limit."""
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  std = tc.box_noise * jnp.stack([w, h, w, h], axis=-1)
  noise = jnp.clip(jax.random.normal(key, boxes.shape) * std, -tc.box_noise_max,
                   tc.box_noise_max)
  hi = jnp.stack([valid_hw[:, 1], valid_hw[:, 0]] * 2, axis=-1).astype(jnp.float32) - 1
  b = jnp.clip(boxes + noise, 0.0, hi)
  return jnp.stack([jnp.minimum(b[:, 0], b[:, 2]), jnp.minimum(b[:, 1], b[:, 3]),
                    jnp.maximum(b[:, 0], b[:, 2]), jnp.maximum(b[:, 1], b[:, 3])], axis=-1)


def _valid_region(valid_hw: jax.Array, s: int) -> jax.Array:
  """(n, S, S) bool: pixels inside the un-padded image."""
  rows = jnp.arange(s)[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(s)[None, None, :] < valid_hw[:, 1, None, None]
  return rows & cols


def _group_losses(params, emb, gt, valid_hw, boxes, key, *, use_box: bool,
                  config: SamConfig, tc: TrainConfig) -> Dict[str, jax.Array]:
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
  n, s = gt.shape[0], config.image_size
  dtype = tc.compute_dtype
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
    box = _jitter_boxes(k_first, boxes, valid_hw, tc)
  else:
    xy, _, ok = _sample_from_mask(k_first, gt)
    points = points.at[:, 0].set(xy)
    labels = labels.at[:, 0].set(jnp.where(ok, 1, PAD_LABEL))
  dec = functools.partial(decode_masks, params, emb, config=config, dtype=dtype)
  logits, iou_pred = dec(points if n_points else None, labels if n_points else None, box,
                         None, multimask_output=not use_box)
  first = losses(logits, iou_pred)
  stats = {k: first[k] for k in ("loss", "focal", "dice", "iou_mse")}
  iou_first = first["iou"]
  prev = chosen_low_res(logits, first["best"])
  valid = _valid_region(valid_hw, s)
  flat_gt = gt.reshape(n, -1)

  def correction(carry, xs):
    points, labels, prev = carry
    it_key, slot = xs
    pred = resize_bilinear(prev, (s, s)) > 0
    err = (gt & ~pred) | (pred & ~gt & valid)
    xy, idx, ok = _sample_from_mask(it_key, err)
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


def _loss_fn(params, batch, key, config: SamConfig, tc: TrainConfig):
  """Mean loss over valid instance slots, and metrics.

  Args:
    params: full SAM params (frozen parts are wrapped in stop_gradient here).
    batch: `_train_batch` arrays: valid_hw (B, 2), gt (B, K, S, S) uint8, boxes
      (B, K, 4), inst_valid (B, K), and images (B, S, S, 3) uint8 or embeddings
      (B, h, w, C).
    key: PRNG key of this step.

  Returns:
    (loss scalar, metrics dict of scalars).
  """
  parts = TRAINABLE_PARTS[tc.train]
  # Frozen parts are constants: no backward pass through them at all.
  params = {k: (v if k in parts else jax.lax.stop_gradient(v)) for k, v in params.items()}
  valid_hw = batch["valid_hw"]
  if "images" in batch:
    emb = encode_image(params, batch["images"], config, tc.compute_dtype, valid_hw)
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
    st = _group_losses(params, flat(emb_i, sl), flat(gt, sl), flat(hw_i, sl),
                       flat(batch["boxes"], sl), g_key, use_box=use_box, config=config, tc=tc)
    stats.append(st)
    weights.append(flat(batch["inst_valid"], sl).astype(jnp.float32))
  w = jnp.concatenate(weights)
  denom = jnp.maximum(w.sum(), 1.0)
  metrics = {name: jnp.sum(jnp.concatenate([st[name] for st in stats]) * w) / denom
             for name in stats[0]}
  metrics["instances"] = w.sum()
  return metrics["loss"], metrics


def _train_step_fn(config: SamConfig, tc: TrainConfig, mesh):
  """jit(state, batch) -> (state, metrics); state = {params, opt_state, step}."""
  # Eval/save/log settings do not enter the step: runs differing only in them (e.g. a
  # resumed run started from the CLI) share one compilation.
  default = TrainConfig()
  return _compiled_train_step(config, dataclasses.replace(
      tc, **{k: getattr(default, k) for k in tc.to_dict() if k not in tc.trajectory_dict()}),
      mesh)


@functools.lru_cache(maxsize=16)
def _compiled_train_step(config: SamConfig, tc: TrainConfig, mesh):
  import optax
  tx = make_optimizer(tc)
  base_key = jax.random.PRNGKey(tc.seed)

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], batch, key, config, tc)
    parts = TRAINABLE_PARTS[tc.train]
    metrics["grad_norm"] = optax.global_norm({k: v for k, v in grads.items() if k in parts})
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  repl, shard = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  return jax.jit(step_fn, in_shardings=(repl, shard), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def init_train_state(params, tc: TrainConfig, mesh) -> Dict[str, Any]:
  """Fresh {params, opt_state, step} replicated over `mesh`."""
  params = mesh_lib.replicate(jax.tree_util.tree_map(jnp.asarray, params), mesh)
  opt_state = jax.jit(make_optimizer(tc).init, out_shardings=mesh_lib.replicated(mesh))(params)
  return {"params": params, "opt_state": opt_state,
          "step": mesh_lib.replicate(jnp.zeros((), jnp.int32), mesh)}


# ----------------------------------------------------------------------------------------
# Image embeddings and validation.
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _encode_fn(config: SamConfig, dtype_name: str, mesh):
  shard = mesh_lib.batch_sharded(mesh)
  fn = lambda params, images, hw: encode_image(params, images, config, DTYPES[dtype_name], hw
                                               ).astype(jnp.float32)
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh), shard, shard),
                 out_shardings=shard)


def compute_embeddings(params, images: Sequence[np.ndarray], config: SamConfig,
                       dtype: str = "float32", mesh=None, batch_size: int = 8,
                       out: Optional[np.ndarray] = None, progress: bool = False
                       ) -> np.ndarray:
  """Image embeddings (N, h, w, C) float32 of raw images, in batches.

  Args:
    images: sequence of uint8 (H, W, 3) images (any size; resized like the predictor).
    out: optional preallocated (N, h, w, C) array (e.g. a np.memmap) to fill.
  """
  mesh = mesh or mesh_lib.data_mesh()
  fn = _encode_fn(config, dtype, mesh)
  s, e, c = config.image_size, config.embedding_size, config.prompt_embed_dim
  n = len(images)
  if out is None:
    out = np.zeros((n, e, e, c), np.float32)
  bar = _progress(total=n, desc="embeddings", unit="img", enabled=progress)
  for start in range(0, n, batch_size):
    idx = range(start, min(n, start + batch_size))
    imgs = np.zeros((len(idx), s, s, 3), np.uint8)
    hws = np.zeros((len(idx), 2), np.int32)
    for j, i in enumerate(idx):
      ex = prepare_example(images[i], np.zeros((0, 1, 1), bool), s)
      imgs[j], hws[j] = ex.image, ex.valid_hw
    m = mesh.devices.size
    emb = fn(params, *mesh_lib.shard_batch((mesh_lib.pad_to_multiple(imgs, m),
                                            mesh_lib.pad_to_multiple(hws, m)), mesh))
    out[start:start + len(idx)] = np.asarray(emb)[:len(idx)]
    bar.update(len(idx))
  bar.close()
  return out


class _LazyImages:
  """`Sequence` of a dataset's images only (no mask decoding)."""

  def __init__(self, dataset):
    self.dataset = dataset

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    return _dataset_image(self.dataset, i)


@dataclasses.dataclass
class EvalSet:
  """Validation instances in the input frame, with their fixed prompts.

  Attributes:
    images: raw images (for re-encoding while the encoder trains).
    inst_image: (M,) index of each instance's image.
    gt: (M, S, S) bool masks in the input frame.
    valid_hw: (M, 2) un-padded size of the instance's image.
    points: (M, 2) interior-most point (max of the distance transform), xy.
    boxes: (M, 4) tight xyxy boxes.
  """

  images: List[np.ndarray]
  inst_image: np.ndarray
  gt: np.ndarray
  valid_hw: np.ndarray
  points: np.ndarray
  boxes: np.ndarray

  def __len__(self) -> int:
    return len(self.inst_image)


def build_eval_set(dataset, config: SamConfig, max_images: Optional[int] = None) -> EvalSet:
  """Prepares every instance of the first `max_images` images of `dataset`."""
  n = len(dataset) if max_images is None else min(len(dataset), max_images)
  images, inst_image, gt, hw, points, boxes = [], [], [], [], [], []
  for i in range(n):
    image, masks = dataset[i]
    ex = prepare_example(image, masks, config.image_size)
    images.append(image)
    for m, box in zip(ex.masks, ex.boxes):
      inst_image.append(i)
      gt.append(m)
      hw.append(ex.valid_hw)
      points.append(interior_point(m))
      boxes.append(box)
  s = config.image_size
  return EvalSet(images, np.asarray(inst_image, np.int32),
                 np.asarray(gt, bool).reshape(-1, s, s), np.asarray(hw, np.int32).reshape(-1, 2),
                 np.asarray(points, np.float32).reshape(-1, 2),
                 np.asarray(boxes, np.float32).reshape(-1, 4))


@functools.lru_cache(maxsize=16)
def _eval_fn(config: SamConfig, dtype_name: str, mesh):
  s = config.image_size

  def fn(params, emb, points, boxes, gt, valid_hw):
    n = points.shape[0]
    dec = functools.partial(decode_masks, params, emb, config=config,
                            dtype=DTYPES[dtype_name])
    lp, ip = dec(points[:, None], jnp.ones((n, 1), jnp.int32), None, None,
                 multimask_output=True)
    # A single point is ambiguous: take the mask the model is most confident in.
    lp = jnp.take_along_axis(lp, jnp.argmax(ip, axis=1)[:, None, None, None], axis=1)
    lb, _ = dec(None, None, boxes, None, multimask_output=False)
    pred = resize_bilinear(jnp.concatenate([lp, lb], axis=1), (s, s)) > 0
    pred = pred & _valid_region(valid_hw, s)[:, None]
    g = gt[:, None]
    inter = jnp.sum(pred & g, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | g, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)  # (n, 2)

  shard = mesh_lib.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(mesh_lib.replicated(mesh),) + (shard,) * 5,
                 out_shardings=shard)


def evaluate(params, config: SamConfig, eval_set: EvalSet, dtype: str = "float32",
             embeddings: Optional[np.ndarray] = None, mesh=None, chunk: int = 32,
             batch_size: int = 8) -> Dict[str, float]:
  """Validation mIoU with a single positive interior point and with the tight box.

  IoUs are measured in the model input frame (GT resized with nearest neighbour):
  the point prompt's most confident multimask output and the box prompt's single
  output, upsampled bilinearly and thresholded at 0.

  Args:
    params: SAM params.
    eval_set: from `build_eval_set`.
    embeddings: (num images, h, w, C) precomputed embeddings, or None to encode.

  Returns:
    {"point_miou", "box_miou", "miou" (their mean), "instances"}.
  """
  mesh = mesh or mesh_lib.data_mesh()
  if len(eval_set) == 0:
    return {"point_miou": float("nan"), "box_miou": float("nan"), "miou": float("nan"),
            "instances": 0}
  if embeddings is None:
    embeddings = compute_embeddings(params, eval_set.images, config, dtype, mesh, batch_size)
  fn = _eval_fn(config, dtype, mesh)
  m = mesh.devices.size
  chunk = -(-chunk // m) * m
  ious = []
  for start in range(0, len(eval_set), chunk):
    sl = slice(start, start + chunk)
    arrays = (embeddings[eval_set.inst_image[sl]], eval_set.points[sl], eval_set.boxes[sl],
              eval_set.gt[sl], eval_set.valid_hw[sl])
    n = len(arrays[1])
    arrays = tuple(mesh_lib.pad_to_multiple(a, chunk) for a in arrays)
    ious.append(np.asarray(fn(params, *mesh_lib.shard_batch(arrays, mesh)))[:n])
  iou = np.concatenate(ious)
  point, box = float(iou[:, 0].mean()), float(iou[:, 1].mean())
  return {"point_miou": point, "box_miou": box, "miou": 0.5 * (point + box),
          "instances": int(len(iou))}


# ----------------------------------------------------------------------------------------
# Checkpointing, logging, plotting.
# ----------------------------------------------------------------------------------------
def _best_metric(metrics) -> float:
  return float(metrics["miou"])


class _NoMetricsWarningFilter(logging.Filter):
  """Drops orbax's warning for checkpoints saved between validations (no metrics)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


def _checkpoint_manager(directory: Path, keep_last: int):
  import orbax.checkpoint as ocp
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoMetricsWarningFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_NoMetricsWarningFilter())
  from orbax.checkpoint import checkpoint_managers as cm
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep_last),
      cm.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
               keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_best_metric, best_mode="max",
      enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(directory.absolute(), item_names=("state", "meta"),
                               options=options)


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _atomic_write_text(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def plot_curves(log: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Training loss and validation mIoU against step, as a PNG (matplotlib Agg)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  train = log.get("train", [])
  if train:
    steps = [r["step"] for r in train]
    ax1.plot(steps, [r["loss"] for r in train], lw=0.8, label="loss")
    ax1.plot(steps, [r["focal"] * log["train_config"]["focal_weight"] for r in train], lw=0.8,
             label="focal (weighted)")
    ax1.plot(steps, [r["dice"] for r in train], lw=0.8, label="dice")
    ax1.plot(steps, [r["iou_mse"] for r in train], lw=0.8, label="iou mse")
    ax1.set_yscale("log")
  ax1.set_xlabel("step")
  ax1.set_title("training loss")
  if train:
    ax1.legend(fontsize=8)
  ev = log.get("eval", [])
  if ev:
    steps = [r["step"] for r in ev]
    ax2.plot(steps, [r["point_miou"] for r in ev], "o-", label="val: 1 point (most confident)")
    ax2.plot(steps, [r["box_miou"] for r in ev], "s-", label="val: box")
  if train:
    ax2.plot([r["step"] for r in train], [r["iou_last"] for r in train], lw=0.6, alpha=0.6,
             label="train IoU, last prompt iter")
  ax2.set_ylim(0, 1)
  ax2.set_xlabel("step")
  ax2.set_title("mIoU")
  if ev or train:
    ax2.legend(fontsize=8)
  fig.tight_layout()
  tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def _progress(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
  from tqdm import tqdm
  tty = sys.stderr.isatty()
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
              dynamic_ncols=True, mininterval=0.5 if tty else 30.0)


# ----------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------
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


class _Prefetcher:
  """Builds the batch of step s + 1 in a thread while step s runs."""

  def __init__(self, make: Callable[[int], Dict[str, np.ndarray]]):
    self.make = make
    self.pool = concurrent.futures.ThreadPoolExecutor(1)
    self.pending: Dict[int, concurrent.futures.Future] = {}

  def get(self, step: int, last: int):
    fut = self.pending.pop(step, None) or self.pool.submit(self.make, step)
    if step + 1 < last:
      self.pending[step + 1] = self.pool.submit(self.make, step + 1)
    return fut.result()

  def close(self):
    for f in self.pending.values():
      f.cancel()
    self.pool.shutdown(wait=True)


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
    out_dir: output folder (see the module docstring for its layout).
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
  out.mkdir(parents=True, exist_ok=True)
  mesh = mesh or mesh_lib.data_mesh()
  n_dev = mesh.devices.size
  if tc.batch_size % n_dev:
    raise ValueError(f"batch_size {tc.batch_size} does not split over {n_dev} devices")
  order = _DataOrder(len(train_data), tc.seed)
  data_fp = _dataset_fingerprint(train_data)

  mngr = _checkpoint_manager(out / CHECKPOINT_DIR, tc.keep_last)
  try:
    state = init_train_state(params, tc, mesh)
    start = 0
    log: Dict[str, Any] = {"train_config": tc.to_dict(), "model_config": config.to_dict(),
                           "train": [], "eval": [], "runs": []}
    latest = mngr.latest_step()
    if latest is not None:
      if not resume:
        raise FileExistsError(f"{out} already has checkpoints (latest step {latest}); resume "
                              "it or choose another output folder")
      state, meta = _restore(mngr, latest, state)
      _check_resume(meta, tc, config, len(train_data), data_fp)
      start = int(meta["step"])
      if (out / LOG_FILE).exists():
        log = json.loads((out / LOG_FILE).read_text())
        # Records written after the checkpoint will be produced again, identically.
        log["train"] = [r for r in log["train"] if r["step"] <= start]
        log["eval"] = [r for r in log["eval"] if r["step"] <= start]
      log_fn(f"resuming {out} at step {start} of {tc.total_steps}")
    _atomic_write_text(out / RUN_FILE, json.dumps({
        "train_config": tc.to_dict(), "model_config": config.to_dict(), "init": init_source,
        "train_data": {"images": len(train_data), "fingerprint": data_fp},
        "val_data": None if val_data is None else {"images": len(val_data),
                                                   "fingerprint": _dataset_fingerprint(val_data)},
        "devices": n_dev}, indent=2) + "\n")

    # Frozen encoder: embeddings once per image, computed with the (fixed) encoder.
    train_emb = val_emb = None
    eval_set = build_eval_set(val_data, config, tc.val_max_images) if val_data is not None \
        else None
    if tc.encoder_frozen:
      train_emb = _cached_embeddings(state["params"], train_data, config, tc, mesh,
                                     embedding_cache_dir, progress, "train", log_fn)
      if eval_set is not None:
        val_emb = compute_embeddings(state["params"], eval_set.images, config, tc.dtype, mesh,
                                     tc.eval_batch_size)

    steps_per_epoch = math.ceil(len(train_data) / tc.batch_size)
    eval_every = tc.eval_every or steps_per_epoch

    def run_eval(step: int) -> Optional[Dict[str, float]]:
      if eval_set is None:
        return None
      t0 = time.time()
      r = evaluate(state["params"], config, eval_set, tc.dtype, val_emb, mesh,
                   batch_size=tc.eval_batch_size)
      rec = {"step": step, **r, "eval_s": round(time.time() - t0, 2)}
      log["eval"].append(rec)
      log_fn(f"step {step}: val point mIoU {r['point_miou']:.4f}, box mIoU "
             f"{r['box_miou']:.4f} ({r['instances']} instances)")
      return r

    def save(step: int, metrics: Optional[Dict[str, float]]) -> None:
      meta = {"step": step, "samples_seen": step * tc.batch_size,
              "epoch": step * tc.batch_size // len(train_data),
              "epoch_position": step * tc.batch_size % len(train_data),
              "num_train_images": len(train_data), "data_fingerprint": data_fp,
              "rng": {"seed": tc.seed, "scheme": "prompts: fold_in(PRNGKey(seed), step); data: "
                      "numpy default_rng([seed, 1, epoch]) / ([seed, 2, sample])"},
              "train_config": tc.trajectory_dict(), "model_config": config.to_dict(),
              "metrics": metrics}
      import orbax.checkpoint as ocp
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)),
                metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
                force=True)
      mngr.wait_until_finished()

    def write_log():
      _atomic_write_text(out / LOG_FILE, json.dumps(log, indent=1) + "\n")
      try:
        plot_curves(log, out / PLOT_FILE)
      except Exception as e:  # a plotting problem must never kill a training run
        log_fn(f"warning: could not plot curves: {e}")

    if start == 0:
      save(0, run_eval(0))
      write_log()

    step_fn = _train_step_fn(config, tc, mesh)
    schedule = learning_rate_schedule(tc)
    last = tc.total_steps if max_steps_this_run is None else min(
        tc.total_steps, start + max_steps_this_run)
    log["runs"].append({"start_step": start, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    prefetch = _Prefetcher(lambda s: _train_batch(train_data, order, s, tc, config, train_emb))
    bar = _progress(total=tc.total_steps, initial=start, desc="finetune", unit="step",
                    enabled=progress)
    t_run = time.time()
    t_win, win_steps, pending = time.time(), 0, []
    step = start
    try:
      while step < last:
        batch = mesh_lib.shard_batch(prefetch.get(step, last), mesh)
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
      prefetch.close()
    log["runs"][-1].update({"end_step": step, "wall_s": round(time.time() - t_run, 2)})
    write_log()

    best_step, best_metrics, best_dir = None, None, None
    finished = step >= tc.total_steps
    if eval_set is not None:
      best_step = mngr.best_step()
      best_metrics = mngr.metrics(best_step) if best_step is not None else None
    if finished:
      if best_step is not None and best_step != step:
        best_params = _restore(mngr, best_step, state)[0]["params"]
      else:
        best_step = best_step if best_step is not None else step
        best_params = state["params"]
      from samjax.checkpoint import save_params
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


def _restore(mngr, step: int, like_state):
  import orbax.checkpoint as ocp
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  return got["state"], got["meta"]


def _check_resume(meta, tc: TrainConfig, config: SamConfig, n_images: int, fp: str) -> None:
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


def _cached_embeddings(params, dataset, config: SamConfig, tc: TrainConfig, mesh,
                       cache_dir, progress: bool, name: str, log_fn) -> np.ndarray:
  """Embeddings of every training image: in memory, or a reusable .npy memmap."""
  images = _LazyImages(dataset)
  e, c = config.embedding_size, config.prompt_embed_dim
  if cache_dir is None:
    gib = len(dataset) * e * e * c * 4 / 2**30
    if gib > MAX_IN_MEMORY_EMBEDDINGS_GIB:
      raise ValueError(f"the embeddings of {len(dataset)} images need {gib:.1f} GiB; pass "
                       "an embedding cache folder (--embedding-cache DIR) to keep them on "
                       "disk")
    return compute_embeddings(params, images, config, tc.dtype, mesh, tc.eval_batch_size,
                              progress=progress)
  cache_dir = Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params["image_encoder"]):
    h.update(np.asarray(leaf).tobytes())
  key = f"{name}-{_dataset_fingerprint(dataset)}-{h.hexdigest()[:12]}-{tc.dtype}"
  path, done = cache_dir / f"{key}.npy", cache_dir / f"{key}.done"
  if path.exists() and done.exists():
    log_fn(f"using cached embeddings {path}")
    return np.load(path, mmap_mode="r")
  arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                  shape=(len(dataset), e, e, c))
  compute_embeddings(params, images, config, tc.dtype, mesh, tc.eval_batch_size, out=arr,
                     progress=progress)
  arr.flush()
  done.write_text("ok\n")
  return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------
def _positive(v: str) -> int:
  i = int(v)
  if i < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
  return i


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
  g.add_argument("--steps", type=_positive, default=d.total_steps, help="total steps")
  g.add_argument("--batch-size", type=_positive, default=d.batch_size, help="images per step")
  g.add_argument("--instances-per-image", type=_positive, default=d.instances_per_image)
  g.add_argument("--lr", type=float, default=d.lr)
  g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
  g.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio)
  g.add_argument("--weight-decay", type=float, default=d.weight_decay)
  g.add_argument("--grad-clip", type=float, default=d.grad_clip_norm,
                 help="global-norm gradient clipping (0: off)")
  g.add_argument("--prompt-iters", type=_positive, default=d.prompt_iters,
                 help="first prompt + error-region corrections per instance")
  g.add_argument("--box-fraction", type=float, default=d.box_fraction,
                 help="share of instances whose first prompt is a noisy box")
  g.add_argument("--loss-resolution", choices=LOSS_RESOLUTIONS, default=d.loss_resolution)
  g.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="compute dtype")
  g.add_argument("--hflip", action="store_true", help="random horizontal flips (--train all)")
  g.add_argument("--seed", type=int, default=d.seed)
  g = parser.add_argument_group("schedule and output")
  g.add_argument("--eval-every", type=int, default=d.eval_every,
                 help="steps between validations (0: once per epoch)")
  g.add_argument("--save-every", type=_positive, default=d.save_every)
  g.add_argument("--keep-last", type=_positive, default=d.keep_last,
                 help="checkpoints kept besides the best one")
  g.add_argument("--log-every", type=_positive, default=d.log_every)
  g.add_argument("--val-max-images", type=_positive, default=None)
  g.add_argument("--eval-batch-size", type=_positive, default=d.eval_batch_size)
  g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                 help="continue from OUT's latest checkpoint if there is one (default); "
                      "--no-resume refuses to touch a folder with checkpoints")
  g.add_argument("--max-steps-this-run", type=_positive, default=None,
                 help="stop (after a checkpoint) once this many steps ran in this call")
  g.add_argument("--embedding-cache", default=None, metavar="DIR",
                 help="with a frozen encoder, keep image embeddings in DIR (memmap)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
  return TrainConfig(
      train=args.train, lr=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
      end_lr_ratio=args.end_lr_ratio, weight_decay=args.weight_decay,
      grad_clip_norm=args.grad_clip, batch_size=args.batch_size,
      instances_per_image=args.instances_per_image, prompt_iters=args.prompt_iters,
      box_fraction=args.box_fraction, loss_resolution=args.loss_resolution, dtype=args.dtype,
      seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
      keep_last=args.keep_last, log_every=args.log_every, hflip=args.hflip,
      val_max_images=args.val_max_images, eval_batch_size=args.eval_batch_size)


def run_finetune(args: argparse.Namespace) -> int:
  """`samjax finetune`: returns the process exit status."""
  from samjax.checkpoint import CheckpointError, load_any
  from samjax.config import get_config
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


def add_export_torch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Arguments of `samjax export-torch CKPT OUT.pth`."""
  parser.add_argument("checkpoint", metavar="CKPT",
                      help="samjax Orbax checkpoint directory (or a finetune output folder: "
                           "its best/ is exported)")
  parser.add_argument("output", metavar="OUT.pth", help="official-format state dict to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.pth")
  parser.add_argument("--verify", action="store_true",
                      help="load the file into the official PyTorch SAM (strict) afterwards")
  return parser


def run_export_torch(args: argparse.Namespace) -> int:
  """`samjax export-torch`: Orbax params -> official `.pth`; returns the exit status."""
  from samjax.checkpoint import (METADATA_FILE, CheckpointError, load_params,
                                 save_torch_state_dict)
  src = Path(args.checkpoint)
  if not (src / METADATA_FILE).exists() and (src / BEST_DIR / METADATA_FILE).exists():
    src = src / BEST_DIR
  out = Path(args.output)
  if out.exists() and not args.overwrite:
    print(f"error: {out} exists (pass --overwrite)", file=sys.stderr)
    return 2
  try:
    config, params = load_params(src)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # Writable copies: torch.from_numpy warns on the read-only views of jax arrays.
  save_torch_state_dict(jax.tree_util.tree_map(np.array, params), config, out)
  if args.verify:
    import torch
    from samjax.reference import build_official
    build_official(config).load_state_dict(torch.load(str(out), weights_only=True))
  official = config.name in ("vit_b", "vit_l", "vit_h")
  how = (f"segment_anything.sam_model_registry[{config.name!r}](checkpoint=...)" if official
         else "samjax.reference.build_official(config).load_state_dict(torch.load(..., "
              "weights_only=True))")
  print(f"wrote {out} ({config.name}; load with {how})"
        + (" - verified" if args.verify else ""), file=sys.stderr)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m samjax.train {finetune,export-torch} ...`."""
  parser = argparse.ArgumentParser(prog="python -m samjax.train",
                                   description="Fine-tune SAM / export params to PyTorch.")
  sub = parser.add_subparsers(dest="command", required=True)
  add_finetune_arguments(sub.add_parser(
      "finetune", help="fine-tune (or train) SAM on COCO instance data"))
  add_export_torch_arguments(sub.add_parser(
      "export-torch", help="write a samjax checkpoint as an official PyTorch state dict"))
  args = parser.parse_args(argv)
  return run_finetune(args) if args.command == "finetune" else run_export_torch(args)


if __name__ == "__main__":
  sys.exit(main())
