"""Client-named paths, resolved only inside one folder.

The bulk viewer (`--masks`) and the image library (`--images`) take paths from the
browser. `resolve_under` is the one check they all go through: a relative path of
plain components, no `..`, no hidden components (temporaries, claims), and, after
following every symlink, still inside the folder. Anything else is refused with a
`PathRefused` whose message names no file outside the folder.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Sequence

from samjax.bulk.inputs import is_under

# "C:", "\\server": names that mean an absolute path somewhere.
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class PathRefused(ValueError):
  """A client path that does not name a file inside the folder (HTTP 400/404)."""

  def __init__(self, message: str, missing: bool = False):
    super().__init__(message)
    #: True when the path is acceptable but there is no such file (404, not 400).
    self.missing = missing


def _components(rel: str) -> list:
  if not isinstance(rel, str) or not rel:
    raise PathRefused("a relative path is needed")
  if "\x00" in rel or "\\" in rel:
    raise PathRefused("path has a NUL or backslash")
  if rel.startswith("/") or _DRIVE_RE.match(rel):
    raise PathRefused("absolute paths are refused; name a file relative to the folder")
  parts = [p for p in rel.split("/") if p not in ("", ".")]
  if not parts:
    raise PathRefused("a relative path is needed")
  for p in parts:
    if p == "..":
      raise PathRefused("'..' is refused; name a file inside the folder")
    if p.startswith("."):
      raise PathRefused("hidden files are not served")
  return parts


def resolve_under(root: str, rel: str, kind: str = "file") -> str:
  """The real path of `root/rel`, if it is a `kind` ("file" or "dir") inside `root`.

  Args:
    root: the folder (any form; compared by its real path).
    rel: a "/"-separated path relative to `root`, as the client sent it (already
      URL-decoded once by the framework; a second encoding stays literal).
    kind: "file" or "dir".

  Returns:
    The absolute real path (symlinks followed), inside the real path of `root`.

  Raises:
    PathRefused: a path that is not relative and plain, leaves `root` (through
      `..` or a symlink), or names nothing (then `missing` is True).
  """
  parts = _components(rel)
  real_root = os.path.realpath(root)
  real = os.path.realpath(os.path.join(real_root, *parts))
  if not is_under(real, real_root) or real == real_root:
    raise PathRefused("path leaves the folder (through a symlink)")
  ok = os.path.isfile(real) if kind == "file" else os.path.isdir(real)
  if not ok:
    raise PathRefused(f"no such {kind}: {'/'.join(parts)}", missing=True)
  return real


def walk_files(root: str, extensions: Sequence[str], limit: int) -> Iterator[str]:
  """Relative "/" paths of files under `root` ending in `extensions`, sorted per folder.

  Hidden files and folders are skipped; symlinked folders are not entered and
  symlinked files are listed only if they resolve inside `root`. At most `limit`.
  """
  real_root = os.path.realpath(root)
  exts = tuple(e.lower() for e in extensions)
  count = 0
  for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if name.startswith(".") or not name.lower().endswith(exts):
        continue
      full = os.path.join(dirpath, name)
      if os.path.islink(full) and not is_under(os.path.realpath(full), real_root):
        continue
      yield os.path.relpath(full, real_root).replace(os.sep, "/")
      count += 1
      if count >= limit:
        return
