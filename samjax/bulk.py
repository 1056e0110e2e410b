"""Bulk automatic-mask jobs: many images in, one SA-1B style JSON per image out.

The job is built around any `generate_batch(images) -> per-image annotation lists`
callable (normally `samjax.AutomaticMaskGenerator.generate_batch` with
`output_mode="coco_rle"`), so this module never touches the model itself.

Pipeline, per process:

  list_inputs -> shard_inputs -> drop inputs whose output is already valid ->
  prefetch_batches (decode in a thread pool, bounded) -> generate_batch ->
  atomic JSON (+ optional overlay PNG) per image.

Design points:

* Resumable: outputs are written to a temporary file in the destination folder and
  moved into place with `os.replace`, so a JSON file under its final name is always
  complete. A rerun skips inputs whose JSON is valid and redoes the rest (missing,
  truncated, or only a leftover temporary file).
* Robust: a broken image file, or an exception from the generator for one image,
  is appended to `failures.jsonl` and the job goes on. `KeyboardInterrupt` and
  `SystemExit` are not swallowed.
* Bounded memory: at most `(prefetch + 1) * batch_size` decoded images exist at any
  time, whatever the number of inputs.
* Multi-process: each process takes a disjoint strided shard of the sorted input
  list; processes never coordinate, so `generate_batch` must only use the devices
  local to its process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
import warnings
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP; SA-1B images are ~3.4 MP.

# One generated annotation (official SamAutomaticMaskGenerator keys).
Annotation = dict[str, Any]
GenerateBatchFn = Callable[[list[np.ndarray]], list[list[Annotation]]]
OverlayFn = Callable[[np.ndarray, list[Annotation]], np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]

_EXIF_ORIENTATION_TAG = 0x0112
# Temporary names are "<final>.<pid>.<8 hex>.tmp"; see `_atomic_write`.
_TEMP_RE = re.compile(r"^(?P<final>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


class BadImageError(Exception):
  """An input that cannot be turned into an RGB image.

  Attributes:
    reason: short human-readable explanation, written to the failures file.
  """

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


# ----------------------------------------------------------------------------- listing


def _has_image_ext(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_under(path: str, root: str) -> bool:
  """Whether absolute `path` is `root` or lies inside it (both normalized)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_under_any(path: str, roots: Sequence[str]) -> bool:
  return any(_is_under(path, r) for r in roots)


def _warn_walk_error(err: OSError) -> None:
  # An unreadable sub-folder should not abort listing a large tree, but the user
  # must hear about it.
  warnings.warn(f"samjax.bulk: cannot list {err.filename!r}: {err.strerror}",
                stacklevel=2)


def _walk_images(root: str, excluded: Sequence[str]) -> Iterator[str]:
  """Yields image files under `root`, recursively.

  Hidden entries (names starting with ".") are skipped: in practice they are
  AppleDouble "._x.jpg" stubs, checkpoint folders and the like, never real inputs.
  """
  for dirpath, dirnames, filenames in os.walk(root, onerror=_warn_walk_error):
    dirnames[:] = sorted(
        d for d in dirnames
        if not d.startswith(".") and not _is_under_any(os.path.join(dirpath, d), excluded))
    for name in filenames:
      if not name.startswith(".") and _has_image_ext(name):
        yield os.path.join(dirpath, name)


def _read_list_file(path: str) -> list[str]:
  """Absolute entries of a text file listing one path per line.

  Blank lines and lines whose first non-blank character is "#" are ignored;
  relative entries are resolved against the list file's folder.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"cannot read list file {path!r}: {e.strerror or e}") from e
  if b"\0" in raw:
    raise ValueError(f"{path!r} has no image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                     "and is not a text file listing paths")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"list file {path!r} is not UTF-8 text: {e}") from e
  base = os.path.dirname(path)
  entries = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    entries.append(os.path.abspath(os.path.join(base, os.path.expanduser(line))))
  return entries


def _collect(inputs: Iterable[PathLike], exclude_dirs: Sequence[PathLike] = ()
             ) -> tuple[list[str], list[str]]:
  """Shared work of `list_inputs` and `input_roots`: (sorted images, sorted folders)."""
  excluded = [os.path.abspath(os.fspath(d)) for d in exclude_dirs]
  images: set[str] = set()
  roots: set[str] = set()

  def add_folder(folder: str) -> None:
    roots.add(folder)
    images.update(_walk_images(folder, excluded))

  for raw in inputs:
    raw = os.fspath(raw)
    path = os.path.abspath(os.path.expanduser(raw))
    if os.path.isdir(path):
      add_folder(path)
    elif os.path.isfile(path):
      if _has_image_ext(path):
        images.add(path)
        continue
      for entry in _read_list_file(path):
        if os.path.isdir(entry):
          add_folder(entry)
        else:
          # Listed files are taken as images whatever their extension; a missing
          # one fails at load time (recorded in failures) instead of aborting a
          # job over a stale line in a million-line list.
          images.add(entry)
    elif os.path.lexists(path):
      raise FileNotFoundError(f"input {raw!r} is neither a file nor a folder (broken link?)")
    else:
      raise FileNotFoundError(f"input {raw!r} does not exist")
  kept = sorted(p for p in images if not _is_under_any(p, excluded))
  return kept, sorted(roots)


def list_inputs(inputs: Sequence[PathLike], exclude_dirs: Sequence[PathLike] = ()
                ) -> list[str]:
  """Expands image files, folders and list files into a sorted list of images.

  Args:
    inputs: each item is an image file (kept whatever it contains), a folder
      (searched recursively for extensions in `IMAGE_EXTENSIONS`, any case; hidden
      entries skipped), or any other file, read as a UTF-8 list of paths: one per
      line, blank lines and full-line `#` comments ignored, relative entries
      resolved against the list file's folder. Listed entries may be folders
      (expanded) or files (kept whatever their extension). List files do not nest.
    exclude_dirs: folders whose contents are never listed (the job passes its
      output folder so overlay PNGs are not picked up as inputs on a rerun).

  Returns:
    Absolute, normalized, deduplicated paths in lexicographic order (the same on
    every process that sees the same files at the same paths).

  Raises:
    FileNotFoundError: an item of `inputs` does not exist.
    ValueError: a non-image file that is not a readable text list.
  """
  return _collect(inputs, exclude_dirs)[0]


def input_roots(inputs: Sequence[PathLike]) -> list[str]:
  """Absolute folders named in `inputs`, directly or inside list files.

  These are the roots whose relative layout `output_path_for` keeps.
  """
  return _collect(inputs)[1]


def shard_inputs(paths: Sequence[str], process_index: int | None = None,
                 process_count: int | None = None) -> list[str]:
  """This process's share of `paths`: every `process_count`-th of the sorted list.

  A strided split (rather than contiguous blocks) spreads each sub-folder across
  processes, which balances load when folders differ in image size. Shards are
  disjoint and their union is `paths`.

  Args:
    paths: input paths (any order; sorted here so all processes agree).
    process_index: this process's index; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The shard, in sorted order.
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  return sorted(paths)[process_index::process_count]


def _resolve_process(process_index: int | None, process_count: int | None
                     ) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Lazy: listing/loading must not initialize a backend.
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"process_index={process_index}, process_count={process_count}")
  return int(process_index), int(process_count)


# ------------------------------------------------------------------------ output names


def _short_hash(text: str, n: int = 10) -> str:
  return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def output_path_for(path: PathLike, input_roots: Sequence[PathLike], out_dir: PathLike
                    ) -> str:
  """The JSON output path of one input: unique per input and stable across runs.

  * Under an input folder: `out_dir/<path relative to that folder>.json`, keeping
    the image extension (`sub/cat.jpg` -> `sub/cat.jpg.json`) so `cat.jpg` and
    `cat.png` side by side do not collide. With nested input folders the
    outermost one is used. When several unrelated folders are inputs, each gets a
    prefix folder `<folder name>-<hash of its absolute path>` so equal relative
    paths in different folders cannot collide.
  * Otherwise (a loose file, or a file from a list file): `out_dir/<stem>-<10 hex
    sha1 of the absolute path>.json`.

  The name depends on the set of input folders: rerun a job with the same inputs
  to resume it.

  Args:
    path: the input image.
    input_roots: the folders among the job's inputs (see `input_roots`).
    out_dir: the job's output folder.

  Returns:
    Absolute path of the JSON file. The overlay, if any, is the same with ".png".
  """
  path = os.path.abspath(os.fspath(path))
  out_dir = os.path.abspath(os.fspath(out_dir))
  roots = sorted({os.path.abspath(os.fspath(r)) for r in input_roots})
  outermost = [r for r in roots if not any(o != r and _is_under(r, o) for o in roots)]
  containing = [r for r in outermost if _is_under(path, r) and path != r]
  if containing:
    root = containing[0]  # Outermost roots are disjoint, so there is only one.
    rel = os.path.relpath(path, root)
    if len(outermost) > 1:
      tag = os.path.basename(root.rstrip(os.sep)) or "root"
      rel = os.path.join(f"{tag}-{_short_hash(root, 8)}", rel)
    return os.path.join(out_dir, rel + ".json")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(out_dir, f"{stem}-{_short_hash(path)}.json")


def _overlay_path(json_path: str) -> str:
  return json_path[:-len(".json")] + ".png"


# ------------------------------------------------------------------------- load images


def _jpeg_is_truncated(data: bytes) -> bool:
  """Whether a JPEG stream ends before its end-of-image (EOI, FF D9) marker.

  Older OpenCV builds decode a truncated JPEG into a half-grey image with only a
  warning, so completeness is checked here. The header segments are walked to the
  first start-of-scan (so an EXIF thumbnail's own EOI does not count); after it,
  entropy-coded data byte-stuffs every FF, so FF D9 can only be the real EOI (or
  lie in data appended after it, which is fine).
  """
  n, pos = len(data), 2
  while pos + 4 <= n:
    if data[pos] != 0xFF:
      return False  # Malformed header: leave the verdict to the decoder.
    marker = data[pos + 1]
    if marker == 0xFF:  # Fill byte.
      pos += 1
    elif marker == 0xDA:  # Start of scan.
      return data.find(b"\xff\xd9", pos) < 0
    elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # Markers without a length.
      pos += 2
    else:
      pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
  return True


def _probe(path: str, max_pixels: int | None) -> tuple[int, int, int] | None:
  """(width, height, EXIF orientation) from the header only, or None if unknown.

  Pillow reads just the header here, so a decompression bomb is rejected before
  any pixel is decoded.
  """
  try:
    with Image.open(path) as im:
      width, height = im.size
      orientation = 1
      with contextlib.suppress(Exception):  # Broken EXIF must not fail the image.
        orientation = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
      return width, height, orientation
  except Image.DecompressionBombError as e:
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and limit is not None and max_pixels <= 2 * limit:
      raise BadImageError(f"image too large: over {max_pixels} pixels") from e
    return None  # Above Pillow's own limit but allowed here: check after decoding.
  except Exception:  # Unidentified or broken header: let OpenCV have a go.
    return None


def _to_rgb8(img: np.ndarray) -> np.ndarray:
  """OpenCV IMREAD_UNCHANGED array -> uint8 (H, W, 3) RGB.

  Conversions match `cv2.imread(path)` (what the official scripts/amg.py uses):
  16-bit keeps the high byte, grey is replicated to 3 channels, alpha is dropped
  (not composited: transparent pixels keep their stored colour).
  """
  if img.dtype == np.uint16:
    img = (img >> 8).astype(np.uint8)
  elif img.dtype != np.uint8:
    raise BadImageError(f"unsupported pixel type {img.dtype} (need 8- or 16-bit integers)")
  if img.ndim == 2:
    img = img[:, :, None]
  if img.ndim != 3:
    raise BadImageError(f"unsupported array shape {img.shape}")
  channels = img.shape[2]
  if channels in (1, 2):  # Grey, or grey + alpha.
    return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
  if channels in (3, 4):  # BGR or BGRA.
    return np.ascontiguousarray(img[:, :, 2::-1])
  raise BadImageError(f"unsupported channel count {channels}")


def _apply_exif_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
  """Turns a stored (H, W, C) image upright per the EXIF orientation tag (1..8)."""
  if orientation == 2:
    img = img[:, ::-1]
  elif orientation == 3:
    img = img[::-1, ::-1]
  elif orientation == 4:
    img = img[::-1]
  elif orientation == 5:
    img = img.transpose(1, 0, 2)
  elif orientation == 6:
    img = np.rot90(img, -1)  # 90 degrees clockwise.
  elif orientation == 7:
    img = img.transpose(1, 0, 2)[::-1, ::-1]
  elif orientation == 8:
    img = np.rot90(img, 1)  # 90 degrees counter-clockwise.
  return np.ascontiguousarray(img)


def load_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               exif_orientation: bool = True) -> np.ndarray:
  """Reads an image file as uint8 RGB, or raises `BadImageError` with a reason.

  Decoding uses `cv2.imdecode(..., IMREAD_UNCHANGED)` on the file bytes (which,
  unlike `cv2.imread`, also works for non-ASCII paths on every platform), and is
  then converted to match `cv2.imread(path)` + BGR->RGB, the loading of the
  official SAM scripts: 16-bit -> high byte, grey -> RGB, alpha dropped, EXIF
  orientation applied (from Pillow's header read).

  Args:
    path: image file.
    max_pixels: refuse images with more than this many pixels (height * width),
      checked from the header before decoding when Pillow can read it. None: no
      limit beyond OpenCV's own.
    exif_orientation: rotate/flip per the EXIF orientation tag.

  Returns:
    (H, W, 3) uint8 RGB array, C-contiguous.

  Raises:
    BadImageError: missing, empty, unreadable, truncated, unsupported or too large.
  """
  path = os.fspath(path)
  try:
    if os.path.isdir(path):
      raise BadImageError("is a folder, not an image file")
    size = os.path.getsize(path)
  except FileNotFoundError:
    raise BadImageError("file does not exist") from None
  except OSError as e:
    raise BadImageError(f"cannot access file: {e.strerror or e}") from e
  if size == 0:
    raise BadImageError("zero-size file")

  header = _probe(path, max_pixels)
  if header is not None and max_pixels is not None and header[0] * header[1] > max_pixels:
    raise BadImageError(f"image too large: {header[0]}x{header[1]} = "
                        f"{header[0] * header[1]} pixels > max_pixels={max_pixels}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImageError(f"cannot read file: {e.strerror or e}") from e
  if data[:2] == b"\xff\xd8" and _jpeg_is_truncated(data):
    raise BadImageError("truncated JPEG (no end-of-image marker)")

  try:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error as e:  # E.g. over OpenCV's own pixel limit.
    raise BadImageError(f"decoder error: {str(e).strip().splitlines()[-1]}") from e
  if img is None:
    if header is None:
      raise BadImageError("unreadable: not a supported image format, or corrupt")
    raise BadImageError("corrupt or truncated image data (decoder failed)")
  if img.ndim < 2 or img.shape[0] == 0 or img.shape[1] == 0:
    raise BadImageError(f"empty image {img.shape}")
  if max_pixels is not None and img.shape[0] * img.shape[1] > max_pixels:
    raise BadImageError(f"image too large: {img.shape[1]}x{img.shape[0]} pixels > "
                        f"max_pixels={max_pixels}")
  img = _to_rgb8(img)
  if exif_orientation and header is not None and header[2] != 1:
    img = _apply_exif_orientation(img, header[2])
  return img


# ----------------------------------------------------------------------- prefetch loader


LoadResult = Union[np.ndarray, BadImageError]


def _safe_load(load_fn: Callable[[str], np.ndarray], path: str) -> LoadResult:
  """Never raises (except BaseException): errors come back as BadImageError."""
  try:
    return load_fn(path)
  except BadImageError as e:
    return e
  except Exception as e:  # A loader bug or MemoryError must cost one image only.
    return BadImageError(f"unexpected error while loading: {type(e).__name__}: {e}")


def prefetch_batches(paths: Sequence[str], batch_size: int, *,
                     load_fn: Callable[[str], np.ndarray] | None = None,
                     num_workers: int = 4, prefetch: int = 2,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     ) -> Iterator[list[tuple[str, LoadResult]]]:
  """Yields batches of decoded images while later batches decode in threads.

  At most `prefetch` batches are submitted ahead of the one handed to the
  caller, so once the caller has dropped a batch before asking for the next, no
  more than `(prefetch + 1) * batch_size` decoded images exist. Decoders (OpenCV,
  Pillow) release the GIL, so threads overlap with the device.

  Args:
    paths: images, in the order batches should come.
    batch_size: images per batch (the last batch may be smaller).
    load_fn: path -> (H, W, 3) uint8; defaults to `load_image(path, max_pixels)`.
      Its `BadImageError` (or any other exception) is returned in place of the image.
    num_workers: decoding threads.
    prefetch: batches decoded ahead; 0 decodes each batch only when asked for.
    max_pixels: passed to the default `load_image`.

  Yields:
    Lists of `(path, image or BadImageError)` in input order.
  """
  if batch_size < 1 or num_workers < 1 or prefetch < 0:
    raise ValueError(f"need batch_size >= 1, num_workers >= 1, prefetch >= 0; got "
                     f"{batch_size}, {num_workers}, {prefetch}")
  if load_fn is None:
    load_fn = functools.partial(load_image, max_pixels=max_pixels)
  chunks = iter([list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)])
  pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="samjax-load")
  pending: deque[list[tuple[str, concurrent.futures.Future]]] = deque()

  def submit_next() -> bool:
    chunk = next(chunks, None)
    if chunk is None:
      return False
    pending.append([(p, pool.submit(_safe_load, load_fn, p)) for p in chunk])
    return True

  try:
    while True:
      while len(pending) < max(prefetch, 1) and submit_next():
        pass
      if not pending:
        return
      batch = [(p, f.result()) for p, f in pending.popleft()]
      # Refill only after the wait: with the batch about to be yielded, this is
      # exactly prefetch + 1 batches alive.
      while len(pending) < prefetch and submit_next():
        pass
      yield batch
      del batch  # Do not keep the caller's previous batch alive while refilling.
  finally:
    for futures in pending:
      for _, f in futures:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ output


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that `path` is either absent/old or complete.

  The temporary file lives in the same folder (same filesystem, so `os.replace`
  is an atomic rename) and is fsynced first so a crash cannot leave a renamed but
  empty file. It is opened normally, not via mkstemp, so the umask applies.
  """
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _remove_stale_temps(out_dir: str, finals: set[str]) -> int:
  """Deletes temporary files left by killed runs for outputs in `finals`.

  Only this process's outputs are touched, so concurrent processes sharing
  `out_dir` never delete each other's in-progress files.
  """
  removed = 0
  for dirpath, _, filenames in os.walk(out_dir):
    for name in filenames:
      m = _TEMP_RE.match(name)
      if m and os.path.join(dirpath, m.group("final")) in finals:
        with contextlib.suppress(OSError):
          os.unlink(os.path.join(dirpath, name))
          removed += 1
  return removed


def is_valid_output(path: PathLike) -> bool:
  """Whether `path` is a complete SA-1B style JSON as written by this module.

  Checks that it parses and has an `image` record with `file_name` (str),
  `height` and `width` (positive ints), and an `annotations` list of dicts each
  with a `segmentation` RLE dict (`size`, `counts`). Never raises.
  """
  try:
    with open(path, "rb") as f:
      record = json.load(f)
    image = record["image"]
    anns = record["annotations"]
    ok = (isinstance(image, dict) and isinstance(image["file_name"], str)
          and isinstance(anns, list))
    for key in ("height", "width"):
      ok = ok and isinstance(image[key], int) and image[key] > 0
    for ann in anns:
      seg = ann["segmentation"]
      ok = ok and isinstance(seg, dict) and "counts" in seg and "size" in seg
    return bool(ok)
  except Exception:
    return False


def _as_coco_rle(seg: Any, hw: tuple[int, int]) -> dict[str, Any]:
  """Any official output_mode's segmentation -> compressed COCO RLE with str counts.

  Accepts compressed RLE (str or bytes counts), uncompressed RLE (list counts) or
  an (H, W) binary mask, so the job also works with generators that were not set
  to output_mode="coco_rle".
  """
  if isinstance(seg, np.ndarray):
    rle = mask_utils.encode(np.asfortranarray(seg.astype(np.uint8)))
  elif isinstance(seg, dict) and isinstance(seg.get("counts"), (list, tuple)):
    h, w = seg["size"]
    rle = mask_utils.frPyObjects({"size": [int(h), int(w)], "counts": list(seg["counts"])},
                                 int(h), int(w))
  elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
    rle = seg
  else:
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  size = [int(rle["size"][0]), int(rle["size"][1])]
  if size != [hw[0], hw[1]]:
    raise ValueError(f"mask size {size} does not match image size {list(hw)}")
  return {"size": size, "counts": counts}


def _floats(values: Any) -> Any:
  """Nested sequence/array of numbers -> nested lists of Python floats."""
  return np.asarray(values, dtype=np.float64).tolist()


def sa1b_record(path: str, image_id: int, hw: tuple[int, int],
                anns: Sequence[Annotation]) -> dict[str, Any]:
  """One image's output in the SA-1B layout.

  Args:
    path: the input image path.
    image_id: integer id of the image.
    hw: (height, width) of the image in pixels, as given to the generator.
    anns: the generator's annotations for this image.

  Returns:
    {"image": {...}, "annotations": [...]} with JSON-ready Python types; bbox and
    crop_box are XYWH in pixels, point_coords [[x, y]] in pixels.
  """
  annotations = []
  for i, ann in enumerate(anns):
    rle = _as_coco_rle(ann["segmentation"], hw)
    area = ann.get("area")
    bbox = ann.get("bbox")
    annotations.append({
        "id": i,
        "segmentation": rle,
        "bbox": _floats(mask_utils.toBbox(rle) if bbox is None else bbox),
        "area": int(mask_utils.area(rle) if area is None else area),
        "predicted_iou": float(ann["predicted_iou"]),
        "stability_score": float(ann["stability_score"]),
        "point_coords": _floats(ann["point_coords"]),
        "crop_box": _floats(ann.get("crop_box", [0, 0, hw[1], hw[0]])),
    })
  return {
      "image": {
          "image_id": int(image_id),
          "file_name": os.path.basename(path),
          "path": path,
          "height": int(hw[0]),
          "width": int(hw[1]),
      },
      "annotations": annotations,
  }


def _image_id(json_path: str, out_dir: str) -> int:
  # Stable across runs and machines: derived from the output's name relative to
  # the output folder; 52 bits so it stays exact as a JSON (double) number.
  rel = os.path.relpath(json_path, out_dir)
  return int(hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:13], 16)


def _write_overlay(png_path: str, image: np.ndarray, record: dict[str, Any],
                   overlay_fn: OverlayFn) -> None:
  """Renders `overlay_fn(image, anns)` with masks decoded to (H, W) bool arrays."""
  anns = [dict(a, segmentation=mask_utils.decode(a["segmentation"]).astype(bool))
          for a in record["annotations"]]
  vis = np.asarray(overlay_fn(image, anns))
  channels = vis.shape[2] if vis.ndim == 3 else 1
  if vis.dtype != np.uint8 or vis.ndim not in (2, 3) or channels not in (1, 3, 4):
    raise ValueError(f"overlay_fn must return uint8 (H, W[, 3|4]), got {vis.dtype} {vis.shape}")
  if vis.ndim == 3:  # RGB(A) -> OpenCV's BGR(A).
    vis = np.concatenate([vis[:, :, 2::-1], vis[:, :, 3:]], axis=2)
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(vis))
  if not ok:
    raise ValueError("PNG encoding of the overlay failed")
  _atomic_write(png_path, buf.tobytes())


class _FailureLog:
  """Appends one JSON line per failed image; opened per write so a kill loses nothing."""

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self._lock = threading.Lock()

  def add(self, image_path: str, stage: str, reason: str) -> None:
    line = json.dumps({
        "path": image_path, "stage": stage, "reason": reason,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    with self._lock, open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
    self.count += 1


# --------------------------------------------------------------------------------- job


@dataclasses.dataclass
class JobSummary:
  """What one process of a bulk job did.

  Attributes:
    total: images in this process's shard.
    done: images processed by this run (valid JSON written).
    skipped: images whose valid output already existed.
    failed: images that failed this run (see `failures_path`).
    elapsed_s: wall-clock seconds of this run.
    out_dir: output folder.
    failures_path: the failures JSONL file (may not exist if nothing failed).
    process_index: this process's index.
    process_count: number of processes.
  """
  total: int
  done: int
  skipped: int
  failed: int
  elapsed_s: float
  out_dir: str
  failures_path: str
  process_index: int = 0
  process_count: int = 1

  @property
  def exit_code(self) -> int:
    """0 when nothing failed, 1 when some images failed."""
    return 1 if self.failed else 0

  @property
  def images_per_s(self) -> float:
    """Throughput over images processed or failed by this run."""
    return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

  def __str__(self) -> str:
    shard = (f" (process {self.process_index}/{self.process_count})"
             if self.process_count > 1 else "")
    text = (f"samjax bulk{shard}: {self.total} images: {self.done} done, {self.skipped} "
            f"skipped (already done), {self.failed} failed in {self.elapsed_s:.1f} s "
            f"({self.images_per_s:.2f} img/s); outputs in {self.out_dir}")
    if self.failed:
      text += f"; failures listed in {self.failures_path}"
    return text


def _generate_isolating(generate_batch: GenerateBatchFn, items: list[tuple[str, np.ndarray]]
                        ) -> list[tuple[str, np.ndarray, list[Annotation] | Exception]]:
  """Runs the generator on a batch; on error, retries one image at a time.

  Returns:
    (path, image, annotations or the exception that image raised) per item.
  """
  try:
    out = generate_batch([img for _, img in items])
    out = list(out)
    if len(out) != len(items):
      raise ValueError(f"generate_batch returned {len(out)} results for {len(items)} images")
    return [(p, img, anns) for (p, img), anns in zip(items, out)]
  except Exception as e:  # KeyboardInterrupt/SystemExit propagate.
    if len(items) == 1:
      return [(items[0][0], items[0][1], e)]
    results = []
    for item in items:
      results.extend(_generate_isolating(generate_batch, [item]))
    return results


def _describe(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def run_job(inputs: Sequence[PathLike], out_dir: PathLike, generate_batch: GenerateBatchFn,
            batch_size: int = 1, overlays: bool = False, overlay_fn: OverlayFn | None = None,
            process_index: int | None = None, process_count: int | None = None,
            num_workers: int = 4, prefetch: int = 2, progress: bool = True,
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> JobSummary:
  """Runs automatic mask generation over many images, resumably.

  Args:
    inputs: image files, folders and list files (see `list_inputs`).
    out_dir: output folder (created). Images inside it are never taken as inputs.
    generate_batch: list of B (H, W, 3) uint8 RGB images (sizes may differ) -> B
      lists of annotation dicts with the official SamAutomaticMaskGenerator keys
      (`segmentation` ideally a COCO RLE; binary masks and uncompressed RLE are
      converted). It must only use this process's devices.
    batch_size: images per `generate_batch` call (the last one may be smaller).
    overlays: also write `<name>.png` next to each JSON (written before the JSON,
      so a valid JSON implies its overlay; with overlays on, an image whose PNG is
      missing is redone).
    overlay_fn: (image (H, W, 3) uint8, annotations with `segmentation` decoded to
      (H, W) bool) -> uint8 RGB image. Defaults to `samjax.viz.overlay_anns`.
    process_index: this process's shard; defaults to `jax.process_index()`.
    process_count: number of shards; defaults to `jax.process_count()`.
    num_workers: image decoding threads.
    prefetch: batches decoded ahead of the device.
    progress: show a tqdm bar (only when stderr is a terminal) and a start line.
    max_pixels: larger images fail with "image too large".

  Returns:
    The `JobSummary` (also printed to stderr). `summary.exit_code` is 1 if any
    image failed; failures are appended to `failures.jsonl` in `out_dir`
    (`failures.<process_index>.jsonl` when there are several processes).

  Raises:
    FileNotFoundError / ValueError: bad `inputs` or arguments (before any work).
    KeyboardInterrupt: propagated; finished outputs stay valid for a rerun.
  """
  start = time.monotonic()
  out_dir = os.path.abspath(os.fspath(out_dir))
  process_index, process_count = _resolve_process(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if overlays and overlay_fn is None:
    try:
      from samjax.viz import overlay_anns as overlay_fn  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ValueError("overlays=True needs overlay_fn (samjax.viz is not available)") from e

  paths, roots = _collect(inputs, exclude_dirs=[out_dir])
  shard = shard_inputs(paths, process_index, process_count)
  os.makedirs(out_dir, exist_ok=True)
  failures = _FailureLog(os.path.join(
      out_dir, "failures.jsonl" if process_count == 1 else f"failures.{process_index}.jsonl"))

  json_paths = {p: output_path_for(p, roots, out_dir) for p in shard}
  todo = [p for p in shard
          if not (is_valid_output(json_paths[p])
                  and (not overlays or os.path.isfile(_overlay_path(json_paths[p]))))]
  finals = {json_paths[p] for p in todo} | {_overlay_path(json_paths[p]) for p in todo}
  _remove_stale_temps(out_dir, finals)
  skipped = len(shard) - len(todo)
  if progress:
    print(f"samjax bulk: {len(paths)} images listed; process {process_index}/{process_count} "
          f"has {len(shard)}, {skipped} already done, {len(todo)} to run", file=sys.stderr)

  done = 0
  bar = tqdm(total=len(todo), unit="img", desc="automask", dynamic_ncols=True,
             disable=not (progress and sys.stderr.isatty()))
  loader = prefetch_batches(todo, batch_size, num_workers=num_workers, prefetch=prefetch,
                            max_pixels=max_pixels)
  try:
    for batch in loader:
      n_batch = len(batch)
      good = []
      for path, result in batch:
        if isinstance(result, BadImageError):
          failures.add(path, "load", result.reason)
        else:
          good.append((path, result))
      del batch
      results = _generate_isolating(generate_batch, good) if good else []
      for path, image, anns in results:
        if isinstance(anns, Exception):
          failures.add(path, "generate", f"generator error: {_describe(anns)}")
          continue
        json_path = json_paths[path]
        try:
          record = sa1b_record(path, _image_id(json_path, out_dir), image.shape[:2], anns)
          if overlays:
            _write_overlay(_overlay_path(json_path), image, record, overlay_fn)
          data = json.dumps(record, separators=(",", ":")).encode("utf-8")
          _atomic_write(json_path, data)
          done += 1
        except Exception as e:  # Bad annotation, overlay or disk error: this image only.
          failures.add(path, "write", f"could not write output: {_describe(e)}")
      del results, good
      bar.update(n_batch)
      bar.set_postfix(failed=failures.count, refresh=False)
  finally:
    loader.close()
    bar.close()

  summary = JobSummary(total=len(shard), done=done, skipped=skipped, failed=failures.count,
                       elapsed_s=time.monotonic() - start, out_dir=out_dir,
                       failures_path=failures.path, process_index=process_index,
                       process_count=process_count)
  print(summary, file=sys.stderr)
  return summary


# --------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def add_automask_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the bulk automatic-mask options to `parser` (e.g. a subcommand's).

  Generator options and defaults mirror the official SamAutomaticMaskGenerator.

  Returns:
    `parser`, for chaining.
  """
  parser.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="image files, folders (searched recursively) or text files "
                           "listing one path per line")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output folder: one SA-1B style JSON per image")
  parser.add_argument("--checkpoint", metavar="CKPT", help="model checkpoint")
  parser.add_argument("--model", choices=("vit_b", "vit_l", "vit_h"), default="vit_h",
                      help="model size (default: %(default)s)")

  gen = parser.add_argument_group("mask generator (as SamAutomaticMaskGenerator)")
  gen.add_argument("--points-per-side", type=_positive_int, default=32,
                   help="point grid side length (default: %(default)s)")
  gen.add_argument("--points-per-batch", type=_positive_int, default=64,
                   help="prompt points per decoder batch (default: %(default)s)")
  gen.add_argument("--pred-iou-thresh", type=float, default=0.88,
                   help="minimum predicted mask IoU (default: %(default)s)")
  gen.add_argument("--stability-score-thresh", type=float, default=0.95,
                   help="minimum stability score (default: %(default)s)")
  gen.add_argument("--stability-score-offset", type=float, default=1.0,
                   help="logit offset for the stability score (default: %(default)s)")
  gen.add_argument("--box-nms-thresh", type=float, default=0.7,
                   help="box IoU for NMS within a crop (default: %(default)s)")
  gen.add_argument("--crop-n-layers", type=_non_negative_int, default=0,
                   help="layers of image crops (default: %(default)s)")
  gen.add_argument("--crop-nms-thresh", type=float, default=0.7,
                   help="box IoU for NMS between crops (default: %(default)s)")
  gen.add_argument("--crop-overlap-ratio", type=float, default=512 / 1500,
                   help="crop overlap as a fraction of image length (default: 512/1500)")
  gen.add_argument("--crop-n-points-downscale-factor", type=_positive_int, default=1,
                   help="point grid downscale per crop layer (default: %(default)s)")
  gen.add_argument("--min-mask-region-area", type=_non_negative_int, default=0,
                   help="remove holes/islands smaller than this many pixels "
                        "(default: %(default)s)")

  job = parser.add_argument_group("job")
  job.add_argument("--overlays", action="store_true",
                   help="also write <name>.png mask overlays next to the JSON files")
  job.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per generator call (default: %(default)s)")
  job.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model compute dtype (default: %(default)s)")
  job.add_argument("--num-workers", type=_positive_int, default=4,
                   help="image decoding threads (default: %(default)s)")
  job.add_argument("--prefetch", type=_non_negative_int, default=2,
                   help="batches decoded ahead of the device (default: %(default)s)")
  job.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels fail (default: %(default)s)")
  job.add_argument("--no-progress", action="store_true", help="no progress bar")

  dist = parser.add_argument_group("multi-process (one process per host)")
  dist.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first; each process then "
                         "handles its own shard of the inputs")
  dist.add_argument("--coordinator-address", metavar="HOST:PORT",
                    help="jax.distributed coordinator (default: auto-detected)")
  dist.add_argument("--num-processes", type=_positive_int, help="number of processes")
  dist.add_argument("--process-id", type=_non_negative_int, help="this process's id")
  return parser


def generator_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """AutomaticMaskGenerator keyword options from `add_automask_arguments` args.

  Model options (--model, --checkpoint, --dtype) are not included: they choose the
  model the generator wraps. `output_mode` is "coco_rle", which the job writes.
  """
  return {
      "points_per_side": args.points_per_side,
      "points_per_batch": args.points_per_batch,
      "pred_iou_thresh": args.pred_iou_thresh,
      "stability_score_thresh": args.stability_score_thresh,
      "stability_score_offset": args.stability_score_offset,
      "box_nms_thresh": args.box_nms_thresh,
      "crop_n_layers": args.crop_n_layers,
      "crop_nms_thresh": args.crop_nms_thresh,
      "crop_overlap_ratio": args.crop_overlap_ratio,
      "crop_n_points_downscale_factor": args.crop_n_points_downscale_factor,
      "min_mask_region_area": args.min_mask_region_area,
      "output_mode": "coco_rle",
  }


def _maybe_initialize_distributed(args: argparse.Namespace) -> None:
  explicit = {"coordinator_address": args.coordinator_address,
              "num_processes": args.num_processes, "process_id": args.process_id}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if not args.distributed:
    if explicit:
      raise ValueError("--coordinator-address/--num-processes/--process-id need --distributed")
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(**explicit)


def run_automask(args: argparse.Namespace, make_generator: Callable[[argparse.Namespace], Any],
                 overlay_fn: OverlayFn | None = None) -> JobSummary:
  """Runs the bulk job from parsed `add_automask_arguments` args.

  Args:
    args: parsed arguments.
    make_generator: args -> object with `generate_batch(list of images)`; called
      after `jax.distributed.initialize()` (with --distributed), so it may build
      device meshes. It should use `generator_kwargs_from_args(args)`.
    overlay_fn: overlay renderer; defaults to `samjax.viz.overlay_anns` when
      --overlays is given.

  Returns:
    The `JobSummary`; exit the program with `summary.exit_code`.
  """
  _maybe_initialize_distributed(args)
  generator = make_generator(args)
  return run_job(args.inputs, args.out, generator.generate_batch,
                 batch_size=args.batch_size, overlays=args.overlays, overlay_fn=overlay_fn,
                 num_workers=args.num_workers, prefetch=args.prefetch,
                 progress=not args.no_progress, max_pixels=args.max_pixels)
