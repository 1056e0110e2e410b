"""PyTorch <-> Orbax conversion of SAM checkpoints.

Conversion is data: `conversion_table(config)` lists, for every Flax parameter, the
PyTorch state-dict key it comes from and the named transform between the two layouts.
The table is generated from `jax.eval_shape` of the model's init with a few generic
rules (PyTorch `blocks.3` is Flax `blocks_3`; `weight` is `kernel`, `scale` or
`embedding`) plus an explicit table of exceptions. The same table runs backwards for
export (Orbax -> official state dict).

PyTorch files are read with `torch.load(weights_only=True)` only: a pickle that would
run code is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from samjax import config as config_lib
from samjax.config import SamConfig

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
    dummy = np.empty(self.flax_shape, np.int8)
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


def check_state_dict(state_dict: Mapping[str, Any], config: SamConfig) -> List[Entry]:
  """Raises one CheckpointError listing every missing, unexpected and mis-shaped key."""
  table = conversion_table(config)
  expected = {e.torch_key: e for e in table}
  present = {k for k in state_dict if not k.endswith(IGNORED_TORCH_KEYS)}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model expects "
               f"{expected[k].torch_shape}" for k in sorted(present & set(expected))
               if tuple(state_dict[k].shape) != expected[k].torch_shape]
  if missing or unexpected or misshaped:
    lines = [f"state dict does not match SAM config {config.name!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines += [f"    {x}" for x in items]
    raise CheckpointError("\n".join(lines))
  return table


def params_from_state_dict(state_dict: Mapping[str, Any], config: SamConfig,
                           dtype=np.float32) -> Dict[str, Any]:
  """Official state dict (name -> array-like) -> nested Flax params (numpy)."""
  table = check_state_dict(state_dict, config)
  flat = {}
  for e in table:
    w = np.asarray(_to_numpy(state_dict[e.torch_key]), dtype=np.float32)
    flat[tuple(e.flax_path.split("/"))] = np.ascontiguousarray(
        TRANSFORMS[e.transform][0](w)).astype(dtype)
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
  """Reads an official `.pth` safely: `torch.load(weights_only=True)` when torch is
  installed, else samjax's own allow-list reader (`samjax.io.torchfile`). Never runs code
  from the file."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint file not found: {path}")
  if path.is_dir():
    raise CheckpointError(f"{path} is a directory; expected a PyTorch .pth file "
                          "(use samjax.load_params for converted Orbax checkpoints)")
  if path.stat().st_size == 0:
    raise CheckpointError(f"checkpoint file is empty: {path}")
  import pickle
  try:
    import torch
  except ImportError:
    torch = None
  try:
    if torch is not None:
      obj = torch.load(str(path), map_location="cpu", weights_only=True)
    else:  # samjax's own allow-list reader: same safety, no torch needed
      from samjax.io import torchfile
      obj = torchfile.load_state_dict(path)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"refusing to load {path}: it contains pickled objects other than tensors (a "
        f"checkpoint that could run code when loaded). Only plain state dicts are accepted. "
        f"Details: {str(e).splitlines()[0]}") from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or "
                          f"truncated?): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None
  if isinstance(obj, dict):
    for wrapper in ("model", "state_dict"):
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      continue
    out[k[len("module."):] if k.startswith("module.") else k] = _to_numpy(v)
  return out


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
  except (KeyError, IndexError, ZeroDivisionError) as e:
    raise CheckpointError(f"not a complete SAM checkpoint: cannot read {e} from it") from None
  for name, known in config_lib.CONFIGS.items():
    if known.replace(name="custom") == cfg:
      return known
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
# Orbax checkpoints.
# ----------------------------------------------------------------------------------------
def save_params(params, config: SamConfig, dst_dir: str | os.PathLike,
                metadata: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> Path:
  """Writes params with Orbax `StandardCheckpointer` plus `samjax.json`, atomically."""
  import orbax.checkpoint as ocp
  from samjax import __version__
  dst = Path(dst_dir).absolute()
  if dst.exists():
    if not overwrite:
      raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite)")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))
      ckptr.wait_until_finished()
    meta = {"format": "samjax-orbax-v1", "samjax_version": __version__,
            "model_type": config.name, "config": config.to_dict()}
    meta.update(metadata or {})
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if dst.exists():
      shutil.rmtree(dst)
    os.replace(tmp, dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return dst


def read_metadata(ckpt_dir: str | os.PathLike) -> Dict[str, Any]:
  d = Path(ckpt_dir)
  meta = d / METADATA_FILE
  if not d.is_dir():
    raise CheckpointError(f"Orbax checkpoint directory not found: {d}")
  if not meta.exists() or not (d / PARAMS_DIR).exists():
    raise CheckpointError(f"{d} is not a samjax checkpoint (expected {METADATA_FILE} and "
                          f"{PARAMS_DIR}/); convert a .pth with `samjax convert`")
  try:
    return json.loads(meta.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{meta} is corrupt: {e}") from None


def load_params(ckpt_dir: str | os.PathLike, dtype=jnp.float32, sharding=None
                ) -> Tuple[SamConfig, Any]:
  """Restores (config, params) from a samjax Orbax checkpoint.

  Args:
    ckpt_dir: directory written by `convert_checkpoint` / `save_params`.
    dtype: parameter storage dtype (float32 recommended; compute dtype is separate).
    sharding: optional `jax.sharding.Sharding` applied to every array (e.g. replicated
      over a mesh) so arrays arrive already placed.
  """
  import orbax.checkpoint as ocp
  meta = read_metadata(ckpt_dir)
  config = SamConfig.from_dict(meta["config"])
  shapes = param_shapes(config)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = traverse_util.unflatten_dict({
      tuple(k.split("/")): jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
      for k, s in shapes.items()})
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(Path(ckpt_dir).absolute() / PARAMS_DIR, target)
  except Exception as e:  # orbax raises many types; name the file and the cause
    raise CheckpointError(f"cannot restore {ckpt_dir}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  if dtype != jnp.float32:
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  return config, params


def convert_checkpoint(src_pth: str | os.PathLike, dst_dir: str | os.PathLike,
                       model_type: Optional[str | SamConfig] = None,
                       overwrite: bool = False) -> SamConfig:
  """Converts an official SAM `.pth` into a samjax Orbax checkpoint directory.

  Args:
    src_pth: official state dict (e.g. `sam_vit_h_4b8939.pth`).
    dst_dir: output directory (created atomically).
    model_type: `vit_b`/`vit_l`/`vit_h`/`tiny` or a SamConfig; detected from the
      tensor shapes when None, and checked against them when given.

  Returns:
    The model's SamConfig.
  """
  sd = load_torch_state_dict(src_pth)
  config = resolve_config(sd, model_type)
  params = params_from_state_dict(sd, config)
  save_params(params, config, dst_dir, overwrite=overwrite, metadata={
      "source_file": Path(src_pth).name, "source_sha256": sha256_file(src_pth)})
  return config


def load_any(path: str | os.PathLike, model_type=None, dtype=jnp.float32
             ) -> Tuple[SamConfig, Any]:
  """(config, params) from either an Orbax directory or an official `.pth` file."""
  p = Path(path)
  if p.is_dir():
    return load_params(p, dtype=dtype)
  sd = load_torch_state_dict(p)
  config = resolve_config(sd, model_type)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype),
                                  params_from_state_dict(sd, config))
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
