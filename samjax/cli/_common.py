"""Argument types, model options and output checks shared by the commands."""

from __future__ import annotations

import argparse
import os
import re
import sys

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


def add_compute_arguments(group, auto_dtype: bool = False) -> None:
  """--dtype and --attention: how the model computes (not which model).

  With `auto_dtype` (inference commands), --dtype defaults to "auto": bfloat16 on
  TPUs and GPUs, float32 on CPUs (`resolve_dtype`).
  """
  if auto_dtype:
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="compute dtype; parameters stay float32 (default: auto, "
                            "bfloat16 on TPUs and GPUs, float32 on CPUs; the choice is "
                            "printed)")
  else:
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


def add_max_pixels_argument(group, default: int) -> None:
  group.add_argument("--max-pixels", type=non_negative_int, default=default,
                     help="images with more pixels fail, checked from the file header before "
                          "decoding; the format is read from the content, whatever the "
                          "extension says (default: %(default)s; 0: no limit, which also lets "
                          "OpenCV try formats whose header samjax cannot read)")


def resolve_dtype(name: str, command: str, verbose: bool = True) -> str:
  """--dtype: "auto" becomes bfloat16 on TPUs and GPUs and float32 on CPUs (printed
  when `verbose`).

  Call it once the devices are known (after `jax.distributed.initialize()`).
  """
  if name != "auto":
    return name
  import jax  # pylint: disable=import-outside-toplevel
  platform = jax.devices()[0].platform.lower()
  dtype = "float32" if platform == "cpu" else "bfloat16"
  if verbose:
    print(f"samjax {command}: computing in {dtype} (--dtype auto on {platform})",
          file=sys.stderr)
  return dtype


def check_checkpoint_arg(args: argparse.Namespace) -> None:
  """A --checkpoint that does not exist fails before anything else is done."""
  ckpt = getattr(args, "checkpoint", None)
  if ckpt and not os.path.exists(ckpt):
    raise FileNotFoundError(f"--checkpoint {ckpt} does not exist")


def load_model_from_args(args: argparse.Namespace, command: str = "predict"):
  """The SamModel named by --checkpoint / --model, computing as --dtype / --attention.

  Without --checkpoint, the official weights of --model (default vit_h) are downloaded
  once and cached. --dtype auto is resolved here (and written back to `args.dtype`).
  """
  from samjax.predictor import load_model  # pylint: disable=import-outside-toplevel
  args.dtype = resolve_dtype(args.dtype, command)
  return load_model(checkpoint=args.checkpoint,
                    model_type=None if args.checkpoint else (args.model or "vit_h"),
                    dtype=args.dtype, attention=args.attention)


def check_output_file(path: str, flag: str, what: str = "file") -> str:
  """Fails unless `path` can become a file: not a folder, parent a folder (or creatable).

  Returns:
    The absolute path.

  Raises:
    ValueError: with a message naming `flag`.
  """
  if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
    raise ValueError(f"{flag} {path}: is a folder; name the {what} to write")
  full = os.path.abspath(path)
  parent = os.path.dirname(full)
  existing = parent
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path}: no permission to write in {existing}")
  return full


def check_writable_dir(path: str, what: str, hint: str = "") -> None:
  """Creates folder `path` if needed and checks a file can be written there.

  Raises:
    ValueError: "cannot use {what} {path}: <reason>{hint}".
  """
  from samjax.io import files  # pylint: disable=import-outside-toplevel
  probe = os.path.join(path, f".samjax-write-test.{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    files.atomic_write(probe, b"ok\n")
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"cannot use {what} {path}: {e.strerror or e}{hint}") from None
