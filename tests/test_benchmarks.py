"""The benchmark suite runs end to end (tiny model, CPU) and reports what it claims.

Speed is never asserted here (a 2-core CI machine says nothing about speed); what is
checked is that the run produces its JSON/markdown/PNG, that every requested variant got
a row with timings and parity numbers, and that those parity numbers are fp32-tight.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import devprofile as profile_lib


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  rc = bench_main.main([
      "--models", "tiny", "--batch-sizes", "1", "--dtypes", "float32",
      "--attention-impl", "auto,fold_xla,einsum/xla", "--profile", "--iters", "2",
      "--warmup", "1", "--prompts", "2", "--no-prompt-upscale",
      "--amg", "--amg-settings", "defaults", "--amg-dtypes", "float32,bfloat16",
      "--amg-points-per-side", "4", "--amg-iters", "1", "--out", str(out)])
  with open(out / "results.json") as f:
    return rc, out, json.load(f)


def test_outputs_written(tiny_run):
  rc, out, res = tiny_run
  assert rc == 0
  assert res["errors"] == [], res["errors"]
  for name in ("results.json", "results.md", "ratios.png"):
    assert (out / name).stat().st_size > 0
  md = (out / "results.md").read_text()
  assert "## Image encoder" in md and "## Automatic mask generator" in md
  assert "Where the samjax encoder's device time goes" in md


def test_encoder_rows_per_attention_variant(tiny_run):
  _, out, res = tiny_run
  rows = res["encoder"]
  assert [r["attention"]["requested"] for r in rows] == ["auto", "fold_xla", "einsum/xla"]
  assert rows[0]["attention"]["window"] == rows[0]["attention"]["global"] == "einsum"
  assert (rows[2]["attention"]["window"], rows[2]["attention"]["global"]) == ("einsum", "xla")
  # One official timing, shared by the three rows.
  assert len({json.dumps(r["official"], sort_keys=True) for r in rows}) == 1
  for r in rows:
    assert r["samjax"]["images_per_s"] > 0 and r["ratio"] > 0
    num = r["numerics"]["samjax_vs_official_fp32"]
    assert num["max_rel"] < 1e-4 and num["mask_iou"] > 0.999
    prof = r["profile"]
    table = prof.get("kernels") or prof.get("xla_ops") or prof.get("host_ops")
    assert table["total_ms"] > 0 and table["top"]
    assert os.path.exists(out / prof["trace_file"])


def test_amg_rows_compare_with_official_fp32(tiny_run):
  _, _, res = tiny_run
  rows = res["amg"]
  assert [(r["setting"], r["dtype"]) for r in rows] == [("defaults", "float32"),
                                                        ("defaults", "bfloat16")]
  for r in rows:
    assert r["official_dtype"] == "float32"
    assert r["samjax"]["seconds_per_image"] > 0 and r["official"]["seconds_per_image"] > 0
    assert "numerics" in r


def test_attention_env_override_does_not_break_fp32(tmp_path, monkeypatch):
  """Regression: a GPU kernel named in SAMJAX_ATTENTION_IMPL once broke fp32 model setup."""
  monkeypatch.setenv("SAMJAX_ATTENTION_IMPL", "fold_mla")
  rc = bench_main.main(["--models", "tiny", "--batch-sizes", "1", "--dtypes", "float32",
                        "--sections", "encoder", "--iters", "1", "--warmup", "1",
                        "--out", str(tmp_path)])
  res = json.loads((tmp_path / "results.json").read_text())
  assert rc == 0 and res["errors"] == [], res["errors"]
  assert res["encoder"][0]["attention"]["global"] == "einsum"


def test_trace_summary_by_kernel_and_kind(tmp_path):
  """The profile summary sums device events per call, by name and kind, stream lines only."""
  ev = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
  ]
  for _ in range(2):  # two traced calls
    ev += [{"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_sm90_gemm", "ts": 0, "dur": 3000},
           {"ph": "X", "pid": 1, "tid": 7, "name": "cudnn_sdpa_flash_fprop", "ts": 0,
            "dur": 1000},
           {"ph": "X", "pid": 1, "tid": 7, "name": "loop_convert_fusion", "ts": 0, "dur": 500},
           {"ph": "X", "pid": 2, "tid": 9, "name": "host work", "ts": 0, "dur": 99000}]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": ev}, f)
  s = profile_lib.summarize_trace(str(path), calls=2)
  k = s["kernels"]
  assert k["total_ms"] == pytest.approx(4.5)
  assert k["by_kind"]["matmul"]["ms"] == pytest.approx(3.0)
  assert k["by_kind"]["attention"]["ms"] == pytest.approx(1.0)
  assert k["by_kind"]["fusion/other"]["ms"] == pytest.approx(0.5)
  assert k["top"][0]["name"] == "nvjet_sm90_gemm" and k["top"][0]["count_per_call"] == 1
  assert profile_lib.kind_of("cudnn-conv-bias-activation") == "convolution"
  assert profile_lib.kind_of("loop_convert_fusion_3") == "fusion/other"


def test_no_benchmark_module_shadows_the_standard_library():
  """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a file there named like a
  stdlib module (it happened with profile.py) breaks cProfile, and with it `import torch`."""
  import sys
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  names = {f[:-3] for f in os.listdir(here) if f.endswith(".py")}
  assert not names & set(sys.stdlib_module_names)


def test_bulk_throughput_settings_mean_the_same_on_both_sides():
  """benchmarks/bulk_throughput.py gives amg.py and `samjax automask` the same flags: each
  setting must parse on both sides into the same generator options."""
  from benchmarks import bulk_throughput as bulk
  from samjax.cli import build_parser
  from samjax.cli.automask import options_from_args
  path = bulk.find_official_amg()
  if path is None:
    pytest.skip("the official scripts/amg.py is not here (set $SAMJAX_OFFICIAL_AMG)")
  amg = bulk.load_official_amg(path)
  for setting, values in bulk.SETTINGS.items():
    flags = bulk.gen_flags(bulk.Run.parse(f"vit_b:12:{setting}:3"))
    official = amg.get_amg_kwargs(amg.parser.parse_args(
        ["--input", "x", "--output", "y", "--model-type", "vit_b", "--checkpoint", "c",
         *flags]))
    assert official == {"points_per_side": 12, **values}
    ours = options_from_args(build_parser().parse_args(["automask", "x", "--out", "y",
                                                        *flags]))
    for k, v in official.items():
      assert getattr(ours, k) == v, (setting, k)
  with pytest.raises(Exception, match="MODEL:POINTS:SETTING"):
    bulk.Run.parse("vit_b:8:nonsense")
