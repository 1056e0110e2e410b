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
    positive_int, resolve_dtype
from samjax.io.images import DEFAULT_MAX_PIXELS

HELP = "automatic masks for many images (SA-1B style JSON, or amg.py's files)"
DESCRIPTION = (
    "Run the automatic mask generator over image files, folders (searched recursively, "
    "symlinked folders followed once) and list files, writing per image one SA-1B style "
    "JSON (COCO RLE masks) or the files of the official scripts/amg.py "
    "(--output-format). The output folder and the inputs are checked before "
    "the model is loaded. The job manifest OUT/samjax_job.json records the model, "
    "checkpoint SHA-256, dtype and generator settings (each SA-1B JSON carries them too). "
    "Resumable: a rerun with the same settings skips images whose output is complete; one "
    "with other settings stops before loading the model, naming what differs "
    "(--overwrite recomputes). "
    "Broken images and unlistable folders are listed in failures.jsonl and the job goes "
    "on; an image that succeeds later leaves that list. Jobs started on the same local "
    "--out split the images between them (each image is claimed first). Inputs and --out "
    "may be URLs (s3://, gs://, any fsspec protocol; credentials and endpoints from the "
    "store's usual environment, e.g. AWS_ENDPOINT_URL): outputs are whole-object uploads, "
    "there are no claims, so start one job per URL --out. Ctrl-C or SIGTERM "
    "finishes the images in flight, prints the summary and stops; a second one stops "
    "at once.")
EPILOG = EXIT_EPILOG

# Share of a device's memory the encoder may take with --batch-size auto: the rest is
# for the mask decoder's pipeline (which bounds its own share) and the runtime.
AUTO_MEMORY_FRACTION = 0.5

# `samjax.bulk.layouts.FORMATS`, here so that --help imports no bulk code (tested equal).
OUTPUT_FORMATS = ("sa1b", "amg-json", "amg-png")

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
                           "listing one path per line; each may be a local path or a URL "
                           "(s3://bucket/prefix, gs://..., any fsspec protocol; a list "
                           "file may list URLs)")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output folder or URL (s3://bucket/prefix, ...): one output per "
                           "image, see --output-format (created; must not be an input "
                           "folder or contain one)")
  parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default=OUTPUT_FORMATS[0],
                      help="sa1b (the default): one SA-1B style JSON per image, named by its "
                           "path with the extension (sub/cat.jpg -> sub/cat.jpg.json). "
                           "amg-json: the official scripts/amg.py --convert-to-rle output, "
                           "<stem>.json, a list of the generator's records with COCO RLE "
                           "masks. amg-png: amg.py's default output, a folder <stem>/ of "
                           "<i>.png masks and metadata.csv. The amg names are the official "
                           "ones for a flat folder; subfolders are kept (amg.py flattens "
                           "them), and images whose names would collide (cat.jpg and cat.png) "
                           "keep their extension (cat.jpg.json, cat.png.json)")

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
                   help="also write <name>.png mask overlays next to the outputs (for "
                        "amg-png: next to each image's folder)")
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
  job.add_argument("--quiet", action="store_true",
                   help="print only errors (the exit status says how the job ended)")
  job.add_argument("--overwrite", action="store_true",
                   help="recompute every image, valid outputs included, and rewrite the "
                        "job manifest (samjax_job.json). Without it, a rerun with the same "
                        "model, checkpoint, dtype, generator settings and output format "
                        "resumes, and one with any of them changed stops before loading "
                        "the model, naming what differs")
  job.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: reruns and other hosts sharing "
                        "it skip compilation (default: xla/ in samjax's cache folder, "
                        "$SAMJAX_CACHE or else $XDG_CACHE_HOME/samjax or ~/.cache/samjax; "
                        "'' disables); checked before the model loads")
  job.add_argument("--claim-timeout", type=positive_float, default=300.0, metavar="S",
                   help="a claim on an image by another job on the same local --out (no "
                        "claims at URLs) that was "
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
  """--batch-size, with "auto" resolved once (and printed unless --quiet)."""
  if args.batch_size != "auto":
    return int(args.batch_size)
  batch, why = auto_batch_size(generator)
  if not getattr(args, "quiet", False):
    print(f"samjax automask: batch size {batch} (--batch-size auto: {why})", file=sys.stderr)
  return batch


def _say(args: argparse.Namespace, text: str) -> None:
  if not getattr(args, "quiet", False):
    print(f"samjax automask: {text}", file=sys.stderr)


def _attention_text(generator) -> Optional[str]:
  """The generator's resolved encoder kernels as "WINDOWED/GLOBAL" (None: unknown)."""
  attention = getattr(getattr(generator, "runtime", None), "attention", None)
  if attention is None:
    return None
  return f"{attention.window}/{attention.global_attn}"


def _checkpoint_text(ckpt: dict) -> str:
  """--checkpoint as the start lines show it: path, format and digest."""
  sha = ckpt.get("sha256")
  of = {"file": "of the file", "source": "of the .pth it was converted from",
        "official": "official, verified on download"}.get(ckpt.get("sha256_of"), "")
  parts = [f"sha256 {sha[:12]}... ({of})" if sha else None,
           f"params sha256 {ckpt['params_sha256'][:12]}..." if ckpt.get("params_sha256")
           else None]
  digest = "; ".join(p for p in parts if p)
  return f"{ckpt.get('path')} ({ckpt.get('format')}{'; ' + digest if digest else ''})"


def _devices_info() -> dict:
  """Backend, device kind and count, process index and count (what JAX sees)."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "local_device_count": jax.local_device_count(),
          "process_index": jax.process_index(), "process_count": jax.process_count()}


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
  inputs (`samjax.bulk.plan_job`), the job manifest of the output folder against this
  run (`samjax.bulk.provenance.check_manifest`: the checkpoint is identified by its
  SHA-256 without loading it). Then the model is loaded, --batch-size auto resolved,
  the manifest written (or checked again, now with the model type and kernels), and
  the start lines printed: backend, devices, processes, model, checkpoint, dtype,
  batch size, attention kernels, output format.

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
  # pylint: disable=import-outside-toplevel
  from samjax.bulk import plan_job, provenance, run_job
  options = options_from_args(args)  # Wrong combinations fail before any heavy work.
  check_checkpoint_arg(args)
  if make_generator is None:
    check_compilation_cache(args.compilation_cache)
    make_generator = globals()["make_generator"]
  _maybe_initialize_distributed(args)
  plan = plan_job(args.inputs, args.out, output_format=getattr(args, "output_format", None)
                  or OUTPUT_FORMATS[0])
  quiet = getattr(args, "quiet", False)
  overwrite = getattr(args, "overwrite", False)
  args.dtype = resolve_dtype(args.dtype, "automask", verbose=not quiet)
  where = _devices_info()
  _say(args, f"backend {where['backend']}: {where['device_count']} device(s) "
             f"({where['device_kind']}; {where['local_device_count']} in this process), "
             f"process {where['process_index']} of {where['process_count']}")
  hint = provenance.accelerator_hint(where["backend"])
  if hint:
    _say(args, f"warning: {hint}")
  output_format = (getattr(plan, "output_format", None) or getattr(args, "output_format", None)
                   or provenance.DEFAULT_OUTPUT_FORMAT)
  prov = provenance.Provenance.create(
      checkpoint=provenance.checkpoint_identity(args.checkpoint, args.model),
      options=options, dtype=args.dtype, attention_requested=args.attention,
      output_format=output_format)
  provenance.check_manifest(plan.out_dir, prov, list(plan.outputs.values()),
                            overwrite=overwrite)
  generator = make_generator(args)
  batch_size = resolve_batch_size(args, generator)
  runtime = getattr(generator, "runtime", None)
  prov = prov.replace(
      model_type=getattr(getattr(runtime, "config", None), "name", None) or prov.model_type,
      attention=_attention_text(generator))
  manifest, wrote = provenance.ensure_manifest(
      plan.out_dir, prov, {**where, "batch_size": batch_size, "overlays": args.overlays,
                           "max_pixels": args.max_pixels},
      overwrite=overwrite, process_index=plan.process_index)
  for note in () if wrote else provenance.differences(manifest.provenance, prov)[1]:
    _say(args, f"note: resuming a job whose manifest records another {note}: this does "
               "not change outputs beyond rounding, and each output records its own")
  _say(args, f"model {prov.model_type or '?'}, checkpoint {_checkpoint_text(prov.checkpoint)}")
  _say(args, f"dtype {prov.dtype}, batch size {batch_size}, attention "
             f"{prov.attention or prov.attention_requested}, output format {output_format}")
  _say(args, f"job manifest {manifest.path} ({'written' if wrote else 'checked'}; settings "
             f"sha256 {manifest.settings_sha256[:12]}...)")
  return run_job(args.inputs, args.out, generator.generate_batch,
                 batch_size=batch_size, overlays=args.overlays,
                 overlay_fn=overlay_fn, num_workers=args.num_workers, prefetch=args.prefetch,
                 progress=not (args.no_progress or quiet), max_pixels=args.max_pixels or None,
                 plan=plan, claim_timeout_s=args.claim_timeout, overwrite=overwrite,
                 provenance=prov.record(), report=not quiet)


def run(args: argparse.Namespace) -> int:
  summary = run_automask(args)
  if summary.interrupted:
    print(f"samjax automask: interrupted by {summary.interrupted}", file=sys.stderr)
  return summary.exit_code
