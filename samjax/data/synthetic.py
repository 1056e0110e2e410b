"""Synthetic instance-segmentation scenes (textured shapes) and COCO export.

Meant for training and testing tiny SAM models without downloading anything: every
image is a textured background with a few overlapping, textured ellipses, polygons and
rectangles. Objects are painted back to front with hard edges, so each instance's
ground truth is exactly the set of pixels it owns in the final image (later objects
occlude earlier ones and masks never overlap).

COCO export (`write_coco_dataset`) writes `images/NNNNNN.png` and `annotations.json`.
Polygons are traced so that pycocotools rasterises them back to exactly the same
pixels; masks a polygon cannot represent (holes punched by an occluder) are stored as
RLE instead, which pycocotools' `annToMask` decodes just the same.

CLI: `python -m samjax.data.synthetic --out DIR --num-images N --seed S`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from samjax.io.files import atomic_write
from samjax.masks import encode_rle, rle_area, rle_bbox, segmentation_to_mask

CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "polygon", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
]
_SHAPES = ("ellipse", "polygon", "rectangle")

# Minimum mean absolute RGB difference between a new object's texture and what it
# covers; without it some objects would be invisible, which only teaches a model noise.
_MIN_CONTRAST = 40.0

RngLike = Union[np.random.Generator, int, None]


def _as_rng(rng: RngLike) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _as_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    h = w = int(size)
  else:
    h, w = (int(s) for s in size)
  if h < 8 or w < 8:
    raise ValueError(f"size must be at least 8x8 pixels, got {h}x{w}")
  return h, w


# ---------------------------------------------------------------------- textures
# Each returns a float32 (H, W, 3) image with values in [0, 255] covering the whole
# canvas; objects take their pixels from it through their mask.


def _color(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(0, 255, 3).astype(np.float32)


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """(H, W, 1) values in [0, 1] increasing along a random direction."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  a = rng.uniform(0, 2 * np.pi)
  t = xx * np.cos(a) + yy * np.sin(a)
  t -= t.min()
  return (t / max(float(t.max()), 1e-6))[..., None]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
  """(H, W, 3) smooth noise in [0, 1]: a coarse random grid, bicubically upsampled."""
  grid = rng.random((cells + 1, cells + 1, 3)).astype(np.float32)
  up = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
  return np.clip(up, 0.0, 1.0)


def _texture(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
  c0, c1 = _color(rng), _color(rng)
  if kind == "solid":
    out = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
  elif kind == "gradient":
    out = c0 + (c1 - c0) * _ramp(rng, h, w)
  elif kind == "stripes":
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, period = rng.uniform(0, np.pi), rng.uniform(4, max(6.0, min(h, w) / 8))
    wave = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    # Half the time hard-edged stripes, otherwise soft sinusoidal bands.
    t = (wave > 0).astype(np.float32) if rng.random() < 0.5 else 0.5 + 0.5 * wave
    out = c0 + (c1 - c0) * t[..., None]
  elif kind == "checker":
    cell = int(rng.integers(4, max(5, min(h, w) // 6)))
    yy, xx = np.mgrid[0:h, 0:w]
    t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    out = c0 + (c1 - c0) * t[..., None]
  elif kind == "noise":
    cells = int(rng.integers(2, 12))
    out = c0 + (c1 - c0) * _smooth_noise(rng, h, w, cells)
  else:
    raise ValueError(f"unknown texture {kind!r}")
  # Fine grain on everything so flat colours are not trivially separable.
  grain = rng.normal(0.0, rng.uniform(0.0, 12.0), (h, w, 3)).astype(np.float32)
  return np.clip(out + grain, 0, 255).astype(np.float32)


_BACKGROUNDS = ("gradient", "noise", "checker", "stripes", "solid")
_OBJECT_TEXTURES = ("solid", "gradient", "stripes", "noise", "checker")


# ---------------------------------------------------------------------- shapes


def _shape_mask(rng: np.random.Generator, h: int, w: int, shape: str) -> np.ndarray:
  """(H, W) uint8 {0, 1} footprint of one random shape (may extend past the border)."""
  m = np.zeros((h, w), np.uint8)
  s = min(h, w)
  r_lo, r_hi = 0.06 * s, 0.28 * s
  cx, cy = rng.uniform(0, w), rng.uniform(0, h)
  if shape == "ellipse":
    axes = (max(2, int(rng.uniform(r_lo, r_hi))), max(2, int(rng.uniform(r_lo, r_hi))))
    cv2.ellipse(m, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
  elif shape == "polygon":
    # Star-shaped around the centre (sorted angles), hence always simple.
    n = int(rng.integers(3, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(r_lo, r_hi) * rng.uniform(0.45, 1.0, n)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], -1)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
  elif shape == "rectangle":
    size = (rng.uniform(r_lo, 2 * r_hi), rng.uniform(r_lo, 2 * r_hi))
    angle = float(rng.uniform(0, 90)) if rng.random() < 0.7 else 0.0
    pts = cv2.boxPoints(((cx, cy), size, angle))
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return m


def make_synthetic_image(rng: RngLike, size: Union[int, Sequence[int]] = 256,
                         max_objects: int = 6, min_area: int = 30
                         ) -> Tuple[np.ndarray, List[np.ndarray], List[int]]:
  """Generates one scene of overlapping textured shapes.

  Args:
    rng: numpy Generator (or an int seed). Same generator state, same scene.
    size: image side in pixels, or (H, W).
    max_objects: between 1 and `max_objects` shapes are drawn (0 draws none).
    min_area: instances with fewer visible pixels than this are dropped (their
      pixels stay in the image, as unlabelled clutter).

  Returns:
    image: uint8 (H, W, 3) RGB.
    masks: list of bool (H, W) visible-pixel masks, back to front; pairwise disjoint.
    category_ids: list of ints (ids in `CATEGORIES`), aligned with `masks`.
  """
  rng = _as_rng(rng)
  h, w = _as_hw(size)
  if max_objects < 0:
    raise ValueError(f"max_objects must be >= 0, got {max_objects}")

  canvas = _texture(rng, h, w, _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))])
  owner = np.full((h, w), -1, np.int32)  # Index of the object that owns each pixel.
  cats: List[int] = []
  n = int(rng.integers(1, max_objects + 1)) if max_objects > 0 else 0
  for k in range(n):
    shape_idx = int(rng.integers(len(_SHAPES)))
    foot = _shape_mask(rng, h, w, _SHAPES[shape_idx]).astype(bool)
    if not foot.any():
      foot = _shape_mask(rng, h, w, "ellipse").astype(bool)
      shape_idx = 0
    under = canvas[foot].mean(axis=0)
    # Resample the texture a few times until it stands out from what it covers.
    best, best_diff = None, -1.0
    for _ in range(6):
      tex = _texture(rng, h, w, _OBJECT_TEXTURES[rng.integers(len(_OBJECT_TEXTURES))])
      diff = float(np.abs(tex[foot].mean(axis=0) - under).mean())
      if diff > best_diff:
        best, best_diff = tex, diff
      if diff >= _MIN_CONTRAST:
        break
    canvas[foot] = best[foot]
    owner[foot] = k
    cats.append(CATEGORIES[shape_idx]["id"])

  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  masks, cat_ids = [], []
  for k, cat in enumerate(cats):
    m = owner == k
    if int(m.sum()) >= min_area:
      masks.append(m)
      cat_ids.append(cat)
  return image, masks, cat_ids


# ---------------------------------------------------------------------- COCO


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
  """Outer boundaries of a bool (H, W) mask as COCO polygons [x0, y0, x1, y1, ...].

  Contours are traced on a 2x nearest-upsampled mask and mapped back with a quarter
  pixel inset, i.e. they run between pixel centres and pixel edges. Traced on the
  original grid (through boundary pixel centres) pycocotools' rasteriser drops about
  half the boundary pixels (IoU ~0.9 on small objects); these polygons decode to
  exactly the input mask whenever it has no holes (holes are not representable).
  Every polygon has at least 4 vertices, so pycocotools never mistakes it for a box.
  """
  m = np.asarray(mask).astype(np.uint8)
  up = cv2.resize(m, (m.shape[1] * 2, m.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
  contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  polys = []
  for c in contours:
    pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0
    if len(pts) >= 3:
      polys.append([float(v) for v in pts.ravel()])
  return polys


def write_coco_dataset(out_dir: str, num_images: int, seed: int,
                       size: Union[int, Sequence[int]] = 256, rle: bool = False,
                       max_objects: int = 6, min_area: int = 30) -> str:
  """Writes a synthetic COCO-format instance-segmentation dataset.

  Image i comes from its own `SeedSequence(seed).spawn(...)` child, so a dataset with
  more images starts with the same images as a smaller one with the same seed.

  Args:
    out_dir: created if missing; gets `images/000001.png`, ... and `annotations.json`.
    num_images: number of images.
    seed: dataset seed; output files are byte-identical for equal arguments.
    size: image side in pixels, or (H, W).
    rle: store every segmentation as compressed RLE (exact). Otherwise polygons,
      falling back to RLE for the masks a polygon cannot represent exactly (holes).
    max_objects, min_area: as in `make_synthetic_image`.

  Returns:
    Path of the written `annotations.json`.
  """
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  children = np.random.SeedSequence(int(seed)).spawn(int(num_images))
  images, annotations = [], []
  for i, child in enumerate(children):
    image_id = i + 1  # COCO tools treat id 0 as "missing" in places; start at 1.
    image, masks, cats = make_synthetic_image(np.random.default_rng(child), size,
                                              max_objects, min_area)
    h, w = image.shape[:2]
    file_name = f"{image_id:06d}.png"
    Image.fromarray(image).save(os.path.join(image_dir, file_name))
    images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    for m, cat in zip(masks, cats):
      exact_rle = encode_rle(m)
      seg: Any = exact_rle
      if not rle:
        polys = mask_to_polygons(m)
        if polys and np.array_equal(segmentation_to_mask(polys, (h, w)), m):
          seg = polys
      annotations.append({
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": int(cat),
          "segmentation": seg,
          # Pixel-exact area and tight XYWH box of the visible pixels.
          "area": rle_area(exact_rle),
          "bbox": rle_bbox(exact_rle),
          "iscrowd": 0,
      })
  dataset = {
      "info": {"description": "samjax synthetic shapes", "version": "1.0",
               "seed": int(seed), "segmentation": "rle" if rle else "polygon"},
      "licenses": [],
      "images": images,
      "annotations": annotations,
      "categories": CATEGORIES,
  }
  ann_path = os.path.join(out_dir, "annotations.json")
  atomic_write(ann_path, json.dumps(dataset))
  return ann_path


def load_coco_instances(annotations_json: str, image_dir: Optional[str] = None
                        ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (image, masks) for every image of a COCO instance-segmentation file.

  Segmentations are decoded with pycocotools (`annToMask`), so polygons, RLE and
  uncompressed RLE all work, and so do real COCO files.

  Args:
    annotations_json: path of the COCO json.
    image_dir: folder holding the `file_name`s; defaults to `images/` next to the json.

  Yields:
    image: uint8 (H, W, 3) RGB.
    masks: bool (N, H, W), in annotation order (N may be 0).
  """
  from pycocotools.coco import COCO

  if image_dir is None:
    image_dir = os.path.join(os.path.dirname(os.path.abspath(annotations_json)), "images")
  with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress messages.
    coco = COCO(annotations_json)
  for image_id in sorted(coco.getImgIds()):
    info = coco.loadImgs(image_id)[0]
    with Image.open(os.path.join(image_dir, info["file_name"])) as im:
      image = np.array(im.convert("RGB"))
    h, w = info["height"], info["width"]
    if image.shape[:2] != (h, w):
      raise ValueError(f"{info['file_name']} is {image.shape[:2]}, annotations say {(h, w)}")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    masks = np.zeros((len(anns), h, w), bool)
    for j, ann in enumerate(anns):
      masks[j] = coco.annToMask(ann).astype(bool)
    yield image, masks


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point; returns the process exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m samjax.data.synthetic",
      description="Write a synthetic COCO-format instance-segmentation dataset.")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num-images", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=256, help="image side in pixels")
  parser.add_argument("--max-objects", type=int, default=6)
  parser.add_argument("--min-area", type=int, default=30)
  parser.add_argument("--rle", action="store_true",
                      help="store masks as RLE instead of polygons")
  args = parser.parse_args(argv)
  path = write_coco_dataset(args.out, args.num_images, args.seed, size=args.size,
                            rle=args.rle, max_objects=args.max_objects,
                            min_area=args.min_area)
  with open(path) as f:
    n_ann = len(json.load(f)["annotations"])
  print(f"wrote {args.num_images} images and {n_ann} instances to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
