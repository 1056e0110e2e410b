"""Where a bulk job reads and writes: local paths and fsspec URLs behind one interface.

Every location the job touches is a string: a local path (`/data/imgs`, `imgs/cat.jpg`)
or a URL of any fsspec protocol (`s3://bucket/imgs`, `gs://bucket/out`,
`memory://x`, `https://host/list.txt`). `store_for(location)` gives its `Store`:

* `LocalStore` is what the job did before URLs: `os.path` names, atomic renames
  (`samjax.io.files.atomic_write`), locked appends, temporaries, claims.
* `FsspecStore` wraps `fsspec.filesystem(protocol)`. Names are POSIX-style under
  `protocol://`. A write is one whole-object upload (`pipe_file`: a single PUT, or a
  multipart upload that becomes visible only when it completes), never a stream
  opened under the final name: an fsspec file closed by an exception commits what
  was written so far, so nothing here uses one for writing. There are no
  temporaries, no appends and no O_EXCL files on object stores, so the job keeps
  claims to local output folders, and the failure log is rewritten whole.

Credentials and endpoints come from each store's usual environment. For `s3://`
(s3fs, through botocore): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION`..., and the endpoint from
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (also passed to s3fs explicitly, so
botocore releases that predate those variables honour them too). For `gs://`
(gcsfs): `GOOGLE_APPLICATION_CREDENTIALS` or the default credentials, and
`STORAGE_EMULATOR_HOST` for an emulator.

Problems that a user can fix (unknown protocol, missing client package, no such
bucket, no credentials) come out as `StoreError` (a ValueError) or an `OSError`
whose message names the location.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import threading
from typing import BinaryIO, Callable, Optional, Union

from samjax.io import files

PathLike = Union[str, "os.PathLike[str]"]

_URL_RE = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)
# The client package each common protocol needs, for the error when it is missing.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp", "memory": "fsspec"}
_INSTALL_HINT = "pip install 'samjax[cloud]'"
# "s3:/bucket/x", "gs:bucket/x": a URL missing a slash or two.
_TYPO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/?(?!/)")
# Protocols whose first path segment is a bucket (container) that must exist.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


class StoreError(ValueError):
  """A location cannot be used as given (unknown protocol, missing package...)."""


def is_url(location: PathLike) -> bool:
  """Whether `location` is `protocol://...` other than `file://` (a local path)."""
  m = _URL_RE.match(os.fspath(location))
  return bool(m) and m.group("protocol").lower() not in ("file", "local")


def _local_path(location: str) -> str:
  m = _URL_RE.match(location)
  if m and m.group("protocol").lower() in ("file", "local"):
    return m.group("rest") or "/"
  return location


def split_url(url: str) -> tuple[str, str]:
  """("s3", "bucket/key/x.jpg") for "s3://bucket/key/x.jpg"."""
  m = _URL_RE.match(url)
  if not m:
    raise StoreError(f"not a URL: {url!r}")
  return m.group("protocol").lower(), m.group("rest")


def _reason(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = " ".join(str(e).split())
  return text or type(e).__name__


def _as_os_error(e: Exception, location: str) -> OSError:
  """An fsspec/botocore error as an OSError whose message names `location`.

  PermissionError without an errno (s3fs's AccessDenied) gets EACCES so the job
  recognises a write error that every image would meet.
  """
  name = type(e).__name__
  text = _reason(e)
  if type(e).__module__ != "builtins":  # aiohttp's, botocore's...: name the kind.
    text = text if name in text else f"{name}: {text}"
  if isinstance(e, FileNotFoundError):
    return FileNotFoundError(errno.ENOENT, text, location)
  if isinstance(e, PermissionError):
    return PermissionError(e.errno or errno.EACCES, text, location)
  # Other OSErrors keep their errno (ENOSPC...); NoCredentialsError & co. are not OSErrors.
  # A plain OSError: library subclasses may not take (errno, text, filename).
  return OSError(e.errno if isinstance(e, OSError) and e.errno else errno.EIO, text,
                 location)


class LocalStore:
  """Local paths: the job's behaviour before URLs, name for name."""

  local = True
  protocol = ""

  def norm(self, path: PathLike) -> str:
    """Absolute path (`file://` stripped); "~" is the caller's business, as before.

    Raises:
      StoreError: a mistyped URL (`s3:/bucket/x`), which would otherwise become a
        local folder named "s3:".
    """
    path = _local_path(os.fspath(path))
    m = _TYPO_RE.match(path)
    if m and m.group(1).lower() in _PACKAGES:
      raise StoreError(f"{path!r} looks like a mistyped URL: write "
                       f"{m.group(1)}://{path[m.end():]}")
    return os.path.abspath(path)

  def join(self, base: str, *parts: str) -> str:
    return os.path.join(base, *parts)

  def relpath(self, path: str, root: str) -> str:
    return os.path.relpath(path, root)

  def dirname(self, path: str) -> str:
    return os.path.dirname(path)

  def basename(self, path: str) -> str:
    return os.path.basename(path.rstrip(os.sep))

  def kind(self, path: str) -> Optional[str]:
    """"dir", "file" or None (missing)."""
    if os.path.isdir(path):
      return "dir"
    return "file" if os.path.isfile(path) else None

  def exists(self, path: str) -> bool:
    return os.path.exists(path)

  def open_read(self, path: str) -> BinaryIO:
    return open(path, "rb")  # pylint: disable=consider-using-with

  def read_bytes(self, path: str) -> bytes:
    with open(path, "rb") as f:
      return f.read()

  def write_bytes(self, path: str, data: Union[bytes, str]) -> None:
    """Atomic: a temporary file renamed over `path` (`samjax.io.files.atomic_write`)."""
    files.atomic_write(path, data)

  def remove(self, path: str) -> None:
    os.unlink(path)

  def listdir(self, folder: str) -> list[str]:
    """Names of the files directly in `folder` (sorted)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file())


class FsspecStore:
  """One fsspec protocol (`s3`, `gs`, `memory`...). Names are `protocol://a/b/c`.

  Args:
    protocol: the URL scheme.
    fs: the filesystem; default `fsspec.filesystem(protocol, **storage options)`
      where the options come from the environment (see the module docstring).
  """

  local = False

  def __init__(self, protocol: str, fs=None):
    self.protocol = protocol
    self.fs = fs if fs is not None else _filesystem(protocol)

  # ------------------------------------------------------------------ names
  def norm(self, url: PathLike) -> str:
    """`protocol://a/b` without "." / ".." / empty segments or a trailing "/".

    Raises:
      StoreError: a bucket store's URL without a bucket (`s3://`, `s3:///x`), which
        would otherwise mean every bucket the credentials can see.
    """
    protocol, rest = split_url(os.fspath(url))
    if protocol in _BUCKET_PROTOCOLS and not rest.split("/", 1)[0]:
      raise StoreError(f"{os.fspath(url)!r} names no bucket: write "
                       f"{protocol}://BUCKET/prefix")
    rest = posixpath.normpath("/" + rest).lstrip("/") if rest else ""
    return f"{protocol}://{rest}"

  def join(self, base: str, *parts: str) -> str:
    protocol, rest = split_url(base)
    return f"{protocol}://" + posixpath.join(rest, *parts) if rest else \
        f"{protocol}://" + posixpath.join(*parts)

  def relpath(self, path: str, root: str) -> str:
    return posixpath.relpath("/" + split_url(path)[1], "/" + split_url(root)[1])

  def dirname(self, path: str) -> str:
    protocol, rest = split_url(path)
    return f"{protocol}://{posixpath.dirname(rest.rstrip('/'))}"

  def basename(self, path: str) -> str:
    return posixpath.basename(split_url(path)[1].rstrip("/"))

  # ------------------------------------------------------------------ reading
  def _call(self, location: str, fn: Callable, *args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # Not BaseException: Ctrl-C stays Ctrl-C.
      raise _as_os_error(e, location) from None

  def kind(self, url: str) -> Optional[str]:
    """"dir", "file" or None (missing).

    Raises:
      OSError: the store refused (no such bucket, no credentials, unreachable).
    """
    try:
      info = self.fs.info(url)
    except FileNotFoundError:
      self.check_bucket(url)
      return None
    except Exception as e:
      raise _as_os_error(e, url) from None
    return "dir" if info.get("type") == "directory" else "file"

  def check_bucket(self, url: str) -> None:
    """Raises FileNotFoundError naming the bucket when `url`'s bucket is missing (on
    bucket stores: s3, gs, az...; elsewhere a no-op)."""
    if self.protocol not in _BUCKET_PROTOCOLS:
      return
    bucket = split_url(url)[1].split("/", 1)[0]
    try:
      found = bool(bucket) and self.fs.exists(f"{self.protocol}://{bucket}")
    except Exception as e:  # pylint: disable=broad-except
      raise _as_os_error(e, url) from None
    if not found:
      raise FileNotFoundError(errno.ENOENT, f"the bucket {bucket!r} does not exist (or these "
                              "credentials cannot see it)", url)

  def exists(self, url: str) -> bool:
    try:
      return bool(self.fs.exists(url))
    except Exception:  # pylint: disable=broad-except
      return False

  def open_read(self, url: str) -> BinaryIO:
    return self._call(url, self.fs.open, url, "rb")

  def read_bytes(self, url: str) -> bytes:
    return self._call(url, self.fs.cat_file, url)

  def find(self, root: str) -> list[str]:
    """Every object under `root` (recursively), as full URLs, sorted.

    Raises:
      OSError: the listing failed.
    """
    found = self._call(root, self.fs.find, root, withdirs=False, detail=False)
    base = self.fs._strip_protocol(root).rstrip("/")  # pylint: disable=protected-access
    urls = []
    for p in found:
      p = p.rstrip("/")
      if p == base or not p.startswith(base + "/"):
        continue  # `root` itself as an object, or a store that returns odd names.
      urls.append(self.join(root, p[len(base) + 1:]))
    return sorted(urls)

  def listdir(self, folder: str) -> list[str]:
    """Names of the objects directly under `folder` (sorted)."""
    entries = self._call(folder, self.fs.ls, folder, detail=True)
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e.get("type") != "directory")

  # ------------------------------------------------------------------ writing
  def write_bytes(self, url: str, data: Union[bytes, str]) -> None:
    """One whole-object upload: `url` is absent/old until the upload completes."""
    if isinstance(data, str):
      data = data.encode("utf-8")
    self._call(url, self.fs.pipe_file, url, data)

  def remove(self, url: str) -> None:
    self._call(url, self.fs.rm_file, url)


def _storage_options(protocol: str) -> dict:
  """Options for `fsspec.filesystem(protocol)`, from the environment.

  Listings are never cached: a resume must see what other processes wrote since.
  """
  options = {}
  if protocol in _BUCKET_PROTOCOLS:
    options["use_listings_cache"] = False
  if protocol in ("s3", "s3a"):
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    ignore = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    if endpoint and not ignore:
      options["endpoint_url"] = endpoint
  return options


def _filesystem(protocol: str):
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise StoreError(f"{protocol}:// locations need fsspec: {_INSTALL_HINT}") from None
  from fsspec.registry import known_implementations  # pylint: disable=import-outside-toplevel
  try:
    cls = fsspec.get_filesystem_class(protocol)
  except ValueError:
    known = ", ".join(p + "://" for p in ("s3", "gs", "az", "http", "https", "memory"))
    raise StoreError(f"unknown storage protocol {protocol}:// (fsspec knows none by that "
                     f"name; e.g. {known})") from None
  except ImportError as e:
    package = _PACKAGES.get(protocol) or known_implementations.get(protocol, {}).get("err")
    hint = _INSTALL_HINT if protocol in _PACKAGES else "install the package it names"
    raise StoreError(f"{protocol}:// locations need the {package or 'client'} package "
                     f"({hint}): {_reason(e)}") from None
  if not os.environ.get("SAMJAX_TRACEBACK"):
    # Client libraries log retries with tracebacks (gcsfs) and guesses (bucket types)
    # to stderr through logging's last-resort handler; the error we raise says why.
    import logging  # pylint: disable=import-outside-toplevel
    for name in {cls.__module__.split(".")[0], "fsspec"}:
      logger = logging.getLogger(name)
      if not logger.handlers:
        logger.addHandler(logging.NullHandler())
  try:
    # A fresh instance: fsspec's cache would hand back one made from an older
    # environment (other credentials) after `set_store(protocol, None)`.
    return cls(skip_instance_cache=True, **_storage_options(protocol))
  except Exception as e:  # pylint: disable=broad-except
    raise StoreError(f"cannot set up {protocol}:// storage: {_reason(e)}") from None


LOCAL = LocalStore()
Store = Union[LocalStore, FsspecStore]
_STORES: dict[str, FsspecStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(location: PathLike) -> Store:
  """The `Store` of a local path or URL (one per protocol, made on first use).

  Raises:
    StoreError: unknown protocol, or its client package is not installed.
  """
  location = os.fspath(location)
  if not is_url(location):
    return LOCAL
  protocol = split_url(location)[0]
  with _STORES_LOCK:
    store = _STORES.get(protocol)
    if store is None:
      store = _STORES[protocol] = FsspecStore(protocol)
  return store


def set_store(protocol: str, store: Optional[FsspecStore]) -> None:
  """Uses `store` for `protocol` URLs from now on (None: forget it, the next use
  makes a fresh one from the environment). For tests and custom filesystems."""
  with _STORES_LOCK:
    if store is None:
      _STORES.pop(protocol, None)
    else:
      _STORES[protocol] = store


# -------------------------------------------------------------- location helpers


def norm(location: PathLike) -> str:
  """Absolute local path, or the URL with its path normalized."""
  return store_for(location).norm(location)


def join(base: str, *parts: str) -> str:
  return store_for(base).join(base, *parts)


def relpath(path: str, root: str) -> str:
  return store_for(path).relpath(path, root)


def basename(path: str) -> str:
  return store_for(path).basename(path)


def dirname(path: str) -> str:
  return store_for(path).dirname(path)


def is_under(path: str, root: str) -> bool:
  """Whether normalized `path` is `root` or lies inside it (same store only)."""
  if is_url(path) != is_url(root) or (is_url(path) and
                                      split_url(path)[0] != split_url(root)[0]):
    return False
  sep = "/" if is_url(root) else os.sep
  return path == root or path.startswith(root.rstrip(sep) + sep)


def exists(location: str) -> bool:
  return store_for(location).exists(location)


def read_bytes(location: str) -> bytes:
  return store_for(location).read_bytes(location)


def write_bytes(location: str, data: Union[bytes, str]) -> None:
  """Writes a whole file/object so that it is never visible half-written."""
  store_for(location).write_bytes(location, data)


def remove(location: str) -> None:
  store_for(location).remove(location)


def open_read(location: str) -> BinaryIO:
  return store_for(location).open_read(location)


def listing(root: str) -> Optional[frozenset]:
  """Every object under URL `root` and every "folder" (prefix) above them, from one
  recursive listing: lets a resume skip one request per missing output.

  Returns:
    None for a local path (looking at each file is cheap there), or when the listing
    fails (the caller then looks at each output).
  """
  if not is_url(root):
    return None
  where = store_for(root)
  try:
    found = where.find(root)
  except OSError:
    return None
  present = set(found)
  for url in found:
    parent = where.dirname(url)
    while parent not in present and len(parent) > len(root):
      present.add(parent)
      parent = where.dirname(parent)
  return frozenset(present)


def map_io(fn: Callable, items, location: str, threads: int = 16) -> list:
  """`[fn(x) for x in items]`, on `threads` threads when `location` is a URL (each
  call waits on the network), in order."""
  items = list(items)
  if not is_url(location) or len(items) < 2:
    return [fn(x) for x in items]
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  with concurrent.futures.ThreadPoolExecutor(min(threads, len(items)),
                                             thread_name_prefix="samjax-store") as pool:
    return list(pool.map(fn, items))
