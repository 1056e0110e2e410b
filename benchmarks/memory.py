"""Peak memory under extreme settings: samjax vs the official code, same weights, inputs.

Each case runs in a fresh subprocess (so the peak belongs to that case alone) and
reports the peak resident set size (`ru_maxrss`) of that process, for samjax and for
the official `segment_anything` package on the same randomized official-architecture
model, the same image and the same settings. The model is the committed trained tiny model by default
(`tests/fixtures/tiny_trained`, exported to an official `.pth`; its masks mean something,
so crops keep masks as on real photos), `--model tiny` a randomized tiny model and
`--model vit_b` a randomized ViT-B.

Cases (the settings an adversarial review found memory that grew faster than the work):
  points   `predict` with many points in one prompt
  grid     `AutomaticMaskGenerator(points_per_side=N)`
  batch    `points_per_batch=100000` with a 4x4 grid
  crops    `crop_n_layers=2` on a 1200 x 1800 image
The generator cases run at `KEEP`'s lowered thresholds, so that masks are kept.

  python -m benchmarks.memory                      # all cases, tiny model
  python -m benchmarks.memory --cases crops --model vit_b --out mem.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# The generator cases keep masks (the official thresholds keep none of the tiny model's
# on a synthetic scene, and then nothing but the network's memory is measured): the
# thresholds of tests/test_official_layouts.py and bulk_throughput's "lowered".
KEEP = dict(pred_iou_thresh=0.1, stability_score_thresh=0.4)
CASES = {
    "points": dict(kind="predict", n_points=2000),
    "grid": dict(kind="amg", image=(400, 600), points_per_side=64, **KEEP),
    "batch": dict(kind="amg", image=(400, 600), points_per_side=4, points_per_batch=100000,
                  **KEEP),
    "crops": dict(kind="amg", image=(1200, 1800), points_per_side=8, crop_n_layers=2,
                  **KEEP),
}


def _child(side: str, case: str, model: str, pth: str) -> dict:
  """Runs one case in this process; returns peak RSS and a result summary."""
  import resource
  import numpy as np
  spec = dict(CASES[case])
  kind = spec.pop("kind")
  rng = np.random.default_rng(0)
  if kind == "predict":
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pts = rng.uniform(0, 480, (spec["n_points"], 2))
    labels = np.ones(len(pts), np.int64)
  else:
    h, w = spec.pop("image")
    from samjax.data.synthetic import make_synthetic_image
    image = np.asarray(make_synthetic_image(rng, (h, w))[0], np.uint8)
  if side == "samjax":
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import samjax
    pred = samjax.Predictor.from_checkpoint(pth)
    if kind == "predict":
      pred.set_image(image)
      out = pred.predict(point_coords=pts, point_labels=labels, multimask_output=False)
      summary = {"scores": np.asarray(out[1]).round(4).tolist()}
    else:
      recs = samjax.AutomaticMaskGenerator(pred, output_mode="coco_rle", **spec).generate(image)
      summary = {"masks": len(recs)}
  else:
    import torch
    from samjax import reference
    import samjax
    sam = reference.build_official(samjax.get_config("tiny" if model == "trained" else model))
    sam.load_state_dict(torch.load(pth, weights_only=True))
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    with torch.no_grad():
      if kind == "predict":
        p = SamPredictor(sam)
        p.set_image(image)
        out = p.predict(point_coords=pts, point_labels=labels, multimask_output=False)
        summary = {"scores": np.asarray(out[1]).round(4).tolist()}
      else:
        recs = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **spec).generate(image)
        summary = {"masks": len(recs)}
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"peak_rss_bytes": peak, **summary}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  ap.add_argument("--model", default="trained", choices=("trained", "tiny", "vit_b"))
  ap.add_argument("--out", help="write the results as JSON here")
  ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    side, case, model, pth = args._child  # pylint: disable=protected-access
    print(json.dumps(_child(side, case, model, pth)))
    return 0
  import samjax
  from samjax import reference
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    pth = os.path.join(tmp, f"sam_{args.model}.pth")
    if args.model == "trained":
      from samjax.io.checkpoint import save_torch_state_dict
      fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny_trained")
      config, params = samjax.load_params(fixture)
      save_torch_state_dict(params, config, pth)
    else:
      reference.save_random_checkpoint(samjax.get_config(args.model), pth, seed=0)
    for case in args.cases:
      row = {"case": case, "settings": CASES[case], "model": args.model}
      for side in ("samjax", "official"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--_child", side,
                               case, args.model, pth], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode:
          row[side] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        else:
          row[side] = json.loads(proc.stdout.strip().splitlines()[-1])
      rows.append(row)
      fmt = lambda r: (f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB" if "peak_rss_bytes" in r
                       else f"error: {r['error']}")
      print(f"{case:7s} samjax {fmt(row['samjax'])}   official {fmt(row['official'])}",
            flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
