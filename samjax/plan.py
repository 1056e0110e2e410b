"""Plan a bulk job for TPU chips without the chips: compile every program ahead of time.

`plan(target, ...)` compiles, on this host, each device program of `samjax automask`
for one image size bucket (and the interactive decoder) for a TPU topology described
by `jax.experimental.topologies` ("v5e:2x4", "v6e:2x2", "v4:2x2x1", "v5p:2x2x1", one
chip: "v5e:1x1"), or for this process's own devices ("local"). It needs XLA's TPU
compiler (libtpu), not a TPU. Per program and per device it reports what the compiler
says: HBM (arguments including the parameters, outputs, temporaries, generated code)
against the chip's capacity, FLOPs and bytes accessed per image, the roofline bound
per image, max(FLOPs / peak bf16 rate, bytes / HBM bandwidth), from the published
figures in `CHIPS`, the compile time, and (on request) the largest encoder batch that
fits. ALL OF THESE ARE COMPILE-TIME FIGURES, NOT TIMINGS ON A CHIP: the roofline is a
lower bound on the run time, and the FLOPs are those of the compiled HLO (padding and
the folded attention's extra channels included), not the model's nominal count.

Which programs (exactly those the bulk job runs, from `AutomaticMaskGenerator`):

* the crops of `batch_size` images (all of `image_hw`, default 1024 x 1024: the full
  image and, with crop layers, each layer's crops) are grouped by (point batches,
  crop-size bucket) and dispatched `crops_per_device` per device at most, so each
  call's crop count is the device count times a power of two. Per distinct call shape
  the job compiles the data-parallel encoder (`Runtime.encode`), `crop_stats` and
  `crop_masks` (one 32-survivor chunk per call; a crop keeping more masks calls it
  again with the same shapes).
* "encode" is also compiled at `batch_size` images per step (split over the devices),
  which is what `--batch-size` names; it is the program the batch search sizes. The
  generator itself embeds at most `crops_per_device` crops per device per call, so
  with more images than that per device the job's encoder calls are smaller.
* the interactive decoder (`Runtime.decode`, one embedding, 1 and 64 single-point
  prompts, replicated on every device).
* on request (`programs=(..., "train_step")`, not part of the job): the fine-tuning
  step of `samjax finetune` (`samjax.train.step.train_step_fn`, the default
  `TrainConfig` with this batch size, dtype and attention: images in, the decoder
  trained), its state replicated and donated, its batch split over the devices.

Devices. A topology's devices are those of one host (process 0): the bulk job's
Runtime spans `jax.local_devices()`, so each host of a multi-host slice runs the same
program over its own chips. v5e/v6e hosts hold up to 8 chips (2x4), v4/v5p hosts 4
(2x2x1); the topology is described with those host bounds. A device is a chip: v4 and
v5p chips have two TensorCores, which a TPU VM runs as one "megacore" device, and the
topology is described so (libtpu's compile-only default for v4 is one device per
TensorCore, which a default v4 job never runs).

Memory. Each program's figure is its own peak: its arguments (the float32 parameters,
replicated on every device, count in every program), outputs and temporaries. The bulk
job also keeps one call's low-resolution logits (the `crop_stats` output that
`crop_masks` reads) alive while the next call runs; `PlanReport.job_peak_bytes` adds
that to the largest program.

Can a compile done here be loaded by a real job on the TPU, so that it starts without
compiling? Measured on this host (jax 0.10.2, libtpu 0.0.42.1, no TPU):

* `jax.experimental.serialize_executable.serialize` works on an executable compiled
  for a topology (a v5e:2x2 program: 112 KB). Loading it needs a TPU client:
  `deserialize_and_load` on the CPU backend fails ("PjRtCpuClient::DeserializeExecutable
  proto deserialization failed"), and the compile-only TPU client refuses ("PjRtCompiler
  must be constructed with a Client to call DeserializeLoadedExecutable"). So it can
  only be checked on a TPU host.
* The persistent compilation cache writes entries for topology compiles
  (`jax_compilation_cache_dir`; one `<module>-<sha256>-cache` file per program). Its
  key (`jax._src.cache_key.get`) hashes the StableHLO module (debug info stripped), the
  jaxlib version, the backend's platform and `platform_version` (here "PJRT C API /
  TFRT TPU v5 lite / Built on <date> cl/<changelist>": the device kind and the libtpu
  build), XLA_FLAGS and LIBTPU_INIT_ARGS, the serialized compile options (TPU keeps
  the device assignment, i.e. the device ids), and the fingerprint of the devices'
  topology. The topology fingerprint depends on the host layout: "v5e:2x4" described
  as two hosts of 2x2 chips (libtpu's default) and as one host of 2x4 chips (a real
  v5litepod-8 VM) have different fingerprints, which is why `plan` describes
  topologies with their real host bounds.
* The whole save -> load path works where a client can load what was compiled: on
  this host's CPU (`plan("local", save_dir=DIR)`, tested in tests/test_plan.py), a new
  process running the generator with the cache at DIR, as `samjax automask
  --compilation-cache DIR` sets it, gets persistent-cache hits for encode, crop_stats
  and crop_masks and compiles none of them. That needs each program lowered with the
  argument shardings the job really passes: on one device XLA hands the encoder's
  (and crop_stats') outputs back replicated, not split over the data axis, which is
  another StableHLO module and so another key; the plan takes them from the program
  it compiled before.
* So a cache written by `plan --save DIR` can be hit by `samjax automask
  --compilation-cache DIR` on the TPU only if the job runs the same jax and libtpu
  builds, the same XLA_FLAGS/LIBTPU_INIT_ARGS, the same model/dtype/attention/options
  and image sizes, on one host with the same chips in the same device order, and the
  real TPU client reports the same platform_version and topology fingerprint as the
  compile-only one. The last two could not be checked without a TPU; the cache
  falls back to compiling on a miss, so trying costs nothing. On a TPU host, run the
  job once with `JAX_EXPLAIN_CACHE_MISSES=1` (or `jax_log_compiles`) to see hits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from samjax.amg.options import AmgOptions

#: Default headroom: a program "fits" when it needs at most (1 - margin) of HBM.
DEFAULT_MARGIN = 0.10
#: Survivor masks per `crop_masks` call (the generator's SURVIVOR_CHUNK).
_SURVIVOR_CHUNK = 32
#: The programs of the bulk job, which `plan` compiles by default.
PROGRAMS = ("encode", "crop_stats", "crop_masks", "decode")
#: Programs outside the bulk job that `plan` compiles when asked (`programs=`).
EXTRA_PROGRAMS = ("train_step",)
#: Largest per-device encoder batch the search tries.
_MAX_SEARCH_PER_DEVICE = 1024

#: crop_stats / crop_masks loop (`lax.map` over a device's crops and point batches, a
#: while loop over mask chunks). Measured: XLA:CPU's cost analysis of `lax.map(f, xs)`
#: reports the FLOPs of one `f` whatever the length of xs, and for v5e crop_stats at 4
#: crops per device reports the FLOPs of the 1-crop program.
LOOP_NOTE = ("crop_stats and crop_masks loop over each device's crops, point batches and "
             "mask chunks, and XLA's cost analysis counts a loop body once: their FLOPs, "
             "bytes and roofline (so the bulk job's) leave most of their work out and are "
             "no bound; the encoder's are complete")
NOT_TIMINGS = ("Compile-time figures from XLA's TPU compiler on this host, NOT timings on "
               "a chip: the roofline is a lower bound on the run time.")


class PlanError(RuntimeError):
  """A plan cannot be made (bad target, no TPU compiler, ...); the message says why."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation.

  Attributes:
    name: generation ("v5e").
    device_kind: `jax.Device.device_kind` of its devices.
    peak_flops: peak bf16 FLOP/s per chip.
    hbm_bytes: HBM capacity per chip, bytes.
    hbm_bandwidth: HBM bandwidth per chip, bytes/s.
    cores_per_chip: TensorCores per chip.
    host_bounds: chips of one host VM (x, y, z).
    source: where the figures are published.
  """

  name: str
  device_kind: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  cores_per_chip: int
  host_bounds: Tuple[int, int, int]
  source: str


# Per-chip figures as Google publishes them ("GB" read as 1e9 bytes, "GiB" as 2**30):
# v4: "Peak compute per chip 275 teraflops (bf16 or int8); HBM2 capacity and bandwidth
#     32 GiB, 1200 GBps"; two TensorCores per chip.  https://cloud.google.com/tpu/docs/v4
# v5e: "Peak compute per chip (bf16) 197 TFLOPs; HBM2 capacity and bandwidth 16 GB,
#     819 GBps"; one TensorCore, 8 chips per host.  https://cloud.google.com/tpu/docs/v5e
# v5p: "Peak compute per chip (bf16) 459 TFLOPs; HBM2e capacity and bandwidth 95 GB,
#     2765 GBps"; two TensorCores (one megacore device).
#     https://cloud.google.com/tpu/docs/v5p
# v6e: "Peak compute per chip (bf16) 918 TFLOPs; HBM capacity per chip 32 GB; HBM
#     bandwidth per chip 1640 GBps" (a later revision of the page says 1638 GBps); one
#     TensorCore, 8 chips per host.  https://cloud.google.com/tpu/docs/v6e
# The compiler's own limit can be lower: it refuses programs above 15.75 GiB on a v5e
# chip and 15.25 GiB on a v4 TensorCore (measured with libtpu 0.0.42.1).
CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * 2**30, 1200e9, 2, (2, 2, 1),
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16e9, 819e9, 1, (2, 4, 1),
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95e9, 2765e9, 2, (2, 2, 1),
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32e9, 1640e9, 1, (2, 4, 1),
                "https://cloud.google.com/tpu/docs/v6e"),
}
_BY_KIND = {c.device_kind: c for c in CHIPS.values()}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """What one device of the target can hold and do (a chip, or a v4 TensorCore)."""

  chip: Optional[Chip]
  devices_per_chip: int
  hbm_bytes: float
  peak_flops: Optional[float]
  hbm_bandwidth: Optional[float]


@dataclasses.dataclass
class ProgramPlan:
  """Compile-time figures of one program, per device.

  Attributes:
    name: program ("encode", "crop_stats", "crop_masks", "decode").
    detail: shapes in words.
    in_job: whether the bulk job runs this exact program.
    items: what one call processes, over all devices (images, crops or prompts).
    item: the unit of `items` ("image", "crop", "prompt").
    calls_per_image: calls of this program per image in the bulk job (0 if not in it).
    argument_bytes / output_bytes / temp_bytes / code_bytes / alias_bytes: per device.
    flops / bytes_accessed: per device per call, from `cost_analysis()`.
    compile_s: seconds to lower and compile on this host.
    error: why it did not compile (None if it did); needed_bytes: the HBM the
      compiler asked for when it refused the program for lack of it.
    capacity_bytes / peak_flops / hbm_bandwidth: the device's (`DeviceSpec`); margin:
      the share of HBM that must stay free for `fits`.
    max_batch / max_batch_bytes / search: the largest batch that fits, its HBM per
      device, and the sizes tried (encoder).
  """

  name: str
  detail: str
  in_job: bool
  items: int
  item: str
  num_devices: int
  calls_per_image: float = 0.0
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  alias_bytes: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  compile_s: float = 0.0
  error: Optional[str] = None
  needed_bytes: Optional[int] = None  # what the compiler asked for, when it ran out
  capacity_bytes: float = 0.0
  margin: float = DEFAULT_MARGIN
  peak_flops: Optional[float] = None
  hbm_bandwidth: Optional[float] = None
  max_batch: Optional[int] = None
  max_batch_bytes: Optional[int] = None
  search: Optional[List[Tuple[int, str]]] = None

  @property
  def compiled(self) -> bool:
    return self.error is None

  @property
  def total_bytes(self) -> int:
    """HBM the program needs on one device (donated outputs counted once)."""
    return (self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes -
            self.alias_bytes)

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.capacity_bytes if self.capacity_bytes else math.nan

  @property
  def fits(self) -> bool:
    return self.compiled and self.total_bytes <= (1 - self.margin) * self.capacity_bytes

  @property
  def items_per_device(self) -> float:
    return self.items / self.num_devices

  @property
  def flops_per_item(self) -> float:
    return self.flops / self.items_per_device

  @property
  def bytes_per_item(self) -> float:
    return self.bytes_accessed / self.items_per_device

  @property
  def roofline_s(self) -> Optional[float]:
    """Lower bound on one call's time on a device, max(compute, memory)."""
    if not self.compiled or not self.peak_flops or not self.hbm_bandwidth:
      return None
    return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

  @property
  def roofline_s_per_item(self) -> Optional[float]:
    """Device-seconds per item at the roofline (per chip: divide by devices per chip)."""
    t = self.roofline_s
    return None if t is None else t / self.items_per_device

  @property
  def bound(self) -> Optional[str]:
    if self.roofline_s is None:
      return None
    return ("compute" if self.flops / self.peak_flops >=
            self.bytes_accessed / self.hbm_bandwidth else "memory")

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(total_bytes=self.total_bytes, fits=self.fits, hbm_fraction=self.hbm_fraction,
             flops_per_item=self.flops_per_item if self.compiled else None,
             bytes_per_item=self.bytes_per_item if self.compiled else None,
             roofline_s=self.roofline_s, roofline_s_per_item=self.roofline_s_per_item,
             bound=self.bound)
    return d


@dataclasses.dataclass
class PlanReport:
  """Everything `plan` found. See the module docstring for what each figure means."""

  target: str
  model: str
  dtype: str
  attention: str
  batch_size: int
  image_hw: Tuple[int, int]
  num_devices: int
  device_kind: str
  devices_per_chip: int
  capacity_bytes: float
  margin: float
  programs: List[ProgramPlan]
  chip: Optional[Chip] = None
  crops_per_device: int = 4
  saved_to: Optional[str] = None
  saved_files: Optional[List[str]] = None
  notes: List[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    """Every program compiled and fits, and so does the job's estimated peak."""
    return all(p.fits for p in self.programs) and self.job_fits

  def program(self, name: str) -> ProgramPlan:
    """The first program called `name` (e.g. "encode": the batch_size step)."""
    for p in self.programs:
      if p.name == name:
        return p
    raise KeyError(name)

  @property
  def job_programs(self) -> List[ProgramPlan]:
    return [p for p in self.programs if p.in_job]

  @property
  def job_peak_bytes(self) -> int:
    """Estimated HBM peak of the bulk job on one device (see the module docstring)."""
    progs = self.job_programs
    if not progs:
      return 0
    live = max((p.output_bytes for p in progs if p.name == "crop_stats"), default=0)
    return max(p.total_bytes for p in progs) + live

  @property
  def job_fits(self) -> bool:
    return self.job_peak_bytes <= (1 - self.margin) * self.capacity_bytes

  @property
  def job_roofline_s_per_image(self) -> Optional[float]:
    """Bulk-job device-seconds per image at the roofline (sum over its programs)."""
    total = 0.0
    for p in self.job_programs:
      if p.roofline_s is None:
        return None
      total += p.roofline_s * p.calls_per_image * self.num_devices
    return total

  def _job_sum(self, attr: str) -> float:
    return sum(getattr(p, attr) * p.calls_per_image * self.num_devices
               for p in self.job_programs)

  @property
  def job_flops_per_image(self) -> float:
    """Bulk-job FLOPs per image over all its programs (one crop_masks call per crop)."""
    return self._job_sum("flops")

  @property
  def job_bytes_per_image(self) -> float:
    return self._job_sum("bytes_accessed")

  def images_per_s_per_chip(self, program: Optional[ProgramPlan] = None) -> Optional[float]:
    """Roofline images/s per chip of one program ("encode" if None) or of the job."""
    if program is None:
      t = self.job_roofline_s_per_image
    else:
      t = program.roofline_s_per_item
    return None if not t else self.devices_per_chip / t

  def failures(self) -> List[str]:
    """One line per program that does not compile or fit, then the job estimate."""
    lines = []
    cap = self.capacity_bytes * (1 - self.margin)
    for p in self.programs:
      if not p.compiled and p.needed_bytes:
        lines.append(f"{p.name} ({p.detail}) does not fit: {p.error}")
      elif not p.compiled:
        lines.append(f"{p.name} ({p.detail}) does not compile: {p.error}")
      elif not p.fits:
        lines.append(f"{p.name} ({p.detail}) needs {_gb(p.total_bytes)} of HBM per device; "
                     f"{_gb(cap)} is {100 * (1 - self.margin):.0f}% of the "
                     f"{_gb(self.capacity_bytes)} of a {self.device_kind} device")
    if all(p.compiled for p in self.programs) and not self.job_fits:
      lines.append(f"the bulk job's estimated peak ({_gb(self.job_peak_bytes)} per device: "
                   "largest program + one call's low-res logits in flight) exceeds "
                   f"{_gb(cap)}")
    return lines

  def to_dict(self) -> Dict[str, Any]:
    return {
        "target": self.target, "model": self.model, "dtype": self.dtype,
        "attention": self.attention, "batch_size": self.batch_size,
        "image_hw": list(self.image_hw), "num_devices": self.num_devices,
        "device_kind": self.device_kind, "devices_per_chip": self.devices_per_chip,
        "capacity_bytes": self.capacity_bytes, "margin": self.margin,
        "crops_per_device": self.crops_per_device,
        "chip": dataclasses.asdict(self.chip) if self.chip else None,
        "programs": [p.to_dict() for p in self.programs],
        "job_peak_bytes": self.job_peak_bytes, "job_fits": self.job_fits,
        "job_roofline_s_per_image": self.job_roofline_s_per_image,
        "job_flops_per_image": self.job_flops_per_image,
        "job_bytes_per_image": self.job_bytes_per_image,
        "job_images_per_s_per_chip": self.images_per_s_per_chip(),
        "ok": self.ok, "failures": self.failures(), "saved_to": self.saved_to,
        "saved_files": self.saved_files, "notes": list(self.notes),
        "disclaimer": NOT_TIMINGS,
    }

  def format(self) -> str:
    """A human-readable report (a table per program, then the verdict)."""
    unit = "TensorCore" if self.devices_per_chip > 1 else "chip"
    what = (f"(one device = {'a ' + unit if unit == 'chip' else 'one ' + unit}), "
            f"{_gb(self.capacity_bytes)} HBM" if self.chip else
            f", {_gb(self.capacity_bytes)} of memory")
    lines = [NOT_TIMINGS if self.chip else NOT_TIMINGS.replace("TPU compiler", "compiler"),
             f"target {self.target}: {self.num_devices} x {self.device_kind}"
             f"{' ' if self.chip else ''}{what} per device; {self.model} {self.dtype}, "
             f"attention {self.attention}; {self.batch_size} images of "
             f"{self.image_hw[0]}x{self.image_hw[1]} per step, at most "
             f"{self.crops_per_device} crops per device per call"]
    if self.chip:
      lines.append(f"roofline figures per chip: {self.chip.peak_flops / 1e12:g} TFLOP/s bf16, "
                   f"{self.chip.hbm_bandwidth / 1e9:g} GB/s ({self.chip.source})")
    head = (f"{'program':<11} {'shapes':<44} {'HBM/device':>10} {'of cap':>6} {'args':>8} "
            f"{'temp':>8} {'GFLOP/item':>10} {'GB/item':>8} {'roofline':>12} {'compile':>7}")
    lines += ["", head, "-" * len(head)]
    for p in self.programs:
      mark = "" if p.in_job else " *"
      if not p.compiled:
        lines.append(f"{p.name + mark:<11} {p.detail:<44} DOES NOT COMPILE: {p.error}")
        continue
      per_chip = self.images_per_s_per_chip(p)
      roof = f"{per_chip:.1f} {_UNITS[p.item]}/s" if per_chip else "-"
      lines.append(
          f"{p.name + mark:<11} {p.detail:<44} {_gb(p.total_bytes):>10} "
          f"{100 * p.hbm_fraction:>5.0f}% {_gb(p.argument_bytes):>8} {_gb(p.temp_bytes):>8} "
          f"{p.flops_per_item / 1e9:>10.1f} {p.bytes_per_item / 1e9:>8.2f} {roof:>12} "
          f"{p.compile_s:>6.0f}s")
      if p.max_batch is not None:
        capped = p.max_batch >= _MAX_SEARCH_PER_DEVICE * self.num_devices
        lines.append(f"{'':<11} largest batch that fits ({100 * (1 - self.margin):.0f}% of "
                     f"HBM): {'at least ' if capped else ''}{p.max_batch} images per step "
                     f"({p.max_batch // self.num_devices} per device, "
                     f"{_gb(p.max_batch_bytes or 0)}"
                     f"{', the search stops there' if capped else ''}); tried "
                     + ", ".join(f"{b}:{r}" for b, r in (p.search or [])))
    lines.append("* not part of the bulk job (the --batch-size step as asked, or the "
                 "interactive decoder, or the fine-tuning step); roofline per chip in items/s")
    job = self.images_per_s_per_chip()
    lines.append(f"bulk job: estimated HBM peak {_gb(self.job_peak_bytes)} per device "
                 f"({100 * self.job_peak_bytes / self.capacity_bytes:.0f}%); "
                 f"{self.job_flops_per_image / 1e9:.1f} GFLOP and "
                 f"{self.job_bytes_per_image / 1e9:.2f} GB accessed per image; roofline "
                 + (f"{job:.2f} images/s per chip" if job else "n/a")
                 + " (one crop_masks call per crop)")
    lines += [f"note: {n}" for n in self.notes]
    if self.saved_to:
      lines.append(f"saved {len(self.saved_files or [])} compilation-cache entries to "
                   f"{self.saved_to}")
    fails = self.failures()
    lines.append("OK: every program compiles and fits" if not fails else
                 "NOT OK: " + "; ".join(fails))
    return "\n".join(lines)


_UNITS = {"image": "img", "crop": "crop", "prompt": "prm"}


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB"


# ----------------------------------------------------------------------------------
# Targets.
# ----------------------------------------------------------------------------------

_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def require_tpu_compiler() -> None:
  """Raises PlanError unless XLA's TPU compiler (libtpu) is importable."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise PlanError("XLA's TPU compiler (libtpu) is not installed: install samjax[tpu] "
                    "(pip install 'jax[tpu]')") from None


def topology_devices(target: str) -> list:
  """The devices of one host of a TPU topology such as "v5e:2x4" (compile-only).

  The topology is described with the generation's real host bounds (`Chip.host_bounds`),
  so a single-host slice is one process, as on a TPU VM. Described once per process:
  the same device objects make equal meshes and Runtimes, so plans that share a
  program share its compilation.
  """
  return list(_topology_devices(target))


@functools.lru_cache(maxsize=None)
def _topology_devices(target: str) -> tuple:
  m = _TOPOLOGY_RE.match(target)
  if not m:
    raise PlanError(f"unknown target {target!r}: use 'local' or GEN:TOPOLOGY with GEN in "
                    f"{sorted(CHIPS)}, e.g. v5e:2x4, v6e:2x2, v4:2x2x1, v5p:2x2x1, v5e:1x1")
  require_tpu_compiler()
  chip = CHIPS[m.group(1)]
  dims = [int(d) for d in m.group(2).split("x")]
  dims3 = (dims + [1, 1])[:3]
  if chip.name in ("v4", "v5p") and len(dims) != 3:
    raise PlanError(f"{chip.name} topologies are 3-D (e.g. {chip.name}:2x2x1), got {target!r}")
  if chip.name in ("v5e", "v6e") and len(dims) != 2:
    raise PlanError(f"{chip.name} topologies are 2-D (e.g. {chip.name}:2x4), got {target!r}")
  bounds = [min(d, h) for d, h in zip(dims3, chip.host_bounds)]
  if any(d % b for d, b in zip(dims3, bounds)):
    raise PlanError(f"{target!r} does not split into hosts of {chip.host_bounds} chips")
  import os  # pylint: disable=import-outside-toplevel
  # libtpu's lockfile keeps two processes off the same local TPU chips; a description
  # of chips elsewhere uses none, so compiling for one must not wait for (or block) a
  # job that holds it. Read once, when libtpu is first loaded.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topo_name = f"{chip.name}:{m.group(2)}"
  try:
    with _quiet_stderr():  # libtpu prints warnings about the GCE metadata it lacks
      # v4 chips as one megacore device each, as a v4 VM runs them (v5p's default).
      extra = {"chip_config_name": "megacore"} if chip.name == "v4" else {}
      topo = topologies.get_topology_desc(topo_name, "tpu", chips_per_host_bounds=bounds,
                                          **extra)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PlanError(f"cannot describe topology {topo_name!r}: {text}") from None
  return tuple(d for d in topo.devices if d.process_index == 0)


@contextlib.contextmanager
def _quiet_stderr():
  """Sends what C++ code writes to file descriptor 2 to /dev/null for the block."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):
    yield
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def local_devices() -> list:
  """This process's own devices: its accelerators, else its CPU devices.

  On CPUs the plan is of the job this host would run (its RAM as the capacity); with
  `save_dir` that fills the compilation cache a CPU job reads.
  """
  import jax  # pylint: disable=import-outside-toplevel
  return jax.local_devices()


def device_spec(devices: Sequence[Any]) -> DeviceSpec:
  """Capacity and peak rates of one device (a chip, or a v4 TensorCore)."""
  d = devices[0]
  chip = _BY_KIND.get(d.device_kind)
  if chip is not None:
    # A megacore device spans the chip's cores; otherwise a device is one core.
    cores = getattr(d, "num_cores", None) or 1
    per_chip = max(1, chip.cores_per_chip // cores)
    return DeviceSpec(chip, per_chip, chip.hbm_bytes / per_chip, chip.peak_flops / per_chip,
                      chip.hbm_bandwidth / per_chip)
  try:
    limit = d.memory_stats()["bytes_limit"]
  except Exception:  # pylint: disable=broad-except
    limit = None
  if limit is None and d.platform == "cpu":
    import os  # pylint: disable=import-outside-toplevel
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the host's RAM
  if limit is None:
    raise PlanError(f"no published figures for {d.device_kind!r} and it reports no memory "
                    "limit")
  return DeviceSpec(None, 1, float(limit), None, None)


# ----------------------------------------------------------------------------------
# The bulk job's call shapes.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CropCall:
  """One distinct (crop_stats, crop_masks) call shape of the bulk job."""

  n_batches: int
  bucket: Tuple[int, int]
  per_device: int
  calls_per_image: float
  prompts_per_batch: int = 64  # the generator's device batch (`device_batch`)


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def job_calls(config, options: AmgOptions, image_hw: Tuple[int, int], batch_size: int,
              num_devices: int, crops_per_device: int) -> List[CropCall]:
  """The generator's calls for `batch_size` images of `image_hw` (as `_run_crops`).

  Does not model the generator lowering `crops_per_device` for settings whose low-res
  logits would not fit a device (`_crops_per_device_that_fit`; not the defaults).
  """
  from samjax.amg import utils as amg_utils  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from samjax.amg.generator import device_batch, layer_point_grids
  from samjax.amg.kernels import size_bucket  # pylint: disable=import-outside-toplevel
  grids = layer_point_grids(options)
  boxes, layers = amg_utils.generate_crop_boxes(tuple(image_hw), options.crop_n_layers,
                                                options.crop_overlap_ratio)
  per_image: Dict[Tuple, List[int]] = {}  # (batches, bucket) -> [crops, most points]
  for (x0, y0, x1, y1), layer in zip(boxes, layers):
    n_batches = -(-len(grids[layer]) // options.points_per_batch)
    key = (n_batches, size_bucket(y1 - y0), size_bucket(x1 - x0))
    count, most = per_image.get(key, (0, 0))
    per_image[key] = [count + 1, max(most, len(grids[layer]))]
  per_call = num_devices * crops_per_device
  calls: Dict[Tuple, float] = {}
  for (n_batches, hb, wb), (count, most) in per_image.items():
    crops = count * batch_size
    ppb = device_batch(options.points_per_batch, n_batches, most)
    for start in range(0, crops, per_call):
      n = min(per_call, crops - start)
      per_device = _pow2_ceil(-(-n // num_devices))
      key = (n_batches, (hb, wb), per_device, ppb)
      calls[key] = calls.get(key, 0) + 1 / batch_size
  return [CropCall(nb, b, pd, c, ppb) for (nb, b, pd, ppb), c in calls.items()]


# ----------------------------------------------------------------------------------
# Compiling.
# ----------------------------------------------------------------------------------

_OOM_RE = re.compile(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)|"
                     r"Used ([\d.]+)G of ([\d.]+)G hbm")


def _compile(lower: Callable[[], Any]):
  """(compiled, seconds, error text, bytes needed when out of memory)."""
  t0 = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    needed = None
    m = _OOM_RE.search(text)
    if "RESOURCE_EXHAUSTED" in text or m:
      if m:
        need, avail = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        needed = int(float(need) * 2**30)
        first = (f"out of HBM: needs {float(need):.2f} GiB per device, the compiler "
                 f"allows {float(avail):.2f} GiB")
      else:
        first = "out of HBM: " + first[:200]
    return None, time.perf_counter() - t0, first[:300], needed
  return compiled, time.perf_counter() - t0, None, None


def _measure(prog: ProgramPlan, lower: Callable[[], Any],
             out_shardings: Optional[Dict[str, Any]] = None) -> ProgramPlan:
  """Compiles; fills `prog` from XLA's analyses (and `out_shardings["value"]`)."""
  compiled, seconds, error, needed = _compile(lower)
  prog.compile_s = seconds
  if compiled is None:
    prog.error, prog.needed_bytes = error, needed
    return prog
  if out_shardings is not None:
    # What the job's next program receives: e.g. on one device XLA hands the encoder's
    # output back replicated, not split over the (one-device) data axis, and a
    # program lowered for the other sharding is a different cache entry.
    out_shardings["value"] = compiled.output_shardings
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  prog.argument_bytes = int(mem.argument_size_in_bytes)
  prog.output_bytes = int(mem.output_size_in_bytes)
  prog.temp_bytes = int(mem.temp_size_in_bytes)
  prog.code_bytes = int(mem.generated_code_size_in_bytes)
  prog.alias_bytes = int(mem.alias_size_in_bytes)
  prog.flops = float(cost.get("flops", 0.0))
  prog.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  return prog


@contextlib.contextmanager
def _persistent_cache(path: Optional[str]):
  """Writes every compilation in the block to the persistent cache at `path`."""
  if not path:
    yield
    return
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # The cache decides once per process whether it is on; make it look again.
  compilation_cache.reset_cache()
  try:
    with warnings.catch_warnings():
      # An entry saved by an earlier plan is found here, but only a TPU client can load
      # it (this host compiles it again, and the file stays as it was).
      warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
      yield
  finally:
    for n, v in saved.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()


def _abstract(shape, dtype, sharding=None):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _lower_crop_stats(rt, call: CropCall, emb_aval, options: AmgOptions, mask_chunk: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from samjax.amg import kernels  # pylint: disable=import-outside-toplevel
  cfg = rt.config
  lr = cfg.low_res_mask_size
  b = rt.num_devices * call.per_device
  hb, wb = call.bucket
  nb, ppb = call.n_batches, call.prompts_per_batch
  bh, bw = kernels._bucket_step(hb), kernels._bucket_step(wb)  # pylint: disable=protected-access
  band_h = kernels.band_width(hb, wb, bh, lr)
  band_w = kernels.band_width(hb, wb, bw, lr)
  sh = rt.batch_sharding
  f32, i32 = jnp.float32, jnp.int32
  rows = (_abstract((b, hb // bh), i32, sh), _abstract((b, hb // bh, bh, band_h), f32, sh))
  cols = (_abstract((b, wb // bw), i32, sh), _abstract((b, wb // bw, bw, band_w), f32, sh))
  args = (rt.abstract_params(), _abstract(emb_aval.shape, emb_aval.dtype,
                                         emb_aval.sharding or sh),
          _abstract((b, nb, ppb, 2), f32, sh), _abstract((b, nb, ppb), jnp.bool_, sh),
          rows, cols, _abstract((b, 4), i32, sh), _abstract((b, 4), i32, sh),
          _abstract((b,), i32, sh),
          # The generator passes these two as NumPy arrays (no sharding of their own).
          _abstract((6,), f32), _abstract((2,), jnp.bool_))
  lowered = kernels.crop_stats.lower(*args, rt=rt, decode_fn=kernels.sam_decode,
                                     mask_chunk=mask_chunk)
  return lowered, rows, cols


def _train_config(base, batch: int, dtype: Any, attention: Optional[str]):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from samjax.train.config import TrainConfig  # pylint: disable=import-outside-toplevel
  try:
    return dataclasses.replace(base if base is not None else TrainConfig(), batch_size=batch,
                               dtype=jnp.dtype(dtype).name, attention=attention or "auto")
  except (TypeError, ValueError) as e:
    raise PlanError(f"train_config: {e}") from None


def _lower_train_step(rt, tc):
  """`samjax finetune`'s compiled step, lowered against abstract state and batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from samjax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  from samjax.train.step import train_step_fn  # pylint: disable=import-outside-toplevel
  params = rt.abstract_params()
  rep, sh = rt.replicated, rt.batch_sharding
  opt = jax.tree_util.tree_map(lambda a: _abstract(a.shape, a.dtype, rep),
                               jax.eval_shape(make_optimizer(tc).init, params))
  state = {"params": params, "opt_state": opt, "step": _abstract((), jnp.int32, rep)}
  b, k, s = tc.batch_size, tc.instances_per_image, rt.config.image_size
  batch = {"valid_hw": _abstract((b, 2), jnp.int32, sh),
           "gt": _abstract((b, k, s, s), jnp.uint8, sh),
           "boxes": _abstract((b, k, 4), jnp.float32, sh),
           "inst_valid": _abstract((b, k), jnp.bool_, sh),
           "images": _abstract((b, s, s, 3), jnp.uint8, sh)}
  return train_step_fn(tc, rt).lower(state, batch)


def _search(measure: Callable[[int], ProgramPlan], start: ProgramPlan,
            known: Sequence[ProgramPlan] = (), max_compiles: Optional[int] = None
            ) -> Tuple[Optional[int], List[Tuple[int, str]], Dict[int, ProgramPlan]]:
  """Largest batch whose program fits, by compiling: a bracket [fits, does not fit].

  Memory grows about linearly with the batch, so each next try is where the line
  through the bracket's two ends (or, with no measured upper end, the two measured
  sizes nearest the largest fitting one) crosses the budget (bytes the compiler asked
  for count for programs it refused), kept strictly inside the bracket; with no upper
  end yet that guess is at most 4x the largest fitting size, and with nothing measured
  to go on it doubles (or halves). Ends when the bracket is one apart: usually 3-5
  compiles instead of doubling-then-bisecting's 2 log2(batch).

  Args:
    measure: per-device batch -> its compiled ProgramPlan.
    start: the plan of the first size; `known`: other sizes already compiled.
    max_compiles: stop after this many calls of `measure`, the bracket maybe still
      open (the log then shows the smallest size that did not fit, if any).

  Returns:
    (largest fitting global batch or None, [(batch, verdict)], {per-device: plan}).
  """
  n = start.num_devices
  budget = (1 - start.margin) * start.capacity_bytes
  tried: Dict[int, ProgramPlan] = {p.items // n: p for p in known}
  tried[start.items // n] = start

  def size(p: ProgramPlan) -> Optional[float]:
    return float(p.total_bytes) if p.compiled else (
        float(p.needed_bytes) if p.needed_bytes else None)

  def guess(lo: int, hi: Optional[int]) -> Optional[int]:
    known = sorted((k, size(p)) for k, p in tried.items() if size(p) is not None)
    if len(known) < 2:
      return None
    sizes = dict(known)
    if lo in sizes and hi in sizes:
      # Both ends of the bracket measured: the line through them (the crossing lies
      # between them; the two sizes nearest `lo` may both be below it and overshoot).
      (k1, m1), (k2, m2) = (lo, sizes[lo]), (hi, sizes[hi])
    else:
      ref = lo if lo else known[0][0]
      (k1, m1), (k2, m2) = sorted(known, key=lambda km: abs(km[0] - ref))[:2]
    if k1 == k2 or m1 == m2:
      return None
    slope = (m2 - m1) / (k2 - k1)
    if slope <= 0:
      return None
    return int(math.floor(k1 + (budget - m1) / slope))

  fitting = [k for k, p in tried.items() if p.fits]
  lo = max(fitting, default=0)
  above = [k for k, p in tried.items() if not p.fits and k > lo]
  hi = min(above, default=None)
  bisect = False  # set when a guided try did not halve the bracket
  for _ in range(64 if max_compiles is None else max_compiles):
    # (64: a bound on compiles; the bracket closes long before)
    if hi is not None and hi - lo <= 1:
      break
    g = None if bisect and hi is not None else guess(lo, hi)
    width = None if hi is None else hi - lo
    if hi is None:
      cap = min(_MAX_SEARCH_PER_DEVICE, 4 * max(lo, 1))
      k = max(lo + 1, min(g, cap)) if g is not None else 2 * max(lo, 1)
      if lo >= _MAX_SEARCH_PER_DEVICE:
        break
      k = min(k, _MAX_SEARCH_PER_DEVICE)
    elif g is None:
      k = (lo + hi) // 2 if lo else max(1, hi // 2)
    else:
      k = min(max(g, lo + 1), hi - 1)
      if k in tried:
        k = (lo + hi) // 2
    if k in tried or k < 1:
      break
    tried[k] = p = measure(k)
    if p.fits:
      lo = k
    else:
      hi = k
    bisect = g is not None and width is not None and 2 * (hi - lo) > width
  log = [(k * n, "fits" if p.fits else ("too big" if p.compiled else "OOM"))
         for k, p in sorted(tried.items())]
  return (lo * n if lo else None), log, tried


def plan(target: str = "local", model: str = "vit_h", dtype: str = "bfloat16",
         batch_size: Union[int, str] = 8, options: Optional[AmgOptions] = None,
         attention: Optional[str] = "auto", *, image_hw: Tuple[int, int] = (1024, 1024),
         margin: float = DEFAULT_MARGIN, find_max_batch: bool = False,
         decoder_prompts: Sequence[int] = (1, 64), programs: Sequence[str] = PROGRAMS,
         crops_per_device: Optional[int] = None, save_dir: Optional[str] = None,
         train_config: Optional[Any] = None,
         progress: Optional[Callable[[str], None]] = None) -> PlanReport:
  """Compiles every program of the bulk job for `target` ahead of time; see the module.

  Args:
    target: "local" (this process's devices, CPUs included) or a TPU topology, "v5e:2x4".
    model: "vit_b", "vit_l", "vit_h" or "tiny".
    dtype: compute dtype ("bfloat16" or "float32").
    batch_size: images per step (split over the devices; rounded up to a multiple of
      the device count), or "auto": the largest encoder batch that fits.
    options: the generator's options (default: the official defaults).
    attention: encoder attention setting ("auto", a kernel, "WINDOWED/GLOBAL").
    image_hw: (H, W) of the images, original pixels.
    margin: fraction of HBM kept free for a program to count as fitting.
    find_max_batch: also search the largest encoder batch that fits.
    decoder_prompts: prompt counts of the interactive decoder programs.
    programs: which of `PROGRAMS` (and `EXTRA_PROGRAMS`) to compile (crop_masks needs
      crop_stats).
    crops_per_device: the generator's most crops per device per call (its
      `crops_per_device` attribute; default: its own choice, 4 on accelerators).
    save_dir: write the bulk job's programs to this persistent compilation cache.
    train_config: the `TrainConfig` of the "train_step" program (default: the
      defaults); its batch size, dtype and attention are replaced by this plan's.
    progress: called with a line before each compile.

  Returns:
    A PlanReport.

  Raises:
    PlanError: bad target, no TPU compiler, or a setting that cannot be built.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from samjax.amg.generator import stats_mask_chunk  # pylint: disable=import-outside-toplevel
  from samjax.config import get_config  # pylint: disable=import-outside-toplevel
  from samjax.runtime import Runtime  # pylint: disable=import-outside-toplevel

  unknown = sorted(set(programs) - set(PROGRAMS + EXTRA_PROGRAMS))
  if unknown:
    raise PlanError(f"unknown program(s) {unknown}; choose from "
                    f"{list(PROGRAMS + EXTRA_PROGRAMS)}")
  options = options if options is not None else AmgOptions()
  options = options.replace(output_mode="coco_rle")
  say = progress or (lambda _: None)
  devices = local_devices() if target == "local" else topology_devices(target)
  spec = device_spec(devices)
  try:
    config = get_config(model)
    rt = Runtime(config, dtype=jnp.dtype(dtype), attention=attention, devices=devices)
  except ValueError as e:
    raise PlanError(str(e)) from None
  n = rt.num_devices
  auto = batch_size == "auto"
  if auto:
    batch_size, find_max_batch = n, True
  batch_size = int(batch_size)
  if batch_size < 1:
    raise PlanError(f"batch_size must be >= 1, got {batch_size}")
  step = -(-batch_size // n) * n
  if crops_per_device is None:
    crops_per_device = 1 if rt.platform == "cpu" else 4  # AutomaticMaskGenerator's choice
  if crops_per_device < 1:
    raise PlanError(f"crops_per_device must be >= 1, got {crops_per_device}")
  pack = rt.platform != "cpu"
  common = dict(num_devices=n, capacity_bytes=spec.hbm_bytes, margin=margin,
                peak_flops=spec.peak_flops, hbm_bandwidth=spec.hbm_bandwidth)
  s = config.image_size
  enc_out: Dict[int, Dict[str, Any]] = {}  # batch -> the compiled encoder's output sharding

  def encode_prog(batch: int, in_job: bool, calls: float = 0.0) -> ProgramPlan:
    prog = ProgramPlan("encode", f"{batch} x {s}x{s} images ({batch // n}/device)", in_job,
                       batch, "image", calls_per_image=calls, **common)
    say(f"compiling encode, batch {batch} ...")
    return _measure(prog, lambda: rt.lower_encode(batch), enc_out.setdefault(batch, {}))

  with jax.default_matmul_precision(None), _persistent_cache(save_dir):
    wanted, programs = set(programs), []
    if "encode" not in wanted and (find_max_batch or auto):
      raise PlanError("the batch search compiles the encoder: include 'encode'")
    step_prog = encode_prog(step, in_job=False) if "encode" in wanted else None
    encoders: Dict[int, ProgramPlan] = {}

    def job_encoders(calls: List[CropCall]) -> None:
      for call in calls if "encode" in wanted else ():
        b = call.per_device * n
        if b not in encoders:
          if b == step:  # the --batch-size step is itself the job's call
            step_prog.in_job = True
            encoders[b] = step_prog
          else:
            encoders[b] = encode_prog(b, in_job=True)
        encoders[b].calls_per_image += call.calls_per_image

    if not auto:
      calls = job_calls(config, options, image_hw, batch_size, n, crops_per_device)
      job_encoders(calls)
    if find_max_batch:
      best, log, tried = _search(lambda k: encode_prog(k * n, in_job=False), step_prog,
                                 known=list(encoders.values()))
      if auto and best is not None:
        step = batch_size = best
        step_prog = tried[best // n]
      step_prog.max_batch, step_prog.search = best, log
      if best is not None:
        step_prog.max_batch_bytes = tried[best // n].total_bytes
      if auto:
        calls = job_calls(config, options, image_hw, batch_size, n, crops_per_device)
        job_encoders(calls)
    if step_prog is not None:
      programs.append(step_prog)
    programs += [p for p in encoders.values() if p is not step_prog]
    for call in calls if "crop_stats" in wanted else ():
      b = call.per_device * n
      hb, wb = call.bucket
      where = f"{hb}x{wb} crops, {call.n_batches} point batches, {call.per_device}/device"
      chunk = stats_mask_chunk(rt.platform, call.bucket)
      emb = jax.ShapeDtypeStruct((b, config.embedding_size, config.embedding_size,
                                  config.prompt_embed_dim), rt.dtype,
                                 sharding=enc_out.get(b, {}).get("value"))
      stats = ProgramPlan("crop_stats", where, True, b, "crop",
                          calls_per_image=call.calls_per_image, **common)
      holder: Dict[str, Any] = {}

      def lower_stats(call=call, emb=emb, chunk=chunk, holder=holder):
        lowered, rows, cols = _lower_crop_stats(rt, call, emb, options, chunk)
        holder.update(out=lowered.out_info, rows=rows, cols=cols)
        return lowered
      say(f"compiling crop_stats ({where}) ...")
      stats_out: Dict[str, Any] = {}
      programs.append(_measure(stats, lower_stats, stats_out))
      if "out" not in holder or "crop_masks" not in wanted:
        continue
      low_res = holder["out"]["low_res"]
      low_res_sharding = stats_out.get("value", {}).get("low_res") or rt.batch_sharding
      survivors = min(_SURVIVOR_CHUNK, low_res.shape[1])
      masks = ProgramPlan("crop_masks", f"{where}, {survivors} masks", True, b, "crop",
                          calls_per_image=call.calls_per_image, **common)

      def lower_masks(low_res=low_res, holder=holder, b=b, survivors=survivors, chunk=chunk,
                      low_res_sharding=low_res_sharding):
        from samjax.amg import kernels  # pylint: disable=import-outside-toplevel
        lr = _abstract(low_res.shape, low_res.dtype, low_res_sharding)
        idx = _abstract((b, survivors), jnp.int32, rt.batch_sharding)
        return kernels.crop_masks.lower(lr, idx, holder["rows"], holder["cols"], rt=rt,
                                        pack=pack, mask_chunk=chunk)
      say(f"compiling crop_masks ({where}) ...")
      programs.append(_measure(masks, lower_masks))

    if "train_step" in wanted:
      tc = _train_config(train_config, step, dtype, attention)
      train = ProgramPlan("train_step", f"{step} images x {tc.instances_per_image} "
                          f"instances, train={tc.train!r}, {tc.prompt_iters} prompt "
                          f"iterations ({step // n}/device)", False, step, "image", **common)
      say(f"compiling train_step, batch {step} ...")
      programs.append(_measure(train, lambda: _lower_train_step(rt, tc)))

    for prompts in decoder_prompts if "decode" in wanted else ():
      dec = ProgramPlan("decode", f"1 embedding, {prompts} point prompt(s), replicated", False,
                        prompts * n, "prompt", **common)
      say(f"compiling decode, {prompts} prompt(s) ...")
      programs.append(_measure(dec, lambda prompts=prompts: rt.lower_decode(prompts)))

  saved = None
  if save_dir:
    import os  # pylint: disable=import-outside-toplevel
    saved = sorted(f for f in os.listdir(save_dir) if f.endswith("-cache"))

  notes = []
  if any(p.name in ("crop_stats", "crop_masks") and p.compiled for p in programs):
    notes.append(LOOP_NOTE)
  if spec.devices_per_chip > 1:
    notes.append(f"this topology has {spec.devices_per_chip} devices per {spec.chip.name} "
                 "chip (one per TensorCore, megacore off): HBM, FLOP/s and bandwidth are per "
                 "TensorCore; a v4 job with megacore runs one device per chip instead")
  if step != batch_size:
    notes.append(f"batch {batch_size} rounded up to {step} to split over {n} devices")
  enc_job = [p for p in programs if p.name == "encode" and p.in_job]
  if enc_job and all(p.items != step for p in enc_job):
    notes.append(f"the bulk job embeds at most {crops_per_device} crops per device per call, "
                 f"so its encoder runs at {', '.join(str(p.items) for p in enc_job)} "
                 f"rather than {step} images per call")
  return PlanReport(
      target=target, model=model, dtype=jnp.dtype(dtype).name, attention=str(rt.attention),
      batch_size=batch_size, image_hw=tuple(image_hw), num_devices=n,
      device_kind=devices[0].device_kind, devices_per_chip=spec.devices_per_chip,
      capacity_bytes=spec.hbm_bytes, margin=margin, programs=programs, chip=spec.chip,
      crops_per_device=crops_per_device, saved_to=save_dir, saved_files=saved, notes=notes)
