"""Crash-safe file writes: a file under its final name is always complete.

`atomic_write(path, data)` (or `atomic_open(path)` for writers that stream, such as
`torch.save` or `Figure.savefig`) writes a temporary file in the destination folder,
fsyncs it, renames it over `path` with `os.replace` (atomic on POSIX and Windows when
both names are on one filesystem, which the shared folder guarantees) and then fsyncs
the folder so the rename itself survives a power cut (where the OS allows it).

Temporary names start with `TEMP_PREFIX` and end with the final name, e.g.
`.samjax-tmp.4242.1a2b3c4d.cat.jpg.json`: hidden from folder listings, marked as ours,
and traceable to the file they were going to become, so `remove_stale_temps` can
delete the leftovers of a killed writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from typing import BinaryIO, Collection, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

TEMP_PREFIX = ".samjax-tmp."
# "<prefix><pid>.<8 hex>.<key of the final name>"; see `_final_key`.
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\."
                      r"(?P<key>.+)$")
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


def remove_stale_temps(folder: PathLike, finals: Optional[Collection[PathLike]] = None,
                       recursive: bool = False) -> int:
  """Deletes temporary files left behind by killed `atomic_write`s.

  Call it before a run writes into `folder`, not while another writer may be busy
  there: an in-progress temporary file looks exactly like a stale one. With `finals`,
  only the temporaries of those final paths are removed, so processes that share a
  folder but write disjoint files can each clean up their own.

  Args:
    folder: where to look.
    finals: final paths whose temporaries may go; None: every temporary of ours.
    recursive: also look in sub-folders.

  Returns:
    The number of files removed.
  """
  folder = os.fspath(folder)
  keys = None
  if finals is not None:
    keys = set()
    for p in finals:
      d, name = os.path.split(os.path.abspath(os.fspath(p)))
      keys.add((d, _final_key(name)))
  if recursive:
    walk = ((d, fs) for d, _, fs in os.walk(folder))
  else:
    try:
      walk = iter([(folder, [e.name for e in os.scandir(folder) if e.is_file()])])
    except FileNotFoundError:
      return 0
  removed = 0
  for dirpath, filenames in walk:
    for name in filenames:
      m = _TEMP_RE.match(name)
      if not m:
        continue
      if keys is not None and (os.path.abspath(dirpath), m.group("key")) not in keys:
        continue
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(dirpath, name))
        removed += 1
  return removed
