"""Picture of the committed tiny model's masks on a fresh synthetic image.

  python benchmarks/demo_tiny.py [--out tests/fixtures/tiny_trained/demo.png] [--seed 777]

Three panels: ground truth, one point prompt per object (interior-most pixel, best of
the 3 multimask outputs, with the mask IoU to the ground truth), and the automatic
mask generator. Used for the README; needs no PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

import samjax
from samjax.data.synthetic import make_synthetic_image
from samjax.train import interior_point
from samjax.viz import overlay, overlay_anns

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_trained"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=str(FIXTURE / "demo.png"))
  ap.add_argument("--seed", type=int, default=777)
  args = ap.parse_args(argv)
  image, gt, _ = make_synthetic_image(np.random.default_rng(args.seed), size=256)
  pred = samjax.Predictor.from_checkpoint(FIXTURE)
  pred.set_image(image)
  masks, points, ious = [], [], []
  for m in gt:
    x, y = interior_point(m)
    out, scores, _ = pred.predict(np.array([[x, y]]), np.array([1]))
    best = out[int(np.argmax(scores))]
    masks.append(best)
    points.append((x, y))
    ious.append((best & m).sum() / max((best | m).sum(), 1))
  gen = samjax.AutomaticMaskGenerator(pred, points_per_side=16, pred_iou_thresh=0.5,
                                      stability_score_thresh=0.7)
  anns = gen.generate(image)
  panels = [overlay(image, np.stack(gt)),
            overlay(image, np.stack(masks), points=np.array(points),
                    labels=np.ones(len(points))),
            overlay_anns(image, anns)]
  titles = ["ground truth", f"1 point each: mIoU {np.mean(ious):.2f}", f"automatic: {len(anns)} masks"]
  rows = []
  for p, t in zip(panels, titles):
    p = cv2.resize(p, (384, 384), interpolation=cv2.INTER_NEAREST)
    bar = np.full((28, 384, 3), 255, np.uint8)
    cv2.putText(bar, t, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    rows.append(np.concatenate([bar, p], 0))
  pic = np.concatenate([np.concatenate([r, np.full((412, 6, 3), 255, np.uint8)], 1)
                        for r in rows], 1)
  cv2.imwrite(args.out, cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))
  print(f"wrote {args.out}: {titles}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
