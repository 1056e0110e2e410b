"""`run_job`: the resumable, failure-isolating loop over one process's shard.

`plan_job` does everything that can fail before the model is needed (the output
folder is usable, the inputs list some images), so a command can call it before
loading weights; `run_job` then claims, decodes, generates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from samjax.bulk import store
from samjax.bulk.claims import DEFAULT_TIMEOUT_S, Claims
from samjax.bulk.inputs import IMAGE_EXTENSIONS, NO_IMAGES, PathLike, prefetch_batches, \
    resolve_process, scan_inputs, shard_inputs
from samjax.bulk.layouts import DEFAULT_FORMAT, get_layout, output_paths, pop_temps
from samjax.bulk.outputs import Annotation, FailureLog, OverlayFn
from samjax.io import files
from samjax.io.images import DEFAULT_MAX_PIXELS, BadImageError

GenerateBatchFn = Callable[[list[np.ndarray]], list[list[Annotation]]]

# Write errors that no other image would escape: stop the job instead of failing every
# remaining image one by one.
_DISK_ERRNOS = frozenset(getattr(errno, name) for name in
                         ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EACCES", "EPERM")
                         if hasattr(errno, name))


class JobError(RuntimeError):
  """The job as a whole cannot go on (unusable output folder, no images, full disk).

  Attributes:
    summary: the `JobSummary` of what was done before, when the job had started.
  """

  def __init__(self, message: str, summary: Optional["JobSummary"] = None):
    super().__init__(message)
    self.summary = summary


def _reason(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  return str(e) or type(e).__name__


def _describe(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _is_disk_error(e: BaseException) -> bool:
  return isinstance(e, OSError) and e.errno in _DISK_ERRNOS


# ----------------------------------------------------------------------------- summary


@dataclasses.dataclass
class JobSummary:
  """What one process of a bulk job did.

  Attributes:
    total: images in this process's shard.
    done: images processed by this run (complete output written).
    skipped: images whose valid output already existed.
    failed: failures recorded by this run: images, and inputs that could not be
      listed (see `failures_path`).
    elapsed_s: wall-clock seconds of this run.
    out_dir: output folder.
    failures_path: the failures JSONL file (may not exist if nothing failed).
    process_index: this process's index.
    process_count: number of processes.
    elsewhere: images another job sharing `out_dir` finished or is working on.
    not_run: images this run left undone because it stopped early.
    interrupted: the signal that stopped the run ("SIGINT", "SIGTERM"), if any.
    error: the job-level error that stopped the run (e.g. a full disk), if any.
    unlogged: failure records that could not be written to `failures_path`
      (printed to stderr instead).
    masks: masks (annotations) in the outputs this run wrote.
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
  elsewhere: int = 0
  not_run: int = 0
  interrupted: Optional[str] = None
  error: Optional[str] = None
  unlogged: int = 0
  masks: int = 0

  @property
  def exit_code(self) -> int:
    """2 after a job-level error, 128 + the signal number when interrupted (130 for
    SIGINT, 143 for SIGTERM), 1 when some inputs failed, else 0."""
    if self.error:
      return 2
    if self.interrupted:
      return 128 + int(getattr(signal, self.interrupted))
    return 1 if self.failed else 0

  @property
  def images_per_s(self) -> float:
    """Throughput over images processed or failed by this run."""
    return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

  def __str__(self) -> str:
    shard = (f" (process {self.process_index}/{self.process_count})"
             if self.process_count > 1 else "")
    parts = [f"{self.done} done", f"{self.skipped} skipped (already done)",
             f"{self.failed} failed"]
    if self.elsewhere:
      parts.append(f"{self.elsewhere} taken by other jobs on this folder")
    if self.not_run:
      parts.append(f"{self.not_run} not run")
    text = (f"samjax bulk{shard}: {self.total} images: {', '.join(parts)} in "
            f"{self.elapsed_s:.1f} s ({self.images_per_s:.2f} img/s); {self.masks} masks "
            f"written; outputs in {self.out_dir}")
    if self.failed:
      text += f"; failures listed in {self.failures_path}"
    if self.unlogged:
      text += (f"; {self.unlogged} failure record(s) could not be written there and were "
               "printed above")
    if self.interrupted:
      text += (f"; interrupted by {self.interrupted}: finished outputs are kept, rerun the "
               "same command to do the rest")
    if self.error:
      text += f"; stopped: {self.error}"
    return text


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass
class JobPlan:
  """A checked job, before any model work: see `plan_job`.

  Attributes:
    out_dir: absolute output folder (exists and is writable).
    images: every listed image (all processes).
    roots: input folders (for `output_path_for`).
    shard: this process's images.
    outputs: output path of each image of `shard` (a file; for amg-png a folder).
    problems: (input, reason) that could not be listed.
    notes: what the listing skipped on purpose, and why.
    process_index: this process's index.
    process_count: number of processes.
    output_format: the outputs' layout (a `samjax.bulk.layouts.LAYOUTS` name).
  """
  out_dir: str
  images: list[str]
  roots: list[str]
  shard: list[str]
  outputs: dict[str, str]
  problems: list[tuple[str, str]]
  notes: list[str]
  process_index: int
  process_count: int
  output_format: str = DEFAULT_FORMAT


def check_output_dir(out_dir: PathLike) -> bool:
  """Creates `out_dir` if needed and checks a file can be written there.

  Returns:
    Whether the folder was created by this call.

  At a URL (`samjax.bulk.store`) nothing is created (object stores have no
  folders): a probe object is uploaded and deleted, which fails on a missing bucket,
  missing credentials or no permission.

  Raises:
    JobError: a regular file in the path, no permission, read-only or full disk.
    samjax.bulk.store.StoreError: an unknown protocol, or its package is missing.
  """
  if store.is_url(out_dir):
    return _check_output_url(store.norm(out_dir))
  out_dir = os.path.abspath(os.fspath(out_dir))
  existing = out_dir
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "the output folder" if existing == out_dir else "a part of its path"
    raise JobError(f"cannot use {out_dir} as the output folder: {existing} ({what}) is "
                   "a file, not a folder")
  created = existing != out_dir
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise JobError(f"cannot create the output folder {out_dir}: {_reason(e)}") from None
  probe = os.path.join(out_dir, f".samjax-write-test.{socket.gethostname()}.{os.getpid()}")
  try:
    files.atomic_write(probe, b"samjax checks that this folder takes new files\n")
    os.unlink(probe)
  except OSError as e:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(out_dir)
    raise JobError(f"cannot write to the output folder {out_dir}: {_reason(e)}") from None
  return created


def _check_output_url(out_dir: str) -> bool:
  where = store.store_for(out_dir)
  try:
    if where.kind(out_dir) == "file":
      raise JobError(f"cannot use {out_dir} as the output folder: it is an object, not a "
                     "folder (prefix)")
    probe = where.join(out_dir, f".samjax-write-test.{socket.gethostname()}.{os.getpid()}")
    where.write_bytes(probe, b"samjax checks that this location takes new objects\n")
    where.remove(probe)
  except OSError as e:
    raise JobError(f"cannot write to the output folder {out_dir}: {_reason(e)}") from None
  return False


def plan_job(inputs: Sequence[PathLike], out_dir: PathLike, process_index: int | None = None,
             process_count: int | None = None, output_format: str = DEFAULT_FORMAT
             ) -> JobPlan:
  """Checks the output folder and lists the inputs; what `run_job` does first.

  Call it before loading a model so a wrong `--out` or input costs nothing.
  `output_format` names a `samjax.bulk.layouts.LAYOUTS` entry (checked first); the
  outputs are named by it (`samjax.bulk.layouts.output_paths`).

  Raises:
    JobError: the output folder cannot be used, or no input gave any image (the
      message names the inputs, and why each gave nothing).
    FileNotFoundError / ValueError: a missing input, an unreadable list file, an
      input folder that is (or is inside) the output folder.
  """
  out_dir = store.norm(out_dir)
  process_index, process_count = resolve_process(process_index, process_count)
  layout = get_layout(output_format)
  created = check_output_dir(out_dir)
  try:
    scan = scan_inputs(inputs, exclude_dirs=[out_dir])
    if not scan.images:
      named = ", ".join(os.fspath(i) for i in inputs)
      others = [f"{p}: {r}" for p, r in scan.problems if r != NO_IMAGES]
      why = "; ".join(others[:5]) + (f" (and {len(others) - 5} more)" if len(others) > 5
                                     else "")
      raise JobError(f"no images found in {named} (looked for "
                     f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case)" +
                     (f"; {why}" if why else ""))
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(out_dir)
    raise
  shard = shard_inputs(scan.images, process_index, process_count)
  # Stem names (amg.py's) depend on every image's, so all processes name all images.
  names = output_paths(layout, scan.images if layout.stem_names else shard, scan.roots,
                       out_dir)
  outputs = {p: names[p] for p in shard}
  return JobPlan(out_dir, scan.images, scan.roots, shard, outputs, scan.problems, scan.notes,
                 process_index, process_count, layout.name)


# ---------------------------------------------------------------------------- signals


class _StopOnSignal:
  """While active, the first SIGINT or SIGTERM asks the job to stop after the images in
  flight; a second one does what it would have done without us (SIGINT: a
  KeyboardInterrupt; SIGTERM: the previous handler, by default death)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, enabled: bool):
    self.signum: Optional[int] = None
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self._previous: dict = {}

  def __enter__(self) -> "_StopOnSignal":
    if self.enabled:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  @property
  def name(self) -> Optional[str]:
    return None if self.signum is None else signal.Signals(self.signum).name

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self.signum is None:
      self.signum = signum
      print(f"samjax bulk: {signal.Signals(signum).name} received: finishing the images in "
            "flight, then stopping (send it again to stop at once)", file=sys.stderr)
      return
    previous = self._previous.get(signum)
    self._restore()
    if callable(previous):
      previous(signum, frame)
    elif previous != signal.SIG_IGN:
      signal.raise_signal(signum)


# -------------------------------------------------------------------------------- run


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


def run_job(inputs: Sequence[PathLike], out_dir: PathLike, generate_batch: GenerateBatchFn,
            batch_size: int = 1, overlays: bool = False, overlay_fn: OverlayFn | None = None,
            process_index: int | None = None, process_count: int | None = None,
            num_workers: int = 4, prefetch: int = 2, progress: bool = True,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, *, plan: JobPlan | None = None,
            claims: bool = True, claim_timeout_s: float = DEFAULT_TIMEOUT_S,
            handle_signals: bool = True, overwrite: bool = False,
            provenance: Optional[dict] = None, report: bool = True,
            output_format: Optional[str] = None) -> JobSummary:
  """Runs automatic mask generation over many images, resumably.

  Args:
    inputs: image files, folders and list files (see `list_inputs`).
    out_dir: output folder (created). Its contents are never listed as inputs; an
      input folder that is (or lies inside) it is refused.
    generate_batch: list of B (H, W, 3) uint8 RGB images (sizes may differ) -> B
      lists of annotation dicts with the official SamAutomaticMaskGenerator keys
      (`segmentation` ideally a COCO RLE; binary masks and uncompressed RLE are
      converted). It must only use this process's devices.
    batch_size: images per `generate_batch` call (the last one may be smaller).
    overlays: also write `<name>.png` next to each output (written before the output,
      so a valid output implies its overlay; with overlays on, an image whose PNG is
      missing is redone).
    overlay_fn: (image (H, W, 3) uint8, annotations with `segmentation` decoded to
      (H, W) bool) -> uint8 RGB image. Defaults to `samjax.viz.overlay_anns`.
    process_index: this process's shard; defaults to `jax.process_index()`.
    process_count: number of shards; defaults to `jax.process_count()`.
    num_workers: image decoding threads.
    prefetch: batches decoded ahead of the device.
    progress: show a tqdm bar (only when stderr is a terminal) and a start line.
    max_pixels: larger images fail with "image too large", checked from the file
      header before decoding (None: no limit).
    plan: the `plan_job(inputs, out_dir, ...)` already made (skips redoing it).
    claims: claim each image before working on it (`samjax.bulk.claims`), so jobs
      started on the same `out_dir` split the images instead of each doing all.
    claim_timeout_s: another job's claim not refreshed for this long is taken over
      (a claim of a dead process on this host is taken over at once).
    handle_signals: in the main thread, the first SIGINT/SIGTERM stops the job after
      the images in flight (the second stops it at once).
    overwrite: recompute every image of the shard, valid outputs included.
    provenance: stored under "provenance" in every record written
      (`samjax.bulk.provenance.Provenance.record()`); `sa1b` only (the amg.py
      layouts must equal the official files).
    report: print the notes and the summary (errors are printed regardless).
    output_format: the outputs' layout (`samjax.bulk.layouts.LAYOUTS`: "sa1b",
      "amg-json", "amg-png"); default: the plan's, else "sa1b". Overlays go to the
      output's base + ".png".

  Returns:
    The `JobSummary` (also printed to stderr); exit with `summary.exit_code`: 0, 1 if
    some input failed, 130/143 if a signal stopped the run. Failures are appended
    to `failures.jsonl` in `out_dir` (`failures.<process_index>.jsonl` when there are
    several processes); at the end the records of images that now have a valid
    output are dropped from it.

  Raises:
    JobError: before any work (see `plan_job`), or a write error that every image
      would meet (full disk, read-only or no permission): the job stops, finished
      outputs are kept, `error.summary` says what was done.
    FileNotFoundError / ValueError: bad `inputs` or arguments (before any work).
    KeyboardInterrupt: a second SIGINT, or one raised by `generate_batch`;
      finished outputs stay valid for a rerun.
  """
  start = time.monotonic()
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if plan is None:
    plan = plan_job(inputs, out_dir, process_index, process_count,
                    output_format=output_format or DEFAULT_FORMAT)
  elif plan.out_dir != store.norm(out_dir):
    raise ValueError(f"the plan is for {plan.out_dir}, not {out_dir}")
  if plan.output_format != get_layout(output_format or plan.output_format).name:
    raise ValueError(f"the plan is for output format {plan.output_format}, not "
                     f"{output_format}")
  out_dir, outputs = plan.out_dir, plan.outputs
  layout = get_layout(plan.output_format)
  if overlays and overlay_fn is None:
    from samjax.viz import overlay_anns as overlay_fn  # pylint: disable=import-outside-toplevel

  failures = FailureLog(store.join(out_dir, "failures.jsonl" if plan.process_count == 1
                                    else f"failures.{plan.process_index}.jsonl"))
  for note in plan.notes if report else ():
    print(f"samjax bulk: note: {note}", file=sys.stderr)
  if plan.process_index == 0:  # Every process lists the same inputs; one reports.
    for path, reason in plan.problems:
      print(f"samjax bulk: cannot list {path}: {reason}", file=sys.stderr)
      failures.add(path, "list", reason)

  # At a URL: one listing of what exists, so a missing output costs no request (and
  # the outputs that exist are checked on several threads).
  present = None if overwrite else store.listing(out_dir)

  def finished(p: str) -> bool:
    if present is not None and outputs[p] not in present:
      return False
    return layout.is_valid(outputs[p]) and (
        not overlays or store.exists(layout.overlay_path(outputs[p])))

  todo = list(plan.shard) if overwrite else [
      p for p, done in zip(plan.shard, store.map_io(finished, plan.shard, out_dir)) if not done]
  present = None  # Stale from here on (claimed() checks again, locally).
  skipped = len(plan.shard) - len(todo)
  # One listing of the leftovers of killed writes; each goes when its image is claimed
  # (then nobody else is writing it), including the `*.<pid>.<hex>.tmp` of old versions.
  # Object stores have no temporaries (whole-object uploads).
  local_out = not store.is_url(out_dir)
  temps = files.find_temps(out_dir, recursive=True, legacy=True) if todo and local_out else {}
  if progress:
    print(f"samjax bulk: {len(plan.images)} images listed; process {plan.process_index}/"
          f"{plan.process_count} has {len(plan.shard)}, {skipped} already done, "
          f"{len(todo)} to run", file=sys.stderr)

  held = None
  # Claims are O_EXCL files: local folders only. Processes of one job at a URL split
  # the work by sharding; separate jobs on one URL would each do every image.
  if claims and todo and local_out:
    try:
      held = Claims(out_dir, claim_timeout_s)
    except OSError as e:
      raise JobError(f"cannot create claims in {out_dir}: {_reason(e)}") from None

  state = {"done": 0, "failed_images": 0, "elsewhere": 0, "error": None, "masks": 0}
  succeeded: set[str] = set()
  stop = _StopOnSignal(handle_signals)

  def fail(path: str, stage: str, reason: str) -> None:
    failures.add(path, stage, reason, output=outputs[path])
    state["failed_images"] += 1
    if held is not None:
      held.release(outputs[path])

  def claimed():
    """`todo` in order, each image claimed; those held by others are tried once more
    at the end (their job may have died meanwhile)."""
    deferred = []
    for final_pass, items in ((False, todo), (True, deferred)):
      for p in items:
        if stop.signum is not None or state["error"]:
          return
        if held is not None:
          try:
            mine = held.try_claim(outputs[p])
          except OSError as e:
            state["error"] = f"cannot write claims in {held.folder}: {_reason(e)}"
            return
          if not mine:
            if final_pass:
              state["elsewhere"] += 1
            else:
              deferred.append(p)
            continue
          if not overwrite and finished(p):  # Done by another job since we listed.
            held.release(outputs[p])
            state["elsewhere"] += 1
            continue
        files.remove_files(pop_temps(layout, outputs[p], temps))
        yield p

  bar = tqdm(total=len(todo), unit="img", desc="automask", dynamic_ncols=True,
             disable=not (progress and sys.stderr.isatty()))
  loader = prefetch_batches(claimed(), batch_size, num_workers=num_workers, prefetch=prefetch,
                            max_pixels=max_pixels)
  summary = None
  try:
    with stop:
      for batch in loader:
        n_batch = len(batch)
        good = []
        for path, result in batch:
          if isinstance(result, BadImageError):
            fail(path, "load", result.reason)
          else:
            good.append((path, result))
        del batch
        if stop.signum is not None:
          break  # Abandon the decoded batch; its claims are released below.
        results = _generate_isolating(generate_batch, good) if good else []
        for path, image, anns in results:
          if isinstance(anns, Exception):
            fail(path, "generate", f"generator error: {_describe(anns)}")
            continue
          json_path = outputs[path]
          try:
            n_masks = layout.write(json_path, path, image, anns, out_dir,
                                   overlay_fn if overlays else None, provenance)
          except Exception as e:  # Bad annotation, overlay or disk error.
            fail(path, "write", f"could not write output: {_describe(e)}")
            if _is_disk_error(e):
              state["error"] = f"cannot write {json_path}: {_reason(e)}"
              break
            continue
          state["done"] += 1
          state["masks"] += n_masks
          succeeded.add(path)
          if held is not None:
            held.release(json_path)
        del results, good
        bar.update(n_batch)
        bar.set_postfix(failed=failures.count, refresh=False)
        if state["error"]:
          break
  finally:
    loader.close()
    if held is not None:
      held.close()
    bar.close()
    failures.compact(succeeded, relisted=plan.process_index == 0, is_done=layout.is_valid)
    if plan.process_count == 1:  # Logs of earlier multi-process runs on this folder.
      with contextlib.suppress(OSError):
        for name in store.store_for(out_dir).listdir(out_dir):
          if name.startswith("failures.") and name.endswith(".jsonl") and \
              name != store.basename(failures.path):
            FailureLog(store.join(out_dir, name)).compact(succeeded, relisted=True,
                                                          is_done=layout.is_valid)
    not_run = len(todo) - state["done"] - state["failed_images"] - state["elsewhere"]
    summary = JobSummary(
        total=len(plan.shard), done=state["done"], skipped=skipped, failed=failures.count,
        elapsed_s=time.monotonic() - start, out_dir=out_dir, failures_path=failures.path,
        process_index=plan.process_index, process_count=plan.process_count,
        elsewhere=state["elsewhere"], not_run=max(not_run, 0), interrupted=stop.name,
        error=state["error"], unlogged=len(failures.unwritten), masks=state["masks"])
    if report:
      print(summary, file=sys.stderr)
  if state["error"]:
    raise JobError(state["error"], summary)
  return summary
