"""The official PyTorch SAM, built from a samjax config (for tests and benchmarks).

Needs `torch` and `segment_anything`; nothing on samjax's inference path imports this.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from samjax.config import SamConfig


def build_official(config: SamConfig):
  """An official `segment_anything.modeling.Sam` with `config`'s hyper-parameters."""
  import torch
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  e = config.embedding_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          depth=config.encoder_depth, embed_dim=config.encoder_embed_dim,
          img_size=config.image_size, mlp_ratio=config.mlp_ratio,
          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.encoder_num_heads,
          patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
          global_attn_indexes=list(config.encoder_global_attn_indexes),
          window_size=config.window_size, out_chans=config.prompt_embed_dim),
      prompt_encoder=PromptEncoder(
          embed_dim=config.prompt_embed_dim, image_embedding_size=(e, e),
          input_image_size=(config.image_size, config.image_size),
          mask_in_chans=config.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=config.num_multimask_outputs,
          transformer=TwoWayTransformer(
              depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
              mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
              attention_downsample_rate=config.attention_downsample_rate),
          transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
          iou_head_hidden_dim=config.iou_head_hidden_dim),
      pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std))
  for p in sam.parameters():  # inference only: plain tensors, `.numpy()` works directly
    p.requires_grad_(False)
  return sam.eval()


def randomize_(model, seed: int = 0, std: float = 0.02):
  """Fills *every* parameter and persistent buffer with random values, in place.

  The reference zero-initialises `pos_embed` and the relative position tables, which
  would hide layout bugs; LayerNorm weights are set around 1 so activations stay sane.
  Linear/conv weights get fan-in scaled normals so deep stacks neither explode nor die.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(model.state_dict().items()):
      if name.endswith(("pixel_mean", "pixel_std")):
        continue
      if t.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name
                          or "upscaling.1" in name or "downscaling.1" in name
                          or "downscaling.4" in name) and name.endswith("weight"):
        v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
      elif t.ndim >= 2 and "embed" not in name.split(".")[-2:][0] and "rel_pos" not in name \
          and "gaussian" not in name and "pos_embed" not in name and "tokens" not in name:
        fan_in = int(np.prod(t.shape[1:])) if "upscaling" not in name else t.shape[0]
        v = torch.randn(t.shape, generator=g) / np.sqrt(max(fan_in, 1))
      elif "gaussian" in name:
        v = torch.randn(t.shape, generator=g)
      elif t.ndim >= 2:  # pos_embed, rel_pos tables, embeddings, tokens
        v = 0.5 * torch.randn(t.shape, generator=g)
      else:  # biases
        v = std * 5 * torch.randn(t.shape, generator=g)
      t.copy_(v.to(t.dtype))
  return model


def save_random_checkpoint(config: SamConfig, path, seed: int = 0):
  """Builds an official model with every tensor randomized and saves its state dict."""
  import torch
  model = randomize_(build_official(config), seed)
  torch.save(model.state_dict(), str(path))
  return model
