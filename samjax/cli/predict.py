"""`samjax predict`: masks for point and box prompts on one image, drawn as a picture."""

from __future__ import annotations

import argparse

from samjax.cli._common import add_compute_arguments, load_model_from_args

HELP = "masks for point/box prompts on one image, as a picture"
DESCRIPTION = ("Segment one image from point and box prompts (coordinates in pixels of the "
               "image) and write the best mask over it as a picture.")


def _parse_point(text: str):
  parts = text.split(",")
  if len(parts) not in (2, 3):
    raise argparse.ArgumentTypeError(f"--point wants X,Y or X,Y,LABEL, got {text!r}")
  try:
    x, y = float(parts[0]), float(parts[1])
    label = int(parts[2]) if len(parts) == 3 else 1
  except ValueError:
    raise argparse.ArgumentTypeError(f"--point wants numbers, got {text!r}") from None
  if label not in (0, 1):
    raise argparse.ArgumentTypeError(f"point label must be 1 (foreground) or 0, got {label}")
  return x, y, label


def _parse_box(text: str):
  try:
    v = [float(t) for t in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--box wants X0,Y0,X1,Y1 numbers, got {text!r}") from None
  if len(v) != 4:
    raise argparse.ArgumentTypeError(f"--box wants 4 numbers X0,Y0,X1,Y1, got {text!r}")
  return v


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("image", help="input image file")
  model = parser.add_argument_group("model")
  which = model.add_mutually_exclusive_group()
  which.add_argument("--checkpoint", help="samjax Orbax dir or official .pth")
  which.add_argument("--model", choices=["vit_b", "vit_l", "vit_h"], default=None,
                     help="official weights, downloaded once and cached (default vit_h)")
  add_compute_arguments(model)
  parser.add_argument("--point", action="append", type=_parse_point, default=[],
                      help="X,Y[,LABEL] in image pixels; label 1 foreground (default) or 0")
  parser.add_argument("--box", type=_parse_box, help="X0,Y0,X1,Y1 in image pixels")
  parser.add_argument("--multimask", action="store_true",
                      help="3 candidate masks (best is drawn)")
  parser.add_argument("--out", required=True, help="overlay picture to write (.png/.jpg)")
  parser.add_argument("--masks-out", help="also save masks, scores and logits to this .npz")
  return parser


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import os

  import cv2
  import numpy as np
  from samjax.io.files import atomic_open, atomic_write
  from samjax.io.images import BadImageError, load_image
  from samjax.predictor import Predictor
  from samjax.viz import overlay
  try:
    image = load_image(args.image)
  except BadImageError as e:
    raise ValueError(f"cannot read image {args.image}: {e}") from None
  pred = Predictor(load_model_from_args(args))
  pred.set_image(image)
  coords = labels = None
  if args.point:
    coords = np.array([[x, y] for x, y, _ in args.point])
    labels = np.array([lab for _, _, lab in args.point])
  box = np.array(args.box) if args.box else None
  masks, scores, logits = pred.predict(coords, labels, box, multimask_output=args.multimask)
  best = int(np.argmax(scores))
  pic = overlay(image, masks[best:best + 1], points=coords, labels=labels,
                boxes=None if box is None else box[None])
  ext = os.path.splitext(args.out)[1]
  try:
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))
  except cv2.error:
    ok = False
  if not ok:
    raise ValueError(f"could not write {args.out}: no image format for extension {ext!r}")
  atomic_write(args.out, encoded.tobytes())
  if args.masks_out:
    # np.savez would add the extension to a file name that lacks it; keep that.
    npz = args.masks_out if args.masks_out.endswith(".npz") else args.masks_out + ".npz"
    with atomic_open(npz) as f:
      np.savez_compressed(f, masks=masks, scores=scores, low_res_logits=logits)
  print(f"{len(scores)} mask(s), scores {np.round(scores, 3).tolist()}; wrote {args.out}")
  return 0
