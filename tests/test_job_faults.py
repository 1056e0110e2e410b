"""Faults of the bulk job and the commands, one class per test: exit statuses,
signals, unusable output locations and full disks, odd inputs, failures that later
succeed, concurrent jobs on one folder, lying image headers, predict's output paths,
and the automatic batch size / dtype.

A fast fake generator stands in for the model wherever the model is irrelevant; the
end-to-end cases run the real tiny model of tests/fixtures/tiny_trained.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from samjax import bulk
from samjax.bulk import claims as claims_lib
from samjax.cli import EXIT_STATUSES, automask, main
from samjax.io import files
from samjax.io import images as images_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_trained"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  """automask checks (and the e2e case uses) samjax's cache folder: keep it here."""
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "cache"))


def make_images(folder: Path, n: int, start: int = 0, ext: str = ".png") -> list[Path]:
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(start, start + n):
    rng = np.random.default_rng(i)
    img = np.full((24 + i % 3, 32, 3), rng.integers(0, 255, 3), np.uint8)
    img[4:12, 6:20] = rng.integers(0, 255, 3)
    p = folder / f"img{i:02d}{ext}"
    assert cv2.imwrite(str(p), img)
    paths.append(p)
  return paths


def fake_anns(img: np.ndarray) -> list[dict]:
  mask = img.astype(np.float32).mean(-1) > img.mean()
  return [{"segmentation": mask, "predicted_iou": 0.9, "stability_score": 0.95,
           "point_coords": [[0.0, 0.0]]}]


class FakeGenerator:
  """generate_batch stand-in: one mask per image; optional failures by image size."""

  def __init__(self, fail_if=None):
    self.fail_if = fail_if
    self.seen = 0

  def generate_batch(self, images):
    out = []
    for img in images:
      if self.fail_if is not None and self.fail_if(img):
        raise RuntimeError("poisoned image")
      out.append(fake_anns(img))
    self.seen += len(images)
    return out


def run_cli(argv, monkeypatch, generator=None):
  """`samjax ARGV` in-process; automask builds `generator` (None: building fails)."""

  def make(args):
    if generator is None:
      pytest.fail("the model was loaded although the job could not run")
    return generator

  monkeypatch.setattr(automask, "make_generator", make)
  return main(["automask", *map(str, argv)])


def outputs(out: Path) -> dict[str, dict]:
  return {p.relative_to(out).as_posix(): json.loads(p.read_text())
          for p in sorted(out.rglob("*.json"))
          if p.name != "samjax_job.json" and not p.name.startswith(".")}  # not temporaries


def failures(out: Path, name: str = "failures.jsonl") -> list[dict]:
  path = out / name
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def leftovers(out: Path) -> list[str]:
  return [p.name for p in out.rglob("*") if p.name.startswith((files.TEMP_PREFIX,
                                                               ".samjax-write-test"))]


# A command line with the fake generator, for tests that need a real process.
FAKE_CLI = textwrap.dedent("""
    import hashlib, os, signal, sys, time
    import numpy as np
    from samjax.cli import automask, main

    # As from a terminal: SIGINT raises KeyboardInterrupt. A child inherits an ignored
    # SIGINT from its parent (a background job of a shell, or a test runner some library
    # left so), and then a second SIGINT is ignored too, as the job promises ("does
    # what it would have done without us").
    signal.signal(signal.SIGINT, signal.default_int_handler)

    DELAY = float(os.environ.get("FAKE_DELAY", "0"))
    LOAD_DELAY = float(os.environ.get("FAKE_LOAD_DELAY", "0"))
    LOG = os.environ.get("FAKE_LOG")
    STARTED = os.environ.get("FAKE_STARTED")

    class Gen:
      def generate_batch(self, images):
        if STARTED:
          open(STARTED, "w").close()
        out = []
        for img in images:
          time.sleep(DELAY)
          mask = img.astype(np.float32).mean(-1) > img.mean()
          out.append([{"segmentation": mask, "predicted_iou": 0.9,
                       "stability_score": 0.95, "point_coords": [[0.0, 0.0]]}])
          if LOG:
            with open(LOG, "a") as f:
              f.write(hashlib.sha1(img.tobytes()).hexdigest() + "\\n")
        return out

    def make(args):
      time.sleep(LOAD_DELAY)
      return Gen()

    automask.make_generator = make
    sys.exit(main(["automask", *sys.argv[1:]]))
""")


def fake_cli(tmp_path: Path, *args, env=None, **popen):
  script = tmp_path / "fake_cli.py"
  if not script.exists():
    script.write_text(FAKE_CLI)
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT,
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **popen)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  pytest.fail(f"timed out waiting for {what}")


def quiet(**kw):
  kw.setdefault("progress", False)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return kw


# ----------------------------------------------------------------- 1. exit statuses


def test_exit_statuses_and_one_line_errors(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data, 3)
  out = tmp_path / "out"
  assert run_cli([data, "--out", out, "--no-progress"], monkeypatch, FakeGenerator()) == 0
  assert len(outputs(out)) == 3

  (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  assert run_cli([data, "--out", out, "--no-progress"], monkeypatch, FakeGenerator()) == 1

  cases = {
      "no model": [data, "--out", tmp_path / "o1", "--checkpoint", tmp_path / "none"],
      "no images": [tmp_path / "empty", "--out", tmp_path / "o2"],
      "bad --out": [data, "--out", data / "img00.png" / "sub"],
      "bad flags": [data, "--out", tmp_path / "o3", "--process-id", "1"],
  }
  (tmp_path / "empty").mkdir()
  capsys.readouterr()
  for name, argv in cases.items():
    assert run_cli(argv, monkeypatch) == 2, name
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("samjax automask: error:")]
    assert len(lines) == 1 and "Traceback" not in err, (name, err)
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

  with pytest.raises(SystemExit) as info:  # argparse's usage errors are 2 too.
    main(["automask", str(data), "--out", str(out), "--batch-size", "0"])
  assert info.value.code == 2

  # The table is in --help, and the codes are the documented ones.
  assert [code for code, _ in EXIT_STATUSES] == [0, 1, 2, 130, 143]
  with pytest.raises(SystemExit):
    main(["automask", "--help"])
  text = capsys.readouterr().out
  assert "exit status:" in text
  for code, _ in EXIT_STATUSES:
    assert f"\n  {code} " in text


def test_unexpected_errors_are_one_line_too(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data, 1)

  def broken(args):
    raise TypeError("a bug")

  monkeypatch.setattr(automask, "make_generator", broken)
  assert main(["automask", str(data), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "samjax automask: error: TypeError: a bug" in err and "Traceback" not in err


# ------------------------------------------------------------------------ 2. signals


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_in_flight_and_exits(tmp_path, sig, code):
  data = tmp_path / "data"
  paths = make_images(data, 12)
  out = tmp_path / "out"
  p = fake_cli(tmp_path, data, "--out", out, "--batch-size", 1, "--no-progress",
               env={"FAKE_DELAY": "0.3"})
  wait_for(lambda: len(outputs(out)) >= 2, what="first outputs")
  os.kill(p.pid, sig)
  _, err = p.communicate(timeout=60)
  assert p.returncode == code, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  name = signal.Signals(sig).name
  assert f"samjax automask: interrupted by {name}" in err
  assert f"interrupted by {name}: finished outputs are kept" in err  # The summary.
  got = outputs(out)
  assert 2 <= len(got) < len(paths)
  assert all(bulk.is_valid_output(out / k) for k in got)
  assert not leftovers(out) and not (out / claims_lib.CLAIMS_DIR).exists()

  p = fake_cli(tmp_path, data, "--out", out, "--no-progress")  # Resumes.
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err
  assert f"{len(got)} skipped" in err and len(outputs(out)) == len(paths)


def test_sigterm_while_the_model_loads(tmp_path):
  data = tmp_path / "data"
  make_images(data, 2)
  out = tmp_path / "out"
  p = fake_cli(tmp_path, data, "--out", out, env={"FAKE_LOAD_DELAY": "60"})
  # The plan (output folder, listing) comes before the model: wait for the folder.
  wait_for(out.exists, what="the output folder")
  time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 143, err
  assert err.strip().splitlines()[-1] == "samjax automask: interrupted by SIGTERM"
  assert "Traceback" not in err


def test_second_signal_stops_at_once(tmp_path):
  data = tmp_path / "data"
  make_images(data, 4)
  out = tmp_path / "out"
  started = tmp_path / "started"
  p = fake_cli(tmp_path, data, "--out", out, "--batch-size", 4, "--no-progress",
               # 30 s an image: the batch is surely still in flight when the second
               # signal comes, however loaded the machine; that signal ends it at once.
               env={"FAKE_DELAY": "30", "FAKE_STARTED": str(started)})
  wait_for(started.exists, what="the generator")
  assert len(list((out / claims_lib.CLAIMS_DIR).iterdir())) == 4
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
  reader.start()
  p.send_signal(signal.SIGINT)
  # The second signal only once the first was handled: two sent before the process
  # ran (a loaded machine) would arrive as one, which finishes the batch instead.
  wait_for(lambda: any("finishing the images in flight" in line for line in lines),
           timeout=60, what="the first SIGINT to be handled")
  p.send_signal(signal.SIGINT)
  p.wait(timeout=30)
  reader.join(timeout=10)
  err = "".join(lines)
  assert p.returncode == 130, err
  assert "Traceback" not in err and "finishing the images in flight" in err
  assert not outputs(out) and not leftovers(out)
  assert not (out / claims_lib.CLAIMS_DIR).exists()  # Released on the way out.


def test_leftover_temporaries_are_removed_on_the_next_run(tmp_path):
  data = tmp_path / "data"
  make_images(data, 3)
  out = tmp_path / "out"
  out.mkdir()
  ours = files.temp_path_for(out / "img00.png.json")
  legacy = out / "img01.png.json.4242.deadbeef.tmp"  # samjax < 0.1
  foreign = out / "notes.txt.4242.deadbeef.tmp"  # Same pattern, not one of our outputs.
  for p in (ours, legacy, foreign):
    Path(p).write_text('{"image": {"image_id"')
  summary = bulk.run_job([data], out, FakeGenerator().generate_batch, **quiet())
  assert summary.done == 3
  assert not os.path.exists(ours) and not legacy.exists() and foreign.exists()


# ---------------------------------------------------------- 3. output location, disk


@pytest.mark.parametrize("case", ["file in path", "out is a file", "read-only", "full disk"])
def test_output_location_is_checked_before_the_model(tmp_path, monkeypatch, capsys, case):
  data = tmp_path / "data"
  make_images(data, 2)
  (tmp_path / "file").write_text("x")
  out = tmp_path / "out"
  if case == "file in path":
    out = tmp_path / "file" / "sub"
  elif case == "out is a file":
    out = tmp_path / "file"
  else:
    err = errno.EROFS if case == "read-only" else errno.ENOSPC

    def refuse(path, data, make_dirs=True):
      raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(files, "atomic_write", refuse)
  capsys.readouterr()
  assert run_cli([data, "--out", out], monkeypatch) == 2
  msg = capsys.readouterr().err.strip()
  assert msg.startswith("samjax automask: error:") and "\n" not in msg, msg
  want = {"file in path": "is a file, not a folder", "out is a file": "is a file",
          "read-only": "Read-only file system", "full disk": "No space left on device"}
  assert want[case] in msg
  if case in ("read-only", "full disk"):
    assert not out.exists()  # Created for the check, removed again.


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data, 1)
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    assert run_cli([data, "--out", ro / "out"], monkeypatch) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
  finally:
    ro.chmod(0o700)


def test_unwritable_compilation_cache_is_checked_before_the_model(tmp_path, monkeypatch,
                                                                  capsys):
  data = tmp_path / "data"
  make_images(data, 1)
  (tmp_path / "file").write_text("x")
  assert run_cli([data, "--out", tmp_path / "out", "--compilation-cache",
                  tmp_path / "file" / "xla"], monkeypatch) == 2
  err = capsys.readouterr().err
  assert "cannot use the compilation cache folder" in err and "--compilation-cache" in err
  # The default folder is samjax's cache folder.
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "file" / "cache"))
  assert run_cli([data, "--out", tmp_path / "out"], monkeypatch) == 2
  assert "cannot use the compilation cache folder" in capsys.readouterr().err


@pytest.mark.parametrize("log_full", [False, True])
def test_disk_full_during_the_job_stops_it_and_keeps_outputs(tmp_path, monkeypatch, capsys,
                                                             log_full):
  data = tmp_path / "data"
  make_images(data, 6)
  out = tmp_path / "out"
  real_write, real_append = files.atomic_write, files.append_text
  writes = []

  def write(path, data, make_dirs=True):
    if str(path).endswith(".json"):
      if len(writes) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
      writes.append(path)
    real_write(path, data, make_dirs)

  def append(path, text):
    if log_full:
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real_append(path, text)

  monkeypatch.setattr(files, "atomic_write", write)
  monkeypatch.setattr(files, "append_text", append)
  gen = FakeGenerator()
  capsys.readouterr()
  rc = run_cli([data, "--out", out, "--batch-size", 2, "--no-progress"], monkeypatch, gen)
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith("samjax automask: error: cannot write")
  assert "No space left on device" in err
  got = outputs(out)
  assert len(got) == 2 and all(bulk.is_valid_output(out / k) for k in got)
  assert "2 done" in err and "not run" in err
  assert gen.seen == 4  # Stopped after the batch that hit the full disk.
  recorded = failures(out)
  if log_full:
    assert recorded == [] and "failure record(s) could not be written" in err
    assert '"stage": "write"' in err  # Printed instead.
  else:
    assert [r["stage"] for r in recorded] == ["write"]
    assert "No space left on device" in recorded[0]["reason"]
  assert not leftovers(out)
  monkeypatch.setattr(files, "atomic_write", real_write)
  monkeypatch.setattr(files, "append_text", real_append)
  assert run_cli([data, "--out", out, "--no-progress"], monkeypatch, FakeGenerator()) == 0
  assert len(outputs(out)) == 6 and failures(out) == []


# ------------------------------------------------------------------------- 4. inputs


def test_output_folder_that_is_or_holds_an_input_is_refused(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data / "imgs", 2)
  for out, why in ((data / "imgs", "is the output folder"),
                   (data, "is inside the output folder")):
    capsys.readouterr()
    assert run_cli([data / "imgs", "--out", out], monkeypatch) == 2
    assert why in capsys.readouterr().err
  assert not list(data.rglob("*.json"))
  # Through a link to it, too.
  (tmp_path / "alias").symlink_to(data / "imgs")
  assert run_cli([data / "imgs", "--out", tmp_path / "alias"], monkeypatch) == 2


def test_output_inside_an_input_is_skipped_and_said(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data, 2)
  out = data / "masks"
  for _ in range(2):  # The second run must not take the overlays for inputs.
    capsys.readouterr()
    assert run_cli([data, "--out", out, "--overlays", "--no-progress"], monkeypatch,
                   FakeGenerator()) == 0
  err = capsys.readouterr().err
  assert f"skipped {out}: it is the output folder" in err
  assert len(outputs(out)) == 2 and "2 images: 0 done, 2 skipped" in err
  # A file inside --out that the user names is still processed.
  named = make_images(out / "extra", 1, start=9)[0]
  assert run_cli([named, "--out", out, "--no-progress"], monkeypatch, FakeGenerator()) == 0
  assert len(outputs(out)) == 3


def test_symlinked_folders_are_followed_once(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data / "real", 2)
  elsewhere = make_images(tmp_path / "elsewhere", 2, start=5)
  (data / "linked").symlink_to(tmp_path / "elsewhere")
  (data / "real" / "loop").symlink_to(data)  # A loop back to the top.
  (data / "twice").symlink_to(data / "real")  # The same folder again.
  images = bulk.list_inputs([data])
  assert images == sorted([str(data / "linked" / p.name) for p in elsewhere] +
                          [str(data / "real" / f"img0{i}.png") for i in range(2)])
  assert run_cli([data, "--out", tmp_path / "out", "--no-progress"], monkeypatch,
                 FakeGenerator()) == 0
  err = capsys.readouterr().err
  assert "a link to a folder already listed" in err
  assert sorted(outputs(tmp_path / "out")) == ["linked/img05.png.json",
                                               "linked/img06.png.json",
                                               "real/img00.png.json", "real/img01.png.json"]


def test_unlistable_folders_and_empty_inputs_are_reported(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data / "ok", 2)
  make_images(data / "locked", 2, start=4)
  (tmp_path / "nothing").mkdir()
  (tmp_path / "nothing" / "readme.txt").write_text("no images here")
  real_scandir = os.scandir

  def scandir(path="."):
    if os.fspath(path).rstrip("/").endswith("locked"):
      raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)
  out = tmp_path / "out"
  capsys.readouterr()
  assert run_cli([data, tmp_path / "nothing", "--out", out, "--no-progress"], monkeypatch,
                 FakeGenerator()) == 1
  err = capsys.readouterr().err
  assert "Permission denied" in err and "no images found" in err
  rows = {Path(r["path"]).name: r for r in failures(out)}
  assert set(rows) == {"locked", "nothing"} and {r["stage"] for r in rows.values()} == {"list"}
  assert len(outputs(out)) == 2
  # Nothing to do at all: exit 2, naming the inputs and why.
  assert run_cli([data / "locked", tmp_path / "nothing", "--out", tmp_path / "o2"],
                 monkeypatch) == 2
  err = capsys.readouterr().err
  assert "no images found in" in err and "locked" in err and "nothing" in err
  # Once the folder is readable again, its stale "list" record goes.
  monkeypatch.setattr(os, "scandir", real_scandir)
  assert run_cli([data, tmp_path / "nothing", "--out", out, "--no-progress"], monkeypatch,
                 FakeGenerator()) == 1
  assert [Path(r["path"]).name for r in failures(out)] == ["nothing"]
  assert len(outputs(out)) == 4


# ------------------------------------------------------------ 5. failures that recover


def test_failure_that_later_succeeds_leaves_the_log(tmp_path):
  data = tmp_path / "data"
  make_images(data, 4)
  (data / "bad.png").write_bytes(b"")
  out = tmp_path / "out"
  poisoned = FakeGenerator(fail_if=lambda img: img.shape[0] == 25)  # img01 (and img04..)
  for _ in range(2):  # Failing twice gives one record, not two.
    summary = bulk.run_job([data], out, poisoned.generate_batch, batch_size=2, **quiet())
    assert summary.failed == 2
  rows = failures(out)
  assert sorted(Path(r["path"]).name for r in rows) == ["bad.png", "img01.png"]
  summary = bulk.run_job([data], out, FakeGenerator().generate_batch, **quiet())
  assert (summary.done, summary.failed) == (1, 1)
  assert [Path(r["path"]).name for r in failures(out)] == ["bad.png"]
  (data / "bad.png").unlink()
  make_images(tmp_path / "tmp", 1)[0].rename(data / "bad.png")
  summary = bulk.run_job([data], out, FakeGenerator().generate_batch, **quiet())
  assert summary.exit_code == 0 and not (out / "failures.jsonl").exists()


def test_shared_log_appends_survive_a_concurrent_rewrite(tmp_path):
  log = tmp_path / "log.jsonl"
  log.write_text("")
  n_threads, n_lines = 4, 200

  def writer(k):
    for i in range(n_lines):
      files.append_text(log, json.dumps({"path": f"{k}-{i}"}) + "\n")

  threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
  for t in threads:
    t.start()
  for _ in range(50):  # Each replaces the file while the writers append.
    assert files.rewrite_text(log, lambda text: text + '{"path": "x"}\n')
    assert not files.rewrite_text(log, lambda text: text)  # Unchanged: not rewritten.
  for t in threads:
    t.join()
  lines = [json.loads(x)["path"] for x in log.read_text().splitlines()]
  assert lines.count("x") == 50
  assert sorted(x for x in lines if x != "x") == sorted(
      f"{k}-{i}" for k in range(n_threads) for i in range(n_lines))


# ---------------------------------------------------------------- 6. concurrent jobs


def test_two_jobs_on_one_folder_split_the_images(tmp_path):
  data = tmp_path / "data"
  make_images(data, 8)
  out = tmp_path / "out"
  logs = [tmp_path / f"log{i}" for i in range(2)]
  procs = [fake_cli(tmp_path, data, "--out", out, "--batch-size", 1, "--no-progress",
                    env={"FAKE_DELAY": "0.4", "FAKE_LOG": str(log)}) for log in logs]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err
  done = [log.read_text().split() if log.exists() else [] for log in logs]
  assert len(done[0]) + len(done[1]) == 8  # Each image exactly once...
  assert len(set(done[0]) | set(done[1])) == 8
  assert done[0] and done[1]  # ...by both jobs.
  assert len(outputs(out)) == 8 and not (out / claims_lib.CLAIMS_DIR).exists()
  assert any("taken by other jobs" in err for err in errs)


def test_claims_of_dead_or_silent_jobs_are_taken_over(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  target = str(out / "a.png.json")
  other = claims_lib.Claims(str(out), timeout_s=60, heartbeat=False)
  assert other.try_claim(target)
  mine = claims_lib.Claims(str(out), timeout_s=60, heartbeat=False)
  assert not mine.try_claim(target)  # Held by a live job (this process, another token).

  path = other.path_for(target)
  info = json.loads(Path(path).read_text())
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  Path(path).write_text(json.dumps(dict(info, pid=dead.pid)))  # Its owner died.
  assert mine.try_claim(target)
  mine.release(target)

  Path(path).write_text(json.dumps(dict(info, host="elsewhere")))
  assert not mine.try_claim(target)  # Another host, fresh: alive as far as we know.
  old = time.time() - 120
  os.utime(path, (old, old))
  assert mine.try_claim(target)  # Not refreshed for longer than the timeout.
  assert json.loads(Path(path).read_text())["token"] == mine.token
  mine.close()
  assert not os.path.exists(path)

  beating = claims_lib.Claims(str(out), timeout_s=0.4)
  assert beating.try_claim(target)
  os.utime(beating.path_for(target), (old, old))
  wait_for(lambda: time.time() - os.stat(beating.path_for(target)).st_mtime < 5,
           timeout=5, what="the heartbeat")
  beating.close()
  other.close()


# ------------------------------------------------------------------ 7. image headers


def hdr_bomb(path: Path, side: int = 16384, size: int = 17 << 20) -> Path:
  header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {side} +X {side}\n".encode()
  with open(path, "wb") as f:
    f.write(header)
    f.truncate(size)
  return path


def test_lying_headers_are_refused_before_decoding(tmp_path, monkeypatch, capsys):
  make_images(tmp_path / "data", 2)
  bomb = hdr_bomb(tmp_path / "data" / "bomb.png")
  png_as_jpg = tmp_path / "data" / "really_png.jpg"  # Decoded by its content.
  (tmp_path / "data" / "img00.png").rename(png_as_jpg)

  read = []
  real_open = open

  class Counting:

    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def read(self, n=-1):
      data = self.f.read(n)
      read.append(len(data))
      return data

  monkeypatch.setattr(images_lib, "open", lambda p, mode="r": Counting(real_open(p, mode)),
                      raising=False)
  real_decode = cv2.imdecode
  decoded = []
  monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1) or real_decode(*a))
  with pytest.raises(images_lib.BadImageError) as info:
    images_lib.load_image(bomb)
  assert "too large: 16384x16384" in info.value.reason
  assert "a Radiance HDR file named .png" in info.value.reason
  assert sum(read) <= 1 << 16 and not decoded  # Neither read in full nor decoded.

  out = tmp_path / "out"
  assert run_cli([tmp_path / "data", "--out", out, "--no-progress"], monkeypatch,
                 FakeGenerator()) == 1
  assert [(Path(r["path"]).name, "too large" in r["reason"]) for r in failures(out)] == \
      [("bomb.png", True)]
  assert "really_png.jpg.json" in outputs(out)

  # samjax predict checks the same header, with its own --max-pixels, before the model.
  capsys.readouterr()
  assert main(["predict", str(bomb), "--checkpoint", str(TINY), "--point", "1,1",
               "--out", str(tmp_path / "o.png")]) == 2
  assert "image too large" in capsys.readouterr().err
  assert main(["predict", str(png_as_jpg), "--checkpoint", str(TINY), "--point", "1,1",
               "--max-pixels", "100", "--out", str(tmp_path / "o.png")]) == 2
  assert "max_pixels=100" in capsys.readouterr().err
  assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------- 8. predict outputs


@pytest.mark.parametrize("flag,value,why", [
    ("--out", "p.xyz", "cannot write pictures with extension '.xyz'"),
    ("--out", "p", "extension '(none)'"),
    ("--out", "folder", "is a folder"),
    ("--out", "file/p.png", "is a file, not a folder"),
    ("--masks-out", "folder", "is a folder"),
    ("--masks-out", "o.png", "name the same file"),
])
def test_predict_checks_output_paths_before_the_model(tmp_path, monkeypatch, capsys, flag,
                                                      value, why):
  from samjax.cli import predict
  img = tmp_path / "in.png"
  cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "folder").mkdir()
  (tmp_path / "file").write_text("x")
  monkeypatch.setattr(predict, "load_model_from_args",
                      lambda *a: pytest.fail("model loaded before the outputs were checked"))
  monkeypatch.chdir(tmp_path)
  argv = {"--out": "o.png", "--masks-out": None}
  argv[flag] = value
  cmd = ["predict", str(img), "--checkpoint", str(TINY), "--point", "1,1"]
  cmd += [x for k, v in argv.items() if v is not None for x in (k, v)]
  assert main(cmd) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("samjax predict: error:") and why in err and "\n" not in err, err
  assert not list(tmp_path.glob("*.npz")) and not (tmp_path / "o.png").exists()


def test_predict_writes_exactly_the_named_files(tmp_path, capsys):
  rng = np.random.default_rng(0)
  cv2.imwrite(str(tmp_path / "in.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
  out, masks = tmp_path / "new" / "pic.webp", tmp_path / "masks"
  assert main(["predict", str(tmp_path / "in.png"), "--checkpoint", str(TINY),
               "--point", "20,20", "--out", str(out), "--masks-out", str(masks)]) == 0
  assert cv2.imread(str(out)).shape == (40, 50, 3)
  assert masks.is_file() and not (tmp_path / "masks.npz").exists()
  assert np.load(masks)["masks"].shape == (1, 40, 50)
  assert "computing in float32 (--dtype auto on cpu)" in capsys.readouterr().err


# ------------------------------------------------------- 9. batch size and dtype auto


def test_auto_batch_size_from_memory_analysis(monkeypatch):
  from samjax.runtime import mesh
  device = types.SimpleNamespace(device_kind="Fake GPU")
  runtime = types.SimpleNamespace(num_devices=2, platform="gpu",
                                  mesh=types.SimpleNamespace(
                                      devices=types.SimpleNamespace(flat=[device])))
  generator = types.SimpleNamespace(runtime=runtime, crops_per_device=4)
  monkeypatch.setattr(mesh, "device_memory_bytes", lambda d: 100 << 20)
  asked = []

  def need(rt, batch):  # 10 MiB fixed + 8 MiB per image on each device.
    asked.append(batch)
    return (10 << 20) + (8 << 20) * (batch // rt.num_devices)

  batch, why = automask.auto_batch_size(generator, fraction=0.5, memory_bytes=need)
  assert (batch, asked) == (8, [8])  # 4 per device: 42 MiB <= 50 MiB.
  monkeypatch.setattr(mesh, "device_memory_bytes", lambda d: 60 << 20)
  asked.clear()
  batch, why = automask.auto_batch_size(generator, fraction=0.5, memory_bytes=need)
  assert (batch, asked) == (4, [8, 4]) and "2 crop(s) per device x 2" in why
  monkeypatch.setattr(mesh, "device_memory_bytes", lambda d: 10 << 20)
  batch, why = automask.auto_batch_size(generator, fraction=0.5, memory_bytes=need)
  assert batch == 2 and "expect out-of-memory" in why
  runtime.platform = "cpu"
  assert automask.auto_batch_size(generator)[0] == 2  # One per CPU device.
  assert automask.auto_batch_size(object())[0] == 1  # Nothing to measure.


def test_encoder_memory_analysis_of_the_real_runtime():
  import samjax
  from samjax.runtime import Runtime
  rt = Runtime(samjax.tiny)
  one, two = automask.encode_memory_bytes(rt, 1), automask.encode_memory_bytes(rt, 2)
  assert 0 < one < two


def test_dtype_auto(monkeypatch, capsys):
  import jax
  from samjax.cli._common import resolve_dtype
  assert resolve_dtype("bfloat16", "automask") == "bfloat16"
  assert resolve_dtype("auto", "automask") == "float32"  # These tests run on CPU.
  for platform in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "devices", lambda p=platform: [types.SimpleNamespace(platform=p)])
    assert resolve_dtype("auto", "automask") == "bfloat16"
  assert "computing in bfloat16 (--dtype auto on tpu)" in capsys.readouterr().err


def test_automask_end_to_end_with_the_tiny_model(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(3)
  for i in range(2):
    img = np.full((64, 80, 3), rng.integers(0, 255, 3), np.uint8)
    cv2.rectangle(img, (10, 10), (40, 35), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    cv2.imwrite(str(data / f"{i}.png"), img)
  out = tmp_path / "out"
  argv = ["automask", str(data), "--out", str(out), "--checkpoint", str(TINY),
          "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
          "--no-progress", "--compilation-cache", ""]
  assert main(argv) == 0
  err = capsys.readouterr().err
  assert "computing in float32 (--dtype auto on cpu)" in err
  assert "batch size 1 (--batch-size auto: one image per CPU device (1))" in err
  got = outputs(out)
  assert len(got) == 2 and sum(len(r["annotations"]) for r in got.values()) > 0
  # The real model's provenance: its config and resolved kernels, as the manifest says.
  manifest = json.loads((out / "samjax_job.json").read_text())
  for record in got.values():
    prov = record["provenance"]
    assert prov["model_type"] == "tiny" and prov["dtype"] == "float32"
    assert "auto" not in prov["attention"] and "/" in prov["attention"]
    assert prov["settings_sha256"] == manifest["settings_sha256"]
    assert {k: v for k, v in prov.items() if k not in ("settings_sha256", "manifest")} == \
        manifest["provenance"]
  assert f"attention {prov['attention']}, output format sa1b" in err
