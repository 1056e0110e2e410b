"""Reads PyTorch `.pth` state dicts without torch, never running code from the file.

A `torch.save` file is a zip archive: `<name>/data.pkl` is a pickle describing the
tensors and `<name>/data/<key>` hold their raw little-endian storages. We unpickle with
an allow-list: only the handful of callables a plain state dict uses are resolved (to
our own numpy implementations); any other global, like `os.system`, is refused. This
gives `torch.load(weights_only=True)` safety for users who install samjax without torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, Dict

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle asks for something other than tensors and plain containers."""


class _StorageType:
  def __init__(self, name):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  arr, itemsize = storage
  if not size:
    return arr[offset:offset + 1].reshape(()).copy()
  strides = tuple(s * itemsize for s in stride)
  view = np.lib.stride_tricks.as_strided(arr[offset:], shape=tuple(size), strides=strides)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("builtins", "set"): set,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, fh, zf: zipfile.ZipFile, prefix: str):
    super().__init__(fh)
    self._zf = zf
    self._prefix = prefix

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafeCheckpointError(f"refusing global {module}.{name}: a state dict only holds "
                                "tensors")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
    storage_type, key = pid[1], pid[2]
    dtype = _STORAGE_DTYPES.get(getattr(storage_type, "name", ""))
    if dtype is None:
      raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
    raw = self._zf.read(f"{self._prefix}data/{key}")
    if dtype == "bfloat16":
      import ml_dtypes
      arr = np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
      return arr, 4
    arr = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
    return arr, arr.itemsize


def load_state_dict(path) -> Dict[str, Any]:
  """Returns {name: numpy array} from a zip-format `.pth` (torch >= 1.6 files).

  Raises:
    UnsafeCheckpointError: the pickle references anything but tensors/containers.
    zipfile.BadZipFile / KeyError / EOFError: not a (complete) torch zip file.
  """
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if not pkls:
      raise zipfile.BadZipFile(f"{path} has no data.pkl: not a torch zip checkpoint")
    prefix = pkls[0][:-len("data.pkl")]
    return _Unpickler(io.BytesIO(zf.read(pkls[0])), zf, prefix).load()
