"""`run_job`: the resumable, failure-isolating loop over one process's shard."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from samjax.bulk.inputs import PathLike, collect_inputs, prefetch_batches, resolve_process, \
    shard_inputs
from samjax.bulk.outputs import Annotation, FailureLog, OverlayFn, image_id_for, \
    is_valid_output, output_path_for, overlay_path, sa1b_record, write_overlay, write_record
from samjax.io.files import remove_stale_temps
from samjax.io.images import DEFAULT_MAX_PIXELS, BadImageError

GenerateBatchFn = Callable[[list[np.ndarray]], list[list[Annotation]]]


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
    out = list(generate_batch([img for _, img in items]))
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
    max_pixels: larger images fail with "image too large" (None: no limit).

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
  process_index, process_count = resolve_process(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if overlays and overlay_fn is None:
    from samjax.viz import overlay_anns as overlay_fn  # pylint: disable=import-outside-toplevel

  paths, roots = collect_inputs(inputs, exclude_dirs=[out_dir])
  shard = shard_inputs(paths, process_index, process_count)
  os.makedirs(out_dir, exist_ok=True)
  failures = FailureLog(os.path.join(
      out_dir, "failures.jsonl" if process_count == 1 else f"failures.{process_index}.jsonl"))

  json_paths = {p: output_path_for(p, roots, out_dir) for p in shard}
  todo = [p for p in shard
          if not (is_valid_output(json_paths[p])
                  and (not overlays or os.path.isfile(overlay_path(json_paths[p]))))]
  # Only this process's outputs: processes sharing out_dir never delete each other's
  # in-progress files.
  finals = [json_paths[p] for p in todo] + [overlay_path(json_paths[p]) for p in todo]
  remove_stale_temps(out_dir, finals, recursive=True)
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
          record = sa1b_record(path, image_id_for(json_path, out_dir), image.shape[:2], anns)
          if overlays:
            write_overlay(overlay_path(json_path), image, record, overlay_fn)
          write_record(json_path, record)
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
