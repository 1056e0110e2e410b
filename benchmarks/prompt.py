"""Prompt path: prompts/s of prompt encoder + mask decoder on a fixed image embedding.

Each call decodes N single-point prompts (one foreground point each, multimask output:
3 masks per prompt) against the same (1, 64, 64, 256) embedding, which is the official
fp32 encoder's embedding of a random image. Three samjax entry points are timed:

  * `decode_masks` under `jax.jit` (the functional API; device-resident inputs),
  * `SamModel.decode` (what `Predictor` calls: numpy prompts in, bucketing, host->device
    copy of the prompts, low-res logits out on the device),
  * `decode_masks` + `upscale_masks` to the SxS frame in one jit ("upscaled" variant),

against the official `prompt_encoder` + `mask_decoder` (+ `Sam.postprocess_masks` to SxS
for the upscaled variant). Inputs of the official side are on its device beforehand.
The mask decoder is the same network for ViT-B/L/H, so by default it is timed once per
distinct decoder config.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from benchmarks.common import (MODES, Context, Models, compare, free_memory, guarded,
                               jax_precision, jax_sync, jnp_dtype, log, random_images,
                               strip_out, time_calls, torch_mode)

SECTION = "prompt"


def decoder_key(cfg):
  return (cfg.image_size, cfg.prompt_embed_dim, cfg.mask_in_chans, cfg.decoder_depth,
          cfg.decoder_mlp_dim, cfg.decoder_num_heads, cfg.num_multimask_outputs,
          cfg.iou_head_depth, cfg.iou_head_hidden_dim)


def _embedding(ctx: Context, models: Models) -> np.ndarray:
  """(1, h, w, C) fp32 official embedding of a random image (cached by the encoder run)."""
  from benchmarks.encoder import _official_encode, _to_nhwc
  cache = ctx.cache.setdefault(models.name, {})
  if "emb_ref" not in cache:
    torch = ctx.torch
    img = random_images(ctx.args.seed + 101, 1, models.config.image_size)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))).to(ctx.torch_device)
    with torch_mode(ctx, MODES["float32"]):
      cache["emb_ref"] = _to_nhwc(_official_encode(ctx, models, x))
    del x
  return cache["emb_ref"]


def _official_decode(ctx, models, emb, coords, labels, upscale: bool):
  m = models.official
  sparse, dense = m.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
  low, iou = m.mask_decoder(image_embeddings=emb, image_pe=m.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=True)
  if upscale:
    s = models.config.image_size
    return m.postprocess_masks(low, (s, s), (s, s)), iou
  return low, iou


def run(ctx: Context, models: Models) -> None:
  import jax
  import jax.numpy as jnp
  from samjax.functional import decode_masks, upscale_masks
  from samjax.model import SamModel
  args = ctx.args
  torch = ctx.torch
  cfg = models.config
  s = cfg.image_size
  done = ctx.cache.setdefault("_prompt_decoders", {})
  key = decoder_key(cfg)
  if key in done and not args.prompt_all_models:
    ctx.skip(SECTION, models.name, f"mask decoder identical to {done[key]}'s (same sizes); "
             "pass --prompt-all-models to time it again")
    return
  done[key] = models.name

  emb_np = _embedding(ctx, models)
  emb_jax = jax.device_put(jnp.asarray(emb_np), ctx.jax_device)
  emb_torch = torch.from_numpy(np.ascontiguousarray(emb_np.transpose(0, 3, 1, 2))).to(
      ctx.torch_device)
  n_max = max(args.prompts)
  all_pts = np.random.default_rng(args.seed + 3).uniform(0, s, (n_max, 1, 2)).astype(np.float32)
  iters = args.iters if args.iters is not None else args.prompt_iters
  variants = [False, True] if args.prompt_upscale else [False]

  for upscale in variants:
    vname = f"upscaled {s}x{s}" if upscale else "low-res logits"
    for n in args.prompts:
      pts = all_pts[:n]
      labs = np.ones((n, 1), np.int32)
      pts_jax, labs_jax = jax.device_put((pts, labs), ctx.jax_device)
      pts_t = torch.from_numpy(pts).to(ctx.torch_device)
      labs_t = torch.from_numpy(labs.astype(np.int64)).to(ctx.torch_device)
      ref32 = None
      for dname in args.dtypes:
        mode = MODES[dname]
        dt = jnp_dtype(mode)
        label = f"{models.name} {vname} n={n} {dname}"
        if ctx.out_of_time():
          ctx.skip(SECTION, label, "deadline")
          continue
        log(f"[prompt] {label}")
        row: Dict[str, Any] = {"model": models.name, "variant": vname, "upscaled": upscale,
                               "prompts": n, "dtype": dname}
        timings: Dict[str, Optional[dict]] = {"samjax": None, "samjax_model_decode": None,
                                               "official": None}

        if upscale:
          def f(p, e, c, l):
            low, iou = decode_masks(p, e, c, l, config=cfg, multimask_output=True, dtype=dt)
            return upscale_masks(low, (s, s), (s, s), cfg), iou
        else:
          def f(p, e, c, l):
            return decode_masks(p, e, c, l, config=cfg, multimask_output=True, dtype=dt)
        jf = jax.jit(f)
        with guarded(ctx, SECTION, f"{label} samjax"):
          with jax_precision(mode):
            timings["samjax"] = time_calls(lambda: jf(models.params, emb_jax, pts_jax, labs_jax),
                                           jax_sync, args.warmup, iters, args.time_cap)
        if not upscale:
          with guarded(ctx, SECTION, f"{label} SamModel.decode"):
            sm = SamModel(cfg, models.params, dtype=dt)
            with jax_precision(mode):
              timings["samjax_model_decode"] = time_calls(
                  lambda: sm.decode(emb_jax, pts, labs, multimask_output=True), jax_sync,
                  args.warmup, iters, args.time_cap)
        with guarded(ctx, SECTION, f"{label} official"):
          with torch_mode(ctx, mode):
            timings["official"] = time_calls(
                lambda: _official_decode(ctx, models, emb_torch, pts_t, labs_t, upscale),
                lambda _: ctx.torch_sync(), args.warmup, iters, args.time_cap)
        for k, t in timings.items():
          if t is not None:
            t["prompts_per_s"] = n / t["median_s"]
            row[k] = strip_out(t)
        if timings["samjax"] is not None and timings["official"] is not None:
          row["ratio"] = row["samjax"]["prompts_per_s"] / row["official"]["prompts_per_s"]
        if timings["samjax_model_decode"] is not None and timings["official"] is not None:
          row["ratio_model_decode"] = (row["samjax_model_decode"]["prompts_per_s"]
                                       / row["official"]["prompts_per_s"])

        with guarded(ctx, SECTION, f"{label} numerics"):
          off = timings["official"]
          off_out = None if off is None else (off["out"][0].float().cpu().numpy(),
                                              off["out"][1].float().cpu().numpy())
          if dname == "float32" and off_out is not None:
            ref32 = off_out
          if ref32 is None:
            with torch_mode(ctx, MODES["float32"]):
              o = _official_decode(ctx, models, emb_torch, pts_t, labs_t, upscale)
              ref32 = (o[0].float().cpu().numpy(), o[1].float().cpu().numpy())
          num: Dict[str, Any] = {}

          def both(ours, ref):
            d = compare(ours[0], ref[0], masks=True)
            d["iou_pred_max_abs"] = compare(ours[1], ref[1])["max_abs"]
            return d
          for k in ("samjax", "samjax_model_decode"):
            t = timings[k]
            if t is None:
              continue
            ours = (np.asarray(jax.device_get(t["out"][0])),
                    np.asarray(jax.device_get(t["out"][1])))
            num[f"{k}_vs_official_fp32"] = both(ours, ref32)
            if dname != "float32" and off_out is not None:
              num[f"{k}_vs_official_{dname}"] = both(ours, off_out)
            del ours
          if dname != "float32" and off_out is not None:
            num[f"official_{dname}_vs_official_fp32"] = both(off_out, ref32)
          row["numerics"] = num
        ctx.results[SECTION].append(row)
        _log_row(row)
        timings = off_out = None
        free_memory(ctx)
      del pts_jax, labs_jax, pts_t, labs_t
      ref32 = None
      free_memory(ctx)
  del emb_jax, emb_torch
  free_memory(ctx)


def _log_row(row):
  parts = []
  for k in ("samjax", "samjax_model_decode", "official"):
    t = row.get(k)
    if t:
      parts.append(f"{k} {t['prompts_per_s']:.4g} prompts/s")
  if "ratio" in row:
    parts.append(f"ratio {row['ratio']:.2f}x")
  num = row.get("numerics", {}).get("samjax_vs_official_fp32")
  if num:
    parts.append(f"max_rel {num['max_rel']:.2e}, mask IoU {num['iou']:.4f}")
  log("  " + "; ".join(parts))
