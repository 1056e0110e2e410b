"""What a run shows: the training curves as a PNG, and progress bars."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional

from samjax.io.files import atomic_open


MATPLOTLIB_MISSING = ("curves.png is not written: it needs matplotlib, which is not "
                      "installed (pip install \"samjax[viz]\"); log.json holds the same "
                      "numbers")


def matplotlib_missing() -> Optional[str]:
  """`MATPLOTLIB_MISSING` when matplotlib cannot be imported, else None."""
  try:
    import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return MATPLOTLIB_MISSING
  return None


def plot_curves(log: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Training loss and validation mIoU against step, as a PNG (matplotlib Agg).

  Args:
    log: the run's log (`train` and `eval` records, `train_config`).
    path: the PNG to write (replaced atomically).

  Raises:
    ImportError: matplotlib is not installed (`MATPLOTLIB_MISSING`: the message
      names the `viz` extra).
  """
  missing = matplotlib_missing()
  if missing:
    raise ImportError(missing)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  train = log.get("train", [])
  if train:
    steps = [r["step"] for r in train]
    ax1.plot(steps, [r["loss"] for r in train], lw=0.8, label="loss")
    ax1.plot(steps, [r["focal"] * log["train_config"]["focal_weight"] for r in train], lw=0.8,
             label="focal (weighted)")
    ax1.plot(steps, [r["dice"] for r in train], lw=0.8, label="dice")
    ax1.plot(steps, [r["iou_mse"] for r in train], lw=0.8, label="iou mse")
    ax1.set_yscale("log")
  ax1.set_xlabel("step")
  ax1.set_title("training loss")
  if train:
    ax1.legend(fontsize=8)
  ev = log.get("eval", [])
  if ev:
    steps = [r["step"] for r in ev]
    ax2.plot(steps, [r["point_miou"] for r in ev], "o-", label="val: 1 point (most confident)")
    ax2.plot(steps, [r["box_miou"] for r in ev], "s-", label="val: box")
  if train:
    ax2.plot([r["step"] for r in train], [r["iou_last"] for r in train], lw=0.6, alpha=0.6,
             label="train IoU, last prompt iter")
  ax2.set_ylim(0, 1)
  ax2.set_xlabel("step")
  ax2.set_title("mIoU")
  if ev or train:
    ax2.legend(fontsize=8)
  fig.tight_layout()
  try:
    with atomic_open(path) as f:
      fig.savefig(f, format="png", dpi=90)
  finally:
    plt.close(fig)


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
  """A tqdm bar on stderr; redrawn at most every 30 s when stderr is not a terminal."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tty = sys.stderr.isatty()
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
              dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
