"""samjax: Segment Anything in JAX/Flax.

The public names below are imported on first use (PEP 562), so that `import samjax`
(and `samjax --help`) does not pay for importing jax and flax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SamConfig": "samjax.config", "get_config": "samjax.config", "tiny": "samjax.config",
    "vit_b": "samjax.config", "vit_h": "samjax.config", "vit_l": "samjax.config",
    "Sam": "samjax.modeling", "postprocess_masks": "samjax.modeling",
    "preprocess": "samjax.modeling",
    "CheckpointError": "samjax.io.checkpoint", "convert_checkpoint": "samjax.io.checkpoint",
    "load_any": "samjax.io.checkpoint", "load_params": "samjax.io.checkpoint",
    "save_params": "samjax.io.checkpoint",
    "decode_masks": "samjax.functional", "encode_image": "samjax.functional",
    "upscale_masks": "samjax.functional",
    "Runtime": "samjax.runtime",
    "SamModel": "samjax.model",
    "Predictor": "samjax.predictor", "SAMPredictor": "samjax.predictor",
    "SamPredictor": "samjax.predictor",
    "ResizeLongestSide": "samjax.transforms",
    "AmgOptions": "samjax.amg.options",
    "AutomaticMaskGenerator": "samjax.amg.generator",
    "SamAutomaticMaskGenerator": "samjax.amg.generator",
    "SAMAutomaticMaskGenerator": "samjax.amg.generator",
}

__all__ = sorted(_EXPORTS) + ["build_sam", "__version__"]


def build_sam(config, dtype=None):
  """The Flax `Sam` module for `config` (a SamConfig or a name like "vit_b")."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from samjax.config import get_config  # pylint: disable=import-outside-toplevel
  from samjax.modeling import Sam  # pylint: disable=import-outside-toplevel
  if isinstance(config, str):
    config = get_config(config)
  return Sam(config, dtype=dtype or jnp.float32)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    # Submodules (samjax.train, samjax.bulk, ...) are found by the import system.
    raise AttributeError(f"module 'samjax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
