"""Analytic FLOP count of SAM's image encoder (for model FLOPs utilisation).

Only matmul-like work is counted (1 MAC = 2 FLOPs); LayerNorm, softmax, GELU and the
residual adds are a few percent of a FLOP and are left out, as is usual for MFU.
Work on the zero padding of windowed blocks (64x64 tokens padded to 70x70) *is* counted:
both implementations really execute it, and it is what the hardware must sustain.

ViT-H at 1024x1024 comes to ~2.98 TMAC = ~5.96 TFLOP per image.
"""

from __future__ import annotations

from typing import Dict

from samjax.config import SamConfig


def _ceil_to(n: int, m: int) -> int:
  return -(-n // m) * m


def encoder_macs(config: SamConfig) -> Dict[str, float]:
  """Multiply-accumulates per image, by component, for `config`'s image encoder."""
  g = config.embedding_size               # token grid side (64 officially)
  n = g * g                               # tokens
  c = config.encoder_embed_dim
  hidden = int(c * config.mlp_ratio)
  p = config.patch_size
  out = config.prompt_embed_dim
  ws = config.window_size
  gp = _ceil_to(g, ws) if ws > 0 else g   # padded grid side (70 officially)
  n_pad = gp * gp                         # tokens the windowed attention sees
  n_win = (gp // ws) ** 2 if ws > 0 else 1
  w_tok = ws * ws                         # tokens per window (196)

  macs = {k: 0.0 for k in ("patch_embed", "qkv", "attn_qk", "attn_av", "rel_pos", "proj",
                           "mlp", "neck")}
  macs["patch_embed"] = n * (p * p * 3) * c
  for i in range(config.encoder_depth):
    if i in config.encoder_global_attn_indexes or ws == 0:
      tok, groups, per_group, side = n, 1, n, g
    else:
      tok, groups, per_group, side = n_pad, n_win, w_tok, ws
    macs["qkv"] += tok * c * 3 * c
    # Per head: (t x hd) @ (hd x t) for the logits and (t x t) @ (t x hd) for the values;
    # summed over heads hd * heads = c.
    macs["attn_qk"] += groups * per_group * per_group * c
    macs["attn_av"] += groups * per_group * per_group * c
    # Decomposed relative position: every query dotted with `side` rows of R_h and of R_w.
    macs["rel_pos"] += 2 * tok * side * c
    macs["proj"] += tok * c * c
    macs["mlp"] += 2 * n * c * hidden     # the MLP runs after unpartition: no padding
  macs["neck"] = n * c * out + n * (9 * out) * out  # 1x1 conv, then 3x3 conv
  macs["total"] = sum(macs.values())
  return macs


def encoder_flops(config: SamConfig) -> Dict[str, float]:
  """FLOPs per image (2 per MAC), by component, with `total`."""
  return {k: 2.0 * v for k, v in encoder_macs(config).items()}


def describe(config: SamConfig) -> str:
  f = encoder_flops(config)
  parts = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in f.items() if k != "total")
  return (f"{config.name}: {f['total'] / 1e9:.5g} GFLOP/image "
          f"({f['total'] / 2e9:.5g} GMAC); GFLOP by part: {parts}")
