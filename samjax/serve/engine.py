"""The server's model side: image embeddings in an LRU, prompt decoding, automask jobs.

`Engine` owns one `SamModel` and a lock that every device call holds, so requests
from several tabs (Starlette runs them in a thread pool) and the automask worker
never reach the device at once. An image is embedded once (`Predictor.set_image`)
and kept, with its pixels, in an LRU keyed by a hash of its pixels; a click only
runs `Predictor.predict` (prompt encoder + mask decoder + upsampling) on the kept
embedding, so a mask here is exactly what `Predictor.predict` returns for the same
prompts.

The low-res logits of recent predictions stay on the server (per image, a few) so
the next click can feed the chosen candidate back as `mask_input`, as the official
predictor's interactive loop does, without the browser shipping logits around.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import math
import threading
import time
import traceback
import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from samjax.amg.options import AmgOptions
from samjax.masks import encode_rle, mask_to_box


class NotFound(LookupError):
  """An unknown or expired image, prediction or job (HTTP 404)."""


class Gone(LookupError):
  """A prediction referenced as `mask_input` that is no longer kept (HTTP 410)."""


def json_safe(value: Any) -> Any:
  """Nested records -> JSON-ready Python values; NaN and infinities become None.

  (Stability scores are NaN for empty masks when the filters are off; JSON has no NaN.)
  """
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def image_key(image: np.ndarray) -> str:
  """The LRU key of an RGB image: sha256 of its shape and pixels (20 hex digits).

  The same picture uploaded twice, or as PNG and as a lossless re-encode, shares one
  embedding.
  """
  h = hashlib.sha256(repr(image.shape).encode())
  h.update(np.ascontiguousarray(image).data)
  return h.hexdigest()[:20]


def mask_entry(index: int, mask: np.ndarray, score: float) -> Dict[str, Any]:
  """One candidate mask as the API returns it: COCO RLE, area, XYWH box, score."""
  x0, y0, x1, y1 = (int(v) for v in mask_to_box(mask))
  area = int(np.count_nonzero(mask))
  bbox = [x0, y0, x1 - x0 + 1, y1 - y0 + 1] if area else [0, 0, 0, 0]
  return {"index": index, "predicted_iou": json_safe(score), "area": area, "bbox": bbox,
          "segmentation": encode_rle(mask)}


@dataclasses.dataclass
class Prediction:
  """What a predict call left for later: the candidates' low-res logits and masks."""
  prediction_id: str
  low_res: np.ndarray          # (C, h, w) float32 logits
  masks: List[Dict[str, Any]]  # mask_entry per candidate


class ImageEntry:
  """One image: its pixels, a Predictor holding its embedding, recent predictions."""

  def __init__(self, image_id: str, name: str, image: np.ndarray, predictor,
               keep_predictions: int):
    self.image_id = image_id
    self.name = name
    self.image = image
    self.predictor = predictor
    self.predictions: "collections.OrderedDict[str, Prediction]" = collections.OrderedDict()
    self.keep_predictions = keep_predictions
    self.embed_ms = 0.0
    self._counter = itertools.count(1)

  @property
  def height(self) -> int:
    return int(self.image.shape[0])

  @property
  def width(self) -> int:
    return int(self.image.shape[1])

  def info(self) -> Dict[str, Any]:
    return {"image_id": self.image_id, "name": self.name, "width": self.width,
            "height": self.height, "embed_ms": round(self.embed_ms, 1)}

  def remember(self, low_res: np.ndarray, masks: List[Dict[str, Any]]) -> Prediction:
    pred = Prediction(f"{self.image_id}.{next(self._counter)}", low_res, masks)
    self.predictions[pred.prediction_id] = pred
    while len(self.predictions) > self.keep_predictions:
      self.predictions.popitem(last=False)
    return pred


@dataclasses.dataclass
class Job:
  """An automask run: queued -> running -> done | failed."""
  job_id: str
  image_id: str
  options: Dict[str, Any]
  status: str = "queued"
  created: float = dataclasses.field(default_factory=time.time)
  started: Optional[float] = None
  finished: Optional[float] = None
  records: Optional[List[Dict[str, Any]]] = None
  error: Optional[str] = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)

  def info(self, with_records: bool = True) -> Dict[str, Any]:
    out = {"job_id": self.job_id, "image_id": self.image_id, "status": self.status,
           "options": self.options, "error": self.error,
           "seconds": None if self.finished is None or self.started is None
           else round(self.finished - self.started, 3)}
    if self.records is not None:
      out["count"] = len(self.records)
      if with_records:
        out["records"] = self.records
    return out


def amg_option_fields() -> List[Dict[str, Any]]:
  """The generator options the app offers: `AmgOptions.cli_fields()` but the output mode.

  Defaults and help texts come from `AmgOptions`, their only copy.
  """
  out = []
  for f in AmgOptions.cli_fields():
    kind = "float" if "float" in str(f.type) else "int"
    out.append({"name": f.name, "type": kind, "default": json_safe(f.default),
                "help": f.metadata["help"]})
  return out


def amg_options(requested: Optional[Dict[str, Any]]) -> AmgOptions:
  """`AmgOptions` from a request's options dict (COCO RLE output).

  Raises:
    ValueError: an unknown option, or values `AmgOptions` refuses (its message).
  """
  requested = dict(requested or {})
  allowed = {f["name"] for f in amg_option_fields()}
  unknown = sorted(set(requested) - allowed)
  if unknown:
    raise ValueError(f"unknown automask option(s) {unknown}; known: {sorted(allowed)}")
  return AmgOptions(**requested, output_mode="coco_rle")


class Engine:
  """The model, the image LRU and the automask worker of one server.

  Args:
    model: a loaded `samjax.SamModel`.
    cache_size: images whose embedding is kept (least recently used goes first).
    keep_predictions: predictions kept per image for `mask_input` and export.
    max_jobs: finished automask jobs kept for `GET /api/jobs/ID`.
  """

  def __init__(self, model, cache_size: int = 8, keep_predictions: int = 16,
               max_jobs: int = 16):
    if cache_size < 1:
      raise ValueError(f"cache_size must be >= 1, got {cache_size}")
    self.model = model
    self.cache_size = cache_size
    self.keep_predictions = keep_predictions
    self.max_jobs = max_jobs
    #: Held by every call that reaches the device (embedding, decoding, automask).
    self.device_lock = threading.Lock()
    self._state = threading.RLock()
    self._images: "collections.OrderedDict[str, ImageEntry]" = collections.OrderedDict()
    self._generators: "collections.OrderedDict[AmgOptions, Any]" = collections.OrderedDict()
    self._jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
    self._queue: "collections.deque[Job]" = collections.deque()
    self._wake = threading.Condition(self._state)
    self._worker: Optional[threading.Thread] = None
    self._closed = False

  # ------------------------------------------------------------------ images
  def add_image(self, image: np.ndarray, name: str = "") -> Dict[str, Any]:
    """Embeds an (H, W, 3) uint8 RGB image unless it is cached; returns its info.

    The info has `cached` (whether the embedding was already there).
    """
    from samjax.predictor import Predictor  # pylint: disable=import-outside-toplevel
    key = image_key(image)
    with self._state:
      entry = self._images.get(key)
      if entry is not None:
        self._images.move_to_end(key)
        return {**entry.info(), "cached": True}
    with self.device_lock:
      with self._state:  # Another tab may have embedded it while we waited.
        entry = self._images.get(key)
      if entry is None:
        start = time.perf_counter()
        predictor = Predictor(self.model)
        predictor.set_image(image)
        np.asarray(predictor.features)  # Wait for the device: embed_ms is the real cost.
        entry = ImageEntry(key, name, image, predictor, self.keep_predictions)
        entry.embed_ms = 1e3 * (time.perf_counter() - start)
        cached = False
      else:
        cached = True
    with self._state:
      self._images[key] = entry
      self._images.move_to_end(key)
      while len(self._images) > self.cache_size:
        self._images.popitem(last=False)
    return {**entry.info(), "cached": cached}

  def image(self, image_id: str) -> ImageEntry:
    with self._state:
      entry = self._images.get(image_id)
      if entry is None:
        raise NotFound(f"no image {image_id!r} on the server (evicted or never opened); "
                       "open it again")
      self._images.move_to_end(image_id)
      return entry

  def images(self) -> List[Dict[str, Any]]:
    with self._state:
      return [e.info() for e in reversed(self._images.values())]

  # ------------------------------------------------------------------ prompts
  def predict(self, image_id: str, point_coords=None, point_labels=None, box=None,
              mask_input: Optional[Dict[str, Any]] = None, multimask_output: bool = True
              ) -> Dict[str, Any]:
    """`Predictor.predict` on a kept embedding; masks as COCO RLE.

    Args:
      image_id: from `add_image`.
      point_coords: [[x, y], ...] pixels of the image, or None.
      point_labels: [1 | 0, ...] (foreground / background), or None.
      box: [x0, y0, x1, y1] pixels, or None.
      mask_input: {"prediction_id": ..., "index": k}: feed candidate k of that
        earlier prediction back as low-res logits (None: no mask input).
      multimask_output: 3 candidates instead of 1.

    Returns:
      {"prediction_id", "image_id", "width", "height", "masks": [mask_entry...],
       "best": index of the highest predicted IoU, "timing_ms": {...}}.

    Raises:
      NotFound: unknown image. Gone: `mask_input` names a prediction no longer kept.
      ValueError: bad prompts (the predictor's message).
    """
    entry = self.image(image_id)
    coords = labels = None
    if point_coords is not None or point_labels is not None:
      coords = _numbers(point_coords, "point_coords", (-1, 2))
      labels = _numbers(point_labels, "point_labels", (-1,))
      if coords.shape[0] == 0 and labels.shape[0] == 0:
        coords = labels = None
    b = None if box is None else _numbers(box, "box", (4,))
    if coords is None and b is None and mask_input is None:
      raise ValueError("give at least one point, a box or a mask_input")
    logits_in = None
    if mask_input is not None:
      logits_in = self._mask_input(entry, mask_input)
    t0 = time.perf_counter()
    with self.device_lock:
      t1 = time.perf_counter()
      masks, scores, low_res = entry.predictor.predict(
          coords, labels, b, logits_in, multimask_output=bool(multimask_output))
      t2 = time.perf_counter()
    entries = [mask_entry(k, m, s) for k, (m, s) in enumerate(zip(masks, scores))]
    t3 = time.perf_counter()
    with self._state:
      pred = entry.remember(np.asarray(low_res, np.float32), entries)
    return {"prediction_id": pred.prediction_id, "image_id": image_id,
            "width": entry.width, "height": entry.height, "masks": entries,
            "best": int(np.argmax(scores)),
            "timing_ms": {"wait": round(1e3 * (t1 - t0), 2),
                          "predict": round(1e3 * (t2 - t1), 2),
                          "encode": round(1e3 * (t3 - t2), 2)}}

  def _mask_input(self, entry: ImageEntry, ref: Any) -> np.ndarray:
    if not isinstance(ref, dict) or not isinstance(ref.get("prediction_id"), str):
      raise ValueError('mask_input must be {"prediction_id": "...", "index": k}')
    index = ref.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
      raise ValueError(f"mask_input.index must be an int, got {index!r}")
    with self._state:
      pred = entry.predictions.get(ref["prediction_id"])
    if pred is None:
      raise Gone(f"prediction {ref['prediction_id']!r} is no longer kept (the server keeps "
                 f"{self.keep_predictions} per image); send the prompts without mask_input")
    if not 0 <= index < pred.low_res.shape[0]:
      raise ValueError(f"mask_input.index {index} out of range: that prediction has "
                       f"{pred.low_res.shape[0]} mask(s)")
    return pred.low_res[index][None]

  def prediction(self, prediction_id: str) -> Prediction:
    image_id = prediction_id.rsplit(".", 1)[0]
    entry = self.image(image_id)
    with self._state:
      pred = entry.predictions.get(prediction_id)
    if pred is None:
      raise NotFound(f"no prediction {prediction_id!r} (the server keeps "
                     f"{self.keep_predictions} per image)")
    return pred

  # ------------------------------------------------------------------ automask
  def generator(self, options: AmgOptions):
    """The `AutomaticMaskGenerator` for `options` (a few are kept)."""
    from samjax.amg.generator import AutomaticMaskGenerator  # pylint: disable=import-outside-toplevel
    with self._state:
      gen = self._generators.get(options)
      if gen is None:
        gen = AutomaticMaskGenerator(self.model, options=options)
        self._generators[options] = gen
        while len(self._generators) > 4:
          self._generators.popitem(last=False)
      self._generators.move_to_end(options)
      return gen

  def automask(self, image_id: str, options: Optional[Dict[str, Any]] = None) -> Job:
    """Queues an automask job for a kept image (options checked now); returns it.

    Raises:
      NotFound: unknown image. ValueError: bad options.
    """
    opts = amg_options(options)
    entry = self.image(image_id)
    job = Job(uuid.uuid4().hex[:12], image_id, json_safe(
        {f["name"]: getattr(opts, f["name"]) for f in amg_option_fields()}))
    with self._state:
      if self._closed:
        raise RuntimeError("the server is shutting down")
      self._jobs[job.job_id] = job
      self._queue.append((job, entry.image, opts))
      self._trim_jobs()
      if self._worker is None:
        self._worker = threading.Thread(target=self._work, name="samjax-automask",
                                        daemon=True)
        self._worker.start()
      self._wake.notify()
    return job

  def _trim_jobs(self) -> None:
    finished = [j for j in self._jobs.values() if j.status in ("done", "failed")]
    for j in finished[:max(0, len(self._jobs) - self.max_jobs)]:
      del self._jobs[j.job_id]

  def _work(self) -> None:
    while True:
      with self._state:
        while not self._queue and not self._closed:
          self._wake.wait()
        if self._closed:
          return
        job, image, opts = self._queue.popleft()
        job.status, job.started = "running", time.time()
      try:
        gen = self.generator(opts)
        with self.device_lock:
          records = gen.generate(image)
        job.records = json_safe(records)
        job.status = "done"
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()  # The server log gets it; the client gets one line.
        job.error = _one_line(e)
        job.status = "failed"
      finally:
        job.finished = time.time()
        job.done.set()

  def job(self, job_id: str) -> Job:
    with self._state:
      job = self._jobs.get(job_id)
    if job is None:
      raise NotFound(f"no job {job_id!r} (the server keeps the last {self.max_jobs})")
    return job

  def jobs(self) -> List[Dict[str, Any]]:
    with self._state:
      return [j.info(with_records=False) for j in reversed(self._jobs.values())]

  def close(self) -> None:
    with self._state:
      self._closed = True
      self._wake.notify_all()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if isinstance(e, (ValueError, RuntimeError, OSError)) and text:
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _numbers(value: Any, name: str, shape: Sequence[int]) -> np.ndarray:
  """A JSON list of numbers as a float64/int array of `shape` (-1: any), or ValueError."""
  if not isinstance(value, list):
    raise ValueError(f"{name} must be a list, got {type(value).__name__}")

  def check(v):
    if isinstance(v, list):
      for x in v:
        check(x)
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ValueError(f"{name} must hold numbers, got {v!r}")
  check(value)
  try:
    arr = np.array(value, dtype=np.float64)
  except ValueError:
    raise ValueError(f"{name} is ragged") from None
  if len(shape) == 2 and arr.size == 0:
    arr = arr.reshape(0, shape[1])
  if arr.ndim != len(shape) or any(s not in (-1, a) for s, a in zip(shape, arr.shape)):
    want = "x".join("N" if s == -1 else str(s) for s in shape)
    raise ValueError(f"{name} must have shape {want}, got {list(arr.shape)}")
  if name == "point_labels":
    if not np.all(np.isin(arr, (0, 1))):
      raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got "
                       f"{sorted(set(arr.tolist()))}")
    return arr.astype(np.int64)
  return arr
