#!/usr/bin/env python3
"""Smoke test of samjax at its dependency floors (run by `.ci/run` in a venv that holds
exactly the `>=` minimums of pyproject.toml's `dependencies`).

Exercises the code paths whose APIs decide the floors, through the public API, without
torch (the floors venv has none):

  1. a randomized tiny official-layout `.pth`, written here without torch;
  2. `samjax.convert_checkpoint` (torch-free .pth reader, Orbax StandardCheckpointer)
     and `samjax.load_params` (bit-exact round trip);
  3. `samjax.Predictor`: point, box and mask prompts; `samjax.encode_image` under a
     user's jit, where "auto" attention goes through jax.lax.platform_dependent;
  4. `samjax.AutomaticMaskGenerator.generate` (jax.shard_map(check_vma=...), lax.map,
     OpenCV hole filling, pycocotools RLE);
  5. the Pallas TPU attention kernel in interpret mode (pallas.tpu.CompilerParams,
     InterpretParams), when the module is there;
  6. `samjax.train.finetune`: two steps, stopped after one and resumed (optax
     multi_transform/adamw/warmup_cosine_decay_schedule; Orbax CheckpointManager with a
     preservation policy, save, restore, best-checkpoint export).

Plain Python: prints what it did, exits non-zero on the first failure.
Usage: python .ci/floors_smoke.py [--workdir DIR] [--pins PINS.txt]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import io
import pickle
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                 "opencv-python-headless", "pillow", "pycocotools", "tqdm", "tensorstore",
                 "ml_dtypes", "scipy")

_T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[floors-smoke {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def check(cond: bool, what: str) -> None:
  if not cond:
    raise AssertionError(what)


# ----------------------------------------------------------------------------------------
# A torch-format .pth writer that needs no torch.
# ----------------------------------------------------------------------------------------
class _Global:
  """Stands for a global (`module.name`) that torch's unpickler resolves."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # save_reduce insists on a callable
    raise TypeError("placeholder")


class _Storage:
  def __init__(self, key: str, numel: int):
    self.key, self.numel = key, numel


class _Tensor:
  def __init__(self, storage: _Storage, shape):
    self.storage, self.shape = storage, tuple(int(s) for s in shape)

  def __reduce__(self):
    stride, acc = [], 1
    for s in reversed(self.shape):
      stride.append(acc)
      acc *= s
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, self.shape, tuple(reversed(stride)), False,
             collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its `save` can be hooked
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.numel)
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
      return
    super().save(obj, save_persistent_id)


def write_torch_state_dict(state_dict, path: Path) -> None:
  """Writes {name: float32 array} in torch.save's zip format (loads with torch.load)."""
  records, tensors = {}, collections.OrderedDict()
  for i, (k, v) in enumerate(state_dict.items()):
    v = np.asarray(v, dtype="<f4")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
    records[f"archive/data/{i}"] = v.tobytes(order="C")
    tensors[k] = _Tensor(_Storage(str(i), v.size), v.shape)
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(tensors)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for name, data in records.items():
      zf.writestr(name, data)
    zf.writestr("archive/version", "3\n")


# ----------------------------------------------------------------------------------------
# The checks.
# ----------------------------------------------------------------------------------------
def _internal(name: str, *modules: str):
  """A samjax helper that has no public name, from wherever it lives now."""
  for m in modules:
    try:
      return getattr(importlib.import_module(m), name)
    except (ImportError, AttributeError):
      continue
  raise ImportError(f"{name} not found in any of {modules}")


def report_versions() -> None:
  got = []
  for d in DISTRIBUTIONS:
    try:
      got.append(f"{d}=={metadata.version(d)}")
    except metadata.PackageNotFoundError:
      got.append(f"{d}: not installed")
  log("python " + sys.version.split()[0] + "; " + ", ".join(got))
  if importlib.util.find_spec("torch") is None:
    log("torch is not installed: torch-free paths only")
  else:
    log("torch is installed (this run does not need it; samjax will read the .pth with it)")


def _release(v: str):
  parts = [int(x) if x.isdigit() else x for x in v.split(".")]
  while parts and parts[-1] == 0:
    parts.pop()
  return parts


def check_pins(pins_file: str) -> None:
  """Every `name==X` of the pins file is what is installed (nothing drifted)."""
  n = 0
  for line in Path(pins_file).read_text().splitlines():
    if "==" not in line:
      continue
    name, want = (x.strip() for x in line.split("=="))
    got = metadata.version(name)
    check(_release(got) == _release(want), f"{name}: installed {got}, pinned {want}")
    n += 1
  log(f"{n} pinned floors installed exactly ({pins_file})")


def make_random_pth(work: Path):
  import samjax
  from flax import traverse_util
  where = ("samjax.io.checkpoint", "samjax.checkpoint")
  param_shapes = _internal("param_shapes", *where)
  state_dict_from_params = _internal("state_dict_from_params", *where)
  config = samjax.tiny
  rng = np.random.default_rng(0)
  # Every leaf random (the reference zero-inits pos_embed and the relative position
  # tables, which would let a mis-mapped tensor pass), from shapes only: no compile.
  params = traverse_util.unflatten_dict({
      tuple(k.split("/")): rng.normal(0.0, 0.05, s).astype(np.float32)
      for k, s in sorted(param_shapes(config).items())})
  sd = state_dict_from_params(params, config)
  pth = work / "tiny_random.pth"
  write_torch_state_dict(sd, pth)
  log(f"wrote {pth.name}: {len(sd)} tensors, {sum(v.size for v in sd.values()):,} "
      f"parameters, {pth.stat().st_size / 1e6:.1f} MB (no torch)")
  return config, params, pth


def convert_and_reload(config, params, pth: Path, work: Path) -> Path:
  import jax
  import samjax
  ckpt = work / "tiny_orbax"
  got_config = samjax.convert_checkpoint(pth, ckpt, model_type="tiny")
  check(got_config == config, f"convert_checkpoint returned {got_config}")
  loaded_config, loaded = samjax.load_params(ckpt)
  check(loaded_config == config, "load_params: config differs")
  a, b = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)
  check(len(a) == len(b), f"load_params: {len(b)} leaves, expected {len(a)}")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  log(f"convert_checkpoint -> {ckpt.name}/ and load_params: {len(a)} arrays bit-identical")
  return ckpt


def predict(ckpt: Path, pth: Path):
  import samjax
  from samjax.data.synthetic import make_synthetic_image
  image, masks, _ = make_synthetic_image(np.random.default_rng(1), size=(192, 256))
  predictor = samjax.Predictor(ckpt)
  predictor.set_image(image)
  h, w = image.shape[:2]
  out_masks, scores, low_res = predictor.predict(
      point_coords=np.array([[100.0, 80.0], [30.0, 40.0]]), point_labels=np.array([1, 0]),
      multimask_output=True)
  check(out_masks.shape == (3, h, w) and out_masks.dtype == bool,
        f"point masks {out_masks.shape} {out_masks.dtype}")
  check(scores.shape == (3,) and np.isfinite(scores).all(), f"scores {scores}")
  s = samjax.tiny.low_res_mask_size
  check(low_res.shape == (3, s, s), f"low-res logits {low_res.shape}")
  box_masks, box_scores, _ = predictor.predict(box=np.array([20.0, 30.0, 200.0, 150.0]),
                                               mask_input=low_res[:1], multimask_output=False)
  check(box_masks.shape == (1, h, w), f"box masks {box_masks.shape}")
  # The .pth converted in memory gives the same answer as the Orbax checkpoint.
  from_pth = samjax.Predictor(pth)
  from_pth.set_image(image)
  again, _, _ = from_pth.predict(point_coords=np.array([[100.0, 80.0], [30.0, 40.0]]),
                                 point_labels=np.array([1, 0]), return_logits=True)
  ref, _, _ = predictor.predict(point_coords=np.array([[100.0, 80.0], [30.0, 40.0]]),
                                point_labels=np.array([1, 0]), return_logits=True)
  np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5)
  log(f"Predictor: point prompt -> {out_masks.shape}, scores {np.round(scores, 3)}; "
      f"box + mask prompt -> {box_masks.shape}; .pth and Orbax agree")
  # `encode_image` inside a user's own jit: "auto" attention is chosen per platform by
  # jax.lax.platform_dependent; it must be the embedding the Predictor computed.
  import jax
  _, params = samjax.load_params(ckpt)
  resized = samjax.ResizeLongestSide(samjax.tiny.image_size).apply_image(image)
  emb = jax.jit(lambda p, x: samjax.encode_image(p, x, samjax.tiny))(
      params, resized[None].astype(np.float32))
  np.testing.assert_allclose(np.asarray(emb), np.asarray(predictor.features),
                             rtol=1e-4, atol=1e-4)
  log(f"jit(encode_image) with per-platform attention == Predictor features {emb.shape}")
  return predictor, image


def automatic_masks(predictor, image) -> None:
  import samjax
  amg = samjax.AutomaticMaskGenerator(
      predictor, points_per_side=6, points_per_batch=16, pred_iou_thresh=0.0,
      stability_score_thresh=0.0, min_mask_region_area=20, output_mode="coco_rle")
  records = amg.generate(image)
  check(isinstance(records, list) and records, "AutomaticMaskGenerator produced no masks")
  keys = {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
          "stability_score", "crop_box"}
  check(keys <= set(records[0]), f"record keys {sorted(records[0])}")
  seg = records[0]["segmentation"]
  check(list(seg["size"]) == list(image.shape[:2]) and isinstance(seg["counts"], str),
        f"coco_rle segmentation {seg!r:.80}")
  log(f"AutomaticMaskGenerator.generate: {len(records)} masks (coco_rle, "
      f"min_mask_region_area=20)")


def pallas_tpu_kernel() -> None:
  """The Pallas TPU flash-attention kernel, in the TPU interpreter (runs on a CPU)."""
  try:
    attention_tpu = importlib.import_module("samjax.modeling.attention_tpu")
  except ImportError:
    log("no samjax.modeling.attention_tpu: Pallas kernel check skipped")
    return
  import jax.numpy as jnp
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 20, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 20, 2, 6)), jnp.float32)
  out = attention_tpu.flash_attention_tpu(q, q, v, interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(
      attention_tpu.reference_attention(q, q, v)), rtol=1e-4, atol=1e-5)
  log(f"Pallas TPU flash attention (interpret mode) matches the reference, {out.shape}")


def finetune(params, work: Path) -> None:
  import samjax
  from samjax import train as T
  from samjax.data.synthetic import write_coco_dataset
  train_json = write_coco_dataset(str(work / "train"), 4, seed=11)
  val_json = write_coco_dataset(str(work / "val"), 2, seed=12)
  tc = T.TrainConfig(train="decoder", lr=1e-3, warmup_steps=1, total_steps=2, batch_size=2,
                     instances_per_image=2, prompt_iters=1, eval_every=2, save_every=1,
                     keep_last=1, log_every=1, seed=3)
  train, val = T.CocoInstances(train_json), T.CocoInstances(val_json)
  out = work / "run"
  quiet = dict(val_data=val, progress=False, log_fn=lambda s: None)
  first = T.finetune(tc, samjax.tiny, params, train, out, max_steps_this_run=1, **quiet)
  check(first.step == 1 and not first.finished, f"first call: step {first.step}")
  run = T.finetune(tc, samjax.tiny, params, train, out, **quiet)  # resumes at step 1
  check(run.finished and run.step == 2, f"resumed run: step {run.step}")
  check([r["step"] for r in run.log["eval"]] == [0, 2], f"evals {run.log['eval']}")
  check(np.isfinite([r["loss"] for r in run.log["train"]]).all(), "non-finite loss")
  kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  check(kept[-1] == 2 and run.best_step in kept and len(kept) <= 2,
        f"checkpoints kept {kept}, best {run.best_step}")
  best_config, _ = samjax.load_params(run.best_dir)
  check(best_config == samjax.tiny, "best_dir config")
  log(f"finetune: 2 steps (stopped after 1, resumed), losses "
      f"{[round(r['loss'], 3) for r in run.log['train']]}, checkpoints kept {kept}, "
      f"best step {run.best_step} exported")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="keep outputs here (default: a temp dir)")
  parser.add_argument("--pins", help="pip pins file (`name==X` lines): check that exactly "
                      "these versions are installed")
  args = parser.parse_args()
  report_versions()
  if args.pins:
    check_pins(args.pins)
  with tempfile.TemporaryDirectory(prefix="samjax-floors-") as tmp:
    work = Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    config, params, pth = make_random_pth(work)
    ckpt = convert_and_reload(config, params, pth, work)
    predictor, image = predict(ckpt, pth)
    automatic_masks(predictor, image)
    pallas_tpu_kernel()
    finetune(params, work)
  log("OK")
  return 0


if __name__ == "__main__":
  sys.exit(main())
