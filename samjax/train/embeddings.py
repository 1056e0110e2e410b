"""Image embeddings of a frozen encoder: computed once per image, in memory or on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from samjax.config import SamConfig
from samjax.runtime import Runtime
from samjax.train.config import TrainConfig
from samjax.train.data import LazyImages, dataset_fingerprint, prepare_example
from samjax.train.plots import progress_bar

# Beyond this a frozen encoder's embeddings must go to an on-disk cache (ViT-B/L/H
# embeddings are 4 MiB per image).
MAX_IN_MEMORY_EMBEDDINGS_GIB = 16.0


def eval_runtime(config: SamConfig, dtype: str, mesh, runtime: Optional[Runtime]) -> Runtime:
  """`runtime`, or one for `config` in `dtype` over `mesh` with "auto" kernels."""
  if runtime is not None:
    return runtime
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return Runtime(config, dtype=getattr(jnp, dtype), attention="auto", mesh=mesh)


def compute_embeddings(params, images: Sequence[np.ndarray], config: SamConfig,
                       dtype: str = "float32", mesh=None, batch_size: int = 8,
                       out: Optional[np.ndarray] = None, progress: bool = False, *,
                       runtime: Optional[Runtime] = None) -> np.ndarray:
  """Image embeddings (N, h, w, C) float32 of raw images, in batches.

  Args:
    images: sequence of uint8 (H, W, 3) images (any size; resized like the predictor).
    dtype, mesh: compute dtype name and device mesh of the encoder, when no
      `runtime` is given (default: all local devices, "auto" attention kernels).
    out: optional preallocated (N, h, w, C) array (e.g. a np.memmap) to fill.
    runtime: the Runtime to encode with (its config, dtype, kernels and mesh).
  """
  rt = eval_runtime(config, dtype, mesh, runtime)
  params = rt.place(params)  # once, not with every batch
  s, e, c = config.image_size, config.embedding_size, config.prompt_embed_dim
  n = len(images)
  if out is None:
    out = np.zeros((n, e, e, c), np.float32)
  bar = progress_bar(total=n, desc="embeddings", unit="img", enabled=progress)
  for start in range(0, n, batch_size):
    idx = range(start, min(n, start + batch_size))
    imgs = np.zeros((len(idx), s, s, 3), np.uint8)
    hws = np.zeros((len(idx), 2), np.int32)
    for j, i in enumerate(idx):
      ex = prepare_example(images[i], np.zeros((0, 1, 1), bool), s)
      imgs[j], hws[j] = ex.image, ex.valid_hw
    # Embeddings come in the compute dtype; bf16 -> float32 is exact.
    out[start:start + len(idx)] = np.asarray(rt.encode(params, imgs, hws), np.float32)
    bar.update(len(idx))
  bar.close()
  return out


def cached_embeddings(params, dataset, tc: TrainConfig, rt: Runtime, cache_dir,
                      progress: bool, name: str, log_fn: Callable[[str], None]
                      ) -> np.ndarray:
  """Embeddings of every image of `dataset`: in memory, or a reusable .npy memmap.

  Args:
    params: SAM params (only the image encoder's are used).
    dataset: `CocoInstances` or a sequence of (image, masks).
    tc: `dtype` (part of the cache key, with the runtime's attention kernels) and
      `eval_batch_size`.
    rt: the Runtime to encode with.
    cache_dir: folder of the memmaps, or None to keep them in memory (refused beyond
      MAX_IN_MEMORY_EMBEDDINGS_GIB).
    name: prefix of the cache file, e.g. "train".

  Returns:
    (N, h, w, C) float32 (a read-only memmap when cached on disk).
  """
  config = rt.config
  images = LazyImages(dataset)
  e, c = config.embedding_size, config.prompt_embed_dim
  if cache_dir is None:
    gib = len(dataset) * e * e * c * 4 / 2**30
    if gib > MAX_IN_MEMORY_EMBEDDINGS_GIB:
      raise ValueError(f"the embeddings of {len(dataset)} images need {gib:.1f} GiB; pass "
                       "an embedding cache folder (--embedding-cache DIR) to keep them on "
                       "disk")
    return compute_embeddings(params, images, config, batch_size=tc.eval_batch_size,
                              progress=progress, runtime=rt)
  cache_dir = Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params["image_encoder"]):
    h.update(np.asarray(leaf).tobytes())
  # Different attention kernels differ in the last bits: they are part of the key.
  h.update(str(rt.attention).encode())
  key = f"{name}-{dataset_fingerprint(dataset)}-{h.hexdigest()[:12]}-{tc.dtype}"
  path, done = cache_dir / f"{key}.npy", cache_dir / f"{key}.done"
  if path.exists() and done.exists():
    log_fn(f"using cached embeddings {path}")
    return np.load(path, mmap_mode="r")
  arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                  shape=(len(dataset), e, e, c))
  compute_embeddings(params, images, config, batch_size=tc.eval_batch_size, out=arr,
                     progress=progress, runtime=rt)
  arr.flush()
  done.write_text("ok\n")
  return np.load(path, mmap_mode="r")
