"""The job's inputs: listing files, folders and list files; sharding; decoding ahead.

Inputs are local paths or URLs of any fsspec protocol (`s3://bucket/imgs`,
`gs://...`; see `samjax.bulk.store`), mixed freely; a list file may be a URL and may
list URLs. Listing is deterministic (sorted absolute paths and normalized URLs), so
every process of a multi-process job computes the same list and takes a disjoint
strided share of it. Decoding runs in threads ahead of the generator, with a bound
on how many images are alive.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from samjax.bulk import store
from samjax.io.images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from samjax.io.prefetch import prefetch_map

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# The listing problem of a named folder that holds no image.
NO_IMAGES = (f"no images found in this folder (looked for "
             f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case)")

PathLike = Union[str, "os.PathLike[str]"]
LoadResult = Union[np.ndarray, BadImageError]


# ----------------------------------------------------------------------------- listing


def _has_image_ext(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_under(path: str, root: str) -> bool:
  """Whether absolute `path` is `root` or lies inside it (both normalized; local
  paths or URLs, never one inside the other)."""
  return store.is_under(path, root)


def _is_under_any(path: str, roots: Sequence[str]) -> bool:
  return any(is_under(path, r) for r in roots)


def _reason(err: OSError) -> str:
  return err.strerror or str(err)


@dataclasses.dataclass
class InputScan:
  """What listing the inputs found.

  Attributes:
    images: sorted absolute image paths.
    roots: sorted folders named in the inputs (directly or in list files): the roots
      whose relative layout `output_path_for` keeps.
    problems: (path, reason) of inputs that could not be listed: an unreadable
      folder, a named folder without images. The job reports them as failures.
    notes: what the walk skipped on purpose and why (the output folder inside an
      input folder, a folder reached twice through a symlink).
  """
  images: list[str]
  roots: list[str]
  problems: list[tuple[str, str]]
  notes: list[str]


class InputError(ValueError):
  """The inputs cannot be used as given (e.g. an input folder is the output folder)."""


def _walk_images(root: str, excluded: Sequence[str], visited: set, problems: list,
                 notes: list) -> list[str]:
  """Image files under `root`, recursively, following symlinked folders once each.

  Hidden entries (names starting with ".") are skipped: in practice they are
  AppleDouble "._x.jpg" stubs, checkpoint folders, our own temporaries and claims,
  never real inputs. A folder already listed (a symlink loop, or the same folder
  reached through two links) is listed once, under the first path the sorted walk
  meets, so every process computes the same list.
  """
  found = []

  def onerror(err: OSError) -> None:
    problems.append((err.filename or root, f"cannot list folder: {_reason(err)}"))

  for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
    keep = []
    for d in sorted(dirnames):
      if d.startswith("."):
        continue
      full = os.path.join(dirpath, d)
      try:
        st = os.stat(full)
      except OSError as e:
        problems.append((full, f"cannot list folder: {_reason(e)}"))
        continue
      if _is_under_any(os.path.realpath(full), excluded):
        notes.append(f"skipped {full}: it is the output folder (outputs are never inputs)")
        continue
      ident = (st.st_dev, st.st_ino)
      if ident in visited:
        notes.append(f"skipped {full}: a link to a folder already listed "
                     f"({os.path.realpath(full)})")
        continue
      visited.add(ident)
      keep.append(d)
    dirnames[:] = keep
    for name in filenames:
      if not name.startswith(".") and _has_image_ext(name):
        found.append(os.path.join(dirpath, name))
  return found


def _walk_url_images(root: str, excluded: Sequence[str], problems: list, notes: list
                     ) -> list[str]:
  """Image objects under URL `root`, recursively (an object store has no links).

  Hidden entries (a path segment starting with ".") are skipped, as on local disks;
  so are objects under an excluded location (the job's output), with a note.
  """
  try:
    found = store.store_for(root).find(root)
  except OSError as e:
    problems.append((root, f"cannot list folder: {_reason(e)}"))
    return []
  images, skipped = [], set()
  for url in found:
    rel = store.relpath(url, root)
    if any(part.startswith(".") for part in rel.split("/")):
      continue
    ex = next((x for x in excluded if is_under(url, x)), None)
    if ex is not None:
      skipped.add(ex)
      continue
    if _has_image_ext(url):
      images.append(url)
  for ex in sorted(skipped):
    notes.append(f"skipped {ex}: it is the output folder (outputs are never inputs)")
  return images


def _list_entry(base: str, line: str) -> str:
  """A list file's line as a normalized path or URL (relative: to the list's folder)."""
  if store.is_url(line):
    return store.norm(line)
  if store.is_url(base):
    if os.path.isabs(line) or line.startswith("~"):
      return os.path.abspath(os.path.expanduser(line))  # A local path in a remote list.
    return store.norm(store.join(base, line))
  return os.path.abspath(os.path.join(base, os.path.expanduser(line)))


def _read_list_file(path: str) -> list[str]:
  """Absolute entries of a text file listing one path (or URL) per line.

  Blank lines and lines whose first non-blank character is "#" are ignored;
  relative entries are resolved against the list file's folder (for a list file at
  a URL: its "folder" there).
  """
  try:
    raw = store.read_bytes(path)
  except OSError as e:
    raise ValueError(f"cannot read list file {path!r}: {e.strerror or e}") from e
  if b"\0" in raw:
    raise ValueError(f"{path!r} has no image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                     "and is not a text file listing paths")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"list file {path!r} is not UTF-8 text: {e}") from e
  base = store.dirname(path)
  entries = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    entries.append(_list_entry(base, line))
  return entries


def _url_kind(url: str, raw: str) -> Optional[str]:
  """"dir", "file" or None for an input URL; store errors name the input."""
  try:
    return store.store_for(url).kind(url)
  except OSError as e:
    raise FileNotFoundError(f"input {raw!r} cannot be reached: {_reason(e)}") from None


def scan_inputs(inputs: Iterable[PathLike], exclude_dirs: Sequence[PathLike] = ()
                ) -> InputScan:
  """Lists the images of `inputs` and says what could not be listed (see `list_inputs`).

  Raises:
    FileNotFoundError: an item of `inputs` does not exist.
    ValueError: a non-image file that is not a readable text list.
    InputError: a named folder is an excluded folder or lies inside one (the job
      excludes its output folder: walking it would list nothing, or our outputs).
  """
  excluded = [store.norm(d) if store.is_url(d) else os.path.realpath(os.fspath(d))
              for d in exclude_dirs]
  images: set[str] = set()
  folders: set[str] = set()

  def add_listed(entry: str) -> None:
    is_dir = (_url_kind(entry, entry) == "dir" if store.is_url(entry)
              else os.path.isdir(entry))
    if is_dir:
      folders.add(entry)
    else:
      # Listed files are taken as images whatever their extension; a missing
      # one fails at load time (recorded in failures) instead of aborting a
      # job over a stale line in a million-line list.
      images.add(entry)

  for raw in inputs:
    raw = os.fspath(raw)
    if store.is_url(raw):
      url = store.norm(raw)
      kind = _url_kind(url, raw)
      if kind == "dir":
        folders.add(url)
      elif kind == "file" and _has_image_ext(url):
        images.add(url)
      elif kind == "file":
        for entry in _read_list_file(url):
          add_listed(entry)
      else:
        raise FileNotFoundError(f"input {raw!r} does not exist")
      continue
    path = store.LOCAL.norm(os.path.expanduser(raw))
    if os.path.isdir(path):
      folders.add(path)
    elif os.path.isfile(path):
      if _has_image_ext(path):
        images.add(path)  # Named files are taken even inside an excluded folder.
        continue
      for entry in _read_list_file(path):
        add_listed(entry)
    elif os.path.lexists(path):
      raise FileNotFoundError(f"input {raw!r} is neither a file nor a folder (broken link?)")
    elif os.path.isdir(os.path.dirname(path)) and not os.access(os.path.dirname(path),
                                                                 os.X_OK):
      raise FileNotFoundError(f"input {raw!r} cannot be reached: its folder is not readable")
    else:
      raise FileNotFoundError(f"input {raw!r} does not exist")
  for folder in sorted(folders):
    real = folder if store.is_url(folder) else os.path.realpath(folder)
    for ex in excluded:
      if real == ex:
        raise InputError(f"the input folder {folder} is the output folder; write the "
                         "outputs to a folder of their own (e.g. next to it)")
      if is_under(real, ex):
        raise InputError(f"the input folder {folder} is inside the output folder {ex}; "
                         "write the outputs to a folder of their own")
  problems: list[tuple[str, str]] = []
  notes: list[str] = []
  visited: set = set()
  # Outer folders first, so a nested named folder is recognised as already walked.
  for folder in sorted(folders, key=lambda f: (f.count(os.sep), f)):
    if store.is_url(folder):
      if any(o != folder and is_under(folder, o) for o in folders):
        continue  # Its objects are listed with the outer folder.
      n_problems = len(problems)
      found = _walk_url_images(folder, excluded, problems, notes)
      if not found and len(problems) == n_problems:
        problems.append((folder, NO_IMAGES))
      images.update(found)
      continue
    try:
      st = os.stat(folder)
    except OSError as e:
      problems.append((folder, f"cannot list folder: {_reason(e)}"))
      continue
    ident = (st.st_dev, st.st_ino)
    if ident in visited:
      if not any(o != folder and is_under(folder, o) for o in folders):
        notes.append(f"{folder} is a folder already listed through another path")
      continue
    visited.add(ident)
    n_problems = len(problems)
    found = _walk_images(folder, excluded, visited, problems, notes)
    if not found and len(problems) == n_problems:
      problems.append((folder, NO_IMAGES))
    images.update(found)
  return InputScan(sorted(images), sorted(folders), problems, notes)


def collect_inputs(inputs: Iterable[PathLike], exclude_dirs: Sequence[PathLike] = ()
                   ) -> tuple[list[str], list[str]]:
  """(sorted images, sorted folders named in `inputs`): `list_inputs` and `input_roots`
  at once, from one walk. What cannot be listed is a warning (the job reports it)."""
  scan = scan_inputs(inputs, exclude_dirs)
  for path, reason in scan.problems:
    warnings.warn(f"samjax.bulk: {path}: {reason}", stacklevel=2)
  return scan.images, scan.roots


def list_inputs(inputs: Sequence[PathLike], exclude_dirs: Sequence[PathLike] = ()
                ) -> list[str]:
  """Expands image files, folders and list files into a sorted list of images.

  Args:
    inputs: each item is a local path or a URL (`samjax.bulk.store`): an image
      file (kept whatever it contains), a folder
      (searched recursively for extensions in `IMAGE_EXTENSIONS`, any case; hidden
      entries skipped; symlinked folders followed, each folder listed once so
      links cannot loop), or any other file, read as a UTF-8 list of paths: one per
      line, blank lines and full-line `#` comments ignored, relative entries
      resolved against the list file's folder; a list file may be a URL and may
      list URLs. Listed entries may be folders (expanded) or files (kept whatever
      their extension). List files do not nest. On object stores a "folder" is a
      key prefix, and hidden means a path segment starting with ".".
    exclude_dirs: folders whose contents are never listed by a folder walk (the job
      passes its output folder so overlay PNGs are not picked up as inputs on a
      rerun); image files named directly are kept.

  Returns:
    Absolute, normalized, deduplicated paths (and normalized URLs) in
    lexicographic order (the same on every process that sees the same files at
    the same paths).

  Raises:
    FileNotFoundError: an item of `inputs` does not exist.
    ValueError: a non-image file that is not a readable text list; `InputError` (a
      ValueError) when a named folder is or lies in an excluded folder.

  Folders that cannot be listed are warnings here; `scan_inputs` returns them.
  """
  return collect_inputs(inputs, exclude_dirs)[0]


def input_roots(inputs: Sequence[PathLike]) -> list[str]:
  """Absolute folders named in `inputs`, directly or inside list files.

  These are the roots whose relative layout `output_path_for` keeps.
  """
  return collect_inputs(inputs)[1]


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
  process_index, process_count = resolve_process(process_index, process_count)
  return sorted(paths)[process_index::process_count]


def resolve_process(process_index: int | None, process_count: int | None
                    ) -> tuple[int, int]:
  """(process_index, process_count), each defaulting to jax's; validated."""
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


# ---------------------------------------------------------------------------- decoding


def load_input_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """`samjax.io.images.load_image` of a local path or a URL (read through its store)."""
  opener = store.open_read if store.is_url(path) else None
  return load_image(path, max_pixels=max_pixels, opener=opener)


def _safe_load(load_fn: Callable[[str], np.ndarray], path: str) -> LoadResult:
  """Never raises (except BaseException): errors come back as BadImageError."""
  try:
    return load_fn(path)
  except BadImageError as e:
    return e
  except Exception as e:  # A loader bug or MemoryError must cost one image only.
    return BadImageError(f"unexpected error while loading: {type(e).__name__}: {e}")


def prefetch_batches(paths: Iterable[str], batch_size: int, *,
                     load_fn: Callable[[str], np.ndarray] | None = None,
                     num_workers: int = 4, prefetch: int = 2,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     ) -> Iterator[list[tuple[str, LoadResult]]]:
  """Yields batches of decoded images while later batches decode in threads.

  At most `prefetch` batches are being decoded while the caller holds one, so once
  the caller drops each batch before asking for the next, no more than
  `(prefetch + 1) * batch_size` decoded images exist. The images of a batch decode
  in parallel on `num_workers` threads (OpenCV releases the GIL), also with
  `prefetch=0`.

  Args:
    paths: images, in the order batches should come; consumed lazily (a batch's
      paths are taken when it starts decoding), so it may be a generator that
      claims each image as it goes.
    batch_size: images per batch (the last batch may be smaller).
    load_fn: path -> (H, W, 3) uint8; defaults to `load_input_image(path,
      max_pixels)` (local files and URLs). Its `BadImageError` (or any
      other exception) is returned in place of the image.
    num_workers: decoding threads.
    prefetch: batches decoded ahead; 0 decodes each batch only when asked for.
    max_pixels: passed to the default `load_input_image`.

  Yields:
    Lists of `(path, image or samjax.io.images.BadImageError)` in input order.
  """
  if batch_size < 1 or num_workers < 1 or prefetch < 0:
    raise ValueError(f"need batch_size >= 1, num_workers >= 1, prefetch >= 0; got "
                     f"{batch_size}, {num_workers}, {prefetch}")
  if load_fn is None:
    load_fn = functools.partial(load_input_image, max_pixels=max_pixels)
  source = iter(paths)
  chunks = iter(lambda: list(itertools.islice(source, batch_size)), [])
  decoders = concurrent.futures.ThreadPoolExecutor(num_workers,
                                                   thread_name_prefix="samjax-load")

  def decode(chunk: list[str]) -> list[tuple[str, LoadResult]]:
    futures = [decoders.submit(_safe_load, load_fn, p) for p in chunk]
    try:
      return [(p, f.result()) for p, f in zip(chunk, futures)]
    finally:
      for f in futures:  # Only left undone when the wait was interrupted.
        f.cancel()

  batches = prefetch_map(decode, chunks, ahead=prefetch, name="samjax-batch")
  try:
    yield from batches
  finally:
    batches.close()  # Cancels queued batches and waits for the running ones,
    decoders.shutdown(wait=False, cancel_futures=True)  # whose decodes are done.
