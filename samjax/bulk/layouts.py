"""Output layouts of the bulk job: the SA-1B JSON and the two of the official amg.py.

`LAYOUTS` is the one registry: name -> `Layout` (how outputs are named, written, and
recognised as complete, which is what a rerun skips).

* `sa1b` (the default): one JSON per image, `{"image": ..., "annotations": [...]}`
  (`samjax.bulk.outputs.sa1b_record`), named by the image's relative path with its
  extension (`sub/cat.jpg` -> `sub/cat.jpg.json`).
* `amg-json`: what the official `scripts/amg.py --convert-to-rle` writes: per image
  `<stem>.json`, a JSON list of the generator's records (`segmentation` as a COCO RLE,
  `area`, `bbox`, `predicted_iou`, `point_coords`, `stability_score`, `crop_box`, in
  that order, as `json.dump` writes them).
* `amg-png`: what the official script writes by default: per image a folder `<stem>/`
  holding `<i>.png` (8-bit, 0 or 255, one per mask, in the generator's order) and
  `metadata.csv` (the official header and rows: Python's `str` of each number,
  "\\n"-joined, no final newline).

amg.py names outputs by `os.path.splitext(os.path.basename(path))[0]` alone, which
flattens subfolders and lets equal stems collide (`--convert-to-rle` silently
overwrites, the PNG mode stops with `FileExistsError`). Here, `output_paths` keeps the
relative-path scheme of `sa1b`: `<out>/<subfolder>/<stem>`, so for a flat input folder
(and a single image) the names are the official ones. Only where two images would
share a name (same stem in one folder, `cat.jpg` and `cat.png`; loose files with equal
stems from different folders; an overlay PNG that would be another image's folder; a
name the job keeps for itself, `failures.jsonl`, `samjax_job.json`, `.samjax-*`) does
each such image fall back to its unique `sa1b` name without `.json` (`cat.jpg.json`,
`cat.png.json`; loose files `<stem>-<hash>`). Names thus depend on the set of images:
rerun with the same inputs to resume.

Every file is written whole through `samjax.bulk.store` (locally
`samjax.io.files.atomic_write`; at a URL one whole-object upload), by `_put` alone, so
a file under its final name is complete. An `amg-png` folder is complete once its
`metadata.csv` exists: it is removed first when a folder is redone, and written last.
Provenance cannot go into these files (they must equal the official ones); the job's
manifest covers them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import numbers
import os
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from samjax.bulk import store
from samjax.bulk.outputs import Annotation, OverlayFn, image_id_for, output_path_for, \
    sa1b_record, write_overlay, write_record
from samjax.bulk.outputs import is_valid_output as is_valid_sa1b
from samjax.io import files
from samjax.masks import decode_rle, rle_area, rle_bbox, to_coco_rle

# amg.py's `write_masks_to_folder`, verbatim.
AMG_CSV_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
                  "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,"
                  "crop_box_h")
AMG_METADATA = "metadata.csv"
# The official generator's record keys, in its order.
AMG_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords",
            "stability_score", "crop_box")
_MASK_PNG_RE = re.compile(r"^(\d+)\.png$")
# Top-level names of the output folder that belong to the job (failure logs, claims,
# the write probe, the manifest of samjax.bulk.provenance): never an image's output.
_RESERVED_RE = re.compile(r"^(failures(\.\d+)?\.jsonl|samjax_job\.json|\.samjax-claims|"
                          r"\.samjax-(tmp|write-test)\..*)$")

# (output, image path, RGB image (H, W, 3) uint8, annotations, output folder,
#  overlay_fn or None, provenance or None) -> number of masks written
WriteFn = Callable[[str, str, np.ndarray, Sequence[Annotation], str, Optional[OverlayFn],
                    Optional[dict]], int]


@dataclasses.dataclass(frozen=True)
class Layout:
  """One output format of the bulk job.

  Attributes:
    name: the `--output-format` value.
    summary: one line for `--help` and the docs.
    suffix: what an output's name adds to its base (".json"; "" for a folder). The
      overlay of an output is its base + ".png".
    stem_names: outputs are named by the image's stem, as amg.py does (else by its
      file name with the extension, see `samjax.bulk.outputs.output_path_for`).
    write: writes one image's output (its overlay first, when asked); returns the
      number of masks. Provenance goes into `sa1b` records only: the amg.py files
      must equal the official ones (the job manifest covers them).
    is_valid: whether an output is complete (never raises).
  """
  name: str
  summary: str
  suffix: str
  stem_names: bool
  write: WriteFn
  is_valid: Callable[[str], bool]

  def overlay_path(self, output: str) -> str:
    """The overlay PNG of `output`: its base + ".png" (`cat.jpg.json` -> `cat.jpg.png`,
    `cat.json` -> `cat.png`, folder `cat` -> `cat.png`)."""
    return (output[:-len(self.suffix)] if self.suffix else output) + ".png"


# ---------------------------------------------------------------------- file access
# The only places here that touch the output storage (`samjax.bulk.store`: local
# paths or fsspec URLs).


def _put(path: str, data: bytes | str) -> None:
  store.write_bytes(path, data)


def _remove(path: str) -> None:
  try:
    store.remove(path)
  except FileNotFoundError:
    pass


def _listdir(folder: str) -> list[str]:
  """Names of the files directly in `folder` ([] when it does not exist)."""
  try:
    return store.store_for(folder).listdir(folder)
  except (FileNotFoundError, NotADirectoryError):
    return []


def _read_text(path: str) -> str:
  return store.read_bytes(path).decode("utf-8")


# ------------------------------------------------------------------------- records


def _number(x: Any) -> int | float:
  """A Python int or float of the same kind: upstream's int/float types of `bbox` and
  `crop_box` show in the files (`12` vs `12.0`)."""
  if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
    return int(x)
  return float(x)


def amg_records(anns: Sequence[Annotation], hw: tuple[int, int]) -> list[dict[str, Any]]:
  """The generator's annotations as the official generator returns them in
  `output_mode="coco_rle"`: `AMG_KEYS` in order, Python numbers of the same types,
  `segmentation` {"size": [H, W], "counts": str}.

  Args:
    anns: annotations with the official keys; `segmentation` in any official output
      mode (COCO RLE, uncompressed RLE, binary mask). A missing `area` or `bbox` is
      computed from the mask, a missing `crop_box` is the whole image.
    hw: (height, width) of the image.

  Raises:
    ValueError: a segmentation of another kind, or of another size than `hw`.
  """
  out = []
  for ann in anns:
    rle = to_coco_rle(ann["segmentation"], hw)
    bbox = ann.get("bbox")
    out.append({
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
        "area": int(ann["area"] if ann.get("area") is not None else rle_area(rle)),
        "bbox": [_number(v) for v in (rle_bbox(rle) if bbox is None else bbox)],
        "predicted_iou": float(ann["predicted_iou"]),
        "point_coords": [[_number(v) for v in p] for p in ann["point_coords"]],
        "stability_score": float(ann["stability_score"]),
        "crop_box": [_number(v) for v in ann.get("crop_box", [0, 0, hw[1], hw[0]])],
    })
  return out


def amg_metadata_csv(records: Sequence[dict[str, Any]]) -> str:
  """`metadata.csv` of amg.py's `write_masks_to_folder` for `amg_records`."""
  lines = [AMG_CSV_HEADER]
  for i, r in enumerate(records):
    fields = [str(i), str(r["area"]), *[str(x) for x in r["bbox"]],
              *[str(x) for x in r["point_coords"][0]], str(r["predicted_iou"]),
              str(r["stability_score"]), *[str(x) for x in r["crop_box"]]]
    lines.append(",".join(fields))
  return "\n".join(lines)


def mask_png(mask: np.ndarray) -> bytes:
  """An (H, W) bool mask as amg.py writes it: `cv2.imwrite(..., mask * 255)`, an 8-bit
  grayscale PNG of 0 and 255 with OpenCV's default settings."""
  import cv2  # pylint: disable=import-outside-toplevel
  ok, buf = cv2.imencode(".png", np.asarray(mask, np.uint8) * np.uint8(255))
  if not ok:
    raise ValueError("PNG encoding of a mask failed")
  return buf.tobytes()


# -------------------------------------------------------------------------- writers


def _overlay(layout: Layout, output: str, image: np.ndarray, records: list[dict[str, Any]],
             overlay_fn: Optional[OverlayFn]) -> None:
  if overlay_fn is not None:
    write_overlay(layout.overlay_path(output), image, {"annotations": records}, overlay_fn)


def _write_sa1b(output, image_path, image, anns, out_dir, overlay_fn=None,
                provenance=None) -> int:
  record = sa1b_record(image_path, image_id_for(output, out_dir), image.shape[:2], anns)
  if provenance is not None:
    record["provenance"] = provenance
  _overlay(SA1B, output, image, record["annotations"], overlay_fn)
  write_record(output, record)
  return len(record["annotations"])


def _write_amg_json(output, image_path, image, anns, out_dir, overlay_fn=None,
                    provenance=None) -> int:
  del image_path, out_dir, provenance
  records = amg_records(anns, image.shape[:2])
  _overlay(AMG_JSON, output, image, records, overlay_fn)
  _put(output, json.dumps(records))  # json.dump's default separators, as amg.py
  return len(records)


def _write_amg_png(output, image_path, image, anns, out_dir, overlay_fn=None,
                   provenance=None) -> int:
  del image_path, out_dir, provenance
  records = amg_records(anns, image.shape[:2])
  # The folder is incomplete from here until the new metadata.csv is in place.
  _remove(store.join(output, AMG_METADATA))
  _overlay(AMG_PNG, output, image, records, overlay_fn)
  for i, r in enumerate(records):
    _put(store.join(output, f"{i}.png"), mask_png(decode_rle(r["segmentation"])))
  for name in _listdir(output):  # Masks of an earlier run that had more.
    m = _MASK_PNG_RE.match(name)
    if m and int(m.group(1)) >= len(records):
      _remove(store.join(output, name))
  _put(store.join(output, AMG_METADATA), amg_metadata_csv(records))
  return len(records)


# ----------------------------------------------------------------------- validity


def is_valid_amg_json(path: str) -> bool:
  """Whether `path` is a complete amg-json output: a JSON list of records with the
  official keys, each `segmentation` a COCO RLE. Never raises."""
  try:
    records = json.loads(_read_text(path))
    return isinstance(records, list) and all(
        isinstance(r, dict) and set(r) == set(AMG_KEYS)
        and isinstance(r["segmentation"], dict)
        and isinstance(r["segmentation"].get("counts"), str)
        and isinstance(r["segmentation"].get("size"), list) for r in records)
  except Exception:  # pylint: disable=broad-except
    return False


def is_valid_amg_png(folder: str) -> bool:
  """Whether `folder` is a complete amg-png output: `metadata.csv` with the official
  header and rows 0..n-1 of 14 fields, and `0.png` ... `<n-1>.png`. Never raises."""
  try:
    lines = _read_text(store.join(folder, AMG_METADATA)).split("\n")
    if lines[0] != AMG_CSV_HEADER:
      return False
    names = set(_listdir(folder))
    for i, line in enumerate(lines[1:]):
      fields = line.split(",")
      if len(fields) != 14 or fields[0] != str(i) or f"{i}.png" not in names:
        return False
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# ------------------------------------------------------------------------ registry

SA1B = Layout("sa1b", "one SA-1B style JSON per image, <name with extension>.json",
              ".json", False, _write_sa1b, is_valid_sa1b)
AMG_JSON = Layout("amg-json", "the official amg.py --convert-to-rle: <stem>.json, a list "
                  "of COCO RLE records", ".json", True, _write_amg_json, is_valid_amg_json)
AMG_PNG = Layout("amg-png", "the official amg.py default: a folder <stem>/ of <i>.png masks "
                 "and metadata.csv", "", True, _write_amg_png, is_valid_amg_png)
LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (SA1B, AMG_JSON, AMG_PNG)}
FORMATS = tuple(LAYOUTS)
DEFAULT_FORMAT = SA1B.name


def get_layout(name: str | Layout) -> Layout:
  """The `Layout` named `name` (a `Layout` is returned as it is).

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if isinstance(name, Layout):
    return name
  try:
    return LAYOUTS[name]
  except KeyError:
    raise ValueError(f"unknown output format {name!r}; known: {', '.join(FORMATS)}") \
        from None


# --------------------------------------------------------------------------- names


def _hash(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:10]


def output_paths(layout: str | Layout, images: Iterable[str], roots: Sequence[str],
                 out_dir: str) -> dict[str, str]:
  """The output of each image in `layout`: unique, and stable for a given set of images.

  `sa1b`: `output_path_for` of each. Stem-named layouts: `<dir>/<stem><suffix>`
  where `<dir>` is the folder `output_path_for` would use (the image's subfolder
  under its input folder; `out_dir` for loose files); an image whose name or overlay
  name would be shared with another image's, or is a name the job keeps for itself,
  falls back to its `output_path_for` name without ".json" (and, should that still
  collide, with "-<hash of the path>" added), + suffix.

  Args:
    layout: a `Layout` or its name.
    images: the job's images (all processes: the names of one depend on the others).
    roots: the input folders (`samjax.bulk.inputs.input_roots`).
    out_dir: the output folder (normalized: `samjax.bulk.store.norm`).

  Returns:
    {image path: output path}.
  """
  layout = get_layout(layout)
  unique = {p: output_path_for(p, roots, out_dir) for p in images}
  if not layout.stem_names:
    return unique
  bases = {p: u[:-len(".json")] for p, u in unique.items()}

  def base(p: str, level: int) -> str:
    if level == 0:
      return store.join(store.dirname(bases[p]),
                        os.path.splitext(store.basename(p))[0])
    return bases[p] if level == 1 else f"{bases[p]}-{_hash(store.norm(p))}"

  top = store.norm(out_dir)

  def reserved(path: str) -> bool:
    return store.dirname(path) == top and bool(_RESERVED_RE.match(store.basename(path)))

  level = dict.fromkeys(bases, 0)
  for _ in range(3):
    owners = collections.defaultdict(list)
    for p, lv in level.items():
      b = base(p, lv)
      for name in (b + layout.suffix, b + ".png"):
        owners[name].append(p)
    clashing = {p for name, ps in owners.items() if len(ps) > 1 or reserved(name)
                for p in ps}
    raise_ = {p for p in clashing if level[p] < 2}
    if not raise_:
      break
    for p in raise_:
      level[p] += 1
  return {p: base(p, lv) + layout.suffix for p, lv in level.items()}


def pop_temps(layout: Layout, output: str, temps: dict) -> list[str]:
  """The leftover temporaries of `output` and its overlay in `temps` (a
  `samjax.io.files.find_temps` listing), removed from it: for a folder output, every
  temporary inside it."""
  found = list(temps.pop(files.temp_key(layout.overlay_path(output)), ()))
  if layout.suffix:
    found += temps.pop(files.temp_key(output), ())
  elif not store.is_url(output):
    folder = os.path.abspath(output)
    for key in [k for k in temps if k[0] == folder]:
      found += temps.pop(key)
  return found
