"""Provenance of bulk jobs: the job manifest, per-output provenance, safe resume, and
what `samjax automask` says about where it runs (issue #13, parts 1 and 4).

The generator is a stand-in (the model is never loaded: most of these runs must stop
before it, and the others only need outputs); `tests/test_job_faults.py`'s end-to-end
case checks the same provenance with the real tiny model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

import samjax
from samjax.amg.options import AmgOptions
from samjax.bulk import provenance as prov_lib
from samjax.cli import automask, main
from samjax.io.checkpoint import METADATA_FILE

GEN = ["--points-per-side", "8", "--pred-iou-thresh", "0.5", "--no-progress",
       "--compilation-cache", ""]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "cache"))


def make_images(folder: Path, n: int) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    img = np.full((20 + i, 30, 3), 40 * i, np.uint8)
    img[3:9, 5:15] = 250
    assert cv2.imwrite(str(folder / f"img{i}.png"), img)


class FakeGenerator:
  """Two masks per image; looks like AutomaticMaskGenerator to the start lines."""

  def __init__(self, args):
    self.args = args
    window, global_attn = (args.attention, args.attention) if args.attention else \
        ("einsum", "fold")
    self.runtime = types.SimpleNamespace(
        config=types.SimpleNamespace(name="tiny"), platform="cpu", num_devices=1,
        attention=types.SimpleNamespace(window=window, global_attn=global_attn))

  def generate_batch(self, images):
    out = []
    for img in images:
      bright = img.mean(-1) > img.mean()
      out.append([{"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.95,
                   "point_coords": [[1.0, 1.0]]} for m in (bright, ~bright)])
    return out


def run_cli(argv, monkeypatch, load=True):
  """`samjax automask ARGV` in-process; returns (exit status, times the model loaded)."""
  loads = []

  def make(args):
    loads.append(1)
    if not load:
      pytest.fail("the model was loaded although the job must stop before it")
    return FakeGenerator(args)

  monkeypatch.setattr(automask, "make_generator", make)
  return main(["automask", *map(str, argv)]), len(loads)


def outputs(out: Path) -> dict:
  return {p.name: json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))
          if p.name != prov_lib.MANIFEST_NAME}


@pytest.fixture
def job(tiny_ckpt, tmp_path, monkeypatch, capsys):
  """A finished job: (data, out, pth, orbax dir, its stderr)."""
  pth, orbax_dir = tiny_ckpt[0], tiny_ckpt[1]
  data, out = tmp_path / "data", tmp_path / "out"
  make_images(data, 3)
  assert run_cli([data, "--out", out, "--checkpoint", orbax_dir, *GEN], monkeypatch) == (0, 1)
  return data, out, pth, orbax_dir, capsys.readouterr().err


def test_every_output_carries_the_run_provenance_and_it_matches_the_manifest(job):
  data, out, pth, orbax_dir, err = job
  manifest = json.loads((out / prov_lib.MANIFEST_NAME).read_text())
  meta = json.loads((Path(orbax_dir) / METADATA_FILE).read_text())
  expected = {
      "samjax_version": samjax.__version__,
      "model_type": "tiny",
      "checkpoint": {"path": str(Path(orbax_dir).absolute()), "format": "orbax",
                     "sha256": hashlib.sha256(Path(pth).read_bytes()).hexdigest(),
                     "sha256_of": "source", "params_sha256": meta["params_digest"]["all"]},
      "generator": AmgOptions(points_per_side=8, pred_iou_thresh=0.5,
                              output_mode="coco_rle").to_kwargs(),
      "dtype": "float32", "attention": "einsum/fold", "attention_requested": "auto",
      "output_format": "sa1b"}
  expected["generator"]["crop_overlap_ratio"] = 512 / 1500
  assert manifest["format"] == prov_lib.MANIFEST_FORMAT
  assert manifest["provenance"] == expected
  settings = prov_lib.Provenance.from_dict(expected).settings()
  assert manifest["settings"] == settings
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()
  assert manifest["settings_sha256"] == digest
  assert manifest["job"]["backend"] == "cpu" and manifest["job"]["batch_size"] == 1

  got = outputs(out)
  assert len(got) == 3
  for record in got.values():
    p = record["provenance"]
    assert {k: v for k, v in p.items() if k not in ("settings_sha256", "manifest")} == expected
    assert p["settings_sha256"] == digest and p["manifest"] == prov_lib.MANIFEST_NAME
    # The record alone re-derives its settings hash.
    assert prov_lib.Provenance.from_dict(p).settings_sha256() == digest

  # Start and end lines.
  lines = err.splitlines()
  assert "samjax automask: backend cpu: 1 device(s) (cpu; 1 in this process), process 0 " \
         "of 1" in lines
  assert any(line.startswith("samjax automask: model tiny, checkpoint "
                             f"{Path(orbax_dir).absolute()} (orbax; sha256 "
                             f"{expected['checkpoint']['sha256'][:12]}...") for line in lines)
  assert "samjax automask: dtype float32, batch size 1, attention einsum/fold, output " \
         "format sa1b" in lines
  assert any(line.startswith(f"samjax automask: job manifest {out / prov_lib.MANIFEST_NAME} "
                             f"(written; settings sha256 {digest[:12]}") for line in lines)
  summary = [line for line in lines if line.startswith("samjax bulk: 3 images:")]
  assert len(summary) == 1
  assert "3 done, 0 skipped (already done), 0 failed in " in summary[0]
  assert "img/s); 6 masks written; outputs in " in summary[0]


def test_changed_settings_stop_before_the_model_loads(job, monkeypatch, capsys, tmp_path):
  data, out, pth, orbax_dir, _ = job
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
  other = tmp_path / "other.pth"
  other.write_bytes(Path(pth).read_bytes() + b"\0")  # another file: only its hash is read
  cases = {
      "generator and dtype": ([*GEN, "--checkpoint", orbax_dir, "--points-per-side", "4",
                               "--dtype", "bfloat16"],
                              ["generator.points_per_side: 8 -> 4",
                               'dtype: "float32" -> "bfloat16"']),
      "checkpoint": ([*GEN, "--checkpoint", other], ["checkpoint.sha256: "]),
      "output format": ([*GEN, "--checkpoint", orbax_dir, "--output-format", "amg-json"],
                        ['output_format: "sa1b" -> "amg-json"']),
  }
  for name, (argv, fields) in cases.items():
    assert run_cli([data, "--out", out, *argv], monkeypatch, load=False) == (2, 0), name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("samjax automask: error: "), (name, err)
    assert "other settings (samjax_job.json)" in err[-1] and "--overwrite" in err[-1], err
    for field in fields:
      assert field in err[-1], (name, field, err[-1])
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == before

  # --quiet: the error line alone.
  argv = [data, "--out", out, *GEN, "--checkpoint", orbax_dir, "--points-per-side", "4",
          "--quiet"]
  assert run_cli(argv, monkeypatch, load=False) == (2, 0)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "generator.points_per_side: 8 -> 4" in err[0]


def test_settings_that_do_not_change_outputs_resume(job, monkeypatch, capsys):
  data, out, pth, orbax_dir, _ = job
  # The same weights as the .pth they were converted from, other job settings and
  # kernels: a resume (all skipped), with a note on the kernels.
  argv = [data, "--out", out, *GEN, "--checkpoint", pth, "--batch-size", "2",
          "--num-workers", "1", "--prefetch", "0", "--claim-timeout", "5",
          "--max-pixels", "100000", "--attention", "einsum"]
  assert run_cli(argv, monkeypatch) == (0, 1)
  err = capsys.readouterr().err
  assert "3 images: 0 done, 3 skipped (already done), 0 failed" in err
  assert "(checked; settings sha256" in err  # the manifest is kept
  assert 'note: resuming a job whose manifest records another attention: "einsum/fold" ' \
         '-> "einsum/einsum"' in err
  assert json.loads((out / prov_lib.MANIFEST_NAME).read_text())["provenance"]["checkpoint"][
      "format"] == "orbax"

  # A new image is done with this run's provenance; --quiet prints nothing on success.
  make_images(data, 4)
  assert run_cli(argv + ["--quiet"], monkeypatch) == (0, 1)
  assert capsys.readouterr().err == ""
  new = outputs(out)["img3.png.json"]["provenance"]
  assert (new["checkpoint"]["format"], new["checkpoint"]["sha256_of"]) == ("pth", "file")
  assert new["attention_requested"] == "einsum"
  old = outputs(out)["img0.png.json"]["provenance"]
  assert new["settings_sha256"] != old["settings_sha256"]  # a .pth has no params digest
  assert new["checkpoint"]["sha256"] == old["checkpoint"]["sha256"]


def test_overwrite_recomputes_everything_and_rewrites_the_manifest(job, monkeypatch, capsys):
  data, out, pth, orbax_dir, _ = job
  argv = [data, "--out", out, *GEN, "--checkpoint", orbax_dir, "--points-per-side", "4",
          "--overwrite"]
  assert run_cli(argv, monkeypatch) == (0, 1)
  assert "3 done, 0 skipped" in capsys.readouterr().err
  manifest = json.loads((out / prov_lib.MANIFEST_NAME).read_text())
  assert manifest["provenance"]["generator"]["points_per_side"] == 4
  for record in outputs(out).values():
    assert record["provenance"]["generator"]["points_per_side"] == 4
    assert record["provenance"]["settings_sha256"] == manifest["settings_sha256"]
  # ...and a plain rerun with those settings resumes.
  assert run_cli(argv[:-1], monkeypatch) == (0, 1)
  assert "0 done, 3 skipped" in capsys.readouterr().err


def test_outputs_without_a_manifest_are_not_trusted(job, monkeypatch, capsys):
  data, out, pth, orbax_dir, _ = job
  (out / prov_lib.MANIFEST_NAME).unlink()
  argv = [data, "--out", out, *GEN, "--checkpoint", orbax_dir]
  assert run_cli(argv, monkeypatch, load=False) == (2, 0)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "has outputs" in err and "no samjax_job.json" in err and "--overwrite" in err

  (out / prov_lib.MANIFEST_NAME).write_text("{not json")
  assert run_cli(argv, monkeypatch, load=False) == (2, 0)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "cannot read the job manifest" in err and "--overwrite" in err


def test_the_manifest_is_written_once_by_racing_processes(tmp_path):
  """Eight writers at once (threads standing in for processes): one writes, the others
  compare; writers with other settings are refused; nobody ever reads half a file."""
  base = prov_lib.Provenance.create(
      checkpoint={"path": "/x.pth", "format": "pth", "sha256": "a" * 64,
                  "sha256_of": "file", "params_sha256": None, "model_type": "tiny"},
      options=AmgOptions(output_mode="coco_rle"), dtype="float32",
      attention_requested="auto")
  odd = base.replace(dtype="bfloat16")
  out = tmp_path / "out"
  out.mkdir()
  barrier = threading.Barrier(8)
  results = []

  def writer(i):
    prov = odd if i == 7 else base
    barrier.wait()
    try:
      results.append((i, prov_lib.ensure_manifest(str(out), prov, {"process_index": i},
                                                  process_index=i)[1]))
    except prov_lib.ManifestMismatch as e:
      results.append((i, str(e)))

  threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wrote = [i for i, r in results if r is True]
  refused = [i for i, r in results if isinstance(r, str)]
  assert len(wrote) == 1 and len(results) == 8
  if wrote == [7]:  # The odd one won: every other writer is refused.
    assert sorted(refused) == list(range(7))
  else:
    assert refused == [7]
    assert 'dtype: "float32" -> "bfloat16"' in dict(results)[7]
  assert [p.name for p in out.iterdir()] == [prov_lib.MANIFEST_NAME]  # no temporaries
  assert prov_lib.read_manifest(str(out)).job["process_index"] == wrote[0]


def test_differences_name_fields_and_compare_known_digests_only():
  ckpt = {"path": "/a", "format": "orbax", "sha256": "1" * 64, "sha256_of": "source",
          "params_sha256": "2" * 64, "model_type": "vit_b"}
  a = prov_lib.Provenance.create(checkpoint=ckpt, options=AmgOptions(), dtype="float32",
                                 attention_requested=None, attention="fold/fold")
  # The .pth it was converted from: no params digest, model type unknown before loading.
  b = prov_lib.Provenance.create(
      checkpoint={**ckpt, "path": "/b.pth", "format": "pth", "sha256_of": "file",
                  "params_sha256": None, "model_type": None},
      options=AmgOptions(), dtype="float32", attention_requested="einsum",
      attention="einsum/einsum")
  blocking, notes = prov_lib.differences(a, b)
  assert blocking == [] and notes == ['attention: "fold/fold" -> "einsum/einsum"']
  # A fine-tuned checkpoint (params digest only) vs a .pth (file hash only): unknown.
  c = b.replace(checkpoint={**b.checkpoint, "sha256": None}, model_type="vit_b")
  d = a.replace(checkpoint={**a.checkpoint, "sha256": None, "params_sha256": "3" * 64},
                model_type="vit_l", generator={**a.generator, "box_nms_thresh": 0.5})
  blocking, _ = prov_lib.differences(c, d)
  assert blocking == ["generator.box_nms_thresh: 0.7 -> 0.5",
                      'model_type: "vit_b" -> "vit_l"',
                      blocking[2]] and blocking[2].startswith("checkpoint: cannot tell")


def test_official_weights_are_identified_without_downloading(tmp_path, monkeypatch):
  monkeypatch.setenv("SAMJAX_CACHE", str(tmp_path / "empty-cache"))
  from samjax.io import pretrained
  ident = prov_lib.checkpoint_identity(None, "vit_b")
  assert ident == {"path": pretrained.MODELS["vit_b"].url, "format": "official",
                   "sha256": pretrained.MODELS["vit_b"].sha256, "sha256_of": "official",
                   "params_sha256": None, "model_type": "vit_b"}


def test_accelerator_hint_names_the_install_line(tmp_path):
  none = lambda name: None  # noqa: E731
  env = {}
  root = tmp_path / "root"
  (root / "dev").mkdir(parents=True)
  assert prov_lib.accelerator_hint("cpu", str(root), none, env) is None
  (root / "dev" / "vfio").mkdir()
  (root / "dev" / "vfio" / "vfio").touch()  # the control node alone is no TPU
  assert prov_lib.accelerator_hint("cpu", str(root), none, env) is None
  (root / "dev" / "vfio" / "0").touch()
  hint = prov_lib.accelerator_hint("cpu", str(root), none, env)
  assert "TPU" in hint and 'pip install "samjax[tpu]"' in hint and "vfio/0" in hint
  shutil.rmtree(root / "dev" / "vfio")
  (root / "dev" / "accel0").touch()
  assert "accel0" in prov_lib.accelerator_hint("cpu", str(root), none, env)
  (root / "proc" / "driver" / "nvidia").mkdir(parents=True)
  hint = prov_lib.accelerator_hint("cpu", str(root), none, env)
  assert "NVIDIA GPU" in hint and 'pip install "samjax[cuda]"' in hint
  hint = prov_lib.accelerator_hint("cpu", str(tmp_path / "bare"),
                                   lambda name: "/usr/bin/" + name, env)
  assert "NVIDIA GPU (/usr/bin/nvidia-smi)" in hint
  # Not on CPU, or CPU asked for: nothing to say.
  assert prov_lib.accelerator_hint("gpu", str(root), none, env) is None
  assert prov_lib.accelerator_hint("cpu", str(root), none, {"JAX_PLATFORMS": "cpu"}) is None


def test_the_warning_and_the_start_lines_reach_stderr(tmp_path, monkeypatch, capsys):
  data = tmp_path / "data"
  make_images(data, 1)
  monkeypatch.setattr(prov_lib, "accelerator_hint", lambda platform: f"on {platform}: hint")
  assert run_cli([data, "--out", tmp_path / "o", "--model", "vit_b", *GEN],
                 monkeypatch) == (0, 1)
  err = capsys.readouterr().err.splitlines()
  assert "samjax automask: warning: on cpu: hint" in err
  assert any(line.startswith("samjax automask: model tiny, checkpoint https://") and
             "(official; sha256 " in line for line in err)
  assert run_cli([data, "--out", tmp_path / "o2", "--model", "vit_b", "--quiet", *GEN],
                 monkeypatch) == (0, 1)
  assert capsys.readouterr().err == ""


def test_the_bulk_viewer_shows_the_manifest(job):
  from samjax.serve.bulk import BulkFolder
  out = job[1]
  folder = BulkFolder(str(out))
  settings = folder.settings()
  assert settings["settings_file"] == prov_lib.MANIFEST_NAME
  assert settings["settings"]["provenance"]["model_type"] == "tiny"
  assert settings["outputs"] == 3
  assert prov_lib.MANIFEST_NAME not in [i["path"] for i in folder.listing()["items"]]


def test_the_manifest_at_an_fsspec_url(monkeypatch):
  """`--out s3://...` and the like: the manifest goes through samjax.bulk.store."""
  fsspec = pytest.importorskip("fsspec")
  from samjax.bulk import store
  fs = fsspec.filesystem("memory")
  monkeypatch.setattr(store, "_STORES", {"memory": store.FsspecStore("memory", fs)})
  out = "memory://provenance-test/out"
  base = prov_lib.Provenance.create(
      checkpoint={"path": "/x.pth", "format": "pth", "sha256": "b" * 64,
                  "sha256_of": "file", "params_sha256": None, "model_type": "tiny"},
      options=AmgOptions(output_mode="coco_rle"), dtype="float32",
      attention_requested="auto")
  try:
    assert prov_lib.check_manifest(out, base) == (None, [])
    manifest, wrote = prov_lib.ensure_manifest(out, base)
    assert wrote and manifest.path == out + "/" + prov_lib.MANIFEST_NAME
    assert prov_lib.read_manifest(out).settings_sha256 == base.settings_sha256()
    assert prov_lib.ensure_manifest(out, base)[1] is False
    with pytest.raises(prov_lib.ManifestMismatch, match="generator.points_per_side: 32 -> 4"):
      prov_lib.check_manifest(out, base.replace(generator={**base.generator,
                                                           "points_per_side": 4}))
  finally:
    fs.rm("/provenance-test", recursive=True)


def test_outputs_without_a_manifest_at_a_url_are_found_by_one_listing(monkeypatch):
  fsspec = pytest.importorskip("fsspec")
  from samjax.bulk import store
  fs = fsspec.filesystem("memory")
  memory = store.FsspecStore("memory", fs)
  monkeypatch.setattr(store, "_STORES", {"memory": memory})
  out = "memory://provenance-list/out"
  outputs = [f"{out}/img{i:04d}.json" for i in range(500)]
  base = prov_lib.Provenance.create(
      checkpoint={"path": "/x.pth", "format": "pth", "sha256": "b" * 64,
                  "sha256_of": "file", "params_sha256": None, "model_type": "tiny"},
      options=AmgOptions(output_mode="coco_rle"), dtype="float32",
      attention_requested="auto")
  calls = []
  monkeypatch.setattr(memory, "exists", lambda url: calls.append(url) or fs.exists(url))
  try:
    assert prov_lib.check_manifest(out, base, outputs) == (None, [])  # nothing there yet
    fs.pipe(outputs[-1][len("memory://"):], b"{}")  # one output of an older job
    with pytest.raises(prov_lib.ManifestMismatch, match="img0499.json.*but no"):
      prov_lib.check_manifest(out, base, outputs)
    assert len(calls) <= 2, len(calls)  # the manifest itself, not 500 outputs
  finally:
    fs.rm("/provenance-list", recursive=True)


def test_write_if_absent_without_hard_links(tmp_path, monkeypatch):
  def no_links(src, dst):
    raise PermissionError(1, "Operation not permitted")

  monkeypatch.setattr(prov_lib.os, "link", no_links)
  path = str(tmp_path / "m.json")
  assert prov_lib.write_if_absent(path, b"first") is True
  assert prov_lib.write_if_absent(path, b"second") is False
  assert Path(path).read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == [
      "m.json"]


def test_a_checkpoint_without_digests_is_identified_by_its_files(tmp_path):
  """An Orbax checkpoint whose samjax.json records no digest (the trained fixture was
  written before digests) still resumes: its params/ files identify it, and a changed
  byte in them counts as another checkpoint."""
  fixture = Path(__file__).parent / "fixtures" / "tiny_trained"
  meta = json.loads((fixture / METADATA_FILE).read_text())
  assert "source_sha256" not in meta and "params_digest" not in meta  # the case tested
  copy = tmp_path / "ckpt"
  shutil.copytree(fixture, copy)
  first = prov_lib.checkpoint_identity(str(copy), None)
  assert first["sha256_of"] == "files" and len(first["sha256"]) == 64
  assert prov_lib.checkpoint_identity(str(copy), None)["sha256"] == first["sha256"]
  biggest = max((p for p in (copy / "params").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  assert prov_lib.checkpoint_identity(str(copy), None)["sha256"] != first["sha256"]
