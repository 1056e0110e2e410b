"""Bulk jobs on object storage (`samjax.bulk.store`).

The S3 cases run against a real S3-compatible server (moto) on 127.0.0.1, reached
through the standard environment only (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`...),
exactly as a user's job would; the store-level rules use fsspec's `memory://`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import cv2
import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs", reason="the [cloud]/[dev] extra installs s3fs")
moto_server = pytest.importorskip("moto.server", reason="the [dev] extra installs moto[server]")
boto3 = pytest.importorskip("boto3")

from samjax import bulk  # noqa: E402
from samjax.bulk import store  # noqa: E402
from samjax.bulk.outputs import FailureLog, output_path_for  # noqa: E402
from samjax.cli import automask, main  # noqa: E402
from samjax.io.files import TEMP_PREFIX  # noqa: E402

GEN = ["--points-per-side", "6", "--points-per-batch", "16", "--pred-iou-thresh", "0",
       "--stability-score-thresh", "0", "--no-progress", "--num-workers", "2"]


# ---------------------------------------------------------------------------- helpers


def _png(i: int, hw=(40, 56)) -> bytes:
  rng = np.random.default_rng(i)
  img = np.full((*hw, 3), rng.integers(0, 255, 3), np.uint8)
  img[5:20, 8:30] = rng.integers(0, 255, 3)
  ok, buf = cv2.imencode(".png", img)
  assert ok
  return buf.tobytes()


def _fake_generate(images):
  out = []
  for img in images:
    mask = img.astype(np.float32).mean(-1) > img.mean()
    out.append([{"segmentation": mask, "predicted_iou": 0.9, "stability_score": 0.95,
                 "point_coords": [[0.0, 0.0]]}])
  return out


class _Generator:
  def generate_batch(self, images):
    return _fake_generate(images)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def memfs():
  """fsspec's in-memory filesystem, emptied before and after."""
  import fsspec
  fs = fsspec.filesystem("memory")
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]
  yield fs
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]


@pytest.fixture(scope="module")
def s3_endpoint():
  """A moto S3 server on a free 127.0.0.1 port, for the whole module."""
  logging.getLogger("werkzeug").setLevel(logging.ERROR)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
  server.start()
  yield f"http://127.0.0.1:{port}"
  server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
  """(boto3 client, environment for subprocesses): only the standard AWS variables."""
  env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
  monkeypatch.delenv("AWS_PROFILE", raising=False)
  store.set_store("s3", None)  # Made afresh from this environment.
  client = boto3.client("s3", endpoint_url=s3_endpoint)
  yield client, env
  store.set_store("s3", None)


def _bucket(client, versioned: bool = False) -> str:
  name = f"b-{uuid.uuid4().hex[:12]}"
  client.create_bucket(Bucket=name)
  if versioned:
    client.put_bucket_versioning(Bucket=name,
                                 VersioningConfiguration={"Status": "Enabled"})
  return name


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
  pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
  return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _run_cli(argv, monkeypatch, capsys):
  """`samjax automask ARGV` in-process; fails the test if the model would load."""

  def make(args):
    pytest.fail("the model was loaded although the job could not run")

  monkeypatch.setattr(automask, "make_generator", make)
  code = main(["automask", *map(str, argv)])
  return code, capsys.readouterr().err


# ----------------------------------------------------------------- names, listing (memory)


def test_url_names_and_listing_rules(memfs, tmp_path):
  assert store.norm("memory://in//a/./b/") == "memory://in/a/b"
  assert store.join("memory://in/a", "b", "c.png") == "memory://in/a/b/c.png"
  assert store.relpath("memory://in/a/b/c.png", "memory://in/a") == "b/c.png"
  assert store.is_under("memory://in/a/b", "memory://in/a")
  assert not store.is_under("memory://in/ab", "memory://in/a")
  assert not store.is_under("memory://in/a/b", "s3://in/a")  # Another store.
  assert not store.is_under("/in/a/b", "memory://in/a")
  assert store.norm(f"file://{tmp_path}") == str(tmp_path)  # file:// is a local path.

  for name in ("b/2.PNG", "a/1.jpg", "a/.hidden/3.png", "a/._x.png", "a/notes.txt", "c.webp"):
    memfs.pipe_file(f"memory://in/{name}", _png(0))
  memfs.pipe_file("memory://lists/l.txt", b"# comment\n\n../in/a/1.jpg\nmemory://in/c.webp\n"
                  b"memory://in/b\n" + str(tmp_path / "local.png").encode() + b"\n")
  assert bulk.list_inputs(["memory://in/"]) == [
      "memory://in/a/1.jpg", "memory://in/b/2.PNG", "memory://in/c.webp"]
  scan = bulk.scan_inputs(["memory://lists/l.txt"])
  assert scan.images == sorted(["memory://in/a/1.jpg", "memory://in/c.webp",
                                "memory://in/b/2.PNG", str(tmp_path / "local.png")])
  assert scan.roots == ["memory://in/b"]
  # Output names keep the layout under the input folder, at a URL or locally.
  assert output_path_for("memory://in/b/x/2.png", ["memory://in/b"], "memory://out/run") == \
      "memory://out/run/x/2.png.json"
  assert output_path_for("memory://in/b/x/2.png", ["memory://in/b"], str(tmp_path)) == \
      str(tmp_path / "x" / "2.png.json")
  two = output_path_for("memory://in/b/2.png", ["memory://in/b", "memory://in/a"], "memory://o")
  assert re.fullmatch(r"memory://o/b-[0-9a-f]{8}/2\.png\.json", two)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bulk.list_inputs(["memory://in/nothing-here"])
  with pytest.raises(bulk.InputError, match="is the output folder"):
    bulk.scan_inputs(["memory://in/b"], exclude_dirs=["memory://in/b/"])
  # The output prefix inside an input folder is skipped (and said).
  memfs.pipe_file("memory://in/out/old.png", _png(1))
  scan = bulk.scan_inputs(["memory://in"], exclude_dirs=["memory://in/out"])
  assert "memory://in/out/old.png" not in scan.images
  assert any("output folder" in n for n in scan.notes)


def test_failure_log_at_a_url_is_rewritten_whole(memfs):
  url = "memory://out/failures.jsonl"
  log = FailureLog(url, run_id="r1", flush_s=0)
  log.add("memory://in/a.png", "load", "broken", output="memory://out/a.png.json")
  log.add("memory://in/b.png", "load", "broken", output="memory://out/b.png.json")
  lines = memfs.cat_file(url).decode().splitlines()
  assert [json.loads(x)["path"] for x in lines] == ["memory://in/a.png", "memory://in/b.png"]
  # A rerun keeps the earlier records, adds its own, and drops those that now succeed.
  again = FailureLog(url, run_id="r2", flush_s=3600)
  again.add("memory://in/c.png", "generate", "boom", output="memory://out/c.png.json")
  assert len(memfs.cat_file(url).decode().splitlines()) == 3  # The first goes at once,
  again.add("memory://in/d.png", "generate", "boom", output="memory://out/d.png.json")
  assert len(memfs.cat_file(url).decode().splitlines()) == 3  # the next within flush_s wait.
  assert again.compact(succeeded={"memory://in/a.png"})
  paths = [json.loads(x)["path"] for x in memfs.cat_file(url).decode().splitlines()]
  assert paths == ["memory://in/b.png", "memory://in/c.png", "memory://in/d.png"]
  assert FailureLog(url).compact(succeeded={"memory://in/b.png", "memory://in/c.png",
                                            "memory://in/d.png"})
  assert not memfs.exists(url)  # Nothing left: the object goes.
  # A waiting record is uploaded after flush_s even when no other failure follows.
  timed = FailureLog(url, flush_s=1.0)
  timed.add("memory://in/e.png", "load", "broken")
  timed.add("memory://in/f.png", "load", "broken")
  assert len(memfs.cat_file(url).splitlines()) == 1
  deadline = time.time() + 10
  while len(memfs.cat_file(url).splitlines()) < 2 and time.time() < deadline:
    time.sleep(0.05)
  assert len(memfs.cat_file(url).splitlines()) == 2


def test_processes_split_url_inputs_without_overlap_or_gap(memfs, tmp_path):
  for i in range(7):
    memfs.pipe_file(f"memory://in/p{i % 2}/img{i}.png", _png(i))
  memfs.pipe_file("memory://in/broken.png", b"\x89PNG not really")
  done = collections.Counter()
  for k in range(2):
    s = bulk.run_job(["memory://in"], "memory://out/j", _fake_generate, process_index=k,
                     process_count=2, progress=False, handle_signals=False)
    done[k] = s.done
  assert sum(done.values()) == 7 and min(done.values()) > 0
  outs = [u for u in memfs.find("memory://out/j") if u.endswith(".png.json")]
  assert len(outs) == 7
  failed = [json.loads(x)["path"] for k in range(2)
            if memfs.exists(f"memory://out/j/failures.{k}.jsonl")
            for x in memfs.cat_file(f"memory://out/j/failures.{k}.jsonl").decode().splitlines()]
  assert failed == ["memory://in/broken.png"]


def test_folder_outputs_resume_at_a_url(memfs):
  """amg-png writes a folder per image: the resume listing knows folders (prefixes)."""
  for i in range(3):
    memfs.pipe_file(f"memory://in/s/img{i}.png", _png(i))
  first = bulk.run_job(["memory://in"], "memory://out/png", _fake_generate, progress=False,
                       handle_signals=False, output_format="amg-png")
  assert (first.done, first.failed) == (3, 0)
  assert memfs.exists("memory://out/png/s/img0/metadata.csv")
  memfs.rm_file("memory://out/png/s/img1/metadata.csv")  # Incomplete: redone.
  again = bulk.run_job(["memory://in"], "memory://out/png", _fake_generate, progress=False,
                       handle_signals=False, output_format="amg-png")
  assert (again.done, again.skipped) == (1, 2)


# ------------------------------------------------------------------------ S3 (moto)


def _cmd(*args):
  return [sys.executable, "-m", "samjax.cli", "automask", *map(str, args)]


def test_cli_bucket_to_bucket_killed_and_resumed_does_each_image_once(s3, tiny_ckpt, tmp_path):
  client, aws = s3
  src, dst = _bucket(client), _bucket(client, versioned=True)
  n_good = 6
  for i in range(n_good):
    client.put_object(Bucket=src, Key=f"photos/part{i % 2}/img_{i}.png", Body=_png(i, (120, 160)))
  client.put_object(Bucket=src, Key="photos/broken.jpg", Body=b"\xff\xd8 not a jpeg")
  client.put_object(Bucket=src, Key="photos/.cache/skip.png", Body=_png(99))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **aws)
  # The suite's shared cache (as tests/test_automask_job.py): its XLA programs for these
  # image sizes are compiled once per machine, not once per run.
  env["SAMJAX_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "samjax-test-cache")
  cmd = _cmd(f"s3://{src}/photos", "--out", f"s3://{dst}/run", "--checkpoint", tiny_ckpt[1],
             "--batch-size", 1, *GEN)

  def outputs():
    return [k for k in _keys(client, dst, "run/") if k.endswith(".png.json")]

  p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       start_new_session=True)
  deadline = time.time() + 120
  while time.time() < deadline and not outputs() and p.poll() is None:
    time.sleep(0.05)
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  first = outputs()
  assert 1 <= len(first) < n_good, p.stderr.read()[-3000:]
  for key in first:  # Every object under its final name is complete.
    assert bulk.is_valid_output(f"s3://{dst}/{key}")

  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]  # 1: an input failed (the broken one).
  assert "Traceback" not in r.stderr
  m = re.search(r"(\d+) images: (\d+) done, (\d+) skipped", r.stderr)
  assert m, r.stderr[-3000:]
  assert (int(m.group(1)), int(m.group(3))) == (n_good + 1, len(first))
  assert int(m.group(2)) == n_good - len(first)
  final = outputs()
  assert final == sorted(f"run/part{i % 2}/img_{i}.png.json" for i in range(n_good))
  # Each output was uploaded exactly once over both runs: one version per key.
  versions = collections.Counter()
  for page in client.get_paginator("list_object_versions").paginate(Bucket=dst, Prefix="run/"):
    for v in page.get("Versions", []):
      versions[v["Key"]] += 1
  assert {k: versions[k] for k in final} == {k: 1 for k in final}
  for key in final:
    record = json.loads(client.get_object(Bucket=dst, Key=key)["Body"].read())
    assert record["image"]["path"] == f"s3://{src}/photos/" + key[4:-5]
    assert record["image"]["height"] == 120 and record["annotations"]
  failures = client.get_object(Bucket=dst, Key="run/failures.jsonl")["Body"].read().decode()
  assert [json.loads(x)["path"] for x in failures.splitlines()] == [
      f"s3://{src}/photos/broken.jpg"]
  # No temporaries, claims or probes are left in the bucket.
  assert not [k for k in _keys(client, dst) if "/." in k or TEMP_PREFIX in k]


def test_url_inputs_and_list_file_to_a_local_output(s3, tmp_path):
  client, _ = s3
  src = _bucket(client)
  for i in range(3):
    client.put_object(Bucket=src, Key=f"imgs/{i}.png", Body=_png(i))
  client.put_object(Bucket=src, Key="more/x.png", Body=_png(7))
  local = tmp_path / "local.png"
  local.write_bytes(_png(8))
  client.put_object(Bucket=src, Key="lists/todo.txt",
                    Body=f"../more/x.png\n{local}\ns3://{src}/missing.png\n".encode())
  out = tmp_path / "out"
  summary = bulk.run_job([f"s3://{src}/imgs", f"s3://{src}/lists/todo.txt"], out,
                         _fake_generate, progress=False, handle_signals=False)
  assert (summary.done, summary.failed) == (5, 1)
  names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")
                 if p.name != "failures.jsonl")
  assert len(names) == 5 and {"0.png.json", "1.png.json", "2.png.json"} <= set(names)
  (fail,) = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
  assert fail["path"] == f"s3://{src}/missing.png" and "not exist" in fail["reason"]
  assert not list(out.rglob(TEMP_PREFIX + "*")) and not (out / ".samjax-claims").exists()
  # A rerun skips everything (the S3 inputs are listed the same way again).
  again = bulk.run_job([f"s3://{src}/imgs", f"s3://{src}/lists/todo.txt"], out,
                       _fake_generate, progress=False, handle_signals=False)
  assert (again.done, again.skipped) == (0, 5)


def test_nothing_streams_into_a_final_name_at_a_url(s3, memfs, monkeypatch):
  """Every write to S3 is one whole-object upload: no file is opened for writing (an
  fsspec file closed by an exception would commit what it holds)."""
  client, _ = s3
  dst = _bucket(client)
  for i in range(3):
    memfs.pipe_file(f"memory://in/{i}.png", _png(i))
  memfs.pipe_file("memory://in/bad.png", b"broken")
  fs = store.store_for(f"s3://{dst}").fs
  opened = []
  real_open = fs._open

  def no_write_open(path, mode="rb", *args, **kwargs):
    opened.append(mode)
    if not mode.startswith("r"):
      raise AssertionError(f"{path} opened with mode {mode!r}")
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr(fs, "_open", no_write_open)
  summary = bulk.run_job(["memory://in"], f"s3://{dst}/out", _fake_generate, overlays=True,
                         progress=False, handle_signals=False)
  assert (summary.done, summary.failed) == (3, 1)
  assert _keys(client, dst) == sorted(
      ["out/failures.jsonl"] + [f"out/{i}.png.{e}" for i in range(3) for e in ("json", "png")])
  assert all(m.startswith("r") for m in opened)
  # The rerun finds the outputs from one listing and reads only the ones that exist.
  reads = []
  real_cat = fs.cat_file
  monkeypatch.setattr(fs, "cat_file", lambda path, *a, **k: reads.append(path) or
                      real_cat(path, *a, **k))
  memfs.pipe_file("memory://in/3.png", _png(3))
  again = bulk.run_job(["memory://in"], f"s3://{dst}/out", _fake_generate, overlays=True,
                       progress=False, handle_signals=False)
  assert (again.done, again.skipped, again.failed) == (1, 3, 1)
  assert not [r for r in reads if "3.png" in r or "bad.png.json" in r]


@pytest.mark.parametrize("case", ["input_bucket", "out_bucket", "input_key", "protocol_in",
                                  "protocol_out", "not_a_url", "no_credentials", "no_bucket",
                                  "mistyped"])
def test_bad_locations_are_one_line_errors_with_status_2(case, s3, monkeypatch, capsys,
                                                         tmp_path):
  client, _ = s3
  src = _bucket(client)
  client.put_object(Bucket=src, Key="imgs/0.png", Body=_png(0))
  good_in, good_out = f"s3://{src}/imgs", f"s3://{src}/out"
  argv, expect = {
      "input_bucket": ([f"s3://no-such-{src}/imgs", "--out", good_out],
                       f"bucket 'no-such-{src}' does not exist"),
      "out_bucket": ([good_in, "--out", f"s3://no-such-{src}/out"],
                     f"cannot write to the output folder s3://no-such-{src}/out: the bucket"),
      "input_key": ([f"s3://{src}/nothing", "--out", good_out], "does not exist"),
      "protocol_in": (["nosuchproto://x/y", "--out", good_out],
                      "unknown storage protocol nosuchproto://"),
      "protocol_out": ([good_in, "--out", "nosuchproto://x/y"],
                       "unknown storage protocol nosuchproto://"),
      "not_a_url": ([good_in, "--out", f"s3://{src}/imgs/0.png"], "is an object, not a folder"),
      "no_bucket": (["s3:///imgs", "--out", good_out], "'s3:///imgs' names no bucket"),
      "mistyped": ([good_in, "--out", f"s3:/{src}/out"],
                   f"looks like a mistyped URL: write s3://{src}/out"),
      "no_credentials": ([good_in, "--out", str(tmp_path / "out")],
                         "cannot be reached: NoCredentialsError: Unable to locate credentials"),
  }[case]
  if case == "no_credentials":
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
      monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
      monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
      monkeypatch.delenv(name, raising=False)
    store.set_store("s3", None)
  code, err = _run_cli(argv, monkeypatch, capsys)
  assert code == 2, err
  assert expect in err and "Traceback" not in err
  assert len([x for x in err.splitlines() if "error:" in x]) == 1
  assert not (tmp_path / "out").exists() and not os.path.exists("s3:")  # Nothing made.
