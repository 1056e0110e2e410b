"""`samjax.plan` / `samjax plan`: the bulk job compiled for TPU chips from this host.

Needs XLA's TPU compiler (libtpu; skipped without it), no TPU. Compiling for a TPU is
slow even for the tiny model, so the tiny cases use 64x64 images and a 4x4 point grid:
every program of the bulk job (encoder, crop_stats, crop_masks) and the fine-tuning
step still compile, at small shapes, for two generations: v5e over 8 chips (2x4) and
v5p over 4 (2x2x1). Not v6e: its compiler retries small
fusions in VMEM, and the same tiny job took 913 s for v6e:2x4 (749 s of it the
encoder) against 130 s for v5p:2x2x1 and 209 s for v4:2x2x1, measured one after the
other on the same busy 2-core host; the README's v6e figures come from
benchmarks/tpu_table.py. ViT-B compiles its encoder once, to check the FLOPs
against an analytic count of what the compiled program computes, on v4, whose
compiler was about twice as fast as v5e's here.

The encoder compiles with the TPU's default kernels ("auto"); SAMJAX_TEST_PLAN_ATTENTION
names others (e.g. "fold_xla") to test everything else when the default does not
compile.
"""

from __future__ import annotations

import json
import math
import os

# Describing a chip loads libtpu, which takes /tmp/libtpu_lockfile; another JAX process
# holding it must not fail this one (nothing here touches a real TPU). Read when libtpu
# is first loaded, so before anything imports it. samjax.plan sets it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

from samjax import plan as plan_lib  # noqa: E402
from samjax.amg.options import AmgOptions  # noqa: E402
from samjax.train.config import TrainConfig  # noqa: E402

pytest.importorskip("libtpu", reason="needs XLA's TPU compiler: pip install 'jax[tpu]'")

# The encoder kernels under test: the TPU default ("auto"), unless this names others
# (e.g. fold_xla, to test the rest while the default is broken).
ATTENTION = os.environ.get("SAMJAX_TEST_PLAN_ATTENTION", "auto")
SMALL = dict(image_hw=(64, 64), options=AmgOptions(points_per_side=4, points_per_batch=16),
             attention=ATTENTION)
SMALL_FLAGS = ["--image-size", "64x64", "--points-per-side", "4", "--points-per-batch", "16",
               "--attention", ATTENTION]
JOB = {"encode", "crop_stats", "crop_masks"}


# ----------------------------------------------------------------------------------
# An analytic count of the encoder's matmul FLOPs, for the kernels the plan compiles.
# ----------------------------------------------------------------------------------
def _up(x: int, m: int) -> int:
  return -(-x // m) * m


def encoder_flops(cfg, attention) -> float:
  """Matmul FLOPs per image of the encoder as samjax computes it (2 per MAC).

  Patch embedding; per block the qkv projection (on the 70x70 padded grid when windows
  are partitioned before projecting, else on the 64x64 real tokens), the attention
  logits and values (per window or global), the decomposed relative positions, the
  output projection (real tokens) and the MLP; the neck's 1x1 and 3x3 convolutions.
  The folded kernels attend with q/k widened by the relative-position channels
  (hd + side_h + side_w, rounded up to 8). "fold_xla" pads v to that width too; the
  Pallas kernel ("fold_tpu") pads q/k and v to 128 lanes, queries to 8 rows and keys
  to 128 (512-row tiles above 1024 tokens), and declares the padded work as its cost.
  """
  g = cfg.embedding_size
  n, c = g * g, cfg.encoder_embed_dim
  heads, ws = cfg.encoder_num_heads, cfg.window_size
  hidden = int(c * cfg.mlp_ratio)
  hd = c // heads
  gp = _up(g, ws)
  macs = n * cfg.patch_size ** 2 * 3 * c
  for i in range(cfg.encoder_depth):
    glob = i in cfg.encoder_global_attn_indexes
    kernel = attention.kernel(not glob)
    groups, per, side = (1, n, g) if glob else ((gp // ws) ** 2, ws * ws, ws)
    qkv_tokens = n if glob or attention.project_first else gp * gp
    rows = keys = per
    d_qk = d_v = hd
    if kernel.startswith("fold"):
      d_qk = _up(hd + 2 * side, 8)
      d_v = d_qk if kernel == "fold_xla" else hd
    if kernel == "fold_tpu":
      single = per <= 1024
      rows, keys = (_up(per, 8), _up(per, 128)) if single else (_up(per, 512),) * 2
      d_qk, d_v = _up(d_qk, 128), _up(d_v, 128)
    macs += qkv_tokens * c * 3 * c + n * c * c + 2 * n * c * hidden
    macs += groups * heads * rows * keys * (d_qk + d_v)
    macs += groups * per * c * 2 * side  # q . R_h and q . R_w
  macs += n * c * cfg.prompt_embed_dim + n * 9 * cfg.prompt_embed_dim ** 2
  return 2.0 * macs


def _tested_attention():
  from samjax.modeling import attention  # pylint: disable=import-outside-toplevel
  return attention.resolve(attention.AttentionConfig.parse(ATTENTION), "tpu", "bfloat16")


# ----------------------------------------------------------------------------------
# Compiled plans (module scope: each compile is tens of seconds).
# ----------------------------------------------------------------------------------
# The fine-tuning step, small: 2 instances per image, 2 prompt iterations (a first
# prompt and one correction, so the scan over corrections is compiled too).
WITH_TRAIN = dict(programs=plan_lib.PROGRAMS + ("train_step",),
                  train_config=TrainConfig(instances_per_image=2, prompt_iters=2))


@pytest.fixture(scope="module")
def tiny_v5e():
  # 8 chips (a v5litepod-8 host); the v5p job below is 4 chips.
  return plan_lib.plan("v5e:2x4", model="tiny", batch_size=8, decoder_prompts=(1,),
                       **SMALL, **WITH_TRAIN)


@pytest.fixture(scope="module")
def tiny_v5p():
  return plan_lib.plan("v5p:2x2x1", model="tiny", batch_size=4, decoder_prompts=(),
                       **SMALL, **WITH_TRAIN)


def _check_job(report, chips):
  assert report.num_devices == chips and report.devices_per_chip == 1
  names = [p.name for p in report.programs]
  assert JOB <= set(names), names
  assert {p.name for p in report.job_programs} == JOB
  for p in report.programs:
    assert p.compiled, (p.name, p.error)
    assert p.fits and 0 < p.total_bytes < 0.9 * report.capacity_bytes, p.to_dict()
    assert p.argument_bytes > 0 and p.flops > 0 and p.bytes_accessed > 0, p.to_dict()
    assert p.roofline_s and p.roofline_s > 0, p.to_dict()
  assert report.ok and not report.failures()
  assert plan_lib.LOOP_NOTE in report.notes  # the crop programs' FLOPs are incomplete
  assert 0 < report.job_peak_bytes < report.capacity_bytes
  assert report.images_per_s_per_chip() > 0
  # Per call, the job processes each image's one (full-image) crop once per program.
  for p in report.job_programs:
    assert math.isclose(p.calls_per_image * p.items, 1.0), p.to_dict()


def test_tiny_bulk_job_compiles_and_fits_v5e(tiny_v5e):
  _check_job(tiny_v5e, 8)
  enc = tiny_v5e.program("encode")
  assert enc.in_job and enc.items == 8 and enc.items_per_device == 1
  decode = [p for p in tiny_v5e.programs if p.name == "decode"]
  assert len(decode) == 1 and not decode[0].in_job
  text = tiny_v5e.format()
  assert "NOT timings" in text and "OK: every program compiles and fits" in text


def test_tiny_bulk_job_compiles_and_fits_v5p(tiny_v5p):
  _check_job(tiny_v5p, 4)  # one megacore device per chip
  assert tiny_v5p.device_kind == "TPU v5"
  assert tiny_v5p.chip is plan_lib.CHIPS["v5p"]


def test_fine_tuning_step_compiles_and_fits(tiny_v5e, tiny_v5p):
  for report, chips in ((tiny_v5e, 8), (tiny_v5p, 4)):
    train = report.program("train_step")
    assert train.compiled and train.fits and not train.in_job, train.to_dict()
    assert train.items == chips and train.num_devices == chips  # one image per chip
    assert "2 instances" in train.detail and "train='decoder'" in train.detail
    enc = report.program("encode")
    # Its state holds the params and the optimizer's moments of the decoder; it
    # encodes its images (frozen encoder) and runs the decoder forward and backward.
    assert train.argument_bytes > enc.argument_bytes, (train.to_dict(), enc.to_dict())
    assert train.flops_per_item > enc.flops_per_item, (train.to_dict(), enc.to_dict())
    assert "fine-tuning step" in report.format()


def test_flops_are_plausible(tiny_v5e, tiny_v5p):
  import samjax  # pylint: disable=import-outside-toplevel
  expected = encoder_flops(samjax.tiny, _tested_attention())
  for report in (tiny_v5e, tiny_v5p):
    got = report.program("encode").flops_per_item
    # Besides matmuls XLA counts the elementwise work (LayerNorm, softmax, GELU),
    # which is a larger share of the tiny model than of the real ones.
    assert 0.9 * expected < got < 1.5 * expected, (got, expected)
    # The job's FLOPs per image add the decoder and the mask upsampling to those.
    assert report.job_flops_per_image > got


@pytest.mark.slow
def test_vit_b_encoder_flops_match_the_analytic_count():
  import samjax  # pylint: disable=import-outside-toplevel
  # One chip, one image: a single compile, which is also the job's. On v4 (a third
  # generation; the tiny job covers v5e and v5p): its compiler took 66-139 s for this
  # program on the busy host, v5e's 123-236 s.
  report = plan_lib.plan("v4:1x1x1", model="vit_b", batch_size=1, programs=("encode",),
                         attention=ATTENTION)
  enc = report.program("encode")
  assert enc.compiled and enc.fits and enc.in_job, enc.to_dict()
  expected = encoder_flops(samjax.vit_b, _tested_attention())
  assert abs(enc.flops_per_item / expected - 1) < 0.2, (enc.flops_per_item, expected)
  # ViT-B's float32 parameters are ~0.36 GB per device, all of them arguments.
  assert 0.3e9 < enc.argument_bytes < 0.5e9, enc.argument_bytes


# ----------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------
def test_cli_batch_that_cannot_fit_fails_with_one_line(tiny_v5e, capsys):
  from samjax.cli import main  # pylint: disable=import-outside-toplevel
  # The job's encoder calls (1 crop per device) are the fixture's: a cache hit; only
  # the 65536-image step compiles, and the compiler refuses it at once.
  rc = main(["plan", "--target", "v5e:2x4", "--model", "tiny", "--batch-size", "65536",
             "--crops-per-device", "1", "--programs", "encode", "--json", "--quiet",
             *SMALL_FLAGS])
  out, err = capsys.readouterr()
  assert rc == 1, err
  report = json.loads(out)
  assert report["ok"] is False and report["failures"]
  step = report["programs"][0]
  assert step["name"] == "encode" and step["items"] == 65536 and not step["fits"]
  assert "needs" in step["error"] and "GiB" in step["error"], step["error"]
  assert [p["fits"] for p in report["programs"][1:]] == [True]  # the job's encoder
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("samjax plan: encode (65536 x"), err
  assert "does not fit" in lines[0] and "Traceback" not in err, err


def test_cli_json_of_a_plan_that_fits(tiny_v5e, capsys):
  from samjax.cli import main  # pylint: disable=import-outside-toplevel
  # The fixture's crop programs (the encoder is not needed for them): cache hits.
  rc = main(["plan", "--target", "v5e:2x4", "--model", "tiny", "--batch-size", "8",
             "--programs", "crop_stats,crop_masks", "--json", *SMALL_FLAGS])
  out, err = capsys.readouterr()
  assert rc == 0, err
  report = json.loads(out)
  assert report["ok"] and not report["failures"] and report["num_devices"] == 8
  assert "NOT timings" in report["disclaimer"]
  assert {p["name"] for p in report["programs"]} == {"crop_stats", "crop_masks"}
  assert report["chip"]["source"].startswith("https://cloud.google.com/tpu/docs/")
  assert "compiling crop_stats" in err  # progress goes to stderr, JSON alone to stdout


def test_cli_setup_errors_are_one_line(monkeypatch, capsys):
  from samjax.cli import main  # pylint: disable=import-outside-toplevel
  assert main(["plan", "--target", "v7x:2x2"]) == 2
  err = capsys.readouterr().err
  assert "unknown target 'v7x:2x2'" in err and len(err.strip().splitlines()) == 1
  # No TPU compiler: the message says what to install.
  monkeypatch.setattr(plan_lib, "_topology_devices", plan_lib._topology_devices.__wrapped__)
  monkeypatch.setitem(__import__("sys").modules, "libtpu", None)
  assert main(["plan", "--target", "v5e:2x2"]) == 2
  err = capsys.readouterr().err
  assert "samjax[tpu]" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------
# Pieces that need no compile.
# ----------------------------------------------------------------------------------
def test_chip_table_cites_its_sources():
  for name, chip in plan_lib.CHIPS.items():
    assert chip.source == f"https://cloud.google.com/tpu/docs/{name}"
    assert chip.peak_flops > 1e14 and chip.hbm_bytes > 1e10 and chip.hbm_bandwidth > 5e11


def test_topologies_are_one_host():
  # libtpu's default describes v5e:2x4 as two hosts of 2x2; a v5litepod-8 VM is one.
  assert len(plan_lib.topology_devices("v5e:2x4")) == 8
  assert len(plan_lib.topology_devices("v5e:1x1")) == 1
  v4 = plan_lib.topology_devices("v4:2x2x1")  # megacore, as a v4 VM: a device per chip
  assert len(v4) == 4 and plan_lib.device_spec(v4).devices_per_chip == 1
  assert plan_lib.device_spec(v4).hbm_bytes == 32 * 2**30
  assert len(plan_lib.topology_devices("v4:1x1x1")) == 1
  v5p = plan_lib.topology_devices("v5p:2x2x1")  # megacore: one device per chip
  assert len(v5p) == 4 and plan_lib.device_spec(v5p).devices_per_chip == 1
  with pytest.raises(plan_lib.PlanError, match="2-D"):
    plan_lib.topology_devices("v5e:2x2x1")


def test_job_calls_follow_the_generator():
  import samjax  # pylint: disable=import-outside-toplevel
  opts = AmgOptions()
  # 8 images on 1 chip: two calls of 4 crops (the generator's most per device).
  (call,) = plan_lib.job_calls(samjax.vit_h, opts, (1024, 1024), 8, 1, 4)
  assert (call.n_batches, call.bucket, call.per_device, call.calls_per_image) == \
      (16, (1024, 1024), 4, 0.25)
  # 8 images on 4 chips: one call, 2 per device; 6 images: still 2 per device (padded).
  (call,) = plan_lib.job_calls(samjax.vit_h, opts, (1024, 1024), 6, 4, 4)
  assert call.per_device == 2
  # Crop layers add buckets: 4 layer-1 crops of 686-687 px (bucket 768) per 1024 image.
  calls = plan_lib.job_calls(samjax.vit_h, opts.replace(crop_n_layers=1), (1024, 1024), 1,
                             1, 4)
  assert {(c.bucket, c.per_device) for c in calls} == {((1024, 1024), 1), ((768, 768), 4)}
  # A single point batch is as wide as its points (at least 64), as the generator's.
  for side, ppb, slots in ((32, 64, 64), (8, 1024, 64), (16, 1024, 256), (4, 16, 16)):
    (call,) = plan_lib.job_calls(samjax.vit_h, AmgOptions(points_per_side=side,
                                                          points_per_batch=ppb),
                                 (1024, 1024), 1, 1, 4)
    assert call.prompts_per_batch == slots, (side, ppb, call)


def test_bad_train_config_and_programs_are_plan_errors():
  with pytest.raises(plan_lib.PlanError, match="train_config"):
    plan_lib._train_config(object(), 8, "bfloat16", "auto")  # pylint: disable=protected-access
  with pytest.raises(plan_lib.PlanError, match="train_config: batch_size must be >= 1"):
    plan_lib._train_config(None, 0, "bfloat16", "auto")  # pylint: disable=protected-access
  with pytest.raises(plan_lib.PlanError, match="unknown program.*'train'.*train_step"):
    plan_lib.plan("v5e:1x1", model="tiny", programs=("encode", "train"))


def test_batch_search_brackets_the_largest_fit():
  def measure_with(cap, fixed, per_item, limit):
    def measure(k):
      p = plan_lib.ProgramPlan("encode", "", False, 2 * k, "image", 2, capacity_bytes=cap)
      need = fixed + per_item * k
      if need > limit:
        p.error, p.needed_bytes = "out of HBM", int(need)
      else:
        p.argument_bytes = int(need)
      return p
    return measure

  for fixed, per_item, start in ((2.6e9, 1.1e9, 8), (0.4e9, 0.05e9, 1), (15e9, 1e9, 4)):
    measure = measure_with(16e9, fixed, per_item, 16.9e9)
    best, log, _ = plan_lib._search(measure, measure(start))  # pylint: disable=protected-access
    truth = [k for k in range(1, 1025) if measure(k).fits]
    assert best == (2 * max(truth) if truth else None), log
    assert len(log) <= 8, log


# ----------------------------------------------------------------------------------
# plan --save, then a job that starts from the saved compilations (CPU: no TPU here).
# ----------------------------------------------------------------------------------
_JOB = r"""
import json, logging, sys
import numpy as np
from flax import traverse_util
import samjax
from samjax.amg.generator import AutomaticMaskGenerator
from samjax.amg.options import AmgOptions
from samjax.cli.automask import _enable_compilation_cache
from samjax.io.checkpoint import param_shapes
from samjax.model import SamModel

_enable_compilation_cache(sys.argv[1])  # what `samjax automask --compilation-cache` does
seen = []
class Log(logging.Handler):
  def emit(self, record):
    seen.append(record.getMessage())
logger = logging.getLogger("jax._src.compiler")
logger.setLevel(logging.DEBUG)
logger.addHandler(Log())
rng = np.random.default_rng(0)
params = {tuple(k.split("/")): rng.standard_normal(s).astype(np.float32) * 0.1
          for k, s in param_shapes(samjax.tiny).items()}
model = SamModel(samjax.tiny, traverse_util.unflatten_dict(params))
# All-pass thresholds: random weights would keep no mask, and crop_masks never run.
options = AmgOptions(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                     stability_score_thresh=0.0, output_mode="coco_rle")
AutomaticMaskGenerator(model, options=options).generate(
    rng.integers(0, 256, (64, 64, 3), np.uint8))
hits = [m.split("'")[1] for m in seen if m.startswith("Persistent compilation cache hit")]
misses = [m.split("'")[1] for m in seen if m.startswith("PERSISTENT COMPILATION CACHE MISS")]
print(json.dumps({"hits": hits, "misses": misses}))
"""


def test_saved_plan_is_what_a_cpu_job_loads(tmp_path):
  """`plan --save DIR` on this host's CPU, then a new process running the generator
  with `--compilation-cache DIR` finds every program of the job there: it compiles
  none of them. (A TPU's entries can only be loaded by a TPU client; see samjax.plan.)
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  cache = tmp_path / "xla"
  report = plan_lib.plan("local", model="tiny", dtype="float32", batch_size=1,
                         image_hw=(64, 64), decoder_prompts=(), save_dir=str(cache),
                         options=AmgOptions(points_per_side=4, points_per_batch=16,
                                            pred_iou_thresh=0.0, stability_score_thresh=0.0))
  assert report.ok and report.device_kind == "cpu", report.format()
  saved = {f.split("-")[0] for f in report.saved_files}
  assert {"jit__encode", "jit_crop_stats", "jit_crop_masks"} <= saved, saved
  out = subprocess.run([sys.executable, "-c", _JOB, str(cache)], capture_output=True,
                       text=True, timeout=600, check=True).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert {"jit__encode", "jit_crop_stats", "jit_crop_masks"} <= set(got["hits"]), got
  assert not {"jit__encode", "jit_crop_stats", "jit_crop_masks"} & set(got["misses"]), got
