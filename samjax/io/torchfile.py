"""Reads PyTorch `.pth` state dicts without torch, never running code from the file.

A `torch.save` file is a zip archive: `<name>/data.pkl` is a pickle describing the
tensors and `<name>/data/<key>` hold their raw storages. We unpickle with an allow-list:
only the handful of callables a plain state dict uses are resolved, to our own inert
stand-ins; any other global, like `os.system`, is refused. This gives
`torch.load(weights_only=True)` safety, and it is samjax's only `.pth` reader, with or
without torch installed.

Nothing the file says is trusted either. The pickle is first read into lazy tensor
descriptions (storage, offset, size, stride); every one is checked against its storage
(no read past the end, no negative strides, the record's byte length is numel times the
item size) and against the allocation caps below before a byte of tensor data is read.
Zip records are checked against their declared sizes before inflating and never read
past them. Failures raise `TorchFileError` (a `ValueError`) naming the tensor.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

# Allocation caps. The largest official model, ViT-H, is 2.56 GB of float32 (636M
# parameters); its largest tensor is an MLP weight of 5120 x 1280 x 4 B = 26 MB (the
# relative position tables are smaller). A file may not make us allocate more than
# MAX_TENSOR_BYTES for one tensor or one storage (20x that largest tensor), nor more than
# MAX_TOTAL_BYTES in all (2x ViT-H in float32; ViT-H in float64 still fits).
MAX_TENSOR_BYTES = 512 << 20
MAX_TOTAL_BYTES = 5 << 30
# Bytes of tensors whose elements overlap in their storage (zero strides, e.g. saved from
# `.expand()`): these are made from nothing, so they get a small budget of their own.
# torch never writes such tensors for module parameters.
MAX_EXPANDED_BYTES = 64 << 20
# data.pkl of ViT-B is 55 kB (ViT-H ~130 kB); a pickle this large is not a state dict.
MAX_PICKLE_BYTES = 64 << 20
# torch.save stores records uncompressed. A compressed record above 1 MiB that inflates
# more than this (float weights deflate ~1.1:1, zeros ~1000:1) is refused as a zip bomb.
MAX_INFLATE_RATIO = 100
_RATIO_MIN_BYTES = 1 << 20
_MAX_NDIM = 32
_MAX_NESTING = 16
_READ_CHUNK = 16 << 20

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# Storage classes torch has but samjax does not read (named in the error, not "unsafe").
_UNSUPPORTED_STORAGES = ("QInt8Storage", "QUInt8Storage", "QInt32Storage",
                         "QUInt4x2Storage", "QUInt2x4Storage", "ComplexHalfStorage")
# dtypes of `_rebuild_tensor_v3` (torch's newer dtypes, stored in an UntypedStorage).
_V3_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
              "float32": np.float32, "float64": np.float64, "float16": np.float16,
              "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
              "uint8": np.uint8, "bool": np.bool_, "bfloat16": "bfloat16"}
# Inert torch names a state dict's pickle may mention: dtypes, layouts, qschemes.
_TORCH_CONSTANTS = frozenset(
    list(_V3_DTYPES) + [
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
        "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "complex64", "complex128",
        "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits8", "bits16",
        "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
        "per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams",
        "per_tensor_symmetric", "per_channel_symmetric"])
# torch tensor kinds that are safe to unpickle but that samjax cannot use.
_UNSUPPORTED_REBUILDS = {
    "_rebuild_sparse_tensor": "a sparse tensor (samjax needs dense tensors: save "
                              "t.to_dense())",
    "_rebuild_sparse_csr_tensor": "a sparse CSR tensor (samjax needs dense tensors: save "
                                  "t.to_dense())",
    "_rebuild_qtensor": "a quantized tensor (samjax needs float tensors: save "
                        "t.dequantize())",
    "_rebuild_meta_tensor_no_storage": "a tensor on the 'meta' device, which has no data",
    "_rebuild_wrapper_subclass": "a tensor subclass, which samjax does not read",
    "_rebuild_nested_tensor": "a nested tensor, which samjax does not read",
    "_rebuild_device_tensor_from_numpy": "a device tensor built from numpy, which samjax "
                                         "does not read",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor, which samjax does not read",
    "_rebuild_xla_tensor": "an XLA tensor, which samjax does not read",
    "_rebuild_mtia_tensor": "an MTIA tensor, which samjax does not read",
}

_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # no STOP


class TorchFileError(ValueError):
  """The file is not a readable plain PyTorch state dict; the message says why."""


class UnsafeCheckpointError(TorchFileError, pickle.UnpicklingError):
  """The pickle asks for something other than tensors and plain containers."""


class NotATorchFileError(TorchFileError):
  """The file is some other format (safetensors, numpy, HDF5, ...); the message names it."""


# ----------------------------------------------------------------------------------------
# Inert stand-ins the unpickler builds instead of torch objects. None of them accepts
# pickle BUILD state, so a crafted pickle cannot rewrite them after construction.
# ----------------------------------------------------------------------------------------
class _Inert:
  __slots__ = ()

  def __setstate__(self, state):
    raise TorchFileError(f"malformed pickle: BUILD applied to {type(self).__name__}")

  def __reduce__(self):
    raise TypeError("samjax torchfile stand-ins are not picklable")


class _StorageType(_Inert):
  __slots__ = ("name",)

  def __init__(self, name):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _TorchConstant(_Inert):
  __slots__ = ("name",)

  def __init__(self, name):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageRef(_Inert):
  """A storage record, not yet read: `numel` items of `itemsize` bytes.

  `dtype` is a numpy dtype name, "bfloat16", or None for an untyped (byte) storage whose
  tensor names the dtype; `order` is the file's byte order ("<" or ">").
  """
  __slots__ = ("key", "record", "dtype", "itemsize", "numel", "nbytes", "order", "error")

  def __init__(self, key, record, dtype, itemsize, numel, order, error=None):
    self.key, self.record, self.dtype = key, record, dtype
    self.itemsize, self.numel, self.nbytes = itemsize, numel, numel * itemsize
    self.order, self.error = order, error


class _TensorRef(_Inert):
  """A tensor, not yet materialised: a strided view of a storage."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype", "error")

  def __init__(self, storage=None, offset=None, size=None, stride=None, dtype=None,
               error=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.dtype, self.error = dtype, error


def _bad(reason: str) -> _TensorRef:
  return _TensorRef(error=reason)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(x) -> Optional[Tuple[int, ...]]:
  if isinstance(x, (tuple, list)) and all(_is_int(v) for v in x):
    return tuple(x)
  return None


def _make_tensor(storage, offset, size, stride, dtype=None) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    return _bad(f"its storage is {type(storage).__name__}, not a tensor storage")
  if not _is_int(offset):
    return _bad(f"storage offset is {type(offset).__name__} {offset!r:.40}, not an int")
  size_t, stride_t = _int_tuple(size), _int_tuple(stride)
  if size_t is None:
    return _bad(f"size {size!r:.60} is not a tuple of ints")
  if stride_t is None:
    return _bad(f"stride {stride!r:.60} is not a tuple of ints")
  return _TensorRef(storage, offset, size_t, stride_t, dtype)


def _rebuild_tensor(*args):
  if len(args) != 4:
    return _bad(f"_rebuild_tensor got {len(args)} arguments, expected 4")
  return _make_tensor(*args)


def _rebuild_tensor_v2(*args):
  # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
  if len(args) not in (6, 7):
    return _bad(f"_rebuild_tensor_v2 got {len(args)} arguments, expected 6 or 7")
  return _make_tensor(*args[:4])


def _rebuild_tensor_v3(*args):
  # (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
  if len(args) not in (7, 8):
    return _bad(f"_rebuild_tensor_v3 got {len(args)} arguments, expected 7 or 8")
  dt = args[6]
  if not isinstance(dt, _TorchConstant):
    return _bad(f"_rebuild_tensor_v3 dtype is {dt!r:.40}, not a torch dtype")
  if dt.name not in _V3_DTYPES:
    return _bad(f"dtype {dt!r} is not supported (samjax reads float32, float16, "
                "bfloat16 and float64 weights)")
  return _make_tensor(*args[:4], dtype=_V3_DTYPES[dt.name])


def _rebuild_parameter(*args):
  # (data, requires_grad, backward_hooks[, state]) -- the state of a Parameter subclass
  # is Python attributes, irrelevant to the weights.
  if len(args) not in (3, 4):
    return _bad(f"_rebuild_parameter got {len(args)} arguments, expected 3 or 4")
  data = args[0]
  if not isinstance(data, _TensorRef):
    return _bad(f"a Parameter wrapping {type(data).__name__}, not a tensor")
  return data


def _unsupported_rebuild(what):
  def rebuild(*unused):
    return _bad(f"it is {what}")
  return rebuild


def _torch_size(*args):
  if len(args) != 1 or _int_tuple(args[0]) is None:
    raise TorchFileError(f"malformed pickle: torch.Size{args!r:.60}")
  return tuple(args[0])


def _get_layout(*args):
  if len(args) != 1 or not isinstance(args[0], str):
    raise TorchFileError(f"malformed pickle: _get_layout{args!r:.60}")
  return _TorchConstant(args[0].replace("torch.", "", 1))


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("builtins", "set"): set,
}
_ALLOWED.update({("torch._utils", k): _unsupported_rebuild(v)
                 for k, v in _UNSUPPORTED_REBUILDS.items()})

_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class _Unpickler(pickle.Unpickler):
  """Allow-list unpickler producing lazy `_TensorRef`s; reads no tensor data."""

  def __init__(self, fh, zf: zipfile.ZipFile, prefix: str, order: str):
    super().__init__(fh)
    self._zf = zf
    self._prefix = prefix
    self._order = order
    self._storages: Dict[str, _StorageRef] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage") and (name in _STORAGE_DTYPES
                                                 or name in _UNSUPPORTED_STORAGES):
      return _StorageType(name)
    if module == "torch" and name in _TORCH_CONSTANTS:
      return _TorchConstant(name)
    raise UnsafeCheckpointError(f"refusing global {module}.{name}: a state dict only holds "
                                "tensors")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise TorchFileError(f"malformed pickle: unknown persistent id {pid!r:.80} (a torch "
                           "state dict only references storages)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"malformed pickle: storage type {storage_type!r:.60} in "
                           f"persistent id {pid!r:.80}")
    if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
      raise TorchFileError(f"malformed pickle: storage key {key!r:.60}")
    if not _is_int(numel) or numel < 0:
      raise TorchFileError(f"malformed pickle: storage {key!r} has {numel!r:.40} elements")
    name = storage_type.name
    dtype, error, itemsize = _STORAGE_DTYPES.get(name), None, 1
    if name == "UntypedStorage":
      dtype = None  # bytes; the tensor (`_rebuild_tensor_v3`) says how to read them
    elif dtype is None:
      error = f"storage type torch.{name} is not supported"
    elif dtype == "bfloat16":
      itemsize = 2
    else:
      dtype = np.dtype(dtype).name
      itemsize = np.dtype(dtype).itemsize
    ref = _StorageRef(key, f"{self._prefix}data/{key}", dtype, itemsize, numel,
                      self._order, error)
    prev = self._storages.get(key)
    if prev is not None:
      if (prev.nbytes, prev.dtype) != (ref.nbytes, ref.dtype):
        raise TorchFileError(f"storage {key!r} is declared twice with different sizes or "
                             "types")
      return prev
    self._storages[key] = ref
    return ref


# ----------------------------------------------------------------------------------------
# Format sniffing: say what a file is when it is not a torch zip.
# ----------------------------------------------------------------------------------------
def _describe_zip(names) -> Optional[str]:
  """None for a torch.save archive, else what the zip archive looks like."""
  if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
      return ("a TorchScript archive (torch.jit.save), not a state dict: save "
              "torch.jit.load(path).state_dict() with torch.save instead")
    return None
  if names and all(n.endswith(".npy") for n in names):
    return "a numpy .npz archive, not a PyTorch checkpoint"
  if any(n.endswith(".weights.h5") for n in names):
    return "a Keras archive, not a PyTorch checkpoint"
  shown = ", ".join(list(names)[:4]) or "nothing"
  return f"a zip archive without data.pkl, so not a torch.save file (it holds {shown})"


def sniff_format(head: bytes, size: int) -> Optional[str]:
  """Names the format of a non-zip file from its first bytes; None if it may be a zip.

  Args:
    head: the first 512 bytes (or the whole file if shorter).
    size: file size in bytes.
  """
  if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    return None
  if len(head) >= 9 and head[8:9] == b"{":
    n = int.from_bytes(head[:8], "little")
    if 2 <= n <= size - 8:
      return "a safetensors file, not a PyTorch .pth (whatever its name)"
  if head.startswith(b"\x89HDF\r\n\x1a\n"):
    return "an HDF5 file (Keras/h5py weights?), not a PyTorch checkpoint"
  if head.startswith(b"\x93NUMPY"):
    return "a numpy .npy file, not a PyTorch checkpoint"
  if head.startswith(_LEGACY_TORCH_MAGIC):
    return ("a legacy (pre-1.6, non-zip) PyTorch file, which samjax does not read: re-save "
            "it with a recent torch: torch.save(torch.load(path, weights_only=True), new)")
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return ("a plain pickle, not a torch.save zip archive; samjax does not unpickle it "
            "(a pickle can run code)")
  if len(head) > 262 and head[257:262] == b"ustar":
    return "a tar archive (the pre-1.0 PyTorch format?), not a zip-format PyTorch checkpoint"
  for magic, what in ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                      (b"7z\xbc\xaf\x27\x1c", "7-zip"), (b"\x28\xb5\x2f\xfd", "zstd")):
    if head.startswith(magic):
      return f"a {what}-compressed file: decompress it first"
  if head.startswith(b"GGUF"):
    return "a GGUF file, not a PyTorch checkpoint"
  return f"not a PyTorch checkpoint (unrecognised format; first bytes {head[:8].hex(' ')})"


# ----------------------------------------------------------------------------------------
# Checking and materialising tensors.
# ----------------------------------------------------------------------------------------
def _elem_dtype(t: _TensorRef):
  """(numpy dtype in the file's byte order, bfloat16?) of a tensor's elements."""
  base = t.dtype if t.dtype is not None else t.storage.dtype
  if base is None:
    return None, False
  if base == "bfloat16":
    return np.dtype("u2").newbyteorder(t.storage.order), True
  return np.dtype(base).newbyteorder(t.storage.order), False


def _check_tensor(name: str, t: _TensorRef) -> Tuple[int, bool, bool]:
  """Validates one tensor against its storage; returns (output bytes, expanded, zero-copy).

  All arithmetic is on Python ints, so nothing overflows.
  """
  if t.error:
    raise TorchFileError(f"tensor {name!r}: {t.error}")
  s = t.storage
  if s.error:
    raise TorchFileError(f"tensor {name!r}: {s.error}")
  if len(t.size) != len(t.stride):
    raise TorchFileError(f"tensor {name!r}: size {t.size} and stride {t.stride} have "
                         "different lengths")
  if len(t.size) > _MAX_NDIM:
    raise TorchFileError(f"tensor {name!r} has {len(t.size)} dimensions")
  if any(d < 0 for d in t.size):
    raise TorchFileError(f"tensor {name!r} has a negative size {t.size}")
  if any(st < 0 for st in t.stride):
    raise TorchFileError(f"tensor {name!r} has a negative stride {t.stride} (torch never "
                         "writes one)")
  if t.offset < 0:
    raise TorchFileError(f"tensor {name!r} has a negative storage offset {t.offset}")
  dtype, bf16 = _elem_dtype(t)
  if dtype is None:
    raise TorchFileError(f"tensor {name!r}: an untyped storage and no dtype")
  itemsize = dtype.itemsize
  out_itemsize = 4 if bf16 else itemsize  # bfloat16 is widened to float32
  numel = math.prod(t.size)
  storage_items = s.nbytes // itemsize
  if numel == 0:  # an empty tensor reads nothing, but its offset must be in range
    if t.offset > storage_items:
      raise TorchFileError(f"tensor {name!r}: storage offset {t.offset} is past the end "
                           f"of its storage {s.key!r} ({storage_items} elements)")
    span = 0
  else:
    last = t.offset + sum((d - 1) * st for d, st in zip(t.size, t.stride))
    if last >= storage_items:
      raise TorchFileError(
          f"tensor {name!r} (size {t.size}, stride {t.stride}, offset {t.offset}) reaches "
          f"element {last:,} but its storage {s.key!r} holds {storage_items:,}: it would "
          "read past the end of the storage")
    span = last - t.offset + 1
  nbytes = numel * out_itemsize
  if nbytes > MAX_TENSOR_BYTES:
    raise TorchFileError(f"tensor {name!r} of size {t.size} would take {nbytes:,} bytes, "
                         f"more than the {MAX_TENSOR_BYTES:,} allowed for one tensor")
  expanded = numel > span  # elements overlap in memory (zero or overlapping strides)
  contiguous = all(st == math.prod(t.size[i + 1:]) for i, st in enumerate(t.stride)
                   if t.size[i] != 1)
  zero_copy = (not bf16 and numel > 0 and t.offset == 0 and contiguous
               and numel * itemsize == s.nbytes)
  return nbytes, expanded, zero_copy


def _iter_tensors(obj, path: Tuple[str, ...], depth: int = 0
                  ) -> Iterable[Tuple[str, _TensorRef]]:
  if depth > _MAX_NESTING:
    raise TorchFileError(f"containers nested deeper than {_MAX_NESTING} levels at "
                         f"{'/'.join(path)!r}: not a state dict")
  if isinstance(obj, _TensorRef):
    yield "/".join(path), obj
  elif isinstance(obj, _StorageRef):
    raise TorchFileError(f"{'/'.join(path) or 'the file'} holds a bare storage, not a "
                         "tensor")
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from _iter_tensors(v, path + (str(k),), depth + 1)
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _iter_tensors(v, path + (str(i),), depth + 1)
  elif isinstance(obj, (set, frozenset)) and any(isinstance(v, _Inert) for v in obj):
    raise TorchFileError(f"{'/'.join(path) or 'the file'} is a set of tensors, not a "
                         "state dict")


def _replace_tensors(obj, done: Dict[int, Any], depth: int = 0):
  if isinstance(obj, _TensorRef):
    return done[id(obj)]
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _replace_tensors(v, done, depth + 1)
    return out
  if isinstance(obj, list):
    return [_replace_tensors(v, done, depth + 1) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_replace_tensors(v, done, depth + 1) for v in obj)
  return obj


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int) -> bytearray:
  """Exactly `nbytes` of a zip record (its declared size, checked by the caller)."""
  buf = bytearray(nbytes)
  got = 0
  with zf.open(info) as f:
    while got < nbytes:
      chunk = f.read(min(_READ_CHUNK, nbytes - got))
      if not chunk:
        break
      buf[got:got + len(chunk)] = chunk
      got += len(chunk)
    if got != nbytes or f.read(1):  # reading to the end also checks the CRC
      raise TorchFileError(f"record {info.filename!r} holds {got:,} bytes, its header says "
                           f"{nbytes:,}")
  return buf


def _check_record(info: zipfile.ZipInfo, what: str, cap: int) -> None:
  if info.flag_bits & 0x1:
    raise TorchFileError(f"record {info.filename!r} ({what}) is encrypted")
  if info.file_size > cap:
    raise TorchFileError(f"record {info.filename!r} ({what}) declares {info.file_size:,} "
                         f"bytes, more than the {cap:,} allowed")
  if (info.compress_type != zipfile.ZIP_STORED and info.file_size > _RATIO_MIN_BYTES
      and info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1)):
    raise TorchFileError(
        f"record {info.filename!r} ({what}) would inflate {info.compress_size:,} bytes to "
        f"{info.file_size:,} (a zip bomb?); torch.save writes uncompressed archives")


def _select(obj, unwrap: Tuple[str, ...]):
  for key in unwrap:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  return obj


def load_state_dict(path, *, unwrap: Tuple[str, ...] = ()) -> Dict[str, Any]:
  """Returns {name: numpy array} from a zip-format `.pth` (torch >= 1.6 files).

  bfloat16 tensors are returned as float32; other dtypes as stored.

  Args:
    path: the `.pth` file.
    unwrap: keys of wrapper dicts to descend into before reading tensors, in order (e.g.
      `("model", "state_dict")` for training checkpoints); tensors outside (optimizer
      state) are then neither read nor counted against the caps.

  Raises:
    UnsafeCheckpointError: the pickle references anything but tensors/containers.
    NotATorchFileError: the file is another format; the message names it.
    TorchFileError: malformed, truncated, inconsistent, or over the allocation caps.
    OSError: the file cannot be read.
  """
  with open(path, "rb") as f:
    head = f.read(512)
    f.seek(0, 2)
    size = f.tell()
  what = sniff_format(head, size)
  if what is not None:
    raise NotATorchFileError(what)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
    raise TorchFileError(f"a zip archive that cannot be opened (corrupt or truncated?): "
                         f"{e}") from None
  with zf:
    try:
      return _load(zf, unwrap)
    except TorchFileError:
      raise
    except zipfile.BadZipFile as e:
      raise TorchFileError(f"a zip archive that cannot be read (corrupt or truncated?): {e}"
                           ) from None
    except Exception as e:  # zlib/lzma/bz2 errors, unsupported compression, encryption
      raise TorchFileError(f"unreadable zip archive: {type(e).__name__}: {e}") from None


def _load(zf: zipfile.ZipFile, unwrap: Tuple[str, ...]):
  infos = {i.filename: i for i in zf.infolist()}
  what = _describe_zip(list(infos))
  if what is not None:
    raise NotATorchFileError(what)
  pkl = min((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
  prefix = pkl[:-len("data.pkl")]
  _check_record(infos[pkl], "the pickle", MAX_PICKLE_BYTES)
  big_endian = False
  order = infos.get(prefix + "byteorder")
  if order is not None and order.file_size <= 16:
    big_endian = _read_record(zf, order, order.file_size).strip() == b"big"

  data = bytes(_read_record(zf, infos[pkl], infos[pkl].file_size))
  unpickler = _Unpickler(io.BytesIO(data), zf, prefix, "><"[not big_endian])
  try:
    obj = unpickler.load()
  except TorchFileError:
    raise
  except Exception as e:  # a crafted pickle can make the C unpickler raise anything
    raise TorchFileError(f"malformed pickle in {pkl!r}: {type(e).__name__}: "
                         f"{str(e)[:200]}") from None
  obj = _select(obj, unwrap)

  # Plan: check every tensor and the totals before reading any tensor data.
  tensors = list(_iter_tensors(obj, ()))
  plan = {}
  storages: Dict[str, _StorageRef] = {}
  uses: Dict[str, int] = collections.Counter()
  copied = expanded_bytes = 0
  first_user: Dict[str, str] = {}
  for name, t in tensors:
    if id(t) in plan:
      continue
    nbytes, expanded, zero_copy = _check_tensor(name or "<root>", t)
    plan[id(t)] = (name, t, zero_copy)
    storages[t.storage.key] = t.storage
    first_user.setdefault(t.storage.key, name)
    uses[t.storage.key] += 1
    if not zero_copy:
      copied += nbytes
    if expanded:
      expanded_bytes += nbytes
      if expanded_bytes > MAX_EXPANDED_BYTES:
        raise TorchFileError(
            f"tensor {name!r} of size {t.size} has overlapping (zero-stride, expanded) "
            f"elements; materialising such tensors would take more than "
            f"{MAX_EXPANDED_BYTES:,} bytes from {t.storage.nbytes:,} stored bytes")
  for s in storages.values():
    info = infos.get(s.record)
    user = first_user[s.key]
    if info is None:
      raise TorchFileError(f"tensor {user!r}: storage {s.key!r} is referenced but the "
                           f"archive has no record {s.record!r}")
    if info.file_size != s.nbytes:
      raise TorchFileError(
          f"tensor {user!r}: storage {s.key!r} declares {s.numel:,} elements of "
          f"{s.itemsize} bytes ({s.nbytes:,} bytes) but its record holds "
          f"{info.file_size:,} bytes")
    _check_record(info, f"storage of tensor {user!r}", MAX_TENSOR_BYTES)
  total = sum(s.nbytes for s in storages.values()) + copied
  if total > MAX_TOTAL_BYTES:
    raise TorchFileError(f"the tensors would take {total:,} bytes, more than the "
                         f"{MAX_TOTAL_BYTES:,} allowed (twice the largest SAM model)")

  # Read: each storage once, dropped after its last tensor.
  cache: Dict[str, np.ndarray] = {}
  done: Dict[int, np.ndarray] = {}
  for name, t, zero_copy in plan.values():
    s = t.storage
    if s.key not in cache:
      cache[s.key] = np.frombuffer(_read_record(zf, infos[s.record], s.nbytes), np.uint8)
    done[id(t)] = _materialize(cache[s.key], t, zero_copy)
    uses[s.key] -= 1
    if not uses[s.key]:
      del cache[s.key]
  return _replace_tensors(obj, done)


def _materialize(raw: np.ndarray, t: _TensorRef, zero_copy: bool) -> np.ndarray:
  """The tensor's elements as a C-contiguous native-order array (bounds already checked)."""
  dtype, bf16 = _elem_dtype(t)
  items = raw[:len(raw) - len(raw) % dtype.itemsize].view(dtype)
  if zero_copy:
    arr = items.reshape(t.size)
  else:
    view = np.lib.stride_tricks.as_strided(
        items[t.offset:], shape=t.size,
        strides=tuple(st * dtype.itemsize for st in t.stride), writeable=False)
    arr = np.array(view, order="C")
  if not arr.dtype.isnative:
    arr = arr.astype(arr.dtype.newbyteorder("="))
  if bf16:  # bfloat16 is the upper half of a float32
    return (arr.astype(np.uint32) << 16).view(np.float32)
  return arr
