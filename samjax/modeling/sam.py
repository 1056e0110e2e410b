"""The composed SAM model (mirrors `segment_anything/modeling/sam.py`).

`Sam` holds the three parts under the reference's attribute names (`image_encoder`,
`prompt_encoder`, `mask_decoder`). Use `Sam.apply(..., method=...)` with
`embed_image`, `encode_prompts`, `decode` or `predict` to run one stage.
Pre/post-processing are plain functions of the config: they have no parameters.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from samjax.config import SamConfig
from samjax.modeling.attention import AttentionConfig
from samjax.modeling.image_encoder import ImageEncoderViT
from samjax.modeling.mask_decoder import MaskDecoder
from samjax.modeling.prompt_encoder import PromptEncoder
from samjax.resize import resize_bilinear

Dtype = Any

MASK_THRESHOLD = 0.0


class Sam(nn.Module):
  """Segment Anything: image encoder + prompt encoder + mask decoder."""

  config: SamConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Any = AttentionConfig()  # image encoder kernels, see modeling.attention

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.image_encoder = ImageEncoderViT(
        image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.prompt_embed_dim, window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
        attention=self.attention, **kw)
    e = cfg.embedding_size
    self.prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
        input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
        **kw)
    self.mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        transformer_depth=cfg.decoder_depth, transformer_num_heads=cfg.decoder_num_heads,
        transformer_mlp_dim=cfg.decoder_mlp_dim,
        attention_downsample_rate=cfg.attention_downsample_rate, **kw)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """Preprocessed images (B, S, S, 3) -> embeddings (B, S/16, S/16, C)."""
    return self.image_encoder(images)

  def encode_prompts(self, points=None, labels=None, boxes=None, masks=None, batch_size=None):
    return self.prompt_encoder(points, labels, boxes, masks, batch_size)

  def get_dense_pe(self) -> jax.Array:
    return self.prompt_encoder.get_dense_pe()

  def decode(self, image_embeddings, sparse, dense, multimask_output: bool, token_mask=None):
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                             dense, multimask_output, token_mask)

  def predict(self, image_embeddings: jax.Array, points: Optional[jax.Array] = None,
              labels: Optional[jax.Array] = None, boxes: Optional[jax.Array] = None,
              mask_input: Optional[jax.Array] = None, multimask_output: bool = True
              ) -> Tuple[jax.Array, jax.Array]:
    """Prompts (input frame) -> (low-res mask logits (B, M, 4h, 4w), iou (B, M))."""
    batch = None
    if points is None and boxes is None and mask_input is None:
      batch = image_embeddings.shape[0]
    sparse, token_mask, dense = self.prompt_encoder(points, labels, boxes, mask_input, batch)
    return self.decode(image_embeddings, sparse, dense, multimask_output, token_mask)

  def __call__(self, images, points=None, labels=None, boxes=None, mask_input=None,
               multimask_output: bool = True):
    """Full forward on preprocessed images; one prompt set per image."""
    emb = self.embed_image(images)
    return self.predict(emb, points, labels, boxes, mask_input, multimask_output)


def preprocess(images: jax.Array, config: SamConfig) -> jax.Array:
  """Normalises and zero-pads resized images to the square model frame.

  Args:
    images: (B, h, w, 3) RGB in 0..255 (any real dtype), long side == image_size.

  Returns:
    (B, S, S, 3) float32.
  """
  mean = jnp.asarray(config.pixel_mean, jnp.float32)
  std = jnp.asarray(config.pixel_std, jnp.float32)
  x = (images.astype(jnp.float32) - mean) / std
  s = config.image_size
  h, w = x.shape[1], x.shape[2]
  if h > s or w > s:
    raise ValueError(f"resized image is {h}x{w}, larger than the model frame {s}x{s}")
  return jnp.pad(x, ((0, 0), (0, s - h), (0, s - w), (0, 0)))


def postprocess_masks(masks: jax.Array, input_size: Tuple[int, int],
                      original_size: Tuple[int, int], config: SamConfig) -> jax.Array:
  """Low-res logits (..., 4h, 4w) -> logits at the original image size (..., H, W).

  As the reference: upsample to the padded S x S frame, crop the un-padded
  `input_size`, then resize to `original_size`, all bilinear without antialiasing.
  """
  s = config.image_size
  x = resize_bilinear(masks, (s, s))
  x = x[..., :input_size[0], :input_size[1]]
  return resize_bilinear(x, tuple(original_size))
