"""Bit-exactness record of samjax's fp32 outputs on CPU, for refactorings.

A refactoring of the code above the model ("not a number may move") is checked by
recording every public entry point's fp32 outputs before and after and comparing them
bit for bit:

    python -m benchmarks.bitexact record before.npz     # on the old code
    python -m benchmarks.bitexact record after.npz      # on the new code
    python -m benchmarks.bitexact compare before.npz after.npz

Entry points covered (tiny model: the committed trained fixture, and a model with
every tensor randomized so the windowed/padded and global encoder paths both matter):
`Predictor` (set_image, predict with points / box / mask input / multimask,
predict_batch, get_image_embedding), `SamModel` batched call, the functional
`encode_image` / `decode_masks` / `upscale_masks` under `jax.jit`, the
`AutomaticMaskGenerator` (defaults, and with a crop layer), and fine-tuning
(two steps of decoder-only and of whole-model training; the resulting parameters).
Only public APIs are used, so the script runs unchanged on both sides of a refactor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_trained"


def _flat(prefix: str, tree, out: Dict[str, np.ndarray]) -> None:
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in leaves:
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def _records(prefix: str, records, out: Dict[str, np.ndarray]) -> None:
  out[prefix + "/count"] = np.asarray(len(records))
  for i, r in enumerate(records):
    for k in ("segmentation", "bbox", "predicted_iou", "stability_score", "point_coords",
              "crop_box", "area"):
      out[f"{prefix}/{i}/{k}"] = np.asarray(r[k])


def record(path: str) -> Dict[str, np.ndarray]:
  import jax
  import jax.numpy as jnp
  jax.config.update("jax_default_matmul_precision", "highest")
  import samjax
  from samjax import reference
  from samjax.data.synthetic import make_synthetic_image, write_coco_dataset
  out: Dict[str, np.ndarray] = {}
  rng = np.random.default_rng(0)
  image, _ = make_synthetic_image(rng, (200, 310))[:2]
  image = np.asarray(image, np.uint8)

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    pth = tmp / "sam_tiny_random.pth"
    reference.save_random_checkpoint(samjax.tiny, pth, seed=1)
    for name, source in (("trained", str(FIXTURE)), ("random", str(pth))):
      p = samjax.Predictor.from_checkpoint(source)
      p.set_image(image)
      out[f"{name}/embedding"] = np.asarray(p.get_image_embedding())
      m, s, lg = p.predict(point_coords=np.array([[100.0, 80.0], [40.0, 150.0]]),
                           point_labels=np.array([1, 0]), multimask_output=True)
      out[f"{name}/points/masks"], out[f"{name}/points/scores"] = m, s
      out[f"{name}/points/logits"] = lg
      m, s, lg = p.predict(box=np.array([30, 20, 250, 180]), mask_input=lg[:1],
                           multimask_output=False)
      out[f"{name}/box/masks"], out[f"{name}/box/scores"], out[f"{name}/box/logits"] = m, s, lg
      coords = p.transform.apply_coords(np.array([[[60.0, 60.0]], [[200.0, 120.0]]]),
                                        image.shape[:2])
      m, s, lg = p.predict_batch(point_coords=coords, point_labels=np.ones((2, 1), np.int32))
      out[f"{name}/batch/masks"], out[f"{name}/batch/scores"] = np.asarray(m), np.asarray(s)
      out[f"{name}/batch/logits"] = np.asarray(lg)
      resized = p.transform.apply_image(image)
      res = p.model([{"image": resized.transpose(2, 0, 1), "original_size": image.shape[:2],
                      "boxes": p.transform.apply_boxes(np.array([[10, 10, 150, 120]]),
                                                       image.shape[:2])}], True)
      _flat(f"{name}/model", res, out)

      config, params = samjax.load_any(source)
      emb = jax.jit(lambda prm, x: samjax.encode_image(prm, x, config))(
          params, jnp.asarray(resized[None], jnp.float32))
      lr, iou = jax.jit(lambda prm, e, pt, lb: samjax.decode_masks(
          prm, e, pt, lb, config=config, multimask_output=True))(
              params, emb, jnp.asarray(coords, jnp.float32), jnp.ones((2, 1), jnp.int32))
      up = samjax.upscale_masks(lr, resized.shape[:2], image.shape[:2], config)
      out[f"{name}/functional/emb"], out[f"{name}/functional/low_res"] = emb, lr
      out[f"{name}/functional/iou"], out[f"{name}/functional/up"] = iou, up

      gen = samjax.AutomaticMaskGenerator(p, points_per_side=8, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0)
      _records(f"{name}/amg/grid8", gen.generate(image), out)
      gen = samjax.AutomaticMaskGenerator(p, points_per_side=6, crop_n_layers=1,
                                          pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                          output_mode="coco_rle")
      recs = gen.generate(image)
      for r in recs:
        r["segmentation"] = np.frombuffer(r["segmentation"]["counts"].encode(), np.uint8)
      _records(f"{name}/amg/crops", recs, out)
      _records(f"{name}/amg/defaults", samjax.AutomaticMaskGenerator(p).generate(image), out)

    from samjax import train as T
    train_json = write_coco_dataset(str(tmp / "train"), 4, seed=11)
    data = T.CocoInstances(train_json)
    config, params = samjax.load_params(FIXTURE)
    params = jax.tree_util.tree_map(np.asarray, params)
    for train in ("decoder", "all"):
      tc = T.TrainConfig(train=train, lr=1e-3, warmup_steps=1, total_steps=2, batch_size=2,
                         instances_per_image=2, prompt_iters=2, eval_every=0, save_every=2,
                         log_every=1, seed=3)
      res = T.finetune(tc, config, params, data, tmp / f"ft_{train}", progress=False,
                       log_fn=lambda s: None)
      _flat(f"finetune/{train}", res.params, out)
  np.savez_compressed(path, **out)
  return out


def compare(a_path: str, b_path: str) -> int:
  a, b = np.load(a_path), np.load(b_path)
  ka, kb = set(a.files), set(b.files)
  bad = sorted(ka ^ kb)
  for k in sorted(ka & kb):
    x, y = a[k], b[k]
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      bad.append(k)
  print(f"{len(ka & kb)} arrays compared, {len(bad)} differ"
        + ("".join(f"\n  {k}" for k in bad[:50])))
  return 1 if bad else 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("record", help="run every entry point and save its outputs")
  r.add_argument("out")
  c = sub.add_parser("compare", help="exit 1 unless two records are bit-identical")
  c.add_argument("a")
  c.add_argument("b")
  args = ap.parse_args(argv)
  if args.cmd == "record":
    out = record(args.out)
    print(f"{len(out)} arrays -> {args.out}")
    return 0
  return compare(args.a, args.b)


if __name__ == "__main__":
  sys.exit(main())
