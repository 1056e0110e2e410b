"""Model configurations: the three official SAM variants and a tiny one for tests.

Configs are frozen dataclasses so they can be passed as static arguments to `jax.jit`
and hashed into compilation caches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Hyper-parameters of a SAM model (names follow `segment_anything.build_sam`).

  Attributes:
    name: variant name (`vit_b`, `vit_l`, `vit_h`, `tiny` or `custom`).
    image_size: side of the square model input frame, in pixels (1024 officially).
    patch_size: ViT patch size in pixels.
    encoder_embed_dim / encoder_depth / encoder_num_heads: ViT width, depth and heads.
    encoder_global_attn_indexes: blocks that attend globally; the others use windows.
    window_size: window side in patches for windowed blocks (14 officially; the
      64x64 token grid is padded to 70x70).
    mlp_ratio: ViT MLP hidden size over width.
    prompt_embed_dim: width of the neck output, prompt encoder and mask decoder.
    mask_in_chans: channels of the dense (mask) prompt downscaler.
    decoder_depth / decoder_mlp_dim / decoder_num_heads: two-way transformer sizes.
    attention_downsample_rate: internal width divisor of the cross attentions.
    num_multimask_outputs: masks returned with `multimask_output=True`.
    iou_head_depth / iou_head_hidden_dim: IoU prediction MLP.
    pixel_mean / pixel_std: RGB normalisation, in 0..255 units.
  """

  name: str = "vit_b"
  image_size: int = 1024
  patch_size: int = 16
  encoder_embed_dim: int = 768
  encoder_depth: int = 12
  encoder_num_heads: int = 12
  encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
  window_size: int = 14
  mlp_ratio: float = 4.0
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_mlp_dim: int = 2048
  decoder_num_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
  pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)

  @property
  def embedding_size(self) -> int:
    """Side of the image embedding grid (64 for the official models)."""
    return self.image_size // self.patch_size

  @property
  def low_res_mask_size(self) -> int:
    """Side of the decoder's low-resolution mask logits (256 officially)."""
    return 4 * self.embedding_size

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    return d

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "SamConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown SamConfig fields: {sorted(unknown)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)

  def replace(self, **kw) -> "SamConfig":
    return dataclasses.replace(self, **kw)


vit_b = SamConfig(
    name="vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
    encoder_global_attn_indexes=(2, 5, 8, 11))
vit_l = SamConfig(
    name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
    encoder_global_attn_indexes=(5, 11, 17, 23))
vit_h = SamConfig(
    name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
    encoder_global_attn_indexes=(7, 15, 23, 31))
# Small enough to train on a CPU, but structurally complete: windowed blocks whose
# 16x16 token grid is padded to 28x28 (two 14x14 windows a side), global blocks,
# all prompt types, multimask outputs.
tiny = SamConfig(
    name="tiny", image_size=256, patch_size=16, encoder_embed_dim=96, encoder_depth=4,
    encoder_num_heads=4, encoder_global_attn_indexes=(1, 3), window_size=14,
    prompt_embed_dim=64, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=256,
    decoder_num_heads=8, iou_head_hidden_dim=64)

CONFIGS: Dict[str, SamConfig] = {"vit_b": vit_b, "vit_l": vit_l, "vit_h": vit_h, "tiny": tiny}


def get_config(name: str) -> SamConfig:
  """Returns the named config; `default` is ViT-H as in the official registry."""
  if name == "default":
    name = "vit_h"
  if name not in CONFIGS:
    raise ValueError(f"unknown model type {name!r}; expected one of {sorted(CONFIGS)}")
  return CONFIGS[name]
