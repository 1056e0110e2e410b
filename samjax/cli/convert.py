"""`samjax convert`: an official SAM .pth -> a samjax Orbax checkpoint directory."""

from __future__ import annotations

import argparse

from samjax.config import CONFIGS

HELP = "convert an official SAM .pth into a samjax Orbax checkpoint"
DESCRIPTION = (
    "Convert an official SAM PyTorch checkpoint (sam_vit_h_4b8939.pth, "
    "sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth) into a samjax Orbax checkpoint "
    "directory. The model type is detected from the tensor shapes. torch is not needed: "
    "the file is read by samjax's own allow-list reader (samjax.io.torchfile), which "
    "refuses a pickle that would run code when loaded.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("src", help="official .pth state dict")
  parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  parser.add_argument("--model-type", choices=sorted(CONFIGS),
                      help="check the checkpoint is this type (default: detect)")
  parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  return parser


def run(args: argparse.Namespace) -> int:
  from samjax.io.checkpoint import convert_checkpoint  # pylint: disable=import-outside-toplevel
  cfg = convert_checkpoint(args.src, args.dst, model_type=args.model_type,
                           overwrite=args.overwrite)
  print(f"converted {args.src} ({cfg.name}) -> {args.dst}")
  return 0
