"""Fine-tuned params -> an official PyTorch SAM state dict (`.pth`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import jax
import numpy as np

from samjax.config import SamConfig
from samjax.io.checkpoint import METADATA_FILE, load_params, save_torch_state_dict
from samjax.train.config import BEST_DIR

OFFICIAL_MODELS = ("vit_b", "vit_l", "vit_h")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
  """A samjax checkpoint directory; a finetune output folder resolves to its best/."""
  src = Path(path)
  if not (src / METADATA_FILE).exists() and (src / BEST_DIR / METADATA_FILE).exists():
    return src / BEST_DIR
  return src


def export_torch(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                 overwrite: bool = False, verify: bool = False) -> Tuple[Path, SamConfig]:
  """Writes a samjax checkpoint as an official-format `.pth` state dict.

  Args:
    checkpoint: samjax Orbax checkpoint directory, or a finetune output folder (its
      best/ is exported).
    output: the .pth to write.
    overwrite: replace an existing `output`.
    verify: load the file into the official PyTorch SAM (strict) afterwards.

  Returns:
    (the written path, the model config).

  Raises:
    FileExistsError: `output` exists and not `overwrite`.
    CheckpointError: `checkpoint` is not a samjax checkpoint.
  """
  src = resolve_checkpoint(checkpoint)
  out = Path(output)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists")
  config, params = load_params(src)
  # Writable copies: torch.from_numpy warns on the read-only views of jax arrays.
  save_torch_state_dict(jax.tree_util.tree_map(np.array, params), config, out)
  if verify:
    import torch  # pylint: disable=import-outside-toplevel
    from samjax.reference import build_official  # pylint: disable=import-outside-toplevel
    build_official(config).load_state_dict(torch.load(str(out), weights_only=True))
  return out, config


def load_hint(config: SamConfig) -> str:
  """How to load an exported .pth of `config` in PyTorch."""
  if config.name in OFFICIAL_MODELS:
    return f"segment_anything.sam_model_registry[{config.name!r}](checkpoint=...)"
  return ("samjax.reference.build_official(config).load_state_dict(torch.load(..., "
          "weights_only=True))")
