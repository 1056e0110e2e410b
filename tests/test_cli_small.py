"""Small things a team meets first (issue #13, parts 5 and 7): output folders that do not
exist yet, checkpoint modes on shared storage, missing optional packages, flag names in
errors, what `pip install .` puts on sys.path, and the README's install lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from samjax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _modes(folder: Path) -> set[tuple[str, int]]:
  """(kind, permission bits) of `folder` and everything under it."""
  out = {("dir", folder.stat().st_mode & 0o777)}
  for p in folder.rglob("*"):
    out.add(("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777))
  return out


def test_predict_creates_the_parent_folders_of_its_outputs(tiny_ckpt, tmp_path, capsys):
  img = np.full((30, 40, 3), 90, np.uint8)
  img[5:20, 8:30] = 200
  cv2.imwrite(str(tmp_path / "in.png"), img)
  out = tmp_path / "new" / "deeper" / "x.png"
  masks = tmp_path / "other" / "m.npz"
  assert main(["predict", str(tmp_path / "in.png"), "--checkpoint", str(tiny_ckpt[1]),
               "--point", "15,12", "--out", str(out), "--masks-out", str(masks)]) == 0
  assert cv2.imread(str(out)).shape == (30, 40, 3)
  assert set(np.load(masks)) == {"masks", "scores", "low_res_logits"}
  assert f"wrote {out} and {masks}" in capsys.readouterr().out


def test_checkpoint_folders_follow_the_umask(tiny_ckpt, tiny_params, tmp_path):
  from samjax.io.checkpoint import save_params
  umask = os.umask(0o022)
  os.umask(umask)
  # The session's converted checkpoint, made under this process's umask.
  assert _modes(Path(tiny_ckpt[1])) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
  old = os.umask(0o027)  # a group-shared setup
  try:
    dst = save_params(tiny_params, tiny_ckpt[3], tmp_path / "shared" / "ckpt")
  finally:
    os.umask(old)
  assert _modes(dst) == {("dir", 0o750), ("file", 0o640)}


def test_export_torch_without_torch_names_the_extra(tiny_ckpt, tmp_path):
  code = ("import sys; sys.modules['torch'] = None\n"
          "from samjax.cli import main\n"
          f"sys.exit(main(['export-torch', {str(tiny_ckpt[1])!r}, {str(tmp_path / 'o.pth')!r}]))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  assert lines[0].startswith("samjax export-torch: error: ") and \
      'pip install "samjax[torch]"' in lines[0]
  assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("argv, words", [
    (["--steps", "10"], ["--steps 10 is too few", "--warmup-steps 50"]),
    (["--steps", "10", "--warmup-steps", "-1"], ["--warmup-steps must be >= 0"]),
    (["--box-fraction", "2"], ["--box-fraction must be in [0, 1]"]),
])
def test_finetune_errors_name_the_flag(tmp_path, capsys, argv, words):
  out = tmp_path / "run"
  assert main(["finetune", "--data", str(tmp_path / "none.json"), "--from-scratch",
               "--out", str(out), *argv]) == 2
  err = capsys.readouterr().err
  for w in words:
    assert w in err, err
  assert "total_steps" not in err and "box_fraction" not in err
  assert not out.exists()


def test_curves_without_matplotlib_warn_clearly(tiny_ckpt, tmp_path, monkeypatch, capsys):
  import samjax.train
  from samjax.data.synthetic import write_coco_dataset
  from samjax.train import plots
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert 'pip install "samjax[viz]"' in plots.matplotlib_missing()
  with pytest.raises(ImportError, match=r"curves\.png is not written.*samjax\[viz\]"):
    plots.plot_curves({"train": [], "eval": []}, tmp_path / "curves.png")
  assert not (tmp_path / "curves.png").exists()

  # The command says so once, at start.
  data = write_coco_dataset(str(tmp_path / "data"), 1, seed=0, size=64)
  ran = []
  monkeypatch.setattr(samjax.train, "finetune", lambda *a, **kw: ran.append(1) or
                      types.SimpleNamespace(finished=True, step=2, best_dir=None))
  assert main(["finetune", "--data", data, "--checkpoint", str(tiny_ckpt[1]),
               "--out", str(tmp_path / "run"),
               "--steps", "2", "--warmup-steps", "0", "--no-progress"]) == 0
  assert ran == [1]
  err = capsys.readouterr().err
  assert err.count("warning: curves.png is not written") == 1


def test_the_wheel_installs_only_samjax(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
  for name in ("samjax", "convert", "benchmarks"):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                      "--no-build-isolation", "-w", str(tmp_path / "w"), str(src)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  (wheel,) = (tmp_path / "w").glob("samjax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split("/")[0] for n in names} == {"samjax", wheel.name.split("-py")[0] +
                                              ".dist-info"}
  assert "samjax/serve/static/index.html" in names  # package data still there
  # From a checkout, the scripts still run as the README says.
  r = subprocess.run([sys.executable, "-m", "convert.sam_to_orbax", "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr


def test_readme_install_lines_use_extras_that_exist():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  assert extras["cuda"] == ["jax[cuda12]==0.10.2"] and extras["tpu"] == ["jax[tpu]==0.10.2"]
  readme = (ROOT / "README.md").read_text()
  setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
  for line in ('pip install ".[cuda]"', 'pip install ".[tpu]"', '".[cuda13]"'):
    assert line in setup
  for extra in ("cuda", "cuda13", "tpu", "torch", "viz"):
    assert extra in extras
  # The pins follow the installed jax (a release the extras can resolve with).
  from importlib.metadata import version
  assert all(dep.endswith("==" + version("jax")) for dep in extras["cuda"] +
             extras["cuda13"] + extras["tpu"])
  # The provenance table names every Provenance field.
  import dataclasses
  from samjax.bulk.provenance import Provenance
  table = readme.split("### Provenance and resume", 1)[1].split("\n## ", 1)[0]
  for field in dataclasses.fields(Provenance):
    assert f"`{field.name}" in table, field.name
