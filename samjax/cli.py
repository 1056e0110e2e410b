"""`samjax` command line: convert, predict, automask, finetune, export-torch.

Heavy modules are imported inside each command so `samjax --help` is instant and
`samjax convert` is the only command that needs torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_USAGE = 2


def _add_convert(sub):
  p = sub.add_parser("convert", help="convert an official SAM .pth into a samjax Orbax checkpoint",
                     description="Convert an official SAM PyTorch checkpoint "
                     "(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth) into "
                     "a samjax Orbax checkpoint directory. The model type is detected from the "
                     "tensor shapes. The file is read with torch.load(weights_only=True).")
  p.add_argument("src", help="official .pth state dict")
  p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  p.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                 help="check the checkpoint is this type (default: detect)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
  from samjax.checkpoint import convert_checkpoint
  cfg = convert_checkpoint(args.src, args.dst, model_type=args.model_type,
                           overwrite=args.overwrite)
  print(f"converted {args.src} ({cfg.name}) -> {args.dst}")
  return 0


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


def _add_model_args(p):
  g = p.add_mutually_exclusive_group()
  g.add_argument("--checkpoint", help="samjax Orbax dir or official .pth")
  g.add_argument("--model", choices=["vit_b", "vit_l", "vit_h"], default=None,
                 help="official weights, downloaded once and cached (default vit_h)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="compute dtype (params stay float32)")


def _add_predict(sub):
  p = sub.add_parser("predict", help="masks for point/box prompts on one image, as a picture")
  p.add_argument("image", help="input image file")
  _add_model_args(p)
  p.add_argument("--point", action="append", type=_parse_point, default=[],
                 help="X,Y[,LABEL] in image pixels; label 1 foreground (default) or 0")
  p.add_argument("--box", type=_parse_box, help="X0,Y0,X1,Y1 in image pixels")
  p.add_argument("--multimask", action="store_true", help="3 candidate masks (best is drawn)")
  p.add_argument("--out", required=True, help="overlay picture to write (.png/.jpg)")
  p.add_argument("--masks-out", help="also save masks, scores and logits to this .npz")
  p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
  import cv2
  import jax.numpy as jnp
  import numpy as np
  from samjax.bulk import BadImageError, load_image
  from samjax.predictor import Predictor
  from samjax.viz import overlay
  try:
    image = load_image(args.image)
  except BadImageError as e:
    raise ValueError(f"cannot read image {args.image}: {e}") from None
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  if args.checkpoint:
    pred = Predictor.from_checkpoint(args.checkpoint, dtype=dtype)
  else:
    pred = Predictor.from_pretrained(args.model or "vit_h", dtype=dtype)
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
  if not cv2.imwrite(args.out, cv2.cvtColor(pic, cv2.COLOR_RGB2BGR)):
    raise ValueError(f"could not write {args.out} (unknown extension or unwritable folder?)")
  if args.masks_out:
    np.savez_compressed(args.masks_out, masks=masks, scores=scores, low_res_logits=logits)
  print(f"{len(scores)} mask(s), scores {np.round(scores, 3).tolist()}; wrote {args.out}")
  return 0


def _add_automask(sub):
  from samjax import bulk
  from samjax.pretrained import cache_dir
  p = sub.add_parser("automask", help="automatic masks for many images (SA-1B style JSON)")
  bulk.add_automask_arguments(p)
  p.add_argument("--compilation-cache", default=str(cache_dir() / "xla"),
                 help="persistent XLA compilation cache directory ('' disables); reruns and "
                 "other hosts sharing it skip compilation")
  p.set_defaults(func=_run_automask)


def _enable_compilation_cache(path: Optional[str]) -> None:
  """Persistent XLA cache: a restarted or second job skips recompiling (minutes on GPU)."""
  if not path:
    return
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _make_generator(args):
  import jax.numpy as jnp
  from samjax import bulk
  _enable_compilation_cache(args.compilation_cache)
  from samjax.automatic import AutomaticMaskGenerator
  from samjax.predictor import load_model
  dtype = jnp.bfloat16 if getattr(args, "dtype", "float32") == "bfloat16" else jnp.float32
  model = load_model(checkpoint=args.checkpoint, model_type=None if args.checkpoint else args.model,
                     dtype=dtype)
  kw = bulk.generator_kwargs_from_args(args)
  kw["output_mode"] = "coco_rle"
  return AutomaticMaskGenerator(model, **kw)


def _run_automask(args) -> int:
  from samjax import bulk
  summary = bulk.run_automask(args, _make_generator)
  return summary.exit_code


def _add_train(sub):
  from samjax import train
  p = sub.add_parser("finetune", help="fine-tune SAM on COCO-format instance masks")
  train.add_finetune_arguments(p)
  p.set_defaults(func=train.run_finetune)
  q = sub.add_parser("export-torch", help="export a samjax checkpoint as an official .pth")
  train.add_export_torch_arguments(q)
  q.set_defaults(func=train.run_export_torch)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="samjax", description="Segment Anything in JAX.")
  from samjax import __version__
  parser.add_argument("--version", action="version", version=f"samjax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_convert(sub)
  _add_predict(sub)
  _add_automask(sub)
  try:
    _add_train(sub)
  except ImportError:  # training module missing in a trimmed install
    pass
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  from samjax.checkpoint import CheckpointError
  try:
    return int(args.func(args) or 0)
  except (CheckpointError, ValueError, FileNotFoundError, FileExistsError,
          RuntimeError) as e:
    print(f"samjax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
