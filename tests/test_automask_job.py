"""`samjax automask` end to end, in subprocesses: several devices, several processes,
kill-and-resume, and broken inputs, with the real generator on the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samjax.io.files import TEMP_PREFIX

GEN = ["--points-per-side", "6", "--points-per-batch", "16", "--pred-iou-thresh", "0",
       "--stability-score-thresh", "0", "--no-progress", "--num-workers", "2"]


def _images(folder: Path, n: int, seed: int = 0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = (120, 160) if i % 2 else (150, 110)
    img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(3):
      x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
      cv2.rectangle(img, (x, y), (x + 30, y + 25), tuple(int(c) for c in rng.integers(0, 255, 3)),
                    -1)
    cv2.imwrite(str(folder / f"img_{i:02d}.png"), img)
  return sorted(folder.glob("*.png"))


def _env(devices: int = 1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("SAMJAX_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                              "samjax-test-cache"))
  return env


def _cmd(*args):
  return [sys.executable, "-m", "samjax.cli", "automask", *map(str, args)]


def _outputs(out: Path):
  return {p.relative_to(out).as_posix(): json.loads(p.read_text())
          for p in sorted(out.rglob("*.json"))
          if p.name != "samjax_job.json" and not p.name.startswith(".")}  # not temporaries


def _strip(record):
  anns = [{k: a[k] for k in ("segmentation", "bbox", "area", "point_coords", "crop_box")}
          | {"predicted_iou": round(a["predicted_iou"], 4),
             "stability_score": round(a["stability_score"], 4)}
          for a in record["annotations"]]
  return record["image"]["file_name"], anns


def test_four_devices_equal_one(tiny_ckpt, tmp_path):
  imgs = tmp_path / "imgs"
  _images(imgs, 5)
  outs = {}
  for d in (1, 4):
    out = tmp_path / f"out{d}"
    r = subprocess.run(_cmd(imgs, "--out", out, "--checkpoint", tiny_ckpt[1], "--batch-size", 3,
                            *GEN), env=_env(d), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    outs[d] = _outputs(out)
  assert len(outs[1]) == 5 and outs[1].keys() == outs[4].keys()
  n_masks = 0
  for k in outs[1]:
    a, b = _strip(outs[1][k]), _strip(outs[4][k])
    assert a == b, k
    n_masks += len(a[1])
  assert n_masks >= 5  # the test would be vacuous without masks


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_split_without_overlap_or_gap(tiny_ckpt, tmp_path):
  imgs = tmp_path / "imgs"
  paths = _images(imgs, 7)
  out = tmp_path / "out"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(imgs, "--out", out, "--checkpoint", tiny_ckpt[1], "--distributed",
           "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", 2,
           "--process-id", i, *GEN),
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  done = []
  for log in logs:
    m = re.search(r"(\d+) images: (\d+) done, (\d+) skipped", log)
    assert m, log[-2000:]
    done.append(int(m.group(2)))
  assert sum(done) == len(paths) and all(d > 0 for d in done)
  got = _outputs(out)
  names = sorted(r["image"]["file_name"] for r in got.values())
  assert names == sorted(p.name for p in paths)
  # One manifest for the two processes; both processes' outputs point at it.
  written = [log for log in logs if "samjax_job.json (written;" in log]
  assert len(written) == 1 and sum("samjax_job.json (checked;" in log for log in logs) == 1
  manifest = json.loads((out / "samjax_job.json").read_text())
  assert manifest["job"]["process_count"] == 2
  assert {r["provenance"]["settings_sha256"] for r in got.values()} == {
      manifest["settings_sha256"]}


def test_killed_job_resumes_and_finishes_each_image_once(tiny_ckpt, tmp_path):
  imgs = tmp_path / "imgs"
  paths = _images(imgs, 8, seed=1)
  out = tmp_path / "out"
  cmd = _cmd(imgs, "--out", out, "--checkpoint", tiny_ckpt[1], "--batch-size", 1, *GEN)
  p = subprocess.Popen(cmd, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(_outputs(out)) < 2:
    time.sleep(0.2)
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  first = _outputs(out)  # everything under a final name parses: writes are atomic
  assert 2 <= len(first) < len(paths)
  r = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r"(\d+) images: (\d+) done, (\d+) skipped", r.stderr)
  assert m and int(m.group(3)) == len(first) and int(m.group(2)) == len(paths) - len(first)
  final = _outputs(out)
  assert sorted(x["image"]["file_name"] for x in final.values()) == [q.name for q in paths]
  for name, rec in first.items():
    assert final[name] == rec  # finished images were not redone
  for rec in final.values():
    for a in rec["annotations"]:
      m = mask_utils.decode(a["segmentation"])
      assert m.shape == (rec["image"]["height"], rec["image"]["width"])
      assert int(m.sum()) == a["area"]
  assert not list(out.rglob(TEMP_PREFIX + "*"))  # Killed writes' leftovers were removed.


def test_broken_files_are_listed_and_the_job_finishes(tiny_ckpt, tmp_path):
  imgs = tmp_path / "imgs"
  _images(imgs, 3, seed=2)
  (imgs / "empty.jpg").write_bytes(b"")
  (imgs / "garbage.png").write_bytes(os.urandom(500))
  good = (imgs / "img_00.png").read_bytes()
  (imgs / "truncated.png").write_bytes(good[: len(good) // 2])
  gray = np.random.default_rng(0).integers(0, 255, (90, 70), np.uint8)
  cv2.imwrite(str(imgs / "gray.png"), gray)
  rgba = np.dstack([np.full((80, 60, 3), 100, np.uint8), np.full((80, 60), 255, np.uint8)])
  cv2.imwrite(str(imgs / "rgba.png"), rgba)
  out = tmp_path / "out"
  r = subprocess.run(_cmd(imgs, "--out", out, "--checkpoint", tiny_ckpt[1], "--overlays", *GEN),
                     env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
  assert sorted(Path(f["path"]).name for f in failures) == ["empty.jpg", "garbage.png",
                                                           "truncated.png"]
  assert all(f["reason"] for f in failures)
  names = sorted(rec["image"]["file_name"] for rec in _outputs(out).values())
  assert names == ["gray.png", "img_00.png", "img_01.png", "img_02.png", "rgba.png"]
  assert len(list(out.rglob("*.png"))) == 5  # overlays
