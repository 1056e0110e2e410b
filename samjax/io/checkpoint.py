"""PyTorch <-> Orbax conversion of SAM checkpoints.

Conversion is data: `conversion_table(config)` lists, for every Flax parameter, the
PyTorch state-dict key it comes from and the named transform between the two layouts.
The table is generated from `jax.eval_shape` of the model's init with a few generic
rules (PyTorch `blocks.3` is Flax `blocks_3`; `weight` is `kernel`, `scale` or
`embedding`) plus an explicit table of exceptions. The same table runs backwards for
export (Orbax -> official state dict).

PyTorch files are read by samjax's own allow-list reader, `samjax.io.torchfile`, with or
without torch installed: a pickle that would run code is refused, and every tensor is
checked against its storage and against allocation caps before any data is read. Other
formats (safetensors, numpy, HDF5, legacy torch files) are recognised and named.
Parameters must be floating point and finite (`allow_nonfinite=True` to override).

Orbax checkpoints carry a `samjax.json`: the format, the SamConfig (validated on load)
and a SHA-256 digest of every parameter array, checked on load (`verify=False` skips it;
checkpoints written before digests existed load unverified).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from samjax import config as config_lib
from samjax.config import SamConfig
from samjax.io import torchfile

METADATA_FILE = "samjax.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, unsafe, or not the expected SAM model."""


# ----------------------------------------------------------------------------------------
# Layout transforms: name -> (torch -> flax, flax -> torch).
# ----------------------------------------------------------------------------------------
TRANSFORMS = {
    # nn.Linear stores (out, in); flax Dense stores (in, out).
    "linear": (lambda w: w.T, lambda w: w.T),
    # nn.Conv2d stores (out, in, kh, kw); flax Conv stores (kh, kw, in, out).
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    # nn.ConvTranspose2d stores (in, out, kh, kw); ConvTranspose2x2 stores (kh, kw, in, out).
    "conv_transpose": (lambda w: w.transpose(2, 3, 0, 1), lambda w: w.transpose(2, 3, 0, 1)),
    "identity": (lambda w: w, lambda w: w),
}

# Parameters the generic rules would get wrong: flax path -> (torch key, transform).
EXCEPTIONS: Dict[str, Tuple[str, str]] = {
    "mask_decoder/output_upscaling_0/kernel": ("mask_decoder.output_upscaling.0.weight",
                                               "conv_transpose"),
    "mask_decoder/output_upscaling_3/kernel": ("mask_decoder.output_upscaling.3.weight",
                                               "conv_transpose"),
}

# Buffers in official state dicts that samjax keeps in the config instead.
IGNORED_TORCH_KEYS = ("pixel_mean", "pixel_std")


@dataclasses.dataclass(frozen=True)
class Entry:
  flax_path: str
  torch_key: str
  transform: str
  flax_shape: Tuple[int, ...]

  @property
  def torch_shape(self) -> Tuple[int, ...]:
    dummy = np.broadcast_to(np.zeros((), np.int8), self.flax_shape)  # allocates nothing
    return tuple(TRANSFORMS[self.transform][1](dummy).shape)


def _generic_rule(path: str, ndim: int) -> Tuple[str, str]:
  parts = path.split("/")
  *mods, leaf = parts
  torch_mods = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
  if leaf in ("kernel", "scale", "embedding"):
    torch_leaf = "weight"
  else:
    torch_leaf = leaf
  transform = "identity"
  if leaf == "kernel":
    transform = {2: "linear", 4: "conv"}[ndim]
  return ".".join(torch_mods + [torch_leaf]), transform


def param_shapes(config: SamConfig) -> Dict[str, Tuple[int, ...]]:
  """Flat {flax path: shape} of the model's parameters, without allocating them."""
  return dict(_param_shapes(config))


@functools.lru_cache(maxsize=16)
def _param_shapes(config: SamConfig) -> Dict[str, Tuple[int, ...]]:
  # Tracing the whole init takes seconds; configs are frozen, so one trace per config.
  from samjax.modeling import Sam  # local: keeps `samjax.io.checkpoint` light to import
  model = Sam(config)
  s, e = config.image_size, config.low_res_mask_size

  def init():
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, 1, 2)),
                      jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 4)), jnp.zeros((1, e, e)))

  shapes = jax.eval_shape(init)["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def conversion_table(config: SamConfig) -> List[Entry]:
  """One entry per Flax parameter: where it comes from in an official state dict."""
  table = []
  for path, shape in sorted(param_shapes(config).items()):
    key, tf = EXCEPTIONS.get(path) or _generic_rule(path, len(shape))
    table.append(Entry(path, key, tf, shape))
  return table


def _shape(x) -> Tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _dtype_problem(x) -> Optional[str]:
  """None for a dense floating-point array or tensor, else its dtype/layout, in words."""
  if hasattr(x, "detach") and hasattr(x, "layout"):  # a torch tensor, without importing torch
    if str(x.layout) != "torch.strided":
      return f"{str(x.layout).replace('torch.', '')} layout (a dense tensor is needed)"
    if getattr(x, "is_quantized", False) or not x.dtype.is_floating_point:
      return str(x.dtype).replace("torch.", "")
    return None
  dt = getattr(x, "dtype", None)
  if dt is None:
    dt = np.asarray(x).dtype
  dt = np.dtype(dt)
  if dt.kind == "f" or dt.name == "bfloat16":
    return None
  return dt.name


def check_state_dict(state_dict: Mapping[str, Any], config: SamConfig) -> List[Entry]:
  """Raises one CheckpointError listing every missing, unexpected, mis-shaped and
  non-float key."""
  table = conversion_table(config)
  expected = {e.torch_key: e for e in table}
  present = {k for k in state_dict if not k.endswith(IGNORED_TORCH_KEYS)}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  common = sorted(present & set(expected))
  misshaped = [f"{k}: checkpoint {_shape(state_dict[k])}, model expects "
               f"{expected[k].torch_shape}" for k in common
               if _shape(state_dict[k]) != expected[k].torch_shape]
  wrong_dtype = [f"{k}: {p}" for k in common if (p := _dtype_problem(state_dict[k]))]
  if missing or unexpected or misshaped or wrong_dtype:
    lines = [f"state dict does not match SAM config {config.name!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped),
                         ("not floating point (SAM parameters are float)", wrong_dtype)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines += [f"    {x}" for x in items]
    raise CheckpointError("\n".join(lines))
  return table


def _nonfinite_error(bad: List[str], where: str) -> CheckpointError:
  shown = "\n".join(f"    {b}" for b in bad[:20])
  more = f"\n    ... and {len(bad) - 20} more" if len(bad) > 20 else ""
  return CheckpointError(
      f"{where}: {len(bad)} parameter tensor(s) hold NaN or Inf values, which make every "
      f"mask empty:\n{shown}{more}\nPass allow_nonfinite=True to load them anyway.")


def _count_nonfinite(w: np.ndarray) -> str:
  return (f"{int(np.isnan(w).sum())} NaN, {int(np.isinf(w).sum())} Inf of {w.size}")


def params_from_state_dict(state_dict: Mapping[str, Any], config: SamConfig,
                           dtype=np.float32, *, allow_nonfinite: bool = False
                           ) -> Dict[str, Any]:
  """Official state dict (name -> array-like) -> nested Flax params (numpy).

  Raises:
    CheckpointError: keys, shapes or dtypes do not match `config` (one error listing
      all), or some tensors hold NaN/Inf (unless `allow_nonfinite`).
  """
  table = check_state_dict(state_dict, config)
  flat = {}
  nonfinite = []
  for e in table:
    w = np.asarray(_to_numpy(state_dict[e.torch_key]), dtype=np.float32)
    if not allow_nonfinite and not np.isfinite(w).all():
      nonfinite.append(f"{e.torch_key}: {_count_nonfinite(w)}")
    flat[tuple(e.flax_path.split("/"))] = np.ascontiguousarray(
        TRANSFORMS[e.transform][0](w)).astype(dtype)
  if nonfinite:
    raise _nonfinite_error(nonfinite, "the state dict")
  return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: Mapping[str, Any], config: SamConfig) -> Dict[str, np.ndarray]:
  """Nested Flax params -> official state dict as float32 numpy arrays (the reverse)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for e in conversion_table(config):
    if e.flax_path not in flat:
      raise CheckpointError(f"params lack {e.flax_path}")
    out[e.torch_key] = np.ascontiguousarray(
        TRANSFORMS[e.transform][1](np.asarray(flat[e.flax_path], np.float32)))
  # pixel_mean/pixel_std are non-persistent buffers in the reference: not exported.
  return out


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):
    return x.detach().cpu().float().numpy()
  return np.asarray(x)


# ----------------------------------------------------------------------------------------
# Reading PyTorch files safely, and recognising the model type.
# ----------------------------------------------------------------------------------------
def load_torch_state_dict(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Reads an official `.pth` safely with samjax's allow-list reader (`samjax.io.torchfile`).

  That reader gives the safety of `torch.load(weights_only=True)` (no code from the file
  runs) with or without torch installed, and bounds what a crafted file can make it read
  or allocate. A wrapper such as `{"model": state_dict, "optimizer": ...}` is unwrapped
  before any tensor is read; a `module.` prefix (DataParallel) is dropped.

  Raises:
    CheckpointError: missing, unreadable, another format, unsafe, malformed or too large.
  """
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint file not found: {path}")
  if path.is_dir():
    raise CheckpointError(f"{path} is a directory; expected a PyTorch .pth file "
                          "(use samjax.load_params for converted Orbax checkpoints)")
  if path.stat().st_size == 0:
    raise CheckpointError(f"checkpoint file is empty: {path}")
  try:
    obj = torchfile.load_state_dict(path, unwrap=_WRAPPERS)
  except torchfile.UnsafeCheckpointError as e:
    raise CheckpointError(
        f"refusing to load {path}: it contains pickled objects other than tensors (a "
        f"checkpoint that could run code when loaded). Only plain state dicts are accepted. "
        f"Details: {str(e).splitlines()[0]}") from None
  except torchfile.NotATorchFileError as e:
    raise CheckpointError(f"{path} is {e}") from None
  except torchfile.TorchFileError as e:
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  for wrapper in _WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      continue
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


_WRAPPERS = ("model", "state_dict")


def detect_config(state_dict: Mapping[str, Any]) -> SamConfig:
  """Infers the SamConfig from state-dict shapes; names it if it is a known variant."""
  sd = state_dict
  key = "image_encoder.patch_embed.proj.weight"
  if key not in sd or "mask_decoder.mask_tokens.weight" not in sd:
    raise CheckpointError(
        "not a SAM checkpoint: it has no 'image_encoder.patch_embed.proj.weight' or "
        "'mask_decoder.mask_tokens.weight' (first keys: "
        f"{', '.join(list(sd)[:5]) or 'none'})")
  try:
    embed, _, patch, _ = sd[key].shape
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = len({m.group(1) for k in sd
                 if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    rel = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
    head_dim = rel[0][1]
    global_idx = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
    windowed = [r[0] for i, r in enumerate(rel) if i not in global_idx]
    window = (windowed[0] + 1) // 2 if windowed else 14
    prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
    c_self = sd["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"].shape[0]
    c_cross = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"
                 ].shape[0]
    dec_depth = len({m.group(1) for k in sd
                     if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))})
    iou_layers = len({m.group(1) for k in sd
                      if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))})
    cfg = SamConfig(
        name="custom",
        image_size=int(grid * patch), patch_size=int(patch), encoder_embed_dim=int(embed),
        encoder_depth=depth, encoder_num_heads=int(embed // head_dim),
        encoder_global_attn_indexes=global_idx, window_size=int(window),
        mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed,
        prompt_embed_dim=int(prompt_dim),
        mask_in_chans=int(sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        decoder_depth=dec_depth,
        decoder_mlp_dim=int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        attention_downsample_rate=int(c_self // c_cross),
        num_multimask_outputs=int(sd["mask_decoder.mask_tokens.weight"].shape[0] - 1),
        iou_head_depth=iou_layers,
        iou_head_hidden_dim=int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]))
  except (KeyError, IndexError, ZeroDivisionError, ValueError, TypeError) as e:
    raise CheckpointError(f"not a complete SAM checkpoint: cannot read {e} from it") from None
  for name, known in config_lib.CONFIGS.items():
    if known.replace(name="custom") == cfg:
      return known
  problems = config_problems(cfg.to_dict())
  if problems:
    raise CheckpointError("the tensor shapes do not describe a consistent SAM model: "
                          + "; ".join(problems))
  return cfg


def _describe(cfg: SamConfig) -> str:
  return (f"{cfg.name}: embed dim {cfg.encoder_embed_dim}, depth {cfg.encoder_depth}, "
          f"image size {cfg.image_size}")


def resolve_config(state_dict: Mapping[str, Any], model_type: Optional[str | SamConfig]
                   ) -> SamConfig:
  detected = detect_config(state_dict)
  if model_type is None:
    return detected
  forced = model_type if isinstance(model_type, SamConfig) else config_lib.get_config(model_type)
  if forced.replace(name="x") != detected.replace(name="x"):
    raise CheckpointError(f"model type {forced.name!r} was requested but the checkpoint is "
                          f"{_describe(detected)} (expected {_describe(forced)})")
  return forced


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------------------
# samjax.json: format, config schema, parameter digests.
# ----------------------------------------------------------------------------------------
FORMAT = "samjax-orbax-v1"
_FORMAT_RE = re.compile(r"samjax-orbax-v(\d+)")
DIGEST_KEY = "params_digest"

# The SamConfig fields of format v1: a v1 samjax.json has every one. Fields added to
# SamConfig later are optional here, so that older checkpoints get their defaults.
_V1_CONFIG_FIELDS = (
    "name", "image_size", "patch_size", "encoder_embed_dim", "encoder_depth",
    "encoder_num_heads", "encoder_global_attn_indexes", "window_size", "mlp_ratio",
    "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim",
    "decoder_num_heads", "attention_downsample_rate", "num_multimask_outputs",
    "iou_head_depth", "iou_head_hidden_dim", "pixel_mean", "pixel_std")
# Integer fields and their sane ranges. The upper bounds are far above any SAM model
# (ViT-H: width 1280, depth 32); they keep a crafted file from making `jax.eval_shape`
# trace a million blocks.
_INT_RANGES = {
    "image_size": (1, 16384), "patch_size": (1, 1024), "encoder_embed_dim": (1, 65536),
    "encoder_depth": (1, 256), "encoder_num_heads": (1, 4096), "window_size": (1, 16384),
    "prompt_embed_dim": (1, 65536), "mask_in_chans": (1, 65536), "decoder_depth": (1, 256),
    "decoder_mlp_dim": (1, 1 << 20), "decoder_num_heads": (1, 4096),
    "attention_downsample_rate": (1, 65536), "num_multimask_outputs": (1, 256),
    "iou_head_depth": (1, 256), "iou_head_hidden_dim": (1, 65536)}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_problems(d: Mapping[str, Any]) -> List[str]:
  """What is wrong with a SamConfig as a dict (e.g. from samjax.json); [] if nothing.

  Checks the schema (field names and types), ranges, and the divisibility the model
  needs (image_size by patch_size, widths by head counts).
  """
  if not isinstance(d, Mapping):
    return [f"config is a {type(d).__name__}, not an object"]
  fields = {f.name for f in dataclasses.fields(SamConfig)}
  problems = []
  unknown = sorted(set(d) - fields)
  if unknown:
    problems.append(f"unknown fields {unknown} (written by a newer samjax?)")
  missing = [k for k in _V1_CONFIG_FIELDS if k in fields and k not in d]
  if missing:
    problems.append(f"missing fields {missing}")
  for k, (lo, hi) in _INT_RANGES.items():
    if k in d:
      v = d[k]
      if not _is_int(v):
        problems.append(f"{k} is {v!r:.40} ({type(v).__name__}), not an integer")
      elif not lo <= v <= hi:
        problems.append(f"{k} is {v}, expected {lo}..{hi}")
  if "name" in d and not (isinstance(d["name"], str) and d["name"]):
    problems.append(f"name is {d['name']!r:.40}, not a non-empty string")
  if "mlp_ratio" in d and not (_is_number(d["mlp_ratio"]) and 0 < d["mlp_ratio"] <= 64):
    problems.append(f"mlp_ratio is {d['mlp_ratio']!r:.40}, expected a number in (0, 64]")
  for k, positive in (("pixel_mean", False), ("pixel_std", True)):
    v = d.get(k, [0.0] * 3)
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v)
            and (not positive or all(x > 0 for x in v))):
      problems.append(f"{k} is {v!r:.60}, expected 3 {'positive ' if positive else ''}"
                      "numbers")
  if problems:
    return problems
  c = dataclasses.replace(SamConfig(), **{k: v for k, v in d.items() if k in fields})
  idx = c.encoder_global_attn_indexes
  if not (isinstance(idx, (list, tuple)) and all(_is_int(i) for i in idx)):
    problems.append(f"encoder_global_attn_indexes is {idx!r:.60}, not a list of integers")
  elif any(not 0 <= i < c.encoder_depth for i in idx) or len(set(idx)) != len(idx):
    problems.append(f"encoder_global_attn_indexes {list(idx)} are not distinct block "
                    f"indexes in 0..{c.encoder_depth - 1}")
  if c.image_size % c.patch_size:
    problems.append(f"image_size {c.image_size} is not a multiple of patch_size "
                    f"{c.patch_size}")
  if c.encoder_embed_dim % c.encoder_num_heads:
    problems.append(f"encoder_embed_dim {c.encoder_embed_dim} is not a multiple of "
                    f"encoder_num_heads {c.encoder_num_heads}")
  if c.prompt_embed_dim % c.decoder_num_heads:
    problems.append(f"prompt_embed_dim {c.prompt_embed_dim} is not a multiple of "
                    f"decoder_num_heads {c.decoder_num_heads}")
  inner, rem = divmod(c.prompt_embed_dim, c.attention_downsample_rate)
  if rem or inner % c.decoder_num_heads:
    problems.append(f"prompt_embed_dim {c.prompt_embed_dim} / attention_downsample_rate "
                    f"{c.attention_downsample_rate} is not a multiple of decoder_num_heads "
                    f"{c.decoder_num_heads}")
  if int(c.encoder_embed_dim * c.mlp_ratio) < 1:
    problems.append(f"mlp_ratio {c.mlp_ratio} leaves no MLP units")
  return problems


def config_from_dict(d: Mapping[str, Any], where: str = "config") -> SamConfig:
  """A validated SamConfig from its dict form; CheckpointError naming every problem."""
  problems = config_problems(d)
  if problems:
    raise CheckpointError(f"{where}: invalid SAM config: " + "; ".join(problems))
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  kw["mlp_ratio"] = float(kw.get("mlp_ratio", SamConfig.mlp_ratio))
  return SamConfig(**kw)


def read_metadata(ckpt_dir: str | os.PathLike) -> Dict[str, Any]:
  d = Path(ckpt_dir)
  meta = d / METADATA_FILE
  if not d.is_dir():
    raise CheckpointError(f"Orbax checkpoint directory not found: {d}")
  if not meta.is_file() or not (d / PARAMS_DIR).is_dir():
    raise CheckpointError(f"{d} is not a samjax checkpoint (expected {METADATA_FILE} and "
                          f"{PARAMS_DIR}/); convert a .pth with `samjax convert`")
  try:
    out = json.loads(meta.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{meta} is corrupt: {e}") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {meta}: {e}") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{meta} is corrupt: it holds a JSON {type(out).__name__}, not an "
                          "object")
  return out


def config_from_metadata(meta: Mapping[str, Any], where: str = METADATA_FILE) -> SamConfig:
  """Checks the format of a samjax.json and returns its validated SamConfig."""
  from samjax import __version__
  fmt = meta.get("format")
  if fmt != FORMAT:
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    by = meta.get("samjax_version")
    by = f" by samjax {by}" if isinstance(by, str) else ""
    if m and int(m.group(1)) > 1:
      raise CheckpointError(f"{where} was written{by} in format {fmt!r}, newer than the "
                            f"{FORMAT!r} this samjax ({__version__}) reads: upgrade samjax")
    if fmt is None:
      raise CheckpointError(f"{where} has no 'format' field: not a samjax checkpoint")
    raise CheckpointError(f"{where} has an unknown format {fmt!r:.60} (this samjax reads "
                          f"{FORMAT!r})")
  if "config" not in meta:
    raise CheckpointError(f"{where} has no 'config': the model's hyper-parameters are "
                          "unknown")
  return config_from_dict(meta["config"], where)


def _host_f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype="<f4"))


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def _combined(digests: Mapping[str, str]) -> str:
  return hashlib.sha256("".join(f"{k}:{digests[k]}\n" for k in sorted(digests)).encode()
                        ).hexdigest()


def _map_arrays(fn, flat: Mapping[str, Any]) -> Dict[str, Any]:
  """fn over arrays in threads (hashlib and numpy release the GIL on big buffers)."""
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(zip(flat, pool.map(fn, flat.values())))


def params_digest(params) -> Dict[str, Any]:
  """SHA-256 of every parameter's float32 little-endian bytes, by flax path, and of all."""
  flat = traverse_util.flatten_dict(params, sep="/")
  arrays = _map_arrays(lambda x: _sha256(_host_f32(x)), flat)
  arrays = dict(sorted(arrays.items()))
  return {"algorithm": "sha256", "dtype": "float32", "arrays": arrays,
          "all": _combined(arrays)}


def _digests_from_metadata(meta: Mapping[str, Any], paths, where: str
                           ) -> Optional[Dict[str, str]]:
  d = meta.get(DIGEST_KEY)
  if d is None:
    return None  # written before samjax recorded digests: nothing to check against
  hint = "; pass verify=False to load without checking"
  arrays = d.get("arrays") if isinstance(d, dict) else None
  if (not isinstance(arrays, dict) or d.get("algorithm") != "sha256"
      or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                 for v in arrays.values())):
    raise CheckpointError(f"{where}: '{DIGEST_KEY}' is malformed{hint}")
  missing, extra = sorted(set(paths) - set(arrays)), sorted(set(arrays) - set(paths))
  if missing or extra:
    raise CheckpointError(f"{where}: '{DIGEST_KEY}' does not list the model's arrays "
                          f"(missing {missing[:5]}, unexpected {extra[:5]}){hint}")
  if d.get("all") is not None and d["all"] != _combined(arrays):
    raise CheckpointError(f"{where}: '{DIGEST_KEY}' is inconsistent (its combined digest "
                          f"does not match the per-array ones){hint}")
  return arrays


# ----------------------------------------------------------------------------------------
# Writing into a directory safely: only over our own checkpoints, via marked temp dirs.
# ----------------------------------------------------------------------------------------
_TMP_MARKER = ".samjax-partial"  # inside every temporary directory samjax makes
_TMP_NAME = re.compile(r"\..+\.samjax-(?:tmp|old)-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-\w+")
_STALE_AFTER_S = 24 * 3600  # a temp dir from another host is stale after a day


def _host_tag() -> str:
  return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _pid_alive(pid: int) -> bool:
  if os.name == "nt":  # os.kill would terminate the process there
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: it exists, run by someone else
    return True
  return True


def _holds_only_ours(d: Path) -> bool:
  try:
    entries = set(os.listdir(d))
  except OSError:
    return False
  return _TMP_MARKER in entries or entries <= {METADATA_FILE, PARAMS_DIR}


def remove_stale_temp_dirs(parent: str | os.PathLike) -> List[Path]:
  """Removes samjax temp dirs in `parent` left by interrupted saves; returns them.

  Only directories named like ours (`.NAME.samjax-tmp-HOST-PID-*`) that hold our marker
  file or nothing but checkpoint files are candidates, and only when the process that
  made them is gone (same host) or they are over a day old (other hosts).
  """
  removed = []
  try:
    entries = list(os.scandir(parent))
  except OSError:
    return removed
  host, now = _host_tag(), time.time()
  for e in entries:
    m = _TMP_NAME.fullmatch(e.name)
    if not m or not e.is_dir(follow_symlinks=False):
      continue
    try:
      age = now - e.stat(follow_symlinks=False).st_mtime
    except OSError:
      continue
    same_host = m["host"] == host
    stale = ((same_host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])))
             or age > _STALE_AFTER_S)
    if stale and _holds_only_ours(Path(e.path)):
      shutil.rmtree(e.path, ignore_errors=True)
      removed.append(Path(e.path))
  return removed


def _check_destination(dst: Path, overwrite: bool) -> bool:
  """Whether `dst` exists and may be replaced; raises if it must not be touched."""
  if not (dst.exists() or dst.is_symlink()):
    return False
  if not overwrite:
    raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite)")
  if dst.is_symlink():
    raise CheckpointError(f"refusing to overwrite {dst}: it is a symbolic link; give the "
                          "directory it points to, or remove the link")
  if not dst.is_dir():
    raise CheckpointError(f"refusing to overwrite {dst}: it is a file, not a samjax "
                          "checkpoint directory")
  try:
    entries = sorted(os.listdir(dst))
  except OSError as e:
    raise CheckpointError(f"cannot inspect {dst} before overwriting it: {e}") from None
  if not entries:
    return True
  ours = (set(entries) == {METADATA_FILE, PARAMS_DIR} and (dst / METADATA_FILE).is_file()
          and (dst / PARAMS_DIR).is_dir())
  if not ours:
    foreign = [e for e in entries if e not in (METADATA_FILE, PARAMS_DIR)]
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    what = (f"it holds files samjax did not write ({shown})" if foreign else
            f"it lacks {METADATA_FILE} or {PARAMS_DIR}/")
    raise CheckpointError(f"refusing to overwrite {dst}: it is not a samjax checkpoint; "
                          f"{what}. Choose another destination or empty it yourself")
  return True


def _make_temp_dir(parent: Path, name: str) -> Path:
  # Not tempfile.mkdtemp: its 0700 would become the checkpoint's mode after the rename,
  # unreadable to the rest of a team on shared storage. mkdir applies the umask (0755
  # under the usual 022) like any folder the user makes.
  prefix = f".{name}.samjax-tmp-{_host_tag()}-{os.getpid()}-"
  for _ in range(100):
    tmp = parent / (prefix + secrets.token_hex(4))
    try:
      tmp.mkdir()
      break
    except FileExistsError:
      continue
  else:
    raise CheckpointError(f"cannot create a temporary directory in {parent}")
  (tmp / _TMP_MARKER).write_text("a samjax checkpoint being written; safe to delete if no "
                                 "samjax process is running\n")
  return tmp


# ----------------------------------------------------------------------------------------
# Orbax checkpoints.
# ----------------------------------------------------------------------------------------
def save_params(params, config: SamConfig, dst_dir: str | os.PathLike,
                metadata: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> Path:
  """Writes params with Orbax `StandardCheckpointer` plus `samjax.json`, atomically.

  samjax.json records the format, the config and a SHA-256 digest of every array
  (checked by `load_params`). The checkpoint is written into a marked temporary
  directory next to `dst_dir` and renamed into place; temporary directories left by
  interrupted saves into the same parent are removed first.

  Args:
    overwrite: replace `dst_dir` if it is a samjax checkpoint (only `samjax.json` and
      `params/`) or empty; anything else is refused.

  Raises:
    FileExistsError: `dst_dir` exists and `overwrite` is False.
    CheckpointError: `dst_dir` exists but is not a samjax checkpoint, or is a file.
  """
  import orbax.checkpoint as ocp
  from samjax import __version__
  dst = Path(dst_dir).absolute()
  replace = _check_destination(dst, overwrite)
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f"cannot create the directory {dst.parent}: {e}") from None
  remove_stale_temp_dirs(dst.parent)
  host = jax.tree_util.tree_map(np.asarray, params)
  meta = dict(metadata or {})
  meta.update({"format": FORMAT, "samjax_version": __version__, "model_type": config.name,
               "config": config.to_dict(), DIGEST_KEY: params_digest(host)})
  tmp = _make_temp_dir(dst.parent, dst.name)
  old = None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, host)
      ckptr.wait_until_finished()
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / _TMP_MARKER).unlink()
    if replace and dst.exists():
      old = dst.with_name(f".{dst.name}.samjax-old-{_host_tag()}-{os.getpid()}-"
                          f"{secrets.token_hex(4)}")
      os.rename(dst, old)
    try:
      os.replace(tmp, dst)
    except OSError:
      if old is not None:
        os.rename(old, dst)
        old = None
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return dst


_LOOP_CLOSED = "Event loop is closed"


def _quiet_closed_loop(prev):
  """sys.unraisablehook dropping one harmless message, passing the rest to `prev`.

  When one array fails to restore, Orbax closes its event loop while TensorStore reads
  of other arrays are still in flight; their completion callbacks then fail with
  "Event loop is closed", each printed as a traceback. Nothing is lost by dropping them.
  """
  def hook(args):
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == _LOOP_CLOSED:
      return
    prev(args)
  hook.samjax_quiet_closed_loop = True
  return hook


class _QuietAbandonedReads:
  """logging filter for the "asyncio" logger dropping one harmless report.

  After a failed restore the reads of the other arrays (Orbax's `async_deserialize`
  tasks) end with the same NOT_FOUND / DATA_LOSS error, which nobody awaits any more;
  when such a task is garbage collected asyncio logs "Task exception was never
  retrieved" with a traceback, at a moment that depends on the collector. The
  `CheckpointError` already names the damage, so those reports are dropped; every other
  asyncio record passes.
  """

  samjax_quiet_abandoned_reads = True

  def filter(self, record) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Task exception was never retrieved")
                and "async_deserialize" in msg)


def _quiet_abandoned_reads() -> None:
  import logging  # pylint: disable=import-outside-toplevel
  log = logging.getLogger("asyncio")
  if not any(getattr(f, "samjax_quiet_abandoned_reads", False) for f in log.filters):
    log.addFilter(_QuietAbandonedReads())


def _restore_error(ckpt_dir, e: BaseException) -> CheckpointError:
  """One readable error from Orbax/TensorStore's exception chain."""
  chain, x = [], e
  while x is not None and len(chain) < 10:
    chain.append(x)
    x = x.__cause__ or x.__context__
  # TensorStore statuses ("NOT_FOUND: ...", "DATA_LOSS: ...") name the array and file.
  status = next((c for c in reversed(chain) if re.match(r"[A-Z_]{4,}: ", str(c))), None)
  cause = status or next((c for c in reversed(chain) if "<bound method" not in str(c)), e)
  detail = str(cause).split(" [tensorstore_spec", 1)[0].splitlines()
  detail = f"{type(cause).__name__}: {detail[0] if detail else ''}"[:600]
  array = re.search(r'reading "([^"/]+)/', detail)
  at = f" (array {array.group(1).replace('.', '/')})" if array else ""
  damaged = status is not None or "Encountered error while reading" in str(e)
  hint = (f": its array data is missing or damaged{at} (a file under {PARAMS_DIR}/ "
          "deleted or truncated?). Convert or save it again. Details: " if damaged else
          f"{at}: ")
  return CheckpointError(f"cannot restore the checkpoint {ckpt_dir}{hint}{detail}")


def load_params(ckpt_dir: str | os.PathLike, dtype=jnp.float32, sharding=None, *,
                verify: bool = True, allow_nonfinite: bool = False
                ) -> Tuple[SamConfig, Any]:
  """Restores (config, params) from a samjax Orbax checkpoint.

  Args:
    ckpt_dir: directory written by `convert_checkpoint` / `save_params`.
    dtype: parameter storage dtype (float32 recommended; compute dtype is separate).
    sharding: optional `jax.sharding.Sharding` applied to every array (e.g. replicated
      over a mesh) so arrays arrive already placed.
    verify: check every array against the SHA-256 digests in samjax.json (checkpoints
      written before digests existed have none and are loaded unchecked).
    allow_nonfinite: accept parameters holding NaN/Inf instead of raising.

  Raises:
    CheckpointError: not a samjax checkpoint, unknown format, invalid config, missing or
      damaged array data, a digest mismatch, or NaN/Inf parameters.
  """
  import orbax.checkpoint as ocp
  d = Path(ckpt_dir)
  meta = read_metadata(d)
  where = str(d / METADATA_FILE)
  config = config_from_metadata(meta, where)
  shapes = param_shapes(config)
  digests = _digests_from_metadata(meta, shapes, where) if verify else None
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = traverse_util.unflatten_dict({
      tuple(k.split("/")): jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
      for k, s in shapes.items()})
  prev_hook = sys.unraisablehook
  if not getattr(prev_hook, "samjax_quiet_closed_loop", False):
    sys.unraisablehook = _quiet_closed_loop(prev_hook)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(d.absolute() / PARAMS_DIR, target)
  except Exception as e:  # orbax raises many types; name the directory and the cause
    # The hook stays: callbacks of reads still in flight fail after this point, and
    # their abandoned tasks are reported when collected.
    _quiet_abandoned_reads()
    raise _restore_error(d, e) from None
  if getattr(sys.unraisablehook, "samjax_quiet_closed_loop", False) and not getattr(
      prev_hook, "samjax_quiet_closed_loop", False):
    sys.unraisablehook = prev_hook
  _check_restored(params, d, digests, allow_nonfinite)
  if dtype != jnp.float32:
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  return config, params


def _check_restored(params, ckpt_dir: Path, digests: Optional[Mapping[str, str]],
                    allow_nonfinite: bool) -> None:
  """Digest and finiteness checks on restored arrays (one host pass over each)."""
  if digests is None and allow_nonfinite:
    return
  flat = traverse_util.flatten_dict(params, sep="/")

  def scan(x):
    if not getattr(x, "is_fully_addressable", True):
      return None, None  # other hosts hold parts of it: nothing to check here
    a = _host_f32(x)
    return (_sha256(a) if digests is not None else None,
            None if allow_nonfinite or np.isfinite(a).all() else _count_nonfinite(a))

  results = _map_arrays(scan, flat)
  if digests is not None:
    bad = [k for k, (h, _) in results.items() if h is not None and h != digests[k]]
    if bad:
      raise CheckpointError(
          f"checkpoint {ckpt_dir} is damaged: {len(bad)} of {len(flat)} arrays differ from "
          f"the digest recorded when it was saved: {', '.join(bad[:10])}"
          f"{', ...' if len(bad) > 10 else ''}. Convert or save it again (or pass "
          "verify=False to load it as it is)")
  nonfinite = [f"{k}: {n}" for k, (_, n) in results.items() if n is not None]
  if nonfinite:
    raise _nonfinite_error(nonfinite, f"checkpoint {ckpt_dir}")


def convert_checkpoint(src_pth: str | os.PathLike, dst_dir: str | os.PathLike,
                       model_type: Optional[str | SamConfig] = None,
                       overwrite: bool = False, *, allow_nonfinite: bool = False
                       ) -> SamConfig:
  """Converts an official SAM `.pth` into a samjax Orbax checkpoint directory.

  Args:
    src_pth: official state dict (e.g. `sam_vit_h_4b8939.pth`).
    dst_dir: output directory (created atomically).
    model_type: `vit_b`/`vit_l`/`vit_h`/`tiny` or a SamConfig; detected from the
      tensor shapes when None, and checked against them when given.
    overwrite: replace `dst_dir` if it is a samjax checkpoint (or empty); any other
      directory or file is refused.
    allow_nonfinite: convert even if some parameters hold NaN/Inf.

  Returns:
    The model's SamConfig.
  """
  _check_destination(Path(dst_dir).absolute(), overwrite)  # fail before the slow part
  sd = load_torch_state_dict(src_pth)
  config = resolve_config(sd, model_type)
  params = params_from_state_dict(sd, config, allow_nonfinite=allow_nonfinite)
  del sd
  save_params(params, config, dst_dir, overwrite=overwrite, metadata={
      "source_file": Path(src_pth).name, "source_sha256": sha256_file(src_pth)})
  return config


def load_any(path: str | os.PathLike, model_type=None, dtype=jnp.float32, *,
             verify: bool = True, allow_nonfinite: bool = False
             ) -> Tuple[SamConfig, Any]:
  """(config, params) from either an Orbax directory or an official `.pth` file."""
  p = Path(path)
  if p.is_dir():
    return load_params(p, dtype=dtype, verify=verify, allow_nonfinite=allow_nonfinite)
  sd = load_torch_state_dict(p)
  config = resolve_config(sd, model_type)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, dtype),
      params_from_state_dict(sd, config, allow_nonfinite=allow_nonfinite))
  return config, params


def save_torch_state_dict(params, config: SamConfig, out_path: str | os.PathLike) -> Path:
  """Exports params as an official-format `.pth` (loads with `sam_model_registry`)."""
  import torch
  # np.array(...) copies: torch warns on (and must not alias) read-only jax buffers.
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        state_dict_from_params(params, config).items()}
  out = Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  torch.save(sd, tmp)
  os.replace(tmp, out)
  return out
