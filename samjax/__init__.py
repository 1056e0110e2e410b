"""samjax: Segment Anything in JAX/Flax."""

__version__ = "0.1.0"

from samjax.config import SamConfig, get_config, tiny, vit_b, vit_h, vit_l  # noqa: E402
from samjax.modeling import Sam, postprocess_masks, preprocess  # noqa: E402
from samjax.checkpoint import (CheckpointError, convert_checkpoint, load_any,  # noqa: E402
                               load_params, save_params)
from samjax.functional import decode_masks, encode_image, upscale_masks  # noqa: E402


def build_sam(config, dtype=None):
  """The Flax `Sam` module for `config` (a SamConfig or a name like "vit_b")."""
  import jax.numpy as jnp
  if isinstance(config, str):
    config = get_config(config)
  return Sam(config, dtype=dtype or jnp.float32)
from samjax.model import SamModel  # noqa: E402
from samjax.predictor import Predictor, SAMPredictor, SamPredictor  # noqa: E402
from samjax.transforms import ResizeLongestSide  # noqa: E402
from samjax.automatic import AutomaticMaskGenerator, SamAutomaticMaskGenerator, SAMAutomaticMaskGenerator  # noqa: E402
