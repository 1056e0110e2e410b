"""The `samjax` command line: help without jax, the entry point, texts that are true."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest

import samjax.cli
from samjax.cli import COMMANDS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HELP_PROBE = """
import sys
from samjax.cli import main
try:
  main({argv!r})
except SystemExit as e:
  assert e.code == 0, e.code
heavy = sorted(m for m in ("jax", "flax", "torch", "orbax") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def _probe(argv):
  r = subprocess.run([sys.executable, "-c", _HELP_PROBE.format(argv=argv)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout, r.stdout.rsplit("HEAVY:", 1)[1].strip()


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_does_not_import_jax(command):
  argv = ["--help"] if command is None else [command, "--help"]
  out, heavy = _probe(argv)
  assert "usage: samjax" in out
  assert heavy == "", f"`samjax {' '.join(argv)}` imported {heavy}"


def test_every_command_is_registered_and_runs_its_module():
  parser = build_parser()
  sub = next(a for a in parser._actions if a.dest == "command")  # pylint: disable=protected-access
  assert list(sub.choices) == ["convert", "predict", "automask", "finetune", "export-torch",
                               "serve", "plan"]
  for name, module in COMMANDS.items():
    mod = importlib.import_module(module)
    assert sub.choices[name].get_default("func") is mod.run, name
    assert mod.HELP and "\n" not in mod.HELP, name


def test_entry_point_and_module_entry():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts["samjax"] == "samjax.cli:main"
  assert samjax.cli.main is main
  r = subprocess.run([sys.executable, "-m", "samjax.cli", "--version"], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and r.stdout.startswith("samjax "), r.stderr
  exe = shutil.which("samjax", path=os.path.dirname(sys.executable))
  if exe:  # Installed (editable): the console script runs the same main.
    r = subprocess.run([exe, "automask", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--points-per-side" in r.stdout, r.stderr


def test_texts_are_true(capsys):
  from samjax.modeling.attention import KERNELS
  from samjax.cli._common import ATTENTION_EXAMPLES
  assert set(ATTENTION_EXAMPLES) <= set(KERNELS)
  assert not set(ATTENTION_EXAMPLES) & {"auto"}
  with pytest.raises(SystemExit):
    main(["convert", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "torch is not needed" in text and "samjax's own allow-list reader" in text
  assert "jax" in samjax.cli.__doc__ and "export-torch" in samjax.cli.__doc__


def test_convert_needs_no_torch(tiny_ckpt, tmp_path):
  """What `convert --help` promises: with torch unimportable, the command works."""
  code = ("import sys; sys.modules['torch'] = None; from samjax.cli import main; "
          f"sys.exit(main(['convert', {str(tiny_ckpt[0])!r}, {str(tmp_path / 'out')!r}]))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "out").is_dir()


def test_usage_errors_exit_2(tmp_path, capsys):
  assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
  assert "samjax convert: error:" in capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    main(["predict", "x.png", "--out", "y.png", "--attention", "fold/fold/fold"])
  assert info.value.code == 2
  with pytest.raises(SystemExit) as info:
    main(["automask", "x", "--out", "y", "--pred-iou-thresh", "nan"])
  assert info.value.code == 2


def test_convert_scripts_are_the_cli_commands(capsys):
  from convert import orbax_to_sam, sam_to_orbax
  for script, command in ((sam_to_orbax, "convert"), (orbax_to_sam, "export-torch")):
    with pytest.raises(SystemExit) as info:
      script.main(["--help"])
    assert info.value.code == 0
    assert f"usage: samjax {command}" in capsys.readouterr().out
  assert sam_to_orbax.main(["--print-table", "tiny"]) == 0
  rows = capsys.readouterr().out.splitlines()
  assert rows and all(" <- " in r for r in rows)


def test_attention_reaches_the_model(tiny_ckpt, tmp_path, capsys):
  import cv2
  import numpy as np
  img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
  cv2.imwrite(str(tmp_path / "in.png"), img)
  base = ["predict", str(tmp_path / "in.png"), "--checkpoint", str(tiny_ckpt[1]),
          "--point", "30,20"]
  assert main(base + ["--attention", "einsum/xla", "--out", str(tmp_path / "a.png"),
                      "--masks-out", str(tmp_path / "a")]) == 0
  assert main(base + ["--attention", "einsum", "--out", str(tmp_path / "b.png"),
                      "--masks-out", str(tmp_path / "b.npz")]) == 0
  assert not (tmp_path / "a.npz").exists()  # Exactly the named file (np.savez adds .npz).
  a, b = np.load(tmp_path / "a"), np.load(tmp_path / "b.npz")
  # The kernels compute the same function; in fp32 at "highest" matmul precision
  # (conftest) they differ by summation order only, ~1e-6 on these O(1) logits.
  np.testing.assert_allclose(a["low_res_logits"], b["low_res_logits"], atol=1e-4)
  capsys.readouterr()
  assert main(base + ["--attention", "no_such_kernel", "--out", str(tmp_path / "c.png")]) == 2
  err = capsys.readouterr().err
  assert "samjax predict: error:" in err and "no_such_kernel" in err
  assert not (tmp_path / "c.png").exists()
