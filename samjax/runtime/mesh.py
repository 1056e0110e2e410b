"""Device mesh helpers: the one place that decides how work is spread over devices.

samjax uses `jax.jit` with `Mesh`/`NamedSharding` (the successor of `pmap`): a 1-D
mesh over all local devices with axis "data"; params are replicated, batches are
split along their leading axis.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


@functools.lru_cache(maxsize=8)
def _mesh(devices: tuple) -> Mesh:
  return Mesh(np.array(devices), (DATA_AXIS,))


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """1-D mesh over `devices` (default: this process's local devices)."""
  return _mesh(tuple(devices if devices is not None else jax.local_devices()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places a pytree (e.g. params) on every device of `mesh` once."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree, mesh: Mesh):
  """Splits each array's leading axis over the mesh (must divide evenly)."""
  n = mesh.devices.size

  def put(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split over {n} devices; pad it with "
                       "pad_to_multiple first")
    return jax.device_put(x, batch_sharded(mesh))
  return jax.tree_util.tree_map(put, tree)


def pad_to_multiple(x: np.ndarray, multiple: int, axis: int = 0) -> np.ndarray:
  """Pads `axis` with copies of the last entry up to a multiple (results are dropped)."""
  n = x.shape[axis]
  target = -(-n // multiple) * multiple if n else multiple
  if target == n:
    return x
  idx = np.concatenate([np.arange(n), np.full(target - n, max(n - 1, 0))])
  if n == 0:
    shape = list(x.shape)
    shape[axis] = target
    return np.zeros(shape, x.dtype)
  return np.take(x, idx, axis=axis)


def device_memory_bytes(device: jax.Device) -> int:
  """Memory a computation on `device` may use: the accelerator's limit, or host RAM."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (unsupported on this backend)
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 1 << 40
