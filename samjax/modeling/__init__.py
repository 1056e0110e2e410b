"""Flax modules of SAM, one file per part of the model."""

from samjax.modeling.image_encoder import ImageEncoderViT
from samjax.modeling.mask_decoder import MaskDecoder
from samjax.modeling.prompt_encoder import NOT_A_POINT, PAD_LABEL, PromptEncoder
from samjax.modeling.sam import MASK_THRESHOLD, Sam, postprocess_masks, preprocess
from samjax.modeling.transformer import TwoWayTransformer

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer", "Sam",
           "preprocess", "postprocess_masks", "MASK_THRESHOLD", "PAD_LABEL", "NOT_A_POINT"]
