"""Crash-safe file writes: a file under its final name is always complete.

`atomic_write(path, data)` (or `atomic_open(path)` for writers that stream, such as
`torch.save` or `Figure.savefig`) writes a temporary file in the destination folder,
fsyncs it, renames it over `path` with `os.replace` (atomic on POSIX and Windows when
both names are on one filesystem, which the shared folder guarantees) and then fsyncs
the folder so the rename itself survives a power cut (where the OS allows it).

Temporary names start with `TEMP_PREFIX` and end with the final name, e.g.
`.samjax-tmp.4242.1a2b3c4d.cat.jpg.json`: hidden from folder listings, marked as ours,
and traceable to the file they were going to become, so `remove_stale_temps` can
delete the leftovers of a killed writer. Versions before 0.1 named them
`<final>.<pid>.<8 hex>.tmp` (`LEGACY_TEMP_RE`); those are only recognised next to
final names the caller vouches for (`legacy=True` with `finals`).

`append_text` and `rewrite_text` share one file between processes (a log that
several jobs append to while one of them compacts it): both hold an exclusive
`flock` on the file, and reopen it when it was replaced while they waited.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from typing import BinaryIO, Callable, Collection, Dict, Iterator, List, Optional, Tuple, Union

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; shared appends stay best effort.
  fcntl = None

PathLike = Union[str, "os.PathLike[str]"]

TEMP_PREFIX = ".samjax-tmp."
# "<prefix><pid>.<8 hex>.<key of the final name>"; see `_final_key`.
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\."
                      r"(?P<key>.+)$")
# Temporaries of samjax < 0.1: "<final>.<pid>.<8 hex>.tmp".
LEGACY_TEMP_RE = re.compile(r"^(?P<final>.+)\.\d+\.[0-9a-f]{8}\.tmp$")
# Most filesystems allow 255 bytes per name; the prefix, pid and token take < 40.
_MAX_KEY_BYTES = 200


def _final_key(name: str) -> str:
  """The final name as it appears in its temporary names (shortened when too long)."""
  raw = name.encode("utf-8", "surrogateescape")
  if len(raw) <= _MAX_KEY_BYTES:
    return name
  digest = hashlib.sha1(raw).hexdigest()[:16]
  head = raw[:_MAX_KEY_BYTES - 17].decode("utf-8", "ignore")
  return f"{head}~{digest}"


def temp_path_for(path: PathLike) -> str:
  """A fresh temporary name next to `path` (same folder, hence same filesystem)."""
  path = os.fspath(path)
  folder, name = os.path.split(path)
  if not name:
    raise ValueError(f"not a file path: {path!r}")
  return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}."
                              f"{_final_key(name)}")


def fsync_dir(folder: PathLike) -> None:
  """Flushes a folder's entries (a rename into it) to disk; a no-op where unsupported.

  Windows cannot open folders as files and some filesystems refuse to fsync them;
  there the rename is as durable as the OS makes it.
  """
  flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
  try:
    fd = os.open(os.fspath(folder) or ".", flags)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, make_dirs: bool = True) -> Iterator[BinaryIO]:
  """Context manager: a binary file that replaces `path` when the block succeeds.

  The temporary file is opened with mode "xb" (not `mkstemp`), so the umask sets its
  permissions like any new file. On an exception (including KeyboardInterrupt) the
  temporary file is removed and `path` is left as it was.

  Args:
    path: the final file.
    make_dirs: create the missing parent folders first.

  Yields:
    The open temporary file. Write to it; do not close it.
  """
  path = os.fspath(path)
  folder = os.path.dirname(path)
  if make_dirs and folder:
    os.makedirs(folder, exist_ok=True)
  tmp = temp_path_for(path)
  try:
    with open(tmp, "xb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_dir(folder)


def atomic_write(path: PathLike, data: Union[bytes, str], make_dirs: bool = True) -> None:
  """Writes `data` to `path` so that `path` is either absent/old or complete.

  Args:
    path: the final file.
    data: bytes, or text (written as UTF-8).
    make_dirs: create the missing parent folders first.
  """
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_open(path, make_dirs=make_dirs) as f:
    f.write(data)


TempKey = Tuple[str, str]  # (absolute folder, `_final_key` of the final name)


def temp_key(final: PathLike) -> TempKey:
  """How `find_temps` indexes the temporaries of the final path `final`."""
  d, name = os.path.split(os.path.abspath(os.fspath(final)))
  return d, _final_key(name)


def find_temps(folder: PathLike, recursive: bool = False, legacy: bool = False
               ) -> Dict[TempKey, List[str]]:
  """Temporary files of ours under `folder`, by the final path they were writing.

  One listing of the tree: a caller that cleans up per output (e.g. when it claims
  an image) looks its outputs' `temp_key` up here instead of listing a folder each time.

  Args:
    folder: where to look (missing: nothing found).
    recursive: also look in sub-folders.
    legacy: also return names of the pre-0.1 form `<final>.<pid>.<8 hex>.tmp`; only
      delete those for finals you know are yours (the pattern alone could match a
      user's file).

  Returns:
    {temp_key(final): [temporary paths]}.
  """
  folder = os.fspath(folder)
  if recursive:
    walk = ((d, fs) for d, _, fs in os.walk(folder))
  else:
    try:
      walk = iter([(folder, [e.name for e in os.scandir(folder) if e.is_file()])])
    except (FileNotFoundError, NotADirectoryError):
      return {}
  found: Dict[TempKey, List[str]] = {}
  for dirpath, filenames in walk:
    absdir = os.path.abspath(dirpath)
    for name in filenames:
      m = _TEMP_RE.match(name)
      if m:
        key = m.group("key")
      elif legacy and name.endswith(".tmp") and (m := LEGACY_TEMP_RE.match(name)):
        key = _final_key(m.group("final"))
      else:
        continue
      found.setdefault((absdir, key), []).append(os.path.join(dirpath, name))
  return found


def remove_stale_temps(folder: PathLike, finals: Optional[Collection[PathLike]] = None,
                       recursive: bool = False, legacy: bool = False) -> int:
  """Deletes temporary files left behind by killed `atomic_write`s.

  Call it before a run writes into `folder`, not while another writer may be busy
  there: an in-progress temporary file looks exactly like a stale one. With `finals`,
  only the temporaries of those final paths are removed, so processes that share a
  folder but write disjoint files can each clean up their own.

  Args:
    folder: where to look.
    finals: final paths whose temporaries may go; None: every temporary of ours.
    recursive: also look in sub-folders.
    legacy: also remove pre-0.1 temporaries (`<final>.<pid>.<8 hex>.tmp`) of `finals`
      (ignored without `finals`: the name alone does not prove the file is ours).

  Returns:
    The number of files removed.
  """
  legacy = legacy and finals is not None
  found = find_temps(folder, recursive=recursive, legacy=legacy)
  if finals is not None:
    keys = {temp_key(p) for p in finals}
    found = {k: v for k, v in found.items() if k in keys}
  return remove_files(p for paths in found.values() for p in paths)


def remove_files(paths) -> int:
  """Deletes each path that still exists; returns how many went (errors ignored)."""
  removed = 0
  for p in paths:
    with contextlib.suppress(OSError):
      os.unlink(p)
      removed += 1
  return removed


# ------------------------------------------------------------------- shared files


@contextlib.contextmanager
def _locked(path: str, create: bool) -> Iterator[Optional[int]]:
  """An fd of `path` holding an exclusive flock; None when `path` does not exist
  and `create` is False.

  Whoever replaces or removes `path` holds the lock while doing it, so a waiter that
  wakes up on an inode that is no longer `path` reopens instead of writing into a
  file nobody will read.
  """
  flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)
  while True:
    try:
      fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
      if create:
        raise
      yield None
      return
    try:
      if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
      st = os.fstat(fd)
      try:
        cur = os.stat(path)
        current = (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)
      except FileNotFoundError:
        current = False
      if current:
        try:
          yield fd
        finally:
          os.close(fd)
          fd = -1
        return
    finally:
      if fd >= 0:
        os.close(fd)


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` (UTF-8) to `path`, creating it; safe against concurrent appends and
  `rewrite_text` from other processes.

  Raises:
    OSError: the write failed (e.g. ENOSPC); the file may then hold part of `text`.
  """
  data = text.encode("utf-8")
  with _locked(os.fspath(path), create=True) as fd:
    view = memoryview(data)
    while view:
      n = os.write(fd, view)
      view = view[n:]


def rewrite_text(path: PathLike, fn: Callable[[str], Optional[str]]) -> bool:
  """Replaces the text of `path` by `fn(old text)`, atomically, under its lock.

  Appends by other processes wait meanwhile and land in the new file. `fn` returning
  the old text leaves the file untouched; None or "" removes it. A missing file is
  left missing. Stale temporaries of `path` (from a killed rewrite) are removed too:
  the lock holder is the only one who writes them.

  Returns:
    Whether the file was changed.

  Raises:
    OSError: reading or writing failed; the file is then as it was.
  """
  path = os.fspath(path)
  with _locked(path, create=False) as fd:
    if fd is None:
      return False
    remove_stale_temps(os.path.dirname(path) or ".", finals=[path])
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
      chunk = os.read(fd, 1 << 20)
      if not chunk:
        break
      chunks.append(chunk)
    old = b"".join(chunks).decode("utf-8", "replace")
    new = fn(old)
    if new == old:
      return False
    if not new:
      os.unlink(path)
    else:
      atomic_write(path, new)
    return True
