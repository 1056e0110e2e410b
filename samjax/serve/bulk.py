"""The bulk viewer's side: a `samjax automask` output folder, read-only and contained.

The folder (`--masks`) holds one SA-1B style JSON per image (`samjax.bulk.outputs`:
`{"image": {...}, "annotations": [{"segmentation": COCO RLE, "predicted_iou",
"stability_score", "area", "bbox", ...}], "provenance": {...}}`), `failures*.jsonl`,
and the job manifest `samjax_job.json` that `samjax automask` writes
(`samjax.bulk.provenance`), shown as the job's settings (a hand-written `job.json` or
`settings.json` is shown where there is no manifest); the viewer also sums up what the
records themselves say.

Every path comes from the browser and goes through `samjax.serve.paths.resolve_under`.
A JSON that does not parse or does not have the SA-1B shape is reported as broken,
with the reason, and never stops the server. The pictures are looked up under
`--images` only (the outputs record where the images were, which may be anywhere).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from samjax.bulk.inputs import is_under
from samjax.serve.paths import PathRefused, resolve_under, walk_files

#: JSON files larger than this are reported as broken instead of parsed.
MAX_JSON_BYTES = 256 << 20
#: Files listed at most.
MAX_LISTED = 100_000
#: Settings files shown when present at the top of the folder.
SETTINGS_NAMES = ("samjax_job.json", "job.json", "settings.json")
_COUNTS_CHARS = frozenset(chr(c) for c in range(48, 48 + 64))


class BrokenRecord(ValueError):
  """An output JSON that cannot be shown; the message says why."""


def _number(value: Any, what: str, allow_none: bool = False) -> Optional[float]:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BrokenRecord(f"{what} is not a number ({type(value).__name__})")
  return value


def check_record(record: Any) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
  """The image info and annotations of a parsed SA-1B record, checked for the viewer.

  Returns:
    (image dict with file_name, width, height (and path, image_id when present),
     annotations with id, segmentation, area, bbox, predicted_iou,
     stability_score, point_coords, crop_box).

  Raises:
    BrokenRecord: the first thing that is not as `samjax.bulk.outputs.sa1b_record`
      writes it.
  """
  if not isinstance(record, dict):
    raise BrokenRecord(f"top level is a {type(record).__name__}, not an object")
  image, anns = record.get("image"), record.get("annotations")
  if not isinstance(image, dict):
    raise BrokenRecord("no 'image' object")
  if not isinstance(anns, list):
    raise BrokenRecord("no 'annotations' list")
  h, w = image.get("height"), image.get("width")
  for key, v in (("height", h), ("width", w)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise BrokenRecord(f"image.{key} is not a positive integer: {v!r}")
  info = {"file_name": str(image.get("file_name", "")), "width": w, "height": h}
  for key in ("path", "image_id"):
    if key in image:
      info[key] = image[key]
  out = []
  for i, ann in enumerate(anns):
    where = f"annotation {i}"
    if not isinstance(ann, dict):
      raise BrokenRecord(f"{where} is not an object")
    seg = ann.get("segmentation")
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
      raise BrokenRecord(f"{where}: segmentation is not a COCO RLE (size, counts)")
    if list(seg["size"]) != [h, w]:
      raise BrokenRecord(f"{where}: mask size {seg['size']} is not the image's {[h, w]}")
    counts = seg["counts"]
    if isinstance(counts, list):  # Uncompressed RLE: convert, the browser reads one kind.
      from samjax.masks import to_coco_rle  # pylint: disable=import-outside-toplevel
      try:
        seg = to_coco_rle(seg)
      except Exception as e:  # pylint: disable=broad-except
        raise BrokenRecord(f"{where}: bad uncompressed RLE ({e})") from None
    elif not isinstance(counts, str) or not set(counts) <= _COUNTS_CHARS:
      raise BrokenRecord(f"{where}: RLE counts are not a COCO compressed string")
    bbox = ann.get("bbox")
    if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4):
      raise BrokenRecord(f"{where}: bbox is not 4 numbers")
    out.append({
        "id": ann.get("id", i),
        "segmentation": {"size": [h, w], "counts": seg["counts"]},
        "area": _number(ann.get("area", 0), f"{where}: area"),
        "bbox": [_number(v, f"{where}: bbox") for v in bbox] if bbox else None,
        "predicted_iou": _number(ann.get("predicted_iou"), f"{where}: predicted_iou", True),
        "stability_score": _number(ann.get("stability_score"), f"{where}: stability_score",
                                   True),
        "point_coords": ann.get("point_coords"),
        "crop_box": ann.get("crop_box"),
    })
  return info, out


class BulkFolder:
  """A `samjax automask` output folder, for the viewer.

  Args:
    root: the output folder (`--masks`).
    images_root: the folder the pictures are looked up in (`--images`), or None.
  """

  def __init__(self, root: str, images_root: Optional[str] = None):
    if not os.path.isdir(root):
      raise ValueError(f"--masks {root}: not a folder")
    self.root = os.path.realpath(root)
    self.images_root = os.path.realpath(images_root) if images_root else None
    self._summaries: Dict[str, Tuple[Tuple[int, int], Dict[str, Any]]] = {}
    self._lock = threading.Lock()

  # ------------------------------------------------------------------ listing
  def _json_names(self) -> List[str]:
    return [p for p in walk_files(self.root, (".json",), MAX_LISTED)
            if p not in SETTINGS_NAMES]

  def listing(self, offset: int = 0, limit: int = 100) -> Dict[str, Any]:
    """A page of the folder's output JSONs, each checked (results cached by mtime).

    Returns:
      {"folder": name, "total": n, "offset", "limit", "items": [{"path", "status":
       "ok"|"broken", "reason"?, "file_name", "width", "height", "masks",
       "bytes"}], "broken": count of broken items on this page}.
    """
    names = self._json_names()
    page = names[offset:offset + limit]
    items = [self.summary(p) for p in page]
    return {"folder": os.path.basename(self.root), "total": len(names), "offset": offset,
            "limit": limit, "items": items,
            "broken": sum(it["status"] == "broken" for it in items)}

  def summary(self, rel: str) -> Dict[str, Any]:
    """One JSON's line in the listing (its status, image size and mask count)."""
    full = resolve_under(self.root, rel)
    st = os.stat(full)
    stamp = (st.st_mtime_ns, st.st_size)
    with self._lock:
      hit = self._summaries.get(full)
    if hit is not None and hit[0] == stamp:
      return hit[1]
    item: Dict[str, Any] = {"path": rel, "bytes": st.st_size}
    try:
      image, anns = self._load(full, st.st_size)
      item.update(status="ok", file_name=image["file_name"], width=image["width"],
                  height=image["height"], masks=len(anns))
    except BrokenRecord as e:
      item.update(status="broken", reason=str(e))
    with self._lock:
      self._summaries[full] = (stamp, item)
    return item

  @staticmethod
  def _load(full: str, size: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    if size > MAX_JSON_BYTES:
      raise BrokenRecord(f"{size} bytes, more than the viewer reads ({MAX_JSON_BYTES})")
    if size == 0:
      raise BrokenRecord("empty file")
    try:
      with open(full, "rb") as f:
        record = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise BrokenRecord(f"not valid JSON: {e}") from None
    except RecursionError:
      raise BrokenRecord("not valid JSON: nested too deeply") from None
    except OSError as e:
      raise BrokenRecord(f"cannot read: {e.strerror or e}") from None
    return check_record(record)

  def record(self, rel: str) -> Dict[str, Any]:
    """The checked record of one output JSON.

    Raises:
      PathRefused: the path is not a JSON file inside the folder.
      BrokenRecord: the file cannot be shown (the message says why).
    """
    if not rel.endswith(".json") or rel.rsplit("/", 1)[-1] in SETTINGS_NAMES:
      raise PathRefused("not an output JSON")
    full = resolve_under(self.root, rel)
    image, anns = self._load(full, os.path.getsize(full))
    return {"path": rel, "image": image, "annotations": anns,
            "has_picture": self.image_path(rel, image) is not None}

  # ------------------------------------------------------------------ pictures
  def image_path(self, rel: str, image: Dict[str, Any]) -> Optional[str]:
    """The picture of an output under `--images`, or None.

    Tried in order: the JSON's path without ".json" (the job's layout for a folder
    input: `sub/cat.jpg.json` <- `IMAGES/sub/cat.jpg`); the record's `image.path` if
    it lies under `--images`; `IMAGES/<file_name>`.
    """
    if self.images_root is None:
      return None
    candidates = [rel[:-len(".json")]]
    path = image.get("path")
    if isinstance(path, str) and os.path.isabs(path):
      real = os.path.realpath(path)
      if is_under(real, self.images_root) and real != self.images_root:
        candidates.append(os.path.relpath(real, self.images_root).replace(os.sep, "/"))
    if image.get("file_name"):
      candidates.append(str(image["file_name"]))
    for cand in candidates:
      try:
        return resolve_under(self.images_root, cand)
      except PathRefused:
        continue
    return None

  # ------------------------------------------------------------------ job info
  def failures(self) -> List[Dict[str, Any]]:
    """The records of every `failures*.jsonl` at the top of the folder.

    A line that is not a JSON object comes back as {"broken": true, "line": ...}.
    """
    out = []
    try:
      names = sorted(os.listdir(self.root))
    except OSError:
      return out
    for name in names:
      if not (name.startswith("failures") and name.endswith(".jsonl")):
        continue
      try:
        full = resolve_under(self.root, name)
        with open(full, "rb") as f:
          data = f.read(MAX_JSON_BYTES)
      except (PathRefused, OSError):
        continue
      for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except ValueError:
          rec = None
        if isinstance(rec, dict):
          out.append({**rec, "file": name})
        else:
          out.append({"broken": True, "line": line[:300], "file": name})
    return out

  def settings(self) -> Dict[str, Any]:
    """The job's settings file, if any, and what the folder holds."""
    out: Dict[str, Any] = {"folder": os.path.basename(self.root), "settings_file": None,
                           "settings": None}
    for name in SETTINGS_NAMES:
      try:
        full = resolve_under(self.root, name)
      except PathRefused:
        continue
      out["settings_file"] = name
      try:
        with open(full, "rb") as f:
          out["settings"] = json.loads(f.read(1 << 20))
      except (ValueError, OSError) as e:
        out["settings"] = {"broken": True, "reason": str(e)}
      break
    names = self._json_names()
    out["outputs"] = len(names)
    out["overlays"] = sum(1 for p in walk_files(self.root, (".png",), MAX_LISTED))
    out["images_folder"] = bool(self.images_root)
    return out
