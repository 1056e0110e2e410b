"""Bulk job (samjax.bulk) against a fake deterministic generate_batch.

No model is involved: the fake derives two COCO-RLE masks from each image, and
counts per image how often it completed, so resumption can be checked exactly.
All images are synthesized into tmp_path.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import threading
import time

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samjax import bulk
from samjax.cli import automask
from samjax.io import files
from samjax.io.images import BadImageError, load_image

# pycocotools' decode trips a NumPy 2 deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---------------------------------------------------------------------------- helpers


def make_image(seed: int, h: int = 40, w: int = 56, channels: int = 3) -> np.ndarray:
  """Smooth random uint8 image (JPEG-friendly), distinct per seed."""
  rng = np.random.default_rng(seed)
  img = (rng.random((h, w, channels)) * 255).astype(np.float32)
  img = cv2.GaussianBlur(img, (0, 0), 2.0)
  img = img.reshape(h, w, channels)
  img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6) * 255
  return img.round().astype(np.uint8).squeeze()


def write(path, img: np.ndarray) -> str:
  path = str(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, img), path
  return path


def image_key(img: np.ndarray) -> str:
  return hashlib.sha1(img.tobytes() + str(img.shape).encode()).hexdigest()


def fake_masks(img: np.ndarray) -> list[np.ndarray]:
  """Two masks derived from the image: brighter than average, and the top-left quarter."""
  gray = img.astype(np.float32).mean(-1)
  h, w = gray.shape
  quarter = np.zeros((h, w), bool)
  quarter[:h // 2, :w // 2] = True
  return [gray > gray.mean(), quarter]


def fake_annotations(img: np.ndarray) -> list[dict]:
  h, w = img.shape[:2]
  anns = []
  for i, m in enumerate(fake_masks(img)):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    anns.append({
        "segmentation": rle,
        "area": int(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "predicted_iou": 0.9 - 0.1 * i,
        "point_coords": [[w / 2.0, h / 2.0]],
        "stability_score": np.float32(0.97),  # numpy scalars must serialize too.
        "crop_box": [0, 0, w, h],
    })
  return anns


class FakeGenerator:
  """Deterministic stand-in for AutomaticMaskGenerator.generate_batch.

  Args:
    fail_keys: image keys that make a call raise RuntimeError.
    interrupt_after: raise KeyboardInterrupt (a simulated kill) once this many
      images have completed.
  """

  def __init__(self, fail_keys=(), interrupt_after=None):
    self.fail_keys = set(fail_keys)
    self.interrupt_after = interrupt_after
    self.completed = collections.Counter()
    self.calls = []

  def __call__(self, images):
    self.calls.append(len(images))
    for img in images:
      assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if self.interrupt_after is not None and sum(self.completed.values()) >= self.interrupt_after:
      raise KeyboardInterrupt
    keys = [image_key(img) for img in images]
    if self.fail_keys.intersection(keys):
      raise RuntimeError("poisoned image")
    out = [fake_annotations(img) for img in images]
    self.completed.update(keys)
    return out


def good_folder(root, n: int, start: int = 0) -> list[str]:
  """n distinct PNG/JPEG images spread over sub-folders; returns their paths."""
  paths = []
  for i in range(start, start + n):
    ext = ".png" if i % 2 else ".jpg"
    paths.append(write(root / f"part{i % 3}" / f"img{i:02d}{ext}", make_image(i)))
  return paths


def json_files(out_dir) -> set[str]:
  return {os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs if f.endswith(".json")}


def check_output(json_path: str, image_path: str) -> None:
  """The output is valid SA-1B and its RLEs decode to the fake's masks of the image."""
  assert bulk.is_valid_output(json_path)
  with open(json_path) as f:
    record = json.load(f)
  img = load_image(image_path)
  h, w = img.shape[:2]
  assert record["image"]["file_name"] == os.path.basename(image_path)
  assert record["image"]["path"] == os.path.abspath(image_path)
  assert (record["image"]["height"], record["image"]["width"]) == (h, w)
  assert isinstance(record["image"]["image_id"], int)
  expected = fake_masks(img)
  assert [a["id"] for a in record["annotations"]] == list(range(len(expected)))
  for ann, want in zip(record["annotations"], expected):
    assert isinstance(ann["segmentation"]["counts"], str)
    mask = mask_utils.decode(ann["segmentation"])
    assert mask.shape == (h, w)
    np.testing.assert_array_equal(mask.astype(bool), want)
    assert ann["area"] == int(want.sum())
    assert ann["crop_box"] == [0.0, 0.0, float(w), float(h)]
    assert ann["point_coords"] == [[w / 2.0, h / 2.0]]
    assert isinstance(ann["stability_score"], float) and len(ann["bbox"]) == 4


def read_failures(path) -> dict[str, dict]:
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return {r["path"]: r for r in rows}


def quiet_job(*args, **kwargs):
  kwargs.setdefault("progress", False)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return bulk.run_job(*args, **kwargs)


# ---------------------------------------------------------------------- listing/shards


def test_list_inputs_folders_list_files_and_duplicates(tmp_path):
  data = tmp_path / "data"
  a = write(data / "a.png", make_image(0))
  b = write(data / "sub" / "b.JPG", make_image(1))  # Extension case does not matter.
  c = write(data / "sub" / "deeper" / "c.tiff", make_image(2))
  (data / "sub" / "notes.txt").write_text("not an image")
  (data / "sub" / "anim.gif").write_bytes(b"GIF89a")
  write(data / ".hidden" / "h.png", make_image(3))  # Hidden folders are skipped.
  write(data / "._a.png", make_image(4))  # As are AppleDouble stubs.
  other = tmp_path / "other"
  d = write(other / "imgs" / "d.png", make_image(5))
  e = write(tmp_path / "loose" / "e.webp", make_image(6))
  more = write(tmp_path / "more" / "f.bmp", make_image(7))
  lst = other / "list.txt"
  lst.write_text("\n".join([
      "# images for the job",
      "",
      "imgs/d.png",                  # relative to the list file's folder
      f"  {a}  ",                    # duplicate of a folder image, absolute
      "../data/sub/b.JPG",           # duplicate via another spelling
      "../more",                     # a listed folder is expanded
      "../missing/x.png",            # kept: fails at load time, not at listing
  ]) + "\n")

  got = bulk.list_inputs([data, str(lst), e, a, str(data / "sub" / ".." / "a.png")])
  missing = os.path.abspath(tmp_path / "missing" / "x.png")
  want = sorted({a, b, c, d, e, more, missing})
  assert got == want
  assert got == bulk.list_inputs([str(lst), e, data])  # Order of inputs does not matter.
  assert bulk.input_roots([data, str(lst)]) == sorted([str(data), str(tmp_path / "more")])

  with pytest.raises(FileNotFoundError, match="nope"):
    bulk.list_inputs([data, tmp_path / "nope"])
  binary = tmp_path / "blob.bin"
  binary.write_bytes(b"\0\1\2")
  with pytest.raises(ValueError, match="not a text file"):
    bulk.list_inputs([binary])
  # The output folder is never listed, even inside an input folder.
  write(data / "out" / "x.png", make_image(8))
  assert bulk.list_inputs([data], exclude_dirs=[data / "out"]) == [a, b, c]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shards_partition_the_sorted_list(count):
  paths = [f"/d/{i:03d}.png" for i in range(23)][::-1]
  shards = [bulk.shard_inputs(paths, i, count) for i in range(count)]
  flat = [p for s in shards for p in s]
  assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  assert all(s == sorted(s) for s in shards)
  assert shards == [bulk.shard_inputs(list(reversed(paths)), i, count) for i in range(count)]


def test_shard_defaults_and_validation():
  paths = ["/b.png", "/a.png"]
  assert bulk.shard_inputs(paths) == ["/a.png", "/b.png"]  # jax: one process.
  with pytest.raises(ValueError):
    bulk.shard_inputs(paths, 2, 2)


def test_output_paths_unique_and_stable(tmp_path):
  root = str(tmp_path / "data")
  out = str(tmp_path / "out")
  p1 = os.path.join(root, "sub", "cat.jpg")
  p2 = os.path.join(root, "sub", "cat.png")
  assert bulk.output_path_for(p1, [root], out) == os.path.join(out, "sub", "cat.jpg.json")
  assert bulk.output_path_for(p2, [root], out) == os.path.join(out, "sub", "cat.png.json")
  # Nested input folders: the outermost one decides.
  assert bulk.output_path_for(p1, [root, os.path.join(root, "sub")], out) == \
      os.path.join(out, "sub", "cat.jpg.json")
  # Loose files with the same name from different folders do not collide.
  l1 = bulk.output_path_for(str(tmp_path / "x" / "cat.jpg"), [root], out)
  l2 = bulk.output_path_for(str(tmp_path / "y" / "cat.jpg"), [root], out)
  assert l1 != l2 and os.path.dirname(l1) == out
  assert os.path.basename(l1).startswith("cat-") and l1.endswith(".json")
  assert l1 == bulk.output_path_for(str(tmp_path / "x" / "cat.jpg"), [root], out)
  # Two unrelated folders with the same relative path.
  r1, r2 = str(tmp_path / "a" / "imgs"), str(tmp_path / "b" / "imgs")
  o1 = bulk.output_path_for(os.path.join(r1, "cat.jpg"), [r1, r2], out)
  o2 = bulk.output_path_for(os.path.join(r2, "cat.jpg"), [r1, r2], out)
  assert o1 != o2 and os.path.basename(o1) == "cat.jpg.json"


# ---------------------------------------------------------------------------- the job


def test_mixed_folder_finishes_and_lists_failures(tmp_path):
  data = tmp_path / "data"
  good = good_folder(data, 4)
  good.append(write(data / "gray" / "g.png", make_image(10, channels=1)))
  rgba = np.dstack([make_image(11), make_image(12, channels=1)])
  good.append(write(data / "alpha" / "a.png", rgba))
  good.append(write(data / "deep" / "d16.png", make_image(13).astype(np.uint16) * 257))
  broken = {
      str(data / "bad" / "empty.png"): "zero-size",
      str(data / "bad" / "garbage.jpg"): "unreadable",
      str(data / "bad" / "truncated.jpg"): "truncated",
      str(data / "bad" / "notes.jpg"): "unreadable",
  }
  (data / "bad").mkdir()
  (data / "bad" / "empty.png").write_bytes(b"")
  (data / "bad" / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(5000))
  jpg = open(good[0], "rb").read()
  (data / "bad" / "truncated.jpg").write_bytes(jpg[:len(jpg) * 2 // 3])
  (data / "bad" / "notes.jpg").write_text("a text file renamed to .jpg\n")
  out = tmp_path / "out"

  overlay_calls = []

  def overlay_fn(image, anns):
    overlay_calls.append([a["segmentation"].dtype for a in anns])
    vis = image.copy()
    for a in anns:
      assert a["segmentation"].shape == image.shape[:2]
      vis[a["segmentation"]] = (255, 0, 0)
    return vis

  gen = FakeGenerator()
  summary = quiet_job([data], out, gen, batch_size=3, overlays=True, overlay_fn=overlay_fn,
                      num_workers=3)
  assert (summary.total, summary.done, summary.skipped, summary.failed) == (11, 7, 0, 4)
  assert summary.exit_code == 1
  assert "4 failed" in str(summary)

  failures = read_failures(out / "failures.jsonl")
  assert set(failures) == set(broken)
  for path, reason in broken.items():
    assert reason in failures[path]["reason"] and failures[path]["stage"] == "load"
  for path in good:
    json_path = bulk.output_path_for(path, [data], out)
    check_output(json_path, path)
    overlay = cv2.imread(json_path[:-len(".json")] + ".png")
    assert overlay.shape == load_image(path).shape
    assert tuple(overlay[0, 0]) == (0, 0, 255)  # Painted RGB red, stored as BGR.
  assert len(json_files(out)) == len(good)
  assert len(overlay_calls) == len(good) and all(d == [bool, bool] for d in overlay_calls)
  # Every good image went through the generator once; bad ones never did.
  assert sorted(gen.completed.values()) == [1] * len(good)


def test_resume_after_kill_does_each_image_exactly_once(tmp_path):
  data = tmp_path / "data"
  good = good_folder(data, 7)
  keys = {image_key(load_image(p)): p for p in good}
  assert len(keys) == len(good)
  out = data / "out"  # Inside the input folder: overlay PNGs must not become inputs.

  def overlay_fn(image, anns):
    return image

  def job(gen):
    return quiet_job([data], out, gen, batch_size=2, overlays=True, overlay_fn=overlay_fn)

  first = FakeGenerator(interrupt_after=3)
  with pytest.raises(KeyboardInterrupt):
    job(first)
  finished = json_files(out)
  assert len(finished) == sum(first.completed.values()) == 4
  assert all(bulk.is_valid_output(p) for p in finished)

  # A kill during a write leaves a temporary file next to a missing output.
  todo = sorted(set(bulk.output_path_for(p, [data], out) for p in good) - finished)
  partial = files.temp_path_for(todo[0])
  with open(partial, "w") as f:
    f.write('{"image": {"image_id": 1, "file_na')

  second = FakeGenerator()
  summary = job(second)
  assert (summary.done, summary.skipped, summary.failed, summary.exit_code) == (3, 4, 0, 0)
  total = first.completed + second.completed
  assert set(total) == set(keys) and set(total.values()) == {1}
  assert not os.path.exists(partial)
  assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(files.TEMP_PREFIX)]
  for path in good:
    check_output(bulk.output_path_for(path, [data], out), path)

  # A truncated output (e.g. copied by hand, or a disk error) is redone, alone.
  victim = bulk.output_path_for(good[2], [data], out)
  text = open(victim).read()
  with open(victim, "w") as f:
    f.write(text[:len(text) // 2])
  assert not bulk.is_valid_output(victim)
  third = FakeGenerator()
  summary = job(third)
  assert (summary.done, summary.skipped) == (1, 6)
  assert dict(third.completed) == {image_key(load_image(good[2])): 1}
  check_output(victim, good[2])

  # Nothing left to do: the generator is never called.
  fourth = FakeGenerator()
  summary = job(fourth)
  assert (summary.done, summary.skipped, fourth.calls) == (0, 7, [])


def test_generator_error_is_isolated_to_one_image(tmp_path):
  data = tmp_path / "data"
  good = good_folder(data, 5)
  poison = bulk.list_inputs([data])[2]
  gen = FakeGenerator(fail_keys=[image_key(load_image(poison))])
  out = tmp_path / "out"
  summary = quiet_job([data], out, gen, batch_size=5)
  assert (summary.done, summary.failed, summary.exit_code) == (4, 1, 1)
  assert gen.calls == [5, 1, 1, 1, 1, 1]  # The batch, then one image at a time.
  failures = read_failures(out / "failures.jsonl")
  assert list(failures) == [poison]
  assert failures[poison]["stage"] == "generate"
  assert "RuntimeError: poisoned image" in failures[poison]["reason"]
  for path in good:
    json_path = bulk.output_path_for(path, [data], out)
    if path == poison:
      assert not os.path.exists(json_path)
    else:
      check_output(json_path, path)


def uncompressed_rle(mask: np.ndarray) -> dict:
  """COCO uncompressed RLE: run lengths in column-major order, starting with zeros."""
  flat = mask.ravel(order="F").astype(np.int8)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
  counts = np.diff(bounds).tolist()
  return {"size": list(mask.shape), "counts": ([0] + counts) if flat[0] else counts}


def test_other_segmentation_formats_and_bad_annotations(tmp_path):
  data = tmp_path / "data"
  paths = good_folder(data, 3)
  names = sorted(paths)

  def generate(images):
    results = []
    for i, img in enumerate(images):
      anns = fake_annotations(img)
      if i == 0:  # output_mode="binary_mask"
        for a, m in zip(anns, fake_masks(img)):
          a["segmentation"] = m
      elif i == 1:  # output_mode="uncompressed_rle"
        for a, m in zip(anns, fake_masks(img)):
          a["segmentation"] = uncompressed_rle(m)
      else:  # A mask of the wrong size must not produce an output.
        anns[0]["segmentation"] = mask_utils.encode(np.zeros((3, 3), np.uint8, order="F"))
      results.append(anns)
    return results

  summary = quiet_job([data], tmp_path / "out", generate, batch_size=3)
  assert (summary.done, summary.failed) == (2, 1)
  check_output(bulk.output_path_for(names[0], [data], tmp_path / "out"), names[0])
  check_output(bulk.output_path_for(names[1], [data], tmp_path / "out"), names[1])
  failures = read_failures(tmp_path / "out" / "failures.jsonl")
  assert failures[names[2]]["stage"] == "write" and "does not match" in failures[names[2]]["reason"]


def test_two_processes_split_the_work(tmp_path):
  data = tmp_path / "data"
  good = good_folder(data, 9)
  (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  out = tmp_path / "out"
  gens, summaries, created = [], [], []
  for index in (0, 1):
    before = json_files(out) if out.exists() else set()
    gens.append(FakeGenerator())
    summaries.append(quiet_job([data], out, gens[-1], batch_size=2, process_index=index,
                               process_count=2))
    created.append(json_files(out) - before)
  assert not created[0] & created[1]
  assert created[0] | created[1] == {bulk.output_path_for(p, [data], out) for p in good}
  assert not set(gens[0].completed) & set(gens[1].completed)
  assert sum(s.total for s in summaries) == 10 and sum(s.failed for s in summaries) == 1
  assert [s.done for s in summaries] == [len(created[0]), len(created[1])]
  assert not (out / "failures.jsonl").exists()
  owner = [s.process_index for s in summaries if s.failed][0]
  assert list(read_failures(out / f"failures.{owner}.jsonl")) == [str(data / "broken.png")]
  assert not (out / f"failures.{1 - owner}.jsonl").exists()


def test_is_valid_output(tmp_path):
  good = {"image": {"image_id": 1, "file_name": "a.jpg", "path": "/x/a.jpg", "height": 4,
                    "width": 5},
          "annotations": [{"id": 0, "segmentation": {"size": [4, 5], "counts": "04"}}]}
  cases = {
      "good": (good, True),
      "no_annotations": ({"image": good["image"]}, False),
      "no_height": ({"image": {"file_name": "a.jpg", "width": 5}, "annotations": []}, False),
      "bad_segmentation": ({"image": good["image"], "annotations": [{"segmentation": [1]}]}, False),
      "list": ([good], False),
  }
  for name, (obj, valid) in cases.items():
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))
    assert bulk.is_valid_output(path) == valid, name
  (tmp_path / "cut.json").write_text(json.dumps(good)[:30])
  assert not bulk.is_valid_output(tmp_path / "cut.json")
  assert not bulk.is_valid_output(tmp_path / "absent.json")


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("batch_size,prefetch", [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_prefetch_loader_memory_is_bounded(batch_size, prefetch):
  paths = [f"/img/{i:03d}.png" for i in range(23)]
  lock = threading.Lock()
  state = {"live": 0, "max": 0, "loads": 0}

  def load_fn(path):
    with lock:
      state["live"] += 1
      state["loads"] += 1
      state["max"] = max(state["max"], state["live"])
    time.sleep(0.001)
    if path.endswith("007.png"):
      raise ValueError("decoder bug")
    return np.zeros((4, 4, 3), np.uint8)

  seen = []
  for batch in bulk.prefetch_batches(paths, batch_size, load_fn=load_fn, num_workers=4,
                                     prefetch=prefetch):
    assert 1 <= len(batch) <= batch_size
    seen.extend(p for p, _ in batch)
    for p, result in batch:
      if p.endswith("007.png"):
        assert isinstance(result, BadImageError) and "decoder bug" in result.reason
      else:
        assert isinstance(result, np.ndarray)
    time.sleep(0.01)  # The device is busy; decoding runs ahead meanwhile.
    with lock:  # The consumer releases the batch before asking for the next one.
      state["live"] -= len(batch)
  assert seen == paths
  assert state["max"] <= (prefetch + 1) * batch_size
  if prefetch:
    assert state["max"] > batch_size  # It does decode ahead.

  # Stopping early cancels what is queued instead of decoding everything.
  state["loads"] = 0
  loader = bulk.prefetch_batches(paths, batch_size, load_fn=load_fn, num_workers=2,
                                 prefetch=prefetch)
  next(loader)
  loader.close()
  time.sleep(0.05)
  assert state["loads"] <= (prefetch + 1) * batch_size


# ------------------------------------------------------------------------------ CLI


def test_cli_arguments_and_run_automask(tmp_path, monkeypatch):
  from samjax.amg.options import AmgOptions
  data = tmp_path / "data"
  good = good_folder(data, 3)
  out = tmp_path / "out"
  parser = automask.add_arguments(argparse.ArgumentParser())
  args = parser.parse_args([str(data), "--out", str(out)])
  assert (args.model, args.checkpoint, args.dtype, args.batch_size) == ("vit_h", None, "auto",
                                                                        "auto")
  assert args.attention is None  # SAMJAX_ATTENTION_IMPL, else "auto".
  assert not (args.overlays or args.no_progress or args.distributed)
  # The defaults are AmgOptions' (the official generator's), except the output mode.
  assert automask.options_from_args(args) == AmgOptions(output_mode="coco_rle")
  assert automask.options_from_args(args).to_kwargs() == {
      "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
      "stability_score_thresh": 0.95, "stability_score_offset": 1.0, "box_nms_thresh": 0.7,
      "crop_n_layers": 0, "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500,
      "crop_n_points_downscale_factor": 1, "point_grids": None, "min_mask_region_area": 0,
      "output_mode": "coco_rle",
  }
  with pytest.raises(SystemExit):
    parser.parse_args([str(data)])  # --out is required.
  with pytest.raises(SystemExit):
    parser.parse_args([str(data), "--out", str(out), "--points-per-side", "0"])
  with pytest.raises(SystemExit):
    parser.parse_args([str(data), "--out", str(out), "--attention", "not a kernel"])
  # Flags valid alone but not together fail before any work.
  bad = parser.parse_args([str(data), "--out", str(out), "--points-per-side", "2",
                           "--crop-n-layers", "2", "--crop-n-points-downscale-factor", "2"])
  with pytest.raises(ValueError, match="crop layer 2 would get no points"):
    automask.run_automask(bad, lambda a: pytest.fail("generator built"))

  args = parser.parse_args([
      str(data), "--out", str(out), "--model", "vit_b", "--points-per-side", "16",
      "--crop-n-layers", "1", "--batch-size", "2", "--no-progress", "--overlays",
      "--dtype", "bfloat16", "--attention", "fold/fold_mla", "--distributed",
      "--coordinator-address", "10.0.0.1:1234", "--num-processes", "1", "--process-id", "0"])
  options = automask.options_from_args(args)
  assert (options.points_per_side, options.crop_n_layers) == (16, 1)
  assert args.attention == "fold/fold_mla"

  import jax
  init_calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: init_calls.append(kw))
  made = []

  class Generator:

    def __init__(self, a):
      made.append(automask.options_from_args(a))
      self.generate_batch = FakeGenerator()

  summary = automask.run_automask(args, Generator, overlay_fn=lambda image, anns: image)
  assert init_calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 1,
                         "process_id": 0}]
  assert made[0].points_per_side == 16
  assert (summary.done, summary.exit_code) == (3, 0)
  for path in good:
    check_output(bulk.output_path_for(path, [data], out), path)

  args = parser.parse_args([str(data), "--out", str(out), "--process-id", "1"])
  with pytest.raises(ValueError, match="--distributed"):
    automask.run_automask(args, Generator)
