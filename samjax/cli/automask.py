"""`samjax automask`: the bulk automatic-mask job (`samjax.bulk`) from the command line.

The generator's options are the fields of `samjax.amg.options.AmgOptions`, whose
defaults (the official `SamAutomaticMaskGenerator`'s) and help texts are the only
copy; `options_from_args` turns the parsed flags back into an `AmgOptions`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Union

from samjax.amg.options import AmgOptions
from samjax.cli import EXIT_EPILOG
from samjax.cli._common import add_compute_arguments, add_max_pixels_argument, \
    check_checkpoint_arg, check_writable_dir, load_model_from_args, non_negative_int, \
    positive_int
from samjax.io.images import DEFAULT_MAX_PIXELS

HELP = "automatic masks for many images (SA-1B style JSON)"
DESCRIPTION = (
    "Run the automatic mask generator over image files, folders (searched recursively, "
    "symlinked folders followed once) and list files, writing one SA-1B style JSON "
    "(COCO RLE masks) per image. The output folder and the inputs are checked before "
    "the model is loaded. Resumable: a rerun skips images whose output is complete. "
    "Broken images and unlistable folders are listed in failures.jsonl and the job goes "
    "on; an image that succeeds later leaves that list. Jobs started on the same --out "
    "split the images between them (each image is claimed first). Ctrl-C or SIGTERM "
    "finishes the images in flight, prints the summary and stops; a second one stops "
    "at once.")
EPILOG = EXIT_EPILOG

# Share of a device's memory the encoder may take with --batch-size auto: the rest is
# for the mask decoder's pipeline (which bounds its own share) and the runtime.
AUTO_MEMORY_FRACTION = 0.5

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
                      help="output folder: one SA-1B style JSON per image (created; must "
                           "not be an input folder or contain one)")

  model = parser.add_argument_group("model")
  model.add_argument("--checkpoint", metavar="CKPT",
                     help="samjax Orbax dir or official .pth (default: the official "
                          "weights of --model, downloaded once and cached)")
  model.add_argument("--model", choices=("vit_b", "vit_l", "vit_h"), default="vit_h",
                     help="official weights to use without --checkpoint (default: "
                          "%(default)s)")
  add_compute_arguments(model, auto_dtype=True)

  add_generator_arguments(parser.add_argument_group(
      "mask generator (as SamAutomaticMaskGenerator)"))

  job = parser.add_argument_group("job")
  job.add_argument("--overlays", action="store_true",
                   help="also write <name>.png mask overlays next to the JSON files")
  job.add_argument("--batch-size", type=batch_size_arg, default="auto", metavar="N|auto",
                   help="images per generator call. auto (the default): on GPUs and TPUs, "
                        "chosen once per job as the most crops per device, up to what the "
                        "generator puts in one device call, whose compiled encoder fits in "
                        "half of a device's memory (XLA's memory analysis), times the "
                        "number of devices; on CPUs, one image per device. The choice is "
                        "printed")
  job.add_argument("--num-workers", type=positive_int, default=4,
                   help="image decoding threads (default: %(default)s)")
  job.add_argument("--prefetch", type=non_negative_int, default=2,
                   help="batches decoded ahead of the device (default: %(default)s)")
  add_max_pixels_argument(job, DEFAULT_MAX_PIXELS)
  job.add_argument("--no-progress", action="store_true", help="no progress bar")
  job.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: reruns and other hosts sharing "
                        "it skip compilation (default: xla/ in samjax's cache folder, "
                        "$SAMJAX_CACHE or else $XDG_CACHE_HOME/samjax or ~/.cache/samjax; "
                        "'' disables); checked before the model loads")
  job.add_argument("--claim-timeout", type=positive_float, default=300.0, metavar="S",
                   help="a claim on an image by another job on the same --out that was "
                        "not refreshed for S seconds is taken over (a live job refreshes "
                        "its claims; a dead job's claims on this host are taken over at "
                        "once) (default: %(default)g)")

  dist = parser.add_argument_group("multi-process (one process per host)")
  dist.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first; each process then "
                         "handles its own shard of the inputs")
  dist.add_argument("--coordinator-address", metavar="HOST:PORT",
                    help="jax.distributed coordinator (default: auto-detected)")
  dist.add_argument("--num-processes", type=positive_int, help="number of processes")
  dist.add_argument("--process-id", type=non_negative_int, help="this process's id")
  return parser


def batch_size_arg(text: str) -> Union[int, str]:
  return "auto" if text == "auto" else positive_int(text)


def positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
  return value


def options_from_args(args: argparse.Namespace) -> AmgOptions:
  """The generator's `AmgOptions` from parsed arguments (output mode: COCO RLE).

  Raises:
    ValueError: options that are wrong together (each flag was checked alone).
  """
  return AmgOptions.from_namespace(args, **_FIXED_OPTIONS)


def _compilation_cache_path(path: Optional[str]) -> str:
  """--compilation-cache with its default filled in ("" when disabled)."""
  if path is None:
    from samjax.io.pretrained import cache_dir  # pylint: disable=import-outside-toplevel
    path = str(cache_dir() / "xla")
  return path


def check_compilation_cache(path: Optional[str]) -> None:
  """Fails (ValueError) unless the compilation cache folder can be written."""
  path = _compilation_cache_path(path)
  if path:
    check_writable_dir(path, "the compilation cache folder",
                       " (give --compilation-cache another folder, or '' for none)")


def _enable_compilation_cache(path: Optional[str]) -> None:
  """Persistent XLA cache: a restarted or second job skips recompiling (minutes on GPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  path = _compilation_cache_path(path)
  if not path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def make_generator(args: argparse.Namespace):
  """The `AutomaticMaskGenerator` the flags describe (compilation cache enabled first)."""
  from samjax.amg.generator import AutomaticMaskGenerator  # pylint: disable=import-outside-toplevel
  _enable_compilation_cache(args.compilation_cache)
  return AutomaticMaskGenerator(load_model_from_args(args, "automask"),
                                options=options_from_args(args))


def encode_memory_bytes(runtime, batch: int) -> Optional[int]:
  """Device memory of the compiled encoder for `batch` images (per device), from XLA's
  memory analysis; None where the backend gives none."""
  stats = runtime.lower_encode(batch).compile().memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes + stats.generated_code_size_in_bytes -
             stats.alias_size_in_bytes)


def auto_batch_size(generator, fraction: float = AUTO_MEMORY_FRACTION,
                    memory_bytes: Callable[[Any, int], Optional[int]] = encode_memory_bytes
                    ) -> tuple[int, str]:
  """(images per generator call, why) for --batch-size auto.

  On CPUs: one image per device (host RAM is shared with everything else, and a CPU
  gains nothing from larger device calls). On accelerators: the largest power of two
  of crops per device, up to the generator's `crops_per_device` (it never puts more
  in one device call), whose compiled encoder needs at most `fraction` of the
  device's memory (`samjax.runtime.mesh.device_memory_bytes`), times the devices.
  At most log2(crops_per_device) + 1 compilations, once per job.
  """
  runtime = getattr(generator, "runtime", None)
  if runtime is None:
    return 1, "the generator has no runtime to measure"
  n = runtime.num_devices
  if runtime.platform == "cpu":
    return n, f"one image per CPU device ({n})"
  from samjax.runtime.mesh import device_memory_bytes  # pylint: disable=import-outside-toplevel
  device = runtime.mesh.devices.flat[0]
  budget = fraction * device_memory_bytes(device)
  cap = max(1, int(getattr(generator, "crops_per_device", 1)))
  per_device = 1 << (cap.bit_length() - 1)
  while True:
    need = memory_bytes(runtime, per_device * n)
    if need is None or need <= budget or per_device == 1:
      break
    per_device //= 2
  gib = 2 ** 30
  if need is None:
    why = "the backend reports no memory analysis"
  else:
    why = (f"the encoder needs {need / gib:.2f} GiB per device of the {budget / gib:.2f} GiB "
           f"allowed ({fraction:.0%} of {device.device_kind})")
    if need > budget:
      why += "; even one crop per device exceeds that: expect out-of-memory errors"
  return per_device * n, f"{per_device} crop(s) per device x {n} device(s): {why}"


def resolve_batch_size(args: argparse.Namespace, generator) -> int:
  """--batch-size, with "auto" resolved once (and printed)."""
  if args.batch_size != "auto":
    return int(args.batch_size)
  batch, why = auto_batch_size(generator)
  print(f"samjax automask: batch size {batch} (--batch-size auto: {why})", file=sys.stderr)
  return batch


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
                 make_generator: Optional[Callable[[argparse.Namespace], Any]] = None,
                 overlay_fn=None):
  """Runs the bulk job from parsed `add_arguments` args.

  Everything that can fail without the model is checked first, in this order: the
  generator options, --checkpoint exists, the compilation cache folder (with the
  default `make_generator`), (--distributed: the cluster), the output folder and the
  inputs (`samjax.bulk.plan_job`). Then the model is loaded and --batch-size auto
  resolved.

  Args:
    args: parsed arguments.
    make_generator: args -> object with `generate_batch(list of images)`; called
      after `jax.distributed.initialize()` (with --distributed), so it may build
      device meshes. Default: this module's `make_generator` (the
      `AutomaticMaskGenerator` of the flags), looked up when called.
    overlay_fn: overlay renderer; defaults to `samjax.viz.overlay_anns` when
      --overlays is given.

  Returns:
    The `samjax.bulk.JobSummary`; exit the program with `summary.exit_code`.

  Raises:
    samjax.bulk.JobError, ValueError, FileNotFoundError: see above (exit status 2).
  """
  from samjax.bulk import plan_job, run_job  # pylint: disable=import-outside-toplevel
  options_from_args(args)  # Wrong combinations fail before any heavy work.
  check_checkpoint_arg(args)
  if make_generator is None:
    check_compilation_cache(args.compilation_cache)
    make_generator = globals()["make_generator"]
  _maybe_initialize_distributed(args)
  plan = plan_job(args.inputs, args.out)
  generator = make_generator(args)
  return run_job(args.inputs, args.out, generator.generate_batch,
                 batch_size=resolve_batch_size(args, generator), overlays=args.overlays,
                 overlay_fn=overlay_fn, num_workers=args.num_workers, prefetch=args.prefetch,
                 progress=not args.no_progress, max_pixels=args.max_pixels or None,
                 plan=plan, claim_timeout_s=args.claim_timeout)


def run(args: argparse.Namespace) -> int:
  summary = run_automask(args)
  if summary.interrupted:
    print(f"samjax automask: interrupted by {summary.interrupted}", file=sys.stderr)
  return summary.exit_code
