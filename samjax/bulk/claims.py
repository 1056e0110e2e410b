"""Claims: jobs sharing an output folder split the work instead of repeating it.

Before working on an image a job creates `<out>/.samjax-claims/<key>.claim` with
`O_CREAT | O_EXCL` (atomic on local filesystems and on NFS v3+), holding who claimed
it (host, pid, time). Whoever creates the file owns the image; the others skip it. The
claim is removed once the image's output (or failure) is written, so the folder only
holds the images in flight.

A claim is taken over when its owner is gone:

* on the same host (and pid namespace), when its pid no longer runs: a crashed or
  killed job's images are free at once;
* anywhere, when the file was not refreshed for `timeout_s`: a live owner touches its
  claims every `timeout_s / 4` from a heartbeat thread, so only a dead (or frozen)
  owner's claims age.

Taking over is itself exclusive: the taker creates `<key>.claim.break` (O_EXCL),
checks that the claim is still the one it judged stale (same inode, mtime, size),
removes it and claims anew; a second taker finds the `.break` file and moves on.

Claims are for local (and NFS) output folders only. An output at a URL
(`samjax.bulk.store`) has none: object stores offer no O_EXCL create with the
refresh-and-takeover semantics above (S3's conditional `If-None-Match` PUT is not on
every S3-compatible server, and a stale claim could not be broken atomically), so the
processes of one job split a URL output by their deterministic shards, and two
separate jobs on one URL output would each do every image (whole-object uploads keep
every object intact either way).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from typing import Optional

CLAIMS_DIR = ".samjax-claims"
DEFAULT_TIMEOUT_S = 300.0
# A taker that crashed between creating `.break` and removing it leaves it behind;
# breaking takes milliseconds, so an older one is itself stale.
_BREAK_TIMEOUT_S = 60.0


def _namespace() -> str:
  """Identifies this host's pid namespace: pids are only comparable within one
  (containers may share a host name)."""
  parts = []
  for path in ("/proc/sys/kernel/random/boot_id",):
    with contextlib.suppress(OSError):
      with open(path, encoding="ascii") as f:
        parts.append(f.read().strip())
  with contextlib.suppress(OSError):
    parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
  return "/".join(parts)


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid runs on this host (zombies count as running)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it runs, as another user.
    return True
  return True


def claim_name(key: str) -> str:
  """The claim file's name for an output key (its path relative to the output folder)."""
  return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:24] + ".claim"


class Claims:
  """This job's claims on the images of one output folder.

  Args:
    out_dir: the output folder (the claims live in its `.samjax-claims`).
    timeout_s: a claim not refreshed for this long is taken over.
    heartbeat: refresh held claims from a thread (off only in tests).
  """

  def __init__(self, out_dir: str, timeout_s: float = DEFAULT_TIMEOUT_S,
               heartbeat: bool = True):
    if not timeout_s > 0:
      raise ValueError(f"claim timeout must be > 0 s, got {timeout_s}")
    self.out_dir = os.path.abspath(out_dir)
    self.folder = os.path.join(self.out_dir, CLAIMS_DIR)
    os.makedirs(self.folder, exist_ok=True)
    self.timeout_s = float(timeout_s)
    self.host = socket.gethostname()
    self.namespace = _namespace()
    self.token = secrets.token_hex(8)
    self._held: dict[str, str] = {}  # key -> claim file
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    if heartbeat:
      self._thread = threading.Thread(target=self._beat, name="samjax-claims", daemon=True)
      self._thread.start()

  # ------------------------------------------------------------------ public
  def path_for(self, output: str) -> str:
    return os.path.join(self.folder, claim_name(self._key(output)))

  def try_claim(self, output: str) -> bool:
    """Claims the image whose output is `output`; False if another live job holds it.

    Raises:
      OSError: the claims folder cannot be written (a job-level problem).
    """
    key = self._key(output)
    path = os.path.join(self.folder, claim_name(key))
    for _ in range(3):
      if self._create(path, key):
        with self._lock:
          self._held[key] = path
        return True
      if not self._break_if_stale(path):
        return False
    return False

  def release(self, output: str) -> None:
    """Gives the claim up (the output is written, or the image failed)."""
    with self._lock:
      path = self._held.pop(self._key(output), None)
    if path is not None:
      with contextlib.suppress(OSError):
        os.unlink(path)

  def held(self) -> int:
    with self._lock:
      return len(self._held)

  def close(self) -> None:
    """Stops the heartbeat and releases every claim still held."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    with self._lock:
      paths, self._held = list(self._held.values()), {}
    for path in paths:
      with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
      os.rmdir(self.folder)  # Only succeeds when no job holds anything.

  def __enter__(self) -> "Claims":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ internals
  def _key(self, output: str) -> str:
    return os.path.relpath(os.path.abspath(output), self.out_dir)

  def _create(self, path: str, key: str) -> bool:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      return False
    except FileNotFoundError:  # The folder went (another job's close); recreate it.
      os.makedirs(self.folder, exist_ok=True)
      return self._create(path, key)
    info = {"host": self.host, "namespace": self.namespace, "pid": os.getpid(),
            "token": self.token, "output": key, "unix_time": time.time(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
    try:
      os.write(fd, json.dumps(info).encode("utf-8"))
    except OSError:
      os.close(fd)
      with contextlib.suppress(OSError):
        os.unlink(path)
      raise
    os.close(fd)
    return True

  def _is_stale(self, path: str) -> Optional[os.stat_result]:
    """The claim's stat when it may be taken over, else None."""
    try:
      st = os.stat(path)
    except FileNotFoundError:
      return None  # Released meanwhile: the next create will tell.
    info = None
    with contextlib.suppress(OSError, ValueError):
      with open(path, "rb") as f:
        info = json.loads(f.read() or b"null")
    if isinstance(info, dict) and info.get("host") == self.host and \
        info.get("namespace") == self.namespace and isinstance(info.get("pid"), int) and \
        info["pid"] != os.getpid() and not pid_alive(info["pid"]):
      return st
    # No readable owner (a creator killed before writing it) or another host: age.
    return st if time.time() - st.st_mtime > self.timeout_s else None

  def _break_if_stale(self, path: str) -> bool:
    """Removes `path` if its owner is gone; whether the caller should try again."""
    seen = self._is_stale(path)
    if seen is None:
      return not os.path.exists(path)
    breaker = path + ".break"
    try:
      fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      with contextlib.suppress(OSError):
        if time.time() - os.stat(breaker).st_mtime > _BREAK_TIMEOUT_S:
          os.unlink(breaker)
      return False
    try:
      try:
        now = os.stat(path)
      except FileNotFoundError:
        return True
      same = (now.st_ino, now.st_mtime_ns, now.st_size) == \
          (seen.st_ino, seen.st_mtime_ns, seen.st_size)
      if not same:
        return False  # Refreshed or re-claimed while we looked.
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
      return True
    finally:
      os.close(fd)
      with contextlib.suppress(OSError):
        os.unlink(breaker)

  def _beat(self) -> None:
    interval = max(self.timeout_s / 4, 0.05)
    while not self._stop.wait(interval):
      with self._lock:
        paths = list(self._held.values())
      for path in paths:
        with contextlib.suppress(OSError):  # Released meanwhile, or a flaky mount.
          os.utime(path)
