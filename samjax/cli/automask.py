"""`samjax automask`: the bulk automatic-mask job (`samjax.bulk`) from the command line.

The generator's options are the fields of `samjax.amg.options.AmgOptions`, whose
defaults (the official `SamAutomaticMaskGenerator`'s) and help texts are the only
copy; `options_from_args` turns the parsed flags back into an `AmgOptions`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

from samjax.amg.options import AmgOptions
from samjax.cli._common import add_compute_arguments, load_model_from_args, \
    non_negative_int, positive_int
from samjax.io.images import DEFAULT_MAX_PIXELS

HELP = "automatic masks for many images (SA-1B style JSON)"
DESCRIPTION = (
    "Run the automatic mask generator over image files, folders (searched recursively) "
    "and list files, writing one SA-1B style JSON (COCO RLE masks) per image. Resumable: "
    "a rerun skips images whose output is complete. Broken images are listed in "
    "failures.jsonl and the job goes on (exit status 1 if any failed).")

# The job always writes COCO RLE, so the generator's output mode is not a flag.
_FIXED_OPTIONS = {"output_mode": "coco_rle"}


def _option_type(field) -> Callable[[str], Any]:
  """Parses one AmgOptions field's flag and checks it alone, at parse time."""
  kind = str(field.type)
  convert = float if "float" in kind else int

  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None
    try:
      AmgOptions(**{field.name: value})
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
    return value

  parse.__name__ = convert.__name__
  return parse


def _default_text(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def add_generator_arguments(group) -> None:
  """One flag per `AmgOptions.cli_fields()` field (`--points-per-side` ...)."""
  for field in AmgOptions.cli_fields():
    if field.name in _FIXED_OPTIONS:
      continue
    help_text = field.metadata["help"].replace("%", "%%")
    group.add_argument("--" + field.name.replace("_", "-"), type=_option_type(field),
                       default=field.default, metavar="X" if "float" in str(field.type) else "N",
                       help=f"{help_text} (default: {_default_text(field.default)})")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the `samjax automask` arguments to `parser`; returns it."""
  parser.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="image files, folders (searched recursively) or text files "
                           "listing one path per line")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output folder: one SA-1B style JSON per image")

  model = parser.add_argument_group("model")
  model.add_argument("--checkpoint", metavar="CKPT",
                     help="samjax Orbax dir or official .pth (default: the official "
                          "weights of --model, downloaded once and cached)")
  model.add_argument("--model", choices=("vit_b", "vit_l", "vit_h"), default="vit_h",
                     help="official weights to use without --checkpoint (default: "
                          "%(default)s)")
  add_compute_arguments(model)

  add_generator_arguments(parser.add_argument_group(
      "mask generator (as SamAutomaticMaskGenerator)"))

  job = parser.add_argument_group("job")
  job.add_argument("--overlays", action="store_true",
                   help="also write <name>.png mask overlays next to the JSON files")
  job.add_argument("--batch-size", type=positive_int, default=1,
                   help="images per generator call (default: %(default)s)")
  job.add_argument("--num-workers", type=positive_int, default=4,
                   help="image decoding threads (default: %(default)s)")
  job.add_argument("--prefetch", type=non_negative_int, default=2,
                   help="batches decoded ahead of the device (default: %(default)s)")
  job.add_argument("--max-pixels", type=non_negative_int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels fail, checked from the file header before "
                        "decoding (default: %(default)s; 0: no limit, which also lets "
                        "OpenCV try formats whose header samjax cannot read)")
  job.add_argument("--no-progress", action="store_true", help="no progress bar")
  job.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: reruns and other hosts sharing "
                        "it skip compilation (default: xla/ in samjax's cache folder, "
                        "$SAMJAX_CACHE or else $XDG_CACHE_HOME/samjax or ~/.cache/samjax; "
                        "'' disables)")

  dist = parser.add_argument_group("multi-process (one process per host)")
  dist.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first; each process then "
                         "handles its own shard of the inputs")
  dist.add_argument("--coordinator-address", metavar="HOST:PORT",
                    help="jax.distributed coordinator (default: auto-detected)")
  dist.add_argument("--num-processes", type=positive_int, help="number of processes")
  dist.add_argument("--process-id", type=non_negative_int, help="this process's id")
  return parser


def options_from_args(args: argparse.Namespace) -> AmgOptions:
  """The generator's `AmgOptions` from parsed arguments (output mode: COCO RLE).

  Raises:
    ValueError: options that are wrong together (each flag was checked alone).
  """
  return AmgOptions.from_namespace(args, **_FIXED_OPTIONS)


def _enable_compilation_cache(path: Optional[str]) -> None:
  """Persistent XLA cache: a restarted or second job skips recompiling (minutes on GPU)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from samjax.io.pretrained import cache_dir
  if path is None:
    path = str(cache_dir() / "xla")
  if not path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def make_generator(args: argparse.Namespace):
  """The `AutomaticMaskGenerator` the flags describe (compilation cache enabled first)."""
  from samjax.amg.generator import AutomaticMaskGenerator  # pylint: disable=import-outside-toplevel
  _enable_compilation_cache(args.compilation_cache)
  return AutomaticMaskGenerator(load_model_from_args(args), options=options_from_args(args))


def _maybe_initialize_distributed(args: argparse.Namespace) -> None:
  explicit = {"coordinator_address": args.coordinator_address,
              "num_processes": args.num_processes, "process_id": args.process_id}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if not args.distributed:
    if explicit:
      raise ValueError("--coordinator-address/--num-processes/--process-id need --distributed")
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(**explicit)


def run_automask(args: argparse.Namespace,
                 make_generator: Callable[[argparse.Namespace], Any] = make_generator,
                 overlay_fn=None):
  """Runs the bulk job from parsed `add_arguments` args.

  Args:
    args: parsed arguments.
    make_generator: args -> object with `generate_batch(list of images)`; called
      after `jax.distributed.initialize()` (with --distributed), so it may build
      device meshes. The default builds the `AutomaticMaskGenerator` of the flags.
    overlay_fn: overlay renderer; defaults to `samjax.viz.overlay_anns` when
      --overlays is given.

  Returns:
    The `samjax.bulk.JobSummary`; exit the program with `summary.exit_code`.
  """
  from samjax.bulk import run_job  # pylint: disable=import-outside-toplevel
  options_from_args(args)  # Wrong combinations fail before any heavy work.
  _maybe_initialize_distributed(args)
  generator = make_generator(args)
  return run_job(args.inputs, args.out, generator.generate_batch,
                 batch_size=args.batch_size, overlays=args.overlays, overlay_fn=overlay_fn,
                 num_workers=args.num_workers, prefetch=args.prefetch,
                 progress=not args.no_progress, max_pixels=args.max_pixels or None)


def run(args: argparse.Namespace) -> int:
  return run_automask(args).exit_code
