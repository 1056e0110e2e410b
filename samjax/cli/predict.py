"""`samjax predict`: masks for point and box prompts on one image, drawn as a picture."""

from __future__ import annotations

import argparse
import os

from samjax.cli._common import add_compute_arguments, add_max_pixels_argument, \
    check_checkpoint_arg, check_output_file, load_model_from_args
from samjax.io.images import DEFAULT_MAX_PIXELS

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
  add_compute_arguments(model, auto_dtype=True)
  add_max_pixels_argument(parser, DEFAULT_MAX_PIXELS)
  parser.add_argument("--point", action="append", type=_parse_point, default=[],
                      help="X,Y[,LABEL] in image pixels; label 1 foreground (default) or 0")
  parser.add_argument("--box", type=_parse_box, help="X0,Y0,X1,Y1 in image pixels")
  parser.add_argument("--multimask", action="store_true",
                      help="3 candidate masks (best is drawn)")
  parser.add_argument("--out", required=True,
                      help="overlay picture to write; its extension picks the format "
                           "(.png, .jpg, .webp, .tif, ... as OpenCV writes them)")
  parser.add_argument("--masks-out", metavar="FILE",
                      help="also save masks, scores and low-res logits to FILE, an .npz "
                           "archive (written under exactly that name)")
  return parser


# Used where cv2.haveImageWriter is missing (OpenCV < 3.4).
_WRITABLE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff",
                        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".ras", ".sr")


def check_outputs(args: argparse.Namespace) -> None:
  """--out and --masks-out can be written, checked before the model runs.

  Raises:
    ValueError: a folder, a parent that is a file or not writable, an extension
      OpenCV cannot write, or both flags naming the same file.
  """
  import cv2  # pylint: disable=import-outside-toplevel
  out = check_output_file(args.out, "--out", "picture")
  ext = os.path.splitext(out)[1].lower()
  have = getattr(cv2, "haveImageWriter", None)
  writable = have(out) if have is not None else ext in _WRITABLE_EXTENSIONS
  if not ext or not writable:
    raise ValueError(f"--out {args.out}: OpenCV cannot write pictures with extension "
                     f"{ext or '(none)'!r}; use .png or .jpg")
  if args.masks_out:
    masks = check_output_file(args.masks_out, "--masks-out")
    if masks == out:
      raise ValueError("--out and --masks-out name the same file")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import cv2
  import numpy as np
  from samjax.io.files import atomic_open, atomic_write
  from samjax.io.images import BadImageError, load_image
  from samjax.predictor import Predictor
  from samjax.viz import overlay
  check_outputs(args)
  check_checkpoint_arg(args)
  try:
    image = load_image(args.image, max_pixels=args.max_pixels or None)
  except BadImageError as e:
    raise ValueError(f"cannot read image {args.image}: {e}") from None
  pred = Predictor(load_model_from_args(args, "predict"))
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
    # Through a file object: np.savez would append ".npz" to a name without it.
    with atomic_open(args.masks_out) as f:
      np.savez_compressed(f, masks=masks, scores=scores, low_res_logits=logits)
  wrote = args.out + (f" and {args.masks_out}" if args.masks_out else "")
  print(f"{len(scores)} mask(s), scores {np.round(scores, 3).tolist()}; wrote {wrote}")
  return 0
