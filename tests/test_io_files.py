"""samjax.io.files: atomic writes and the clean-up of their leftovers."""

from __future__ import annotations

import os

import pytest

from samjax.io import files
from samjax.io.files import atomic_open, atomic_write, remove_stale_temps


def _names(folder) -> set[str]:
  return set(os.listdir(folder))


def test_atomic_write_bytes_text_and_overwrite(tmp_path):
  target = tmp_path / "sub" / "deeper" / "out.json"
  atomic_write(target, b"\x00\x01 bytes")
  assert target.read_bytes() == b"\x00\x01 bytes"
  atomic_write(target, "text: é")
  assert target.read_bytes() == "text: é".encode("utf-8")
  assert _names(target.parent) == {"out.json"}  # No temporary left behind.
  with pytest.raises(FileNotFoundError):
    atomic_write(tmp_path / "absent" / "x", b"", make_dirs=False)


def test_permissions_follow_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    atomic_write(tmp_path / "f", b"x")
  finally:
    os.umask(old)
  assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
  synced = []
  real = os.fsync

  def spy(fd):
    synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                  else fd)
    return real(fd)

  monkeypatch.setattr(os, "fsync", spy)
  atomic_write(tmp_path / "f.bin", b"data")
  assert len(synced) == 2
  if os.path.exists("/proc/self/fd"):
    assert os.path.basename(synced[0]).startswith(files.TEMP_PREFIX)  # The file, then
    assert synced[1] == os.path.realpath(tmp_path)  # the folder holding the rename.


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  target = tmp_path / "model.pth"
  target.write_bytes(b"old")
  for exc in (OSError("disk full"), KeyboardInterrupt()):
    with pytest.raises(type(exc)):
      with atomic_open(target) as f:
        f.write(b"half of the new")
        raise exc
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == {"model.pth"}


def test_temporary_names(tmp_path):
  tmp = files.temp_path_for(tmp_path / "cat.jpg.json")
  assert os.path.dirname(tmp) == str(tmp_path)
  name = os.path.basename(tmp)
  assert name.startswith(files.TEMP_PREFIX) and name.endswith(".cat.jpg.json")
  assert name.startswith(".")  # Hidden from folder listings (the bulk job skips those).
  assert files.temp_path_for(tmp_path / "a") != files.temp_path_for(tmp_path / "a")
  long_name = "x" * 250 + ".json"
  assert len(os.path.basename(files.temp_path_for(tmp_path / long_name)).encode()) <= 255
  atomic_write(tmp_path / long_name, b"ok")  # The filesystem accepts it.
  assert (tmp_path / long_name).read_bytes() == b"ok"


def test_remove_stale_temps(tmp_path):
  sub = tmp_path / "sub"
  sub.mkdir()
  long_name = "é" * 120 + ".json"
  stale = {}
  for final in (tmp_path / "a.json", tmp_path / "b.json", sub / "c.json", tmp_path / long_name):
    stale[final.name] = files.temp_path_for(final)
    open(stale[final.name], "wb").close()
  others = [tmp_path / "a.json", tmp_path / "notes.tmp", tmp_path / "a.json.1.deadbeef.tmp"]
  for p in others:
    p.write_bytes(b"not ours")

  # Only the temporaries of the given finals, and only in the folder unless recursive.
  assert remove_stale_temps(tmp_path, finals=[tmp_path / "a.json", sub / "c.json"]) == 1
  assert not os.path.exists(stale["a.json"]) and os.path.exists(stale["c.json"])
  assert remove_stale_temps(tmp_path, finals=[sub / "c.json", tmp_path / long_name],
                            recursive=True) == 2
  assert os.path.exists(stale["b.json"])
  assert remove_stale_temps(tmp_path) == 1  # Every one of ours.
  assert _names(tmp_path) == {"sub", "a.json", "notes.tmp", "a.json.1.deadbeef.tmp"}
  assert _names(sub) == set()
  assert remove_stale_temps(tmp_path / "missing") == 0
