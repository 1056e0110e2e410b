"""`samjax plan`: compile the bulk job for TPU chips ahead of time, without the chips.

A front end of `samjax.plan.plan`: the generator options are those of `samjax
automask` (one flag per `AmgOptions.cli_fields()` field, built by the same helper),
so a plan describes exactly the programs that command would compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Tuple, Union

from samjax.cli._common import attention_impl, positive_int
from samjax.cli.automask import add_generator_arguments, options_from_args
# samjax.plan imports jax only inside its functions: `--help` stays jax-free.
from samjax.plan import EXTRA_PROGRAMS, PROGRAMS

HELP = "compile the bulk job for TPU chips ahead of time: HBM, FLOPs, roofline (no TPU needed)"
DESCRIPTION = (
    "Compile, on this host, every device program of `samjax automask` for one image size "
    "(the data-parallel encoder, crop_stats and crop_masks for each crop bucket) and the "
    "interactive decoder (1 and 64 prompts), for a TPU topology described by "
    "jax.experimental.topologies (needs libtpu, not a TPU) or for this machine's own "
    "devices. Reports per program and device the HBM it needs against the chip's "
    "capacity, FLOPs and bytes per image, the roofline bound from the chip's published "
    "peak rates, and compile times. These are compile-time figures from XLA, not timings "
    "on a chip.")
_EXITS = (
    (0, "every program compiles and fits (with the --margin of HBM to spare)"),
    (1, "some program does not fit or does not compile (one line on stderr says which)"),
    (2, "usage or setup error: bad arguments, unknown target, no TPU compiler"),
    (130, "interrupted by SIGINT (Ctrl-C)"),
)
EPILOG = "exit status:\n" + "\n".join(
    textwrap.fill(text, width=78, initial_indent=f"  {code:<4d} ", subsequent_indent=" " * 7)
    for code, text in _EXITS)

EXIT_DOES_NOT_FIT = 1
MODELS = ("vit_b", "vit_l", "vit_h", "tiny")


def batch_size_arg(text: str) -> Union[int, str]:
  return "auto" if text == "auto" else positive_int(text)


def image_size_arg(text: str) -> Tuple[int, int]:
  """"HxW" (or one number for a square) in original pixels."""
  parts = text.lower().split("x")
  try:
    hw = tuple(int(p) for p in parts)
  except ValueError:
    hw = ()
  if len(hw) == 1:
    hw = hw * 2
  if len(hw) != 2 or min(hw) < 1:
    raise argparse.ArgumentTypeError(f"wants HxW in pixels (e.g. 1024x768), got {text!r}")
  return hw


def margin_arg(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"wants a fraction, got {text!r}") from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
  return value


def programs_arg(text: str) -> Tuple[str, ...]:
  names = tuple(p.strip() for p in text.split(",") if p.strip())
  bad = [p for p in names if p not in PROGRAMS + EXTRA_PROGRAMS]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"wants a comma list of "
                                     f"{', '.join(PROGRAMS + EXTRA_PROGRAMS)}, "
                                     f"got {text!r}")
  return names


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the `samjax plan` arguments to `parser`; returns it."""
  parser.add_argument("--target", required=True, metavar="TOPOLOGY|local",
                      help="a TPU topology, GEN:SHAPE with GEN v4, v5e, v5p or v6e (e.g. "
                           "v5e:1x1 for one chip, v5e:2x4, v6e:2x2, v4:2x2x1, v5p:2x2x1; one "
                           "host's chips are planned, as the job runs per host), or 'local' "
                           "for this process's devices (accelerators, else the CPU with its "
                           "RAM as the capacity)")
  model = parser.add_argument_group("model")
  model.add_argument("--model", choices=MODELS, default="vit_h",
                     help="model config (default: %(default)s)")
  model.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                     help="compute dtype; parameters stay float32 (default: %(default)s)")
  model.add_argument("--attention", type=attention_impl, default="auto", metavar="IMPL",
                     help="attention kernels of the image encoder, as for `samjax automask` "
                          "(default: auto, the platform's default kernels)")
  add_generator_arguments(parser.add_argument_group(
      "mask generator (as samjax automask)"))
  job = parser.add_argument_group("job")
  job.add_argument("--batch-size", type=batch_size_arg, default=8, metavar="N|auto",
                   help="images per step, split over the devices; auto: the largest encoder "
                        "batch that fits, found by compiling (default: %(default)s)")
  job.add_argument("--image-size", type=image_size_arg, default=(1024, 1024), metavar="HxW",
                   help="size of the job's images in pixels (default: 1024x1024)")
  job.add_argument("--margin", type=margin_arg, default=0.1, metavar="F",
                   help="fraction of HBM a program must leave free to count as fitting "
                        "(default: %(default)g)")
  job.add_argument("--crops-per-device", type=positive_int, default=None, metavar="N",
                   help="most crops the generator puts on a device per call (its "
                        "crops_per_device attribute; default: its own, 4 on accelerators)")
  job.add_argument("--max-batch", action="store_true",
                   help="also find the largest encoder batch that fits (a few more compiles)")
  job.add_argument("--programs", type=programs_arg, default=PROGRAMS, metavar="LIST",
                   help=f"which programs to compile (default: {','.join(PROGRAMS)}; "
                        f"also: {','.join(EXTRA_PROGRAMS)}, the fine-tuning step)")
  job.add_argument("--save", default=None, metavar="DIR",
                   help="write the compiled programs to this persistent compilation cache "
                        "folder; `samjax automask --compilation-cache DIR` then starts "
                        "without compiling them (tested with --target local on CPU). For "
                        "a TPU target the entries are written here but only a TPU host can "
                        "load them, and only with the same jax/libtpu builds, flags, "
                        "settings and chips; unverified without a TPU (see samjax.plan)")
  out = parser.add_argument_group("output")
  out.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (for scripts)")
  out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  return parser


def run(args: argparse.Namespace) -> int:
  """Runs the plan; prints the report; 0 if everything fits, 1 if not (see EPILOG)."""
  from samjax import plan as plan_lib  # pylint: disable=import-outside-toplevel
  options = options_from_args(args)
  progress = None if args.quiet else (
      lambda line: print(f"samjax plan: {line}", file=sys.stderr, flush=True))
  report = plan_lib.plan(args.target, model=args.model, dtype=args.dtype,
                         batch_size=args.batch_size, options=options,
                         attention=args.attention, image_hw=args.image_size,
                         margin=args.margin, find_max_batch=args.max_batch,
                         programs=args.programs, crops_per_device=args.crops_per_device,
                         save_dir=args.save, progress=progress)
  if args.json:
    print(json.dumps(report.to_dict(), indent=1))
  else:
    print(report.format())
  failures = report.failures()
  if failures:
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    print(f"samjax plan: {failures[0]}{more}", file=sys.stderr)
    return EXIT_DOES_NOT_FIT
  return 0
