"""samjax: Segment Anything in JAX/Flax."""

__version__ = "0.1.0"

from samjax.config import SamConfig, get_config, tiny, vit_b, vit_h, vit_l  # noqa: E402
from samjax.modeling import Sam, postprocess_masks, preprocess  # noqa: E402
