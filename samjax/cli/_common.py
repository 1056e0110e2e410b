"""Argument types and model options shared by the commands that run the model."""

from __future__ import annotations

import argparse
import re

# "auto", a kernel name, or "WINDOWED/GLOBAL". The names themselves are checked when
# the model is built (samjax.modeling.attention.KERNELS), so this parser does not
# import jax; the help names a few (tests check they exist).
ATTENTION_EXAMPLES = ("einsum", "xla", "cudnn", "fold", "fold_mla")
_ATTENTION_RE = re.compile(r"^[a-z][a-z0-9_]*(/[a-z][a-z0-9_]*)?$")


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def attention_impl(text: str) -> str:
  if not _ATTENTION_RE.match(text):
    raise argparse.ArgumentTypeError(
        f"wants a kernel name or WINDOWED/GLOBAL (e.g. fold/fold_mla), got {text!r}")
  return text


def add_compute_arguments(group) -> None:
  """--dtype and --attention: how the model computes (not which model)."""
  group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype; parameters stay float32 (default: %(default)s)")
  group.add_argument("--attention", type=attention_impl, default=None, metavar="IMPL",
                     help="attention kernels of the image encoder: 'auto' (the fastest "
                          "that runs on this device and dtype), one kernel for every block "
                          f"({', '.join(ATTENTION_EXAMPLES)}, ...), or WINDOWED/GLOBAL, one "
                          "for the windowed blocks and one for the global ones (e.g. "
                          "fold/fold_mla); all compute the same function. The kernels are "
                          "listed in samjax.modeling.attention.KERNELS (default: "
                          "$SAMJAX_ATTENTION_IMPL if set, else auto)")


def load_model_from_args(args: argparse.Namespace):
  """The SamModel named by --checkpoint / --model, computing as --dtype / --attention.

  Without --checkpoint, the official weights of --model (default vit_h) are downloaded
  once and cached.
  """
  from samjax.predictor import load_model  # pylint: disable=import-outside-toplevel
  return load_model(checkpoint=args.checkpoint,
                    model_type=None if args.checkpoint else (args.model or "vit_h"),
                    dtype=args.dtype, attention=args.attention)
