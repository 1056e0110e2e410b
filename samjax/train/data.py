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


MAX_LISTED_PROBLEMS = 20


class CocoInstances:
  """Random access to a COCO instance-segmentation file.

  `dataset[i]` is `(image uint8 (H, W, 3) RGB, masks bool (N, H, W))` for the i-th
  image (sorted by id) that has at least one non-crowd instance; polygons, RLE and
  uncompressed RLE are all decoded by pycocotools.

  The whole file is validated when the dataset is built (`validate=True`, the
  default; else call `validate()`), so that a bad record is reported before any
  training starts rather than as a traceback when it is first sampled. Checked,
  without decoding any image: every annotation's `image_id` has an image record;
  `bbox`, when present, is 4 finite numbers; `segmentation` is a list of polygons
  (each an even-length list of >= 6 numbers, i.e. >= 3 points) or an RLE dict with
  `counts` (str or list of ints summing to h * w) and `size` == [height, width]; the
  image record has a positive integer height / width and a relative `file_name`
  inside the images folder; the file of every image in use exists and its header
  (`samjax.io.images.read_file_image_size`, first bytes only) is a known image format
  of the recorded size. Mask areas are taken from the RLE (no full-size decode); a
  dataset without a single non-crowd instance of non-empty mask is refused. Every
  problem found is listed in one ValueError (the first `MAX_LISTED_PROBLEMS`, then a
  count of the rest).
  """

  def __init__(self, annotations_json: str | os.PathLike,
               image_dir: Optional[str | os.PathLike] = None, validate: bool = True):
    import json  # pylint: disable=import-outside-toplevel
    from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
    self.annotations_json = str(annotations_json)
    if image_dir is None:
      image_dir = Path(self.annotations_json).absolute().parent / "images"
    self.image_dir = str(image_dir)
    if not os.path.isfile(self.annotations_json):
      raise FileNotFoundError(f"annotation file not found: {self.annotations_json}")
    h = hashlib.sha256()
    with open(self.annotations_json, "rb") as f:
      raw = f.read()
    h.update(raw)
    self.fingerprint = h.hexdigest()[:16]
    try:
      dataset = json.loads(raw)
    except ValueError as e:
      raise ValueError(f"{self.annotations_json} is not valid JSON: {e}") from None
    problems = _structure_problems(dataset)
    if problems:  # COCO's index itself would fail on these
      raise ValueError(_problem_message(self.annotations_json, problems))
    self.coco = COCO()
    self.coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
      self.coco.createIndex()
    self.image_ids = []
    self._anns: Dict[int, List[int]] = {}
    for image_id in sorted(self.coco.getImgIds()):
      anns = [a["id"] for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
              if not a.get("iscrowd", 0)]
      if anns:
        self.image_ids.append(image_id)
        self._anns[image_id] = anns
    self.validated = False
    if validate:
      self.validate()

  def validate(self) -> None:
    """Checks the whole dataset (see the class docstring); raises one ValueError."""
    if self.validated:
      return
    from pycocotools import mask as mask_utils  # pylint: disable=import-outside-toplevel
    from samjax.io.images import read_file_image_size  # pylint: disable=import-outside-toplevel
    problems: List[str] = []
    nonempty = 0
    for ann in self.coco.dataset.get("annotations", []):
      where = f"annotation {ann.get('id')!r}"
      info = self.coco.imgs.get(ann.get("image_id"))
      if info is None:
        problems.append(f"{where}: image_id {ann.get('image_id')!r} has no image record")
        continue
      bbox = ann.get("bbox")
      if bbox is not None and not (
          isinstance(bbox, (list, tuple)) and len(bbox) == 4
          and all(_is_number(v) for v in bbox)):
        problems.append(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r:.60}")
      hw = _image_hw(info)
      if hw is None:
        continue  # reported with the image record
      reason, rle = _segmentation_rle(ann.get("segmentation"), *hw, mask_utils)
      if reason:
        problems.append(f"{where}: {reason}")
        continue
      if not ann.get("iscrowd", 0):
        try:
          area = int(np.sum(mask_utils.area(rle)))
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{where}: segmentation cannot be decoded ({e})")
          continue
        nonempty += area > 0
    image_dir = os.path.abspath(self.image_dir)
    for image_id in self.image_ids:
      info = self.coco.imgs[image_id]
      name = info.get("file_name")
      where = f"image {image_id!r} ({name!r})"
      hw = _image_hw(info)
      if hw is None:
        problems.append(f"{where}: height / width must be positive integers, got "
                        f"{info.get('height')!r} x {info.get('width')!r}")
      if not isinstance(name, str) or not name:
        problems.append(f"{where}: file_name must be a non-empty string")
        continue
      if os.path.isabs(name) or ".." in Path(name).parts or (
          os.path.commonpath([image_dir, os.path.abspath(os.path.join(image_dir, name))])
          != image_dir):
        problems.append(f"{where}: file_name is outside the images folder {self.image_dir}")
        continue
      path = os.path.join(image_dir, name)
      if not os.path.isfile(path):
        problems.append(f"{where}: file not found in {self.image_dir}")
        continue
      try:
        size = read_file_image_size(path)
      except OSError as e:
        problems.append(f"{where}: cannot read the file ({e})")
        continue
      if size is None:
        problems.append(f"{where}: not an image (unknown format)")
      elif size.width is None:
        problems.append(f"{where}: {size.format} header is truncated or malformed")
      elif hw is not None and (size.height, size.width) != hw:
        problems.append(f"{where}: file is {size.height}x{size.width} but the record says "
                        f"{hw[0]}x{hw[1]}")
    if problems:
      raise ValueError(_problem_message(self.annotations_json, problems))
    if not nonempty:
      raise ValueError(f"dataset {self.annotations_json} has no instance with a non-empty "
                       "mask (crowd annotations excluded): nothing to train or evaluate on")
    self.validated = True

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
    if (info["height"], info["width"]) != (h, w):  # checked up front, unless EXIF-rotated
      raise ValueError(f"{info['file_name']} is {h}x{w} but the annotations say "
                       f"{info['height']}x{info['width']}")
    anns = self.coco.loadAnns(self._anns[self.image_ids[i]])
    masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns])
    return image, masks


def _problem_message(source: str, problems: List[str]) -> str:
  shown = problems[:MAX_LISTED_PROBLEMS]
  more = len(problems) - len(shown)
  return (f"{source}: {len(problems)} bad record(s):\n  " + "\n  ".join(shown)
          + (f"\n  ... and {more} more" if more else ""))


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _image_hw(info) -> Optional[Tuple[int, int]]:
  h, w = info.get("height"), info.get("width")
  return (h, w) if _is_int(h) and _is_int(w) and h > 0 and w > 0 else None


def _structure_problems(dataset) -> List[str]:
  """What would break pycocotools' index: the top-level layout and the ids."""
  if not isinstance(dataset, dict):
    return ["the file is not a COCO object (expected {'images': [...], ...})"]
  problems = []
  for key in ("images", "annotations"):
    if not isinstance(dataset.get(key, []), list):
      problems.append(f"{key!r} must be a list")
  if problems:
    return problems
  for i, img in enumerate(dataset.get("images", [])):
    if not isinstance(img, dict) or "id" not in img:
      problems.append(f"images[{i}]: not an object with an 'id'")
  for i, ann in enumerate(dataset.get("annotations", [])):
    if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
      problems.append(f"annotations[{i}]: not an object with 'id' and 'image_id'")
  return problems


def _segmentation_rle(seg, h: int, w: int, mask_utils):
  """(reason it is bad or None, RLE(s) of a good segmentation)."""
  if isinstance(seg, list):
    if not seg:
      return "segmentation is an empty list of polygons", None
    for j, poly in enumerate(seg):
      if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
        return f"polygon {j} is not a list of numbers", None
      if len(poly) < 6 or len(poly) % 2:
        return (f"polygon {j} has {len(poly)} coordinates (needs an even number, "
                ">= 6: at least 3 points)"), None
    return None, mask_utils.frPyObjects(seg, h, w)
  if isinstance(seg, dict):
    if "counts" not in seg:
      return "RLE segmentation has no 'counts'", None
    size, counts = seg.get("size"), seg["counts"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and [int(v) if _is_int(v) else None for v in size] == [h, w]):
      return f"RLE size {size!r} is not the image's [height, width] [{h}, {w}]", None
    if isinstance(counts, list):
      if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
        return f"uncompressed RLE counts must be non-negative ints summing to {h * w}", None
      return None, mask_utils.frPyObjects(seg, h, w)
    if isinstance(counts, (str, bytes)):
      c = counts.encode() if isinstance(counts, str) else counts
      return None, {"size": [h, w], "counts": c}
    return f"RLE counts must be a string or a list, got {type(counts).__name__}", None
  return (f"segmentation must be a list of polygons or an RLE dict, got "
          f"{type(seg).__name__}"), None


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
