"""Fine-tuning on bad input: invalid annotations, empty masks, a damaged checkpoint.

Each fault is reported up front as one clear error, before anything is written to
the output folder (or, for a damaged checkpoint, resumed around with a warning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from samjax import train as T
from samjax.data.synthetic import write_coco_dataset
from samjax.io.checkpoint import load_params

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_trained"
SMALL = T.TrainConfig(train="decoder", lr=2e-3, warmup_steps=1, total_steps=8,
                      batch_size=2, instances_per_image=2, prompt_iters=1, save_every=2,
                      keep_last=5, log_every=2, seed=1)
QUIET = dict(progress=False, log_fn=lambda s: None)


@pytest.fixture(scope="module")
def model():
  config, params = load_params(FIXTURE)
  return config, jax.tree_util.tree_map(np.asarray, params)


def _edit(json_path, fn):
  d = json.loads(Path(json_path).read_text())
  fn(d)
  Path(json_path).write_text(json.dumps(d))
  return json_path


def test_bad_annotations_are_all_listed_up_front(tmp_path, model):
  j = write_coco_dataset(str(tmp_path / "d"), 6, seed=4, size=64)
  (tmp_path / "d" / "images" / "notimage.png").write_text("hello")

  def corrupt(d):
    anns, imgs = d["annotations"], d["images"]
    by_image = {}
    for a in anns:
      by_image.setdefault(a["image_id"], []).append(a)
    a1 = by_image[1]
    a1[0]["segmentation"] = [[1, 1, 5, 5]]                       # 2 points
    a1[1]["segmentation"] = {"size": [64, 64]}                   # RLE without counts
    by_image[2][0]["bbox"] = "0 0 3 3"                            # bbox of the wrong type
    by_image[2][1]["segmentation"] = 7                            # segmentation wrong type
    imgs[2]["file_name"] = "../x.png"
    imgs[3]["file_name"] = str(tmp_path / "d" / "images" / imgs[3]["file_name"])
    imgs[4]["file_name"] = "missing.png"
    imgs[5]["file_name"] = "notimage.png"
    anns.append({**a1[2], "id": 9999, "image_id": 777})           # no image record

  _edit(j, corrupt)
  with pytest.raises(ValueError) as e:
    T.CocoInstances(j)
  msg = str(e.value)
  for want in ("9 bad record(s)", "polygon 0 has 4 coordinates", "RLE segmentation has no "
               "'counts'", "bbox must be 4 numbers", "segmentation must be a list of "
               "polygons or an RLE dict, got int", "'../x.png'): file_name is outside",
               "file_name is outside the images folder", "'missing.png'): file not found",
               "'notimage.png'): not an image", "annotation 9999: image_id 777 has no "
               "image record"):
    assert want in msg, (want, msg)
  assert msg.count("outside the images folder") == 2  # ../x.png and the absolute path

  # Not validated when built: finetune validates before writing anything.
  data = T.CocoInstances(j, validate=False)
  config, params = model
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="bad record"):
    T.finetune(SMALL, config, params, data, out, **QUIET)
  assert not out.exists()


def test_bad_record_list_is_capped(tmp_path):
  j = write_coco_dataset(str(tmp_path / "d"), 2, seed=4, size=64)
  _edit(j, lambda d: d["annotations"].extend(
      {**d["annotations"][0], "id": 1000 + i, "image_id": 5000 + i} for i in range(30)))
  with pytest.raises(ValueError) as e:
    T.CocoInstances(j)
  msg = str(e.value)
  assert "30 bad record(s)" in msg and "... and 10 more" in msg
  assert msg.count("has no image record") == 20


def _empty_rle(d):
  for a in d["annotations"]:
    img = next(i for i in d["images"] if i["id"] == a["image_id"])
    a["segmentation"] = {"size": [img["height"], img["width"]],
                         "counts": [img["height"] * img["width"]]}


def test_all_empty_masks_are_refused(tmp_path, model):
  j = _edit(write_coco_dataset(str(tmp_path / "d"), 3, seed=4, size=64), _empty_rle)
  with pytest.raises(ValueError, match=r"dataset .*annotations.json has no instance with "
                     "a non-empty mask"):
    T.CocoInstances(j)
  config, params = model
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="non-empty mask"):
    T.finetune(SMALL, config, params, T.CocoInstances(j, validate=False), out, **QUIET)
  assert not out.exists()
  # A plain sequence is not validated; its first steps' batches are checked.
  images = [(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64), bool))] * 3
  with pytest.raises(ValueError, match="no valid instance in its first"):
    T.finetune(SMALL, config, params, images, tmp_path / "out2", **QUIET)
  assert not (tmp_path / "out2").exists()


def _state_files(step_dir: Path):
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file()
                and p.stat().st_size > 0)


def test_damaged_latest_checkpoint_falls_back(tmp_path, model):
  config, params = model
  train = T.CocoInstances(write_coco_dataset(str(tmp_path / "d"), 4, seed=4, size=64))
  out = tmp_path / "out"
  T.finetune(SMALL, config, params, train, out, max_steps_this_run=4, **QUIET)
  ckpt = out / "checkpoints"
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [0, 2, 4]
  # Truncate every data file of the latest step (a crash or a full disk mid-write).
  for f in _state_files(ckpt / "4"):
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 3)
  seen = []
  with pytest.warns(RuntimeWarning, match=r"step\(s\) 4 .*cannot be restored"):
    res = T.finetune(SMALL, config, params, train, out, max_steps_this_run=2,
                     callback=lambda step, m: seen.append(step), **QUIET)
  assert seen == [3, 4] and res.step == 4  # resumed at 2; step 4 saved again
  assert len(list((out / "damaged_checkpoints").iterdir())) == 1
  # Every step damaged: a clear error, not a tensorstore traceback.
  for step in (0, 2, 4):
    for f in _state_files(ckpt / str(step)):
      f.write_bytes(b"")
  with pytest.raises(RuntimeError, match="no checkpoint in .* can be restored"):
    T.finetune(SMALL, config, params, train, out, max_steps_this_run=0, **QUIET)
