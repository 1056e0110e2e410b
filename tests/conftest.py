"""Shared fixtures: randomized official checkpoints, converted through the public API.

Every test compares against the official `segment_anything` package on the same
weights. fp32 comparisons pin matmul precision to "highest" (on TPU/GPU the default
would use bf16 passes and hide real layout bugs behind rounding noise).
"""

from __future__ import annotations

import json
import os

# The suite is written for CPUs. With the TPU compiler installed (the dev extra), JAX
# would otherwise look for a local TPU at start-up in every process, subprocesses
# included; compiling *for* TPU chips from this host works with JAX_PLATFORMS=cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a process-wide lockfile; tests that describe TPU chips (and their
# subprocesses) must not fail because another JAX process holds it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

PARITY_ROWS = []


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
  """(pth path, orbax dir, official torch model, config) for the tiny config, seed 1."""
  import samjax
  from samjax import reference
  from samjax.io.checkpoint import convert_checkpoint
  d = tmp_path_factory.mktemp("tiny")
  pth = d / "sam_tiny_random.pth"
  model = reference.save_random_checkpoint(samjax.tiny, pth, seed=1)
  orbax_dir = d / "orbax"
  convert_checkpoint(pth, orbax_dir)
  return pth, orbax_dir, model, samjax.tiny


@pytest.fixture(scope="session")
def tiny_params(tiny_ckpt):
  from samjax.io.checkpoint import load_params
  return load_params(tiny_ckpt[1])[1]


@pytest.fixture
def record():
  """record(name, **numbers): adds a row to the parity table printed at the end."""
  def _record(name, **numbers):
    PARITY_ROWS.append({"case": name, **{k: float(v) for k, v in numbers.items()}})
  return _record


def parity_stats(ours, ref, threshold=None):
  """max abs error, max error relative to the reference's max magnitude, mask IoU."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err = np.abs(ours - ref).max() if ref.size else 0.0
  scale = max(np.abs(ref).max(), 1e-12) if ref.size else 1.0
  out = {"max_abs": err, "max_rel": err / scale}
  if threshold is not None:
    a, b = ours > threshold, ref > threshold
    union = np.logical_or(a, b).sum()
    out["mask_iou"] = np.logical_and(a, b).sum() / union if union else 1.0
  return out


def pytest_terminal_summary(terminalreporter):
  if not PARITY_ROWS:
    return
  tr = terminalreporter
  tr.section("samjax parity vs official PyTorch SAM")
  keys = ["max_abs", "max_rel", "mask_iou"]
  tr.write_line(f"{'case':58s} " + " ".join(f"{k:>10s}" for k in keys))
  for row in PARITY_ROWS:
    vals = " ".join(f"{row[k]:10.2e}" if k in row and k != "mask_iou" else
                    (f"{row[k]:10.5f}" if k in row else f"{'-':>10s}") for k in keys)
    tr.write_line(f"{row['case']:58s} {vals}")
  out = os.environ.get("SAMJAX_PARITY_REPORT")
  if out:
    with open(out, "w") as f:
      json.dump(PARITY_ROWS, f, indent=1)
