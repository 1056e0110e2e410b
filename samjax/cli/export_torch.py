"""`samjax export-torch CKPT OUT.pth`: samjax params -> an official PyTorch state dict."""

from __future__ import annotations

import argparse
import sys

HELP = "export a samjax checkpoint as an official .pth (needs torch)"
DESCRIPTION = (
    "Write a samjax Orbax checkpoint (or the best params of a finetune output folder) "
    "as an official-format SAM state dict, loadable with segment_anything's "
    "sam_model_registry (official model types) or samjax.reference.build_official.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Arguments of `samjax export-torch CKPT OUT.pth`."""
  parser.add_argument("checkpoint", metavar="CKPT",
                      help="samjax Orbax checkpoint directory (or a finetune output folder: "
                           "its best/ is exported)")
  parser.add_argument("output", metavar="OUT.pth", help="official-format state dict to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.pth")
  parser.add_argument("--verify", action="store_true",
                      help="load the file into the official PyTorch SAM (strict) afterwards")
  return parser


TORCH_MISSING = ("samjax export-torch writes .pth files with PyTorch, which is not "
                 "installed: pip install \"samjax[torch]\" (reading official .pth files, "
                 "e.g. samjax convert, needs no torch)")


def run(args: argparse.Namespace) -> int:
  """`samjax export-torch`: Orbax params -> official `.pth`; returns the exit status."""
  # pylint: disable=import-outside-toplevel
  try:
    import torch  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    print(f"samjax export-torch: error: {TORCH_MISSING}", file=sys.stderr)
    return 2
  from samjax.io.checkpoint import CheckpointError
  from samjax.train.export import export_torch, load_hint
  try:
    out, config = export_torch(args.checkpoint, args.output, overwrite=args.overwrite,
                               verify=args.verify)
  except FileExistsError as e:
    print(f"error: {e} (pass --overwrite)", file=sys.stderr)
    return 2
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out} ({config.name}; load with {load_hint(config)})"
        + (" - verified" if args.verify else ""), file=sys.stderr)
  return 0
