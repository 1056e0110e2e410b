"""The job's outputs: where each goes, what it holds, when it counts as done.

* `output_path_for`: one JSON per input, unique and stable across runs.
* `sa1b_record`: an image's annotations in the SA-1B layout (COCO RLE masks).
* `is_valid_output`: whether a JSON is complete, which is what a rerun skips.
* `write_overlay`: the optional PNG next to the JSON.
* `FailureLog`: the JSON-lines file of images that failed, and why.

These are the `sa1b` layout's; `samjax.bulk.layouts` holds the registry of output
formats (this one and the official amg.py's) that the job writes through.

Every output is written whole through `samjax.bulk.store` (locally
`samjax.io.files.atomic_write`; on object stores one whole-object upload), so a file
under its final name is always complete, whatever killed the job. Locally the failure
log is appended to with `samjax.io.files.append_text` and compacted with
`rewrite_text`, which several jobs sharing the folder may do at once; at a URL it is
rewritten whole (see `FailureLog`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable, Collection, Optional, Sequence, Union

import numpy as np

from samjax.bulk import store
from samjax.bulk.inputs import is_under
from samjax.io import files
from samjax.masks import decode_rle, rle_area, rle_bbox, to_coco_rle

PathLike = Union[str, "os.PathLike[str]"]
# One generated annotation (official SamAutomaticMaskGenerator keys).
Annotation = dict[str, Any]
OverlayFn = Callable[[np.ndarray, list[Annotation]], np.ndarray]


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
    Absolute path of the JSON file. The overlay, if any, is `overlay_path` of it.
  """
  path = store.norm(path)
  out_dir = store.norm(out_dir)
  out = store.store_for(out_dir)
  roots = sorted({store.norm(r) for r in input_roots})
  outermost = [r for r in roots if not any(o != r and is_under(r, o) for o in roots)]
  containing = [r for r in outermost if is_under(path, r) and path != r]
  if containing:
    root = containing[0]  # Outermost roots are disjoint, so there is only one.
    rel = store.relpath(path, root)
    if len(outermost) > 1:
      tag = store.basename(root) or "root"
      rel = f"{tag}-{_short_hash(root, 8)}/{rel}"
    # Relative parts may come from a URL ("/") and go to a local folder, or back.
    return out.join(out_dir, *rel.replace(os.sep, "/").split("/")) + ".json"
  stem = os.path.splitext(store.basename(path))[0]
  return out.join(out_dir, f"{stem}-{_short_hash(path)}.json")


def overlay_path(json_path: str) -> str:
  """The overlay PNG that goes with an output JSON: same name, ".png" for ".json"."""
  return json_path[:-len(".json")] + ".png"


def image_id_for(json_path: str, out_dir: str) -> int:
  """A stable integer id: from the output's path relative to the output folder.

  The same on every run and machine; 52 bits, so it stays exact as a JSON (double)
  number.
  """
  rel = store.relpath(json_path, out_dir)
  return int(hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:13], 16)


# ------------------------------------------------------------------------------ records


def is_valid_output(path: PathLike) -> bool:
  """Whether `path` is a complete SA-1B style JSON as written by this package.

  Checks that it parses and has an `image` record with `file_name` (str),
  `height` and `width` (positive ints), and an `annotations` list of dicts each
  with a `segmentation` RLE dict (`size`, `counts`). Never raises.
  """
  try:
    record = json.loads(store.read_bytes(os.fspath(path)))
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
    anns: the generator's annotations for this image; `segmentation` in any of the
      official output modes (compressed RLE, uncompressed RLE, binary mask).

  Returns:
    {"image": {...}, "annotations": [...]} with JSON-ready Python types; the
    segmentation is a compressed COCO RLE with str counts; bbox and crop_box are
    XYWH in pixels, point_coords [[x, y]] in pixels.

  Raises:
    ValueError: a segmentation of another kind, or of another size than `hw`.
  """
  annotations = []
  for i, ann in enumerate(anns):
    rle = to_coco_rle(ann["segmentation"], hw)
    area = ann.get("area")
    bbox = ann.get("bbox")
    annotations.append({
        "id": i,
        "segmentation": rle,
        "bbox": _floats(rle_bbox(rle) if bbox is None else bbox),
        "area": int(rle_area(rle) if area is None else area),
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


def write_record(json_path: str, record: dict[str, Any]) -> None:
  """Writes a record as compact JSON, whole (never visible half-written)."""
  store.write_bytes(json_path, json.dumps(record, separators=(",", ":")))


def write_overlay(png_path: str, image: np.ndarray, record: dict[str, Any],
                  overlay_fn: OverlayFn) -> None:
  """Renders `overlay_fn(image, anns)` with masks decoded to (H, W) bool arrays."""
  import cv2  # pylint: disable=import-outside-toplevel

  anns = [dict(a, segmentation=decode_rle(a["segmentation"])) for a in record["annotations"]]
  vis = np.asarray(overlay_fn(image, anns))
  channels = vis.shape[2] if vis.ndim == 3 else 1
  if vis.dtype != np.uint8 or vis.ndim not in (2, 3) or channels not in (1, 3, 4):
    raise ValueError(f"overlay_fn must return uint8 (H, W[, 3|4]), got {vis.dtype} {vis.shape}")
  if vis.ndim == 3:  # RGB(A) -> OpenCV's BGR(A).
    vis = np.concatenate([vis[:, :, 2::-1], vis[:, :, 3:]], axis=2)
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(vis))
  if not ok:
    raise ValueError("PNG encoding of the overlay failed")
  store.write_bytes(png_path, buf.tobytes())


# ----------------------------------------------------------------------------- failures


def _now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class FailureLog:
  """The JSON-lines file of inputs that failed, and why; one line per failure.

  Each line: {"path", "stage" ("list", "load", "generate" or "write"), "reason",
  "time", "output" (the JSON the image would have had; null for "list"), "run"}.

  Lines are appended as failures happen (a kill loses nothing). Writing one never
  raises: when the disk is full the record is kept in `unwritten` and printed to
  stderr instead, so the job can stop cleanly and say why. At the end of a run
  `compact` drops the records that are no longer true (see there).

  At a URL (an object store has no appends) the log is one object rewritten whole:
  the earlier runs' records are read once, and the whole text is uploaded again
  when a failure comes, at most every `flush_s` seconds (a record waits at most that
  long), and at `compact`. A kill loses at most the records of the last `flush_s`
  seconds (those images have no output, so the rerun tries them again). Only one writer per log object: the processes of
  a job write one log each, and jobs sharing a URL output are not supported.

  Args:
    path: the JSONL file (local path or URL).
    run_id: marks this run's records (default: host, pid, start time and a random
      token).
    flush_s: at a URL, the longest time a record waits to be uploaded.
  """

  def __init__(self, path: str, run_id: Optional[str] = None, flush_s: float = 2.0):
    self.path = path
    self.run_id = run_id or (f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}:"
                             f"{secrets.token_hex(3)}")
    self.count = 0
    self.unwritten: list[str] = []
    self.write_error: Optional[OSError] = None
    self._lock = threading.Lock()
    self._remote = store.is_url(path)
    self._flush_s = flush_s
    self._text: Optional[str] = None  # At a URL: the whole log as it should be.
    self._dirty = False
    self._flushed_at = 0.0
    self._timer: Optional[threading.Timer] = None

  def _remote_text(self) -> str:
    """At a URL: the log's text, read from the store on first use."""
    if self._text is None:
      try:
        self._text = store.read_bytes(self.path).decode("utf-8", "replace")
      except FileNotFoundError:
        self._text = ""
    return self._text

  def _remote_append(self, line: str) -> None:
    text = self._remote_text()
    if text and not text.endswith("\n"):
      text += "\n"  # A torn last line of an earlier writer: keep ours separate.
    self._text = text + line
    self._dirty = True
    waited = time.monotonic() - self._flushed_at
    if waited >= self._flush_s:
      self.flush()
    elif self._timer is None:  # Uploaded by then even if no other failure comes.
      self._timer = threading.Timer(self._flush_s - waited, self._timed_flush)
      self._timer.daemon = True
      self._timer.start()

  def _timed_flush(self) -> None:
    with self._lock:
      self._timer = None
      if self.write_error is None:
        with contextlib.suppress(OSError):  # Still waiting: the next add or compact retries.
          self.flush()

  def flush(self) -> None:
    """At a URL: uploads the whole log if records wait (a no-op locally).

    Raises:
      OSError: the upload failed (the records stay waiting).
    """
    if not self._remote or not self._dirty:
      return
    store.write_bytes(self.path, self._text or "")
    self._dirty = False
    self._flushed_at = time.monotonic()

  def add(self, image_path: str, stage: str, reason: str, output: Optional[str] = None
          ) -> None:
    """Records one failure (never raises for a write error, see the class)."""
    line = json.dumps({"path": image_path, "stage": stage, "reason": reason,
                       "time": _now_iso(), "output": output, "run": self.run_id})
    with self._lock:
      self.count += 1
      if self.write_error is None:
        try:
          if self._remote:
            self._remote_append(line + "\n")
          else:
            files.append_text(self.path, line + "\n")
          return
        except OSError as e:
          self.write_error = e
          print(f"samjax bulk: cannot write {self.path} ({e.strerror or e}); failure "
                "records follow here instead", file=sys.stderr)
      self.unwritten.append(line)
      print(f"samjax bulk: failed: {line}", file=sys.stderr)

  def compact(self, succeeded: Collection[str] = (), relisted: bool = False,
              is_done: Callable[[str], bool] = None) -> bool:
    """Rewrites the log with only the records that are still true; never raises.

    Dropped: records of images that succeeded in this run (`succeeded`) or whose
    output is valid now (`is_done(output)`, default `is_valid_output`: e.g. another
    job redid them); with `relisted` (this run listed the same inputs again), the
    "list" records of earlier runs; torn lines of a killed writer; and every record
    of an image but its latest. Records that could not be written during the run
    are added. The file is removed when nothing is left.

    Returns:
      Whether the file changed.
    """
    is_done = is_done or is_valid_output
    succeeded = set(succeeded)

    def keep(text: str) -> Optional[str]:
      latest: dict[str, tuple[str, dict]] = {}
      for line in text.splitlines() + self.unwritten:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
          continue
        latest.pop(rec["path"], None)  # Re-insert: keeps the order of latest records.
        latest[rec["path"]] = (line, rec)
      lines = []
      for path, (line, rec) in latest.items():
        if path in succeeded:
          continue
        if relisted and rec.get("stage") == "list" and rec.get("run") != self.run_id:
          continue
        out = rec.get("output")
        if isinstance(out, str) and store.exists(out) and is_done(out):
          continue
        lines.append(line + "\n")
      new = "".join(lines)
      return text if new == text else new

    if self._remote:
      with self._lock:
        if self._timer is not None:
          self._timer.cancel()
          self._timer = None
        return self._compact_remote(keep)
    try:
      if not os.path.exists(self.path):
        if not self.unwritten:
          return False
        files.append_text(self.path, "")  # Create it, to write what was kept in memory.
      changed = files.rewrite_text(self.path, keep)
    except OSError:
      return False
    self.unwritten = []
    return changed

  def _compact_remote(self, keep: Callable[[str], Optional[str]]) -> bool:
    try:
      old = self._remote_text()
      new = keep(old)
      if new == old and not self._dirty:
        return False
      if new:
        self._text, self._dirty = new, True
        self.flush()
      else:
        with contextlib.suppress(FileNotFoundError):
          store.remove(self.path)
        self._text, self._dirty = "", False
    except (OSError, ValueError):
      return False
    self.unwritten = []
    return True
