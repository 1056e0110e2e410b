"""Training data: COCO reading, preparation in the model input frame, data order, batches.

Everything here runs on the host in NumPy; a batch is a pure function of (dataset,
seed, step), which is what makes a resumed run replay exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from samjax.config import SamConfig
from samjax.masks import mask_to_box
from samjax.train.config import TrainConfig
from samjax.transforms import ResizeLongestSide


class CocoInstances:
  """Random access to a COCO instance-segmentation file.

  `dataset[i]` is `(image uint8 (H, W, 3) RGB, masks bool (N, H, W))` for the i-th
  image (sorted by id) that has at least one non-crowd instance; polygons, RLE and
  uncompressed RLE are all decoded by pycocotools.
  """

  def __init__(self, annotations_json: str | os.PathLike,
               image_dir: Optional[str | os.PathLike] = None):
    from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
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
    from PIL import Image  # pylint: disable=import-outside-toplevel
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


def dataset_image(dataset, i: int) -> np.ndarray:
  """The i-th image of a dataset, without decoding its masks where it can."""
  return dataset.image(i) if hasattr(dataset, "image") else dataset[i][0]


def dataset_fingerprint(dataset) -> str:
  """What identifies a dataset's content in run.json and checkpoints."""
  return getattr(dataset, "fingerprint", f"len{len(dataset)}")


class LazyImages:
  """`Sequence` of a dataset's images only (no mask decoding)."""

  def __init__(self, dataset):
    self.dataset = dataset

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    return dataset_image(self.dataset, i)


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
  out = out[out.any(axis=(1, 2))]
  return Example(img, (h, w), out, mask_to_box(out).astype(np.float32))


def interior_point(mask: np.ndarray) -> Tuple[float, float]:
  """(x, y) of the pixel farthest from the mask's boundary (image border counts)."""
  padded = np.pad(mask.astype(np.uint8), 1)
  dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
  y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
  return float(x), float(y)


class DataOrder:
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


def train_batch(dataset, order: DataOrder, step: int, tc: TrainConfig, config: SamConfig,
                embeddings: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
  """Host arrays for one step; a pure function of (dataset, seed, step).

  Returns:
    valid_hw (B, 2) int32, gt (B, K, S, S) uint8, boxes (B, K, 4) float32 tight
    xyxy boxes, inst_valid (B, K) bool, and images (B, S, S, 3) uint8 or, with
    `embeddings` (N, h, w, C) of a frozen encoder, embeddings (B, h, w, C) float32.
  """
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
