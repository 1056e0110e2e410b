"""Image encoder: images/s and embedding parity, samjax (jit) vs official (eager PyTorch).

Both sides time normalisation + the ViT + neck on a device-resident (B, S, S, 3) batch of
full-frame images and stop the clock when the embeddings are ready on the device
(`block_until_ready` / `cuda.synchronize`). Host transfers are not timed.

Numerics compare the (B, 64, 64, 256) embeddings directly and, because an embedding is
only as good as the masks it yields, also through the official fp32 decoder: 16 point
prompts on image 0 decoded from each embedding, thresholded at 0, IoU vs. the masks
decoded from the fp32 reference embedding.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from benchmarks import flops as flops_lib
from benchmarks.common import (MODES, Context, Models, attention_impls, compare, free_memory,
                               guarded, jax_precision, jax_sync, jnp_dtype, log,
                               random_images, strip_out, supports_kwarg, time_calls,
                               torch_mode)

SECTION = "encoder"
N_PROBE_POINTS = 16


def _make_samjax_encoder(models: Models, mode, attention_impl: Optional[str]):
  import jax
  cfg, dt = models.config, jnp_dtype(mode)
  try:
    from samjax.runtime import Runtime
  except ImportError:  # older samjax, for A/B runs against earlier commits
    from samjax.functional import encode_image
    kw = {"attention_impl": attention_impl} if attention_impl and supports_kwarg(
        encode_image, "attention_impl") else {}
    return jax.jit(lambda params, images: encode_image(params, images, cfg, dt, **kw))
  rt = Runtime(cfg, dtype=dt, devices=jax.devices()[:1],
               attention=None if attention_impl in (None, "", "auto") else attention_impl)
  # A fresh jit per configuration, so its first call really compiles; the runtime's
  # traceable encoder carries its resolved kernels.
  return jax.jit(lambda params, images: rt.encoder(params, images))


def _official_encode(ctx: Context, models: Models, x):
  m = models.official
  return m.image_encoder(m.preprocess(x))


def _probe_points(config, seed: int) -> np.ndarray:
  s = config.image_size
  return np.random.default_rng(seed).uniform(0, s, (N_PROBE_POINTS, 1, 2)).astype(np.float32)


def official_decode_lowres(ctx: Context, models: Models, emb_hwc: np.ndarray,
                           points: np.ndarray) -> np.ndarray:
  """fp32 official prompt encoder + mask decoder on one (h, w, C) embedding.

  points: (K, 1, 2) input-frame xy, one foreground point per prompt.
  Returns (K, 3, 4h, 4w) low-res logits as numpy.
  """
  torch = ctx.torch
  dev = ctx.torch_device
  m = models.official
  emb = torch.from_numpy(np.ascontiguousarray(emb_hwc.transpose(2, 0, 1)[None])).to(dev)
  coords = torch.from_numpy(points).to(dev)
  labels = torch.ones(points.shape[:2], dtype=torch.int64, device=dev)
  with torch_mode(ctx, MODES["float32"]):
    sparse, dense = m.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low, _ = m.mask_decoder(image_embeddings=emb.float(),
                            image_pe=m.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=True)
  return low.float().cpu().numpy()


def _compare_embeddings(ctx, models, ours_nhwc, ref_nhwc, ref_masks, points) -> Dict[str, float]:
  out = compare(ours_nhwc, ref_nhwc)
  masks = official_decode_lowres(ctx, models, np.asarray(ours_nhwc[0], np.float32), points)
  iou = compare(masks, ref_masks, masks=True)
  out["mask_iou"] = iou["iou"]
  out["mask_min_iou"] = iou["min_iou"]
  return out


def _to_nhwc(t) -> np.ndarray:
  return t.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def _finish_timing(t: Dict[str, Any], b: int, fl: float, peak: Dict[str, Any], dname: str):
  t["images_per_s"] = b / t["median_s"]
  t["tflops"] = fl * t["images_per_s"] / 1e12
  bf16_rates = [peak[k]["tflops"] for k in ("jax_bf16", "torch_bf16") if k in peak]
  if bf16_rates:  # the best bf16 matmul rate either framework reached in this run
    t["mfu_vs_bf16_peak"] = t["tflops"] / max(bf16_rates)
  same = {"float32": "jax_fp32", "bfloat16": "jax_bf16"}.get(dname)
  if same in peak:
    t["mfu_vs_same_dtype_peak"] = t["tflops"] / peak[same]["tflops"]
  return strip_out(t)


def run(ctx: Context, models: Models) -> None:
  """One row per (batch, dtype, samjax attention variant); the official model is timed
  once per (batch, dtype) and shared by that pair's rows."""
  import jax
  args = ctx.args
  torch = ctx.torch
  cfg = models.config
  fl = flops_lib.encoder_flops(cfg)["total"]
  peak = ctx.results.get("peak") or {}
  cache = ctx.cache.setdefault(models.name, {})
  points = _probe_points(cfg, args.seed + 7)
  iters = args.iters if args.iters is not None else (5 if cfg.name in ("vit_l", "vit_h") else 10)
  impls = [x.strip() for x in str(args.attention_impl).split(",") if x.strip()] or ["auto"]

  for b in args.batch_sizes:
    images = random_images(args.seed + 100 + b, b, cfg.image_size)
    x_jax = jax.device_put(images, ctx.jax_device)
    x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(
        ctx.torch_device)
    ref32: Optional[np.ndarray] = None      # official fp32 embeddings of this batch
    ref_masks: Optional[np.ndarray] = None  # official decoder on ref32[0]

    def ensure_ref32():
      nonlocal ref32, ref_masks
      if ref32 is None:
        with torch_mode(ctx, MODES["float32"]):
          ref32 = _to_nhwc(_official_encode(ctx, models, x_torch))
        ctx.torch_sync()
      if ref_masks is None:
        ref_masks = official_decode_lowres(ctx, models, ref32[0], points)
      cache.setdefault("emb_ref", ref32[:1].copy())
      return ref32, ref_masks

    for dname in args.dtypes:
      mode = MODES[dname]
      label = f"{models.name} b{b} {dname}"
      if ctx.out_of_time():
        ctx.skip(SECTION, label, "deadline")
        continue
      log(f"[encoder] {label} (official)")
      off = off_row = off_nhwc = same_masks = None
      with guarded(ctx, SECTION, f"{label} official"):
        with torch_mode(ctx, mode):
          off = time_calls(lambda: _official_encode(ctx, models, x_torch),
                           lambda _: ctx.torch_sync(), args.warmup, iters, args.time_cap)
        off_nhwc = _to_nhwc(off["out"])
        off_row = _finish_timing(off, b, fl, peak, dname)
        off = None
        if dname == "float32" and ref32 is None:
          ref32 = off_nhwc
      official_numerics = None
      with guarded(ctx, SECTION, f"{label} official numerics"):
        if dname != "float32" and off_nhwc is not None:
          r32, rmasks = ensure_ref32()
          official_numerics = _compare_embeddings(ctx, models, off_nhwc, r32, rmasks, points)
          same_masks = official_decode_lowres(ctx, models, off_nhwc[0], points)

      for impl in impls:
        vlabel = f"{label} attention={impl}"
        if ctx.out_of_time():
          ctx.skip(SECTION, vlabel, "deadline")
          continue
        log(f"[encoder] {vlabel}")
        row: Dict[str, Any] = {"model": models.name, "batch": b, "dtype": dname,
                               "flops_per_image": fl,
                               "attention": attention_impls(cfg, mode, impl)}
        if off_row is not None:
          row["official"] = off_row
        sj = None
        with guarded(ctx, SECTION, f"{vlabel} samjax"):
          fn = _make_samjax_encoder(models, mode, impl)
          with jax_precision(mode):
            sj = time_calls(lambda: fn(models.params, x_jax), jax_sync, args.warmup, iters,
                            args.time_cap)
            if getattr(args, "profile", False):
              with guarded(ctx, SECTION, f"{vlabel} profile"):
                from benchmarks import devprofile as profile_lib
                row["profile"] = profile_lib.profile_jax(
                    lambda: fn(models.params, x_jax), ctx.args.out,
                    f"encoder_{models.name}_b{b}_{dname}_{impl.replace('/', '-')}")
        if sj is not None:
          sj_nhwc = np.asarray(jax.device_get(sj["out"]).astype(np.float32))
          row["samjax"] = _finish_timing(sj, b, fl, peak, dname)
          sj = None
          if off_row is not None:
            row["ratio"] = row["samjax"]["images_per_s"] / off_row["images_per_s"]
          with guarded(ctx, SECTION, f"{vlabel} numerics"):
            r32, rmasks = ensure_ref32()
            num: Dict[str, Any] = {}
            num["samjax_vs_official_fp32"] = _compare_embeddings(ctx, models, sj_nhwc, r32,
                                                                 rmasks, points)
            if dname != "float32" and off_nhwc is not None:
              num[f"samjax_vs_official_{dname}"] = _compare_embeddings(
                  ctx, models, sj_nhwc, off_nhwc, same_masks, points)
            if official_numerics is not None:
              num[f"official_{dname}_vs_official_fp32"] = official_numerics
            row["numerics"] = num
          del sj_nhwc
        ctx.results[SECTION].append(row)
        _log_row(row)
        free_memory(ctx)
    del x_jax, x_torch
    free_memory(ctx)


def _log_row(row):
  parts = []
  for k in ("samjax", "official"):
    t = row.get(k)
    if t:
      parts.append(f"{k} {t['images_per_s']:.3g} img/s (first call {t['first_call_s']:.2f}s, "
                   f"{t['iters']} iters)")
  if "ratio" in row:
    parts.append(f"ratio {row['ratio']:.2f}x")
  num = row.get("numerics", {}).get("samjax_vs_official_fp32")
  if num:
    parts.append(f"max_rel vs fp32 {num['max_rel']:.2e}, mask IoU {num['mask_iou']:.4f}")
  log("  " + "; ".join(parts))
