"""`samjax automask --output-format amg-json|amg-png` against the official scripts/amg.py.

The official files are written by the official script itself: its `main` runs on its
own argparse arguments, with the same .pth loaded through its `sam_model_registry`
(the tiny config added to it, `benchmarks.bulk_throughput.load_official_amg`), the
same images and the same generator settings as `samjax automask` (in-process, fp32,
matmul precision "highest" from conftest).

Model and settings: the trained tiny checkpoint (tests/fixtures/tiny_trained) on
scenes like its training data, whose masks are real, localised objects, with
pred_iou_thresh 0.1 and stability_score_thresh 0.4 (the official thresholds keep
nothing of this small model). Measured on this CPU: 35 masks over 2 images, every mask
pixel-identical (RLE counts equal, PNG files byte-identical), stability scores equal,
predicted IoUs within 8.3e-7 (6.9e-7 with PyTorch on 2 threads).

Tolerances: predicted_iou within 1e-5 (the IoU head matches PyTorch to ~1e-6 relative
in fp32, test_parity.py; 20x the measured gap). stability_score within 1e-3: it is a
ratio of pixel counts at the +-1 logit offsets, so it only moves when a full-resolution
logit crosses an offset, by 1/area per pixel (~1e-3 for the smallest masks here). A
mask must match its official twin at IoU >= 0.999 and at least 90% of the masks must be
pixel-identical, so that a single pixel flipping on another CPU (as happens for ~2% of
the randomized model's masks, test_automatic.py) does not fail the test; the numbers
are printed and recorded in the parity table. Everything else (names, keys, their
order, int/float types, header, separators, number formatting) must be identical: each
file is compared as text with the official one after the few values above are
substituted into the official file.

The job's own files in the output folder (`samjax_job.json`) are not outputs and are
left out of the comparison of names.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import cv2
import numpy as np
import pytest

import samjax
from samjax.bulk import layouts
from samjax.cli import automask as automask_cli
from samjax.cli import build_parser

TRAINED = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_trained")
GEN = ["--points-per-side", "16", "--pred-iou-thresh", "0.1", "--stability-score-thresh",
       "0.4"]
# (file name, synthetic scene seed): a PNG and JPEGs, so both extensions are stripped.
IMAGES = (("scene_a.png", 777), ("scene_b.jpg", 780))
JOB_FILES = {"samjax_job.json"}
IOU_TOL, STABILITY_TOL = 1e-5, 1e-3
# metadata.csv columns that carry predicted_iou and stability_score.
CSV_IOU, CSV_STABILITY = 8, 9


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def official_amg():
  from benchmarks.bulk_throughput import find_official_amg, load_official_amg
  path = find_official_amg()
  if path is None:
    pytest.skip("the official scripts/amg.py is not here (set $SAMJAX_OFFICIAL_AMG)")
  return load_official_amg(path, {"samjax_tiny": samjax.tiny})


@pytest.fixture(scope="module")
def trained_pth(tmp_path_factory):
  """The trained tiny checkpoint as an official .pth (the one file both sides load)."""
  import torch
  from samjax.io.checkpoint import load_any, state_dict_from_params
  if not os.path.exists(TRAINED):
    pytest.skip("no trained tiny checkpoint at tests/fixtures/tiny_trained")
  config, params = load_any(TRAINED)
  assert config == samjax.tiny
  path = tmp_path_factory.mktemp("pth") / "tiny_trained.pth"
  torch.save({k: torch.from_numpy(np.array(v))
              for k, v in state_dict_from_params(params, config).items()}, str(path))
  return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  from samjax.data.synthetic import make_synthetic_image
  folder = tmp_path_factory.mktemp("images")
  for name, seed in IMAGES:
    rgb = make_synthetic_image(seed, (200, 300))[0]
    assert cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[..., ::-1]))
  return folder


def _ours(inputs, out, pth, fmt, *extra):
  """`samjax automask` in this process; returns its JobSummary."""
  args = build_parser().parse_args(
      ["automask", str(inputs), "--out", str(out), "--checkpoint", pth, "--output-format",
       fmt, "--dtype", "float32", "--no-progress", "--compilation-cache", "",
       "--num-workers", "1", *GEN, *extra])
  return automask_cli.run_automask(args)


@pytest.fixture(scope="module")
def runs(official_amg, trained_pth, images, tmp_path_factory):
  """{format: (official output folder, ours)}, each written once for the module."""
  import torch
  root = tmp_path_factory.mktemp("layouts")
  out = {}
  for fmt, rle in (("amg-json", True), ("amg-png", False)):
    official = root / f"official-{fmt}"
    args = official_amg.parser.parse_args(
        ["--input", str(images), "--output", str(official), "--model-type", "samjax_tiny",
         "--checkpoint", trained_pth, "--device", "cpu", *GEN]
        + (["--convert-to-rle"] if rle else []))
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine PyTorch's OpenMP threads wait on each other
    # (7 s per image instead of 3 here); the results do not depend on it.
    torch.set_num_threads(1)
    try:
      with torch.no_grad():
        official_amg.main(args)
    finally:
      torch.set_num_threads(threads)
    ours = root / f"ours-{fmt}"
    summary = _ours(images, ours, trained_pth, fmt)
    assert summary.exit_code == 0 and summary.done == len(IMAGES), summary
    out[fmt] = (official, ours)
  return out


# ----------------------------------------------------------------------------- helpers


def _names(folder) -> set[str]:
  """Every file under `folder`, relative, the job's own files left out."""
  return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
          for f in fs} - JOB_FILES


def _close(a: float, b: float, tol: float) -> bool:
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return abs(a - b) <= tol


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


class _Tally:
  """Masks compared, pixel-identical masks, differing pixels, worst IoU and score gaps."""

  def __init__(self):
    self.masks = self.identical = self.pixels = 0
    self.min_iou, self.d_iou, self.d_stability = 1.0, 0.0, 0.0

  def mask(self, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    diff = int(np.count_nonzero(ours != ref))
    self.masks += 1
    self.identical += diff == 0
    self.pixels += diff
    self.min_iou = min(self.min_iou, _mask_iou(ours, ref))

  def scores(self, ours_iou, ref_iou, ours_stab, ref_stab) -> None:
    assert _close(ours_iou, ref_iou, IOU_TOL), (ours_iou, ref_iou)
    assert _close(ours_stab, ref_stab, STABILITY_TOL), (ours_stab, ref_stab)
    if not math.isnan(ref_iou):
      self.d_iou = max(self.d_iou, abs(ours_iou - ref_iou))
    if not math.isnan(ref_stab):
      self.d_stability = max(self.d_stability, abs(ours_stab - ref_stab))

  def check(self, name: str, record) -> None:
    print(f"{name}: {self.masks} masks, {self.identical} pixel-identical, {self.pixels} "
          f"pixels differ, min IoU {self.min_iou:.5f}, max |d predicted_iou| "
          f"{self.d_iou:.2e}, max |d stability_score| {self.d_stability:.2e}")
    record(f"amg.py layout {name}: masks identical share, max|d iou|",
           max_abs=self.d_iou, mask_iou=self.identical / max(self.masks, 1))
    assert self.masks >= 30, f"only {self.masks} masks: weak test"
    assert self.min_iou >= 0.999
    assert self.identical >= 0.9 * self.masks


# ------------------------------------------------------------------------------- tests


def test_amg_json_equals_official(runs, record):
  official, ours = runs["amg-json"]
  names = _names(official)
  assert names == {os.path.splitext(n)[0] + ".json" for n, _ in IMAGES}
  assert _names(ours) == names
  from samjax.masks import decode_rle
  tally = _Tally()
  for name in sorted(names):
    ref_text = (official / name).read_text()
    text = (ours / name).read_text()
    ref, got = json.loads(ref_text), json.loads(text)
    assert len(got) == len(ref), name
    for r, g in zip(ref, got):
      assert list(g) == list(r) == list(layouts.AMG_KEYS)
      tally.mask(decode_rle(g["segmentation"]), decode_rle(r["segmentation"]))
      tally.scores(g["predicted_iou"], r["predicted_iou"], g["stability_score"],
                   r["stability_score"])
      for k in ("point_coords", "crop_box"):
        assert g[k] == r[k] and [type(v) for v in g[k]] == [type(v) for v in r[k]], k
      assert [type(v) for v in g["bbox"]] == [type(v) for v in r["bbox"]]
      # The values the tolerances allow to differ, taken from ours: the rest of the
      # text (keys, order, types, separators, number formatting) must be the official.
      for k in ("segmentation", "area", "bbox", "predicted_iou", "stability_score"):
        r[k] = g[k]
    assert text == json.dumps(ref), name
  tally.check("amg-json", record)


def test_amg_png_equals_official(runs, record):
  official, ours = runs["amg-png"]
  names = _names(official)
  assert {n.split(os.sep)[0] for n in names} == {os.path.splitext(n)[0] for n, _ in IMAGES}
  assert _names(ours) == names
  tally = _Tally()
  identical_files = 0
  for stem in sorted({n.split(os.sep)[0] for n in names}):
    ref_lines = (official / stem / "metadata.csv").read_text().split("\n")
    lines = (ours / stem / "metadata.csv").read_text().split("\n")
    assert lines[0] == ref_lines[0] == layouts.AMG_CSV_HEADER
    assert len(lines) == len(ref_lines) and len(lines) > 1, stem
    for i, (line, ref_line) in enumerate(zip(lines[1:], ref_lines[1:])):
      got, ref = line.split(","), ref_line.split(",")
      assert len(got) == len(ref) == 14
      tally.scores(float(got[CSV_IOU]), float(ref[CSV_IOU]), float(got[CSV_STABILITY]),
                   float(ref[CSV_STABILITY]))
      png, ref_png = (ours / stem / f"{i}.png").read_bytes(), \
          (official / stem / f"{i}.png").read_bytes()
      mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
      ref_mask = cv2.imdecode(np.frombuffer(ref_png, np.uint8), cv2.IMREAD_UNCHANGED)
      assert mask.dtype == ref_mask.dtype == np.uint8 and mask.ndim == 2
      assert set(np.unique(mask)) <= {0, 255}
      tally.mask(mask > 0, ref_mask > 0)
      if np.array_equal(mask, ref_mask):
        assert png == ref_png, f"{stem}/{i}.png: same pixels, other bytes"
        assert got[1:6] == ref[1:6]  # area and bbox follow from the pixels
        identical_files += 1
      # The values the tolerances allow to differ, taken from ours: the rest of the
      # file (id, point, crop box, formatting, separators) must be the official.
      ref[1:6] = got[1:6]
      ref[CSV_IOU], ref[CSV_STABILITY] = got[CSV_IOU], got[CSV_STABILITY]
      ref_lines[i + 1] = ",".join(ref)
    assert lines == ref_lines, stem
  assert identical_files == tally.identical
  tally.check("amg-png", record)


def test_resume_per_format(runs, trained_pth, images, tmp_path):
  """A rerun skips complete outputs; an incomplete one is redone, identically."""
  stem = os.path.splitext(IMAGES[0][0])[0]
  for fmt, damage in (("amg-png", "metadata"), ("amg-json", "truncate")):
    _, first = runs[fmt]
    out = tmp_path / fmt
    shutil.copytree(first, out)
    summary = _ours(images, out, trained_pth, fmt)
    assert (summary.done, summary.skipped) == (0, len(IMAGES))
    before = {n: (out / n).read_bytes() for n in _names(out)}
    if fmt == "amg-png":
      folder = out / stem
      (folder / "metadata.csv").unlink()  # masks there, metadata.csv not: incomplete
      (folder / "99.png").write_bytes(b"a mask of an earlier, longer run")
      (folder / ".samjax-tmp.4242.0123abcd.3.png").write_bytes(b"killed write")
      assert not layouts.is_valid_amg_png(str(folder))
    else:
      path = out / f"{stem}.json"
      path.write_bytes(path.read_bytes()[:-20])
      assert not layouts.is_valid_amg_json(str(path))
    summary = _ours(images, out, trained_pth, fmt)
    assert (summary.done, summary.skipped) == (1, len(IMAGES) - 1), fmt
    after = {n: (out / n).read_bytes() for n in _names(out)}
    assert after == before, fmt  # stale mask and temporary gone, the rest identical
  # The manifest records the format: resuming into this folder with another one stops.
  with pytest.raises(ValueError, match="output_format"):
    _ours(images, out, trained_pth, "amg-png")


def test_overlays_next_to_outputs(runs, trained_pth, images, tmp_path):
  _, first = runs["amg-png"]
  out = tmp_path / "png"
  shutil.copytree(first, out)
  summary = _ours(images, out, trained_pth, "amg-png", "--overlays")
  # Complete folders without their overlay are redone, now with it.
  assert summary.done == len(IMAGES)
  for name, _ in IMAGES:
    stem = os.path.splitext(name)[0]
    assert (out / f"{stem}.png").stat().st_size > 0 and layouts.is_valid_amg_png(
        str(out / stem))
  assert _names(out) - {f"{os.path.splitext(n)[0]}.png" for n, _ in IMAGES} == \
      _names(first)


# ---------------------------------------------------------------- names and validity


def _touch(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")
  return str(path)


def test_names_flat_nested_and_colliding(tmp_path):
  data, out = tmp_path / "data", str(tmp_path / "out")
  flat = [_touch(data / n) for n in ("x.jpg", "y.png", "z.tar.jpeg")]
  nested = [_touch(data / "sub" / n) for n in ("cat.jpg", "cat.png", "deeper/dog.jpg")]
  clash = [_touch(data / n) for n in ("w.jpg", "w.png.jpg", "failures.jsonl.png",
                                      "samjax_job.png")]
  loose = [_touch(tmp_path / d / "pic.jpg") for d in ("l1", "l2")] + \
      [_touch(tmp_path / "l3" / "solo.jpg")]
  imgs, roots = flat + nested + clash + loose, [str(data)]

  def rel(fmt):
    return {os.path.relpath(p, tmp_path): os.path.relpath(o, out)
            for p, o in layouts.output_paths(fmt, imgs, roots, out).items()}

  names = {fmt: rel(fmt) for fmt in layouts.FORMATS}
  js, png, sa1b = names["amg-json"], names["amg-png"], names["sa1b"]
  # A flat folder: amg.py's names, os.path.splitext(os.path.basename(path))[0].
  assert [js[f"data/{n}"] for n in ("x.jpg", "y.png", "z.tar.jpeg")] == \
      ["x.json", "y.json", "z.tar.json"]
  assert [png[f"data/{n}"] for n in ("x.jpg", "y.png", "z.tar.jpeg")] == ["x", "y", "z.tar"]
  # Subfolders are kept; equal stems in one folder keep their extension.
  assert js["data/sub/deeper/dog.jpg"] == "sub/deeper/dog.json"
  assert (js["data/sub/cat.jpg"], js["data/sub/cat.png"]) == ("sub/cat.jpg.json",
                                                              "sub/cat.png.json")
  assert (png["data/sub/cat.jpg"], png["data/sub/cat.png"]) == ("sub/cat.jpg", "sub/cat.png")
  # amg-png: w.jpg's overlay w.png would be w.png.jpg's folder; the job's own names.
  assert (png["data/w.jpg"], png["data/w.png.jpg"]) == ("w.jpg", "w.png.jpg")
  assert (js["data/w.jpg"], js["data/w.png.jpg"]) == ("w.json", "w.png.json")
  assert (png["data/failures.jsonl.png"], js["data/failures.jsonl.png"]) == \
      ("failures.jsonl.png", "failures.jsonl.json")
  assert (png["data/samjax_job.png"], js["data/samjax_job.png"]) == \
      ("samjax_job", "samjax_job.png.json")
  # Loose files: the stem (amg.py's single-image name) unless two share it.
  assert js["l3/solo.jpg"] == "solo.json"
  assert js["l1/pic.jpg"] != js["l2/pic.jpg"]
  assert {js["l1/pic.jpg"], js["l2/pic.jpg"]} == {sa1b["l1/pic.jpg"], sa1b["l2/pic.jpg"]}
  for fmt, got in names.items():  # outputs and overlays: all distinct
    claimed = [n for o in got.values() for n in (o, layouts.get_layout(fmt).overlay_path(o))]
    assert len(set(claimed)) == len(claimed), fmt
  # sa1b names are today's.
  assert sa1b["data/sub/cat.jpg"] == "sub/cat.jpg.json"
  with pytest.raises(ValueError, match="amg-json"):
    layouts.get_layout("coco")


def test_validity_checks(tmp_path):
  folder = tmp_path / "img"
  folder.mkdir()
  rows = [layouts.AMG_CSV_HEADER, "0,5,1,1,2,3,1.5,1.5,0.9,0.95,0,0,4,4"]
  (folder / "0.png").write_bytes(layouts.mask_png(np.eye(4, dtype=bool)))
  assert not layouts.is_valid_amg_png(str(folder))  # no metadata.csv yet
  (folder / "metadata.csv").write_text("\n".join(rows))
  assert layouts.is_valid_amg_png(str(folder))
  (folder / "metadata.csv").write_text("\n".join(rows + [rows[1].replace("0,", "1,", 1)]))
  assert not layouts.is_valid_amg_png(str(folder))  # 1.png missing
  (folder / "metadata.csv").write_text("\n".join(["id,area"] + rows[1:]))
  assert not layouts.is_valid_amg_png(str(folder))
  (folder / "metadata.csv").write_text(layouts.AMG_CSV_HEADER)
  assert layouts.is_valid_amg_png(str(folder))  # no masks: the official header alone
  path = tmp_path / "x.json"
  rec = layouts.amg_records([{"segmentation": np.eye(4, dtype=bool), "predicted_iou": 0.5,
                              "stability_score": 0.25, "point_coords": [[1.0, 2.0]]}],
                            (4, 4))
  assert list(rec[0]) == list(layouts.AMG_KEYS)
  assert rec[0]["area"] == 4 and rec[0]["crop_box"] == [0, 0, 4, 4]
  path.write_text(json.dumps(rec))
  assert layouts.is_valid_amg_json(str(path))
  path.write_text(json.dumps(rec)[:-3])
  assert not layouts.is_valid_amg_json(str(path))
  path.write_text(json.dumps([{k: v for k, v in rec[0].items() if k != "area"}]))
  assert not layouts.is_valid_amg_json(str(path))
  assert not layouts.is_valid_amg_json(str(tmp_path / "missing.json"))


def test_cli_formats_are_the_registry():
  assert automask_cli.OUTPUT_FORMATS == layouts.FORMATS
  assert automask_cli.OUTPUT_FORMATS[0] == layouts.DEFAULT_FORMAT == "sa1b"


def _fake_generate(images):
  """Two annotations per image (a box and an empty mask), official keys and types."""
  from samjax.masks import encode_rle
  out = []
  for img in images:
    h, w = img.shape[:2]
    box = np.zeros((h, w), bool)
    box[10:50, 20:90] = True
    out.append([{"segmentation": encode_rle(m), "area": int(m.sum()), "bbox": bbox,
                 "predicted_iou": 0.875, "point_coords": [[30.0, 20.5]],
                 "stability_score": s, "crop_box": [0, 0, w, h]}
                for m, bbox, s in ((box, [20, 10, 70, 40], 0.96875),
                                   (np.zeros((h, w), bool), [0.0, 0.0, 0.0, 0.0],
                                    float("nan")))])
  return out


@pytest.mark.parametrize("fmt", ["amg-json", "amg-png"])
def test_url_output_equals_local(images, tmp_path, fmt):
  """--out at an fsspec URL (samjax.bulk.store) gets the same files as a local folder."""
  from samjax.bulk import run_job, store
  url = f"memory://layouts-{fmt}/out"
  local = tmp_path / "out"
  for out in (url, str(local)):
    for _ in range(2):  # the second run resumes: nothing left to do
      summary = run_job([str(images)], out, _fake_generate, output_format=fmt,
                        overlays=True, progress=False, claims=False)
    assert (summary.done, summary.skipped) == (0, len(IMAGES))
  fs = store.store_for(url).fs
  remote = {p[len(f"/layouts-{fmt}/out/"):]: fs.cat_file(p) for p in fs.find(url)}
  assert remote == {n: (local / n).read_bytes() for n in _names(local)}
  assert len(remote) == len(IMAGES) * (2 if fmt == "amg-json" else 4)
