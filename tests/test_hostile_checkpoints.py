"""Crafted, damaged and mislabelled checkpoints: each fails with one clear CheckpointError.

The hostile `.pth` files are written by hand (a tiny pickle assembler and zipfile), so
each test controls exactly the bytes a malicious or broken file would hold; a valid
file built this way loads in real `torch.load(weights_only=True)` (checked below).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import samjax
from samjax.io import checkpoint as ck
from samjax.io import torchfile

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny_trained"


# ----------------------------------------------------------------------------------------
# A tiny pickle assembler: globals, calls and persistent ids exactly as torch writes them,
# plus whatever wrong arguments a test wants.
# ----------------------------------------------------------------------------------------
class G:
  """A pickled global `module.name`."""

  def __init__(self, dotted):
    self.module, self.name = dotted.rsplit(".", 1)


class Call:
  """`fn(*args)` in the pickle (REDUCE)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args


class Pid:
  """A persistent id (BINPERSID)."""

  def __init__(self, value):
    self.value = value


class Build:
  """`obj` with BUILD `state` applied (how pickle restores an object's attributes)."""

  def __init__(self, obj, state):
    self.obj, self.state = obj, state


def dumps(obj) -> bytes:
  out = bytearray(b"\x80\x02")

  def emit(o):
    if isinstance(o, G):
      out.extend(b"c" + f"{o.module}\n{o.name}\n".encode())
    elif isinstance(o, Call):
      emit(o.fn)
      emit(tuple(o.args))
      out.extend(b"R")
    elif isinstance(o, Pid):
      emit(o.value)
      out.extend(b"Q")
    elif isinstance(o, Build):
      emit(o.obj)
      emit(o.state)
      out.extend(b"b")
    elif o is None:
      out.extend(b"N")
    elif o is True or o is False:
      out.extend(b"\x88" if o else b"\x89")
    elif isinstance(o, int):
      n = (o.bit_length() + 8) // 8
      out.extend(b"\x8a" + bytes([n]) + o.to_bytes(n, "little", signed=True))
    elif isinstance(o, float):
      out.extend(b"G" + struct.pack(">d", o))
    elif isinstance(o, str):
      b = o.encode()
      out.extend(b"X" + struct.pack("<I", len(b)) + b)
    elif isinstance(o, tuple):
      out.extend(b"(")
      for x in o:
        emit(x)
      out.extend(b"t")
    elif isinstance(o, list):
      out.extend(b"](")
      for x in o:
        emit(x)
      out.extend(b"e")
    elif isinstance(o, dict):
      out.extend(b"}(")
      for k, v in o.items():
        emit(k)
        emit(v)
      out.extend(b"u")
    else:
      raise TypeError(o)

  emit(obj)
  out.extend(b".")
  return bytes(out)


def storage(key, numel, kind="FloatStorage"):
  return Pid(("storage", G(f"torch.{kind}"), key, "cpu", numel))


def tensor(key, numel, size, stride, offset=0, kind="FloatStorage"):
  return Call(G("torch._utils._rebuild_tensor_v2"), storage(key, numel, kind), offset,
              tuple(size), tuple(stride), False, Call(G("collections.OrderedDict")))


def write_pth(path, obj, records, compression=zipfile.ZIP_STORED) -> Path:
  with zipfile.ZipFile(path, "w", compression) as z:
    z.writestr("archive/data.pkl", dumps(obj))
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
    for k, b in records.items():
      z.writestr(f"archive/data/{k}", b)
  return Path(path)


def set_declared_size(path: Path, member: str, size: int) -> None:
  """Rewrites a record's uncompressed size in its local and central zip headers."""
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    info, pos = z.getinfo(member), z.start_dir
  struct.pack_into("<I", data, info.header_offset + 22, size)
  while data[pos:pos + 4] == b"PK\x01\x02":
    n, m, k = struct.unpack_from("<HHH", data, pos + 28)
    if bytes(data[pos + 46:pos + 46 + n]).decode() == member:
      struct.pack_into("<I", data, pos + 24, size)
    pos += 46 + n + m + k
  path.write_bytes(bytes(data))


def f32(n) -> bytes:
  return np.arange(n, dtype="<f4").tobytes()


@pytest.fixture(params=["with torch", "without torch"])
def torch_mode(request, monkeypatch):
  """Runs a test with torch importable and with it made unimportable."""
  if request.param == "without torch":
    monkeypatch.setitem(sys.modules, "torch", None)
  return request.param


def refused(path, match):
  with pytest.raises(ck.CheckpointError, match=match) as e:
    ck.load_torch_state_dict(path)
  return str(e.value)


def test_assembler_writes_files_real_torch_reads(tmp_path):
  torch = pytest.importorskip("torch")
  p = write_pth(tmp_path / "ok.pth", {"w": tensor("0", 6, (2, 3), (3, 1))}, {"0": f32(6)})
  ref = torch.load(p, weights_only=True)["w"].numpy()
  np.testing.assert_array_equal(torchfile.load_state_dict(p)["w"], ref)


# ----------------------------------------------------------------------------------------
# 1. Out-of-bounds reads.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,stride,offset,numel,what", [
    ((2_000_000,), (1,), 0, 4, "past the end"),         # 4 floats under 2M
    ((2, 2), (3, 1), 0, 4, "past the end"),             # stride walks off the end
    ((4,), (1,), 1, 4, "past the end"),                 # offset pushes it off
    ((0,), (1,), 9, 4, "offset 9 is past the end"),     # empty but offset out of range
    ((2**62, 2**62), (2**62, 1), 0, 4, "past the end"),  # would overflow int64
    ((4,), (-1,), 3, 4, "negative stride"),
    ((4,), (1,), -1, 4, "negative storage offset"),
    ((-4,), (1,), 0, 4, "negative size"),
])
def test_tensor_extent_is_checked_against_its_storage(tmp_path, torch_mode, size, stride,
                                                      offset, numel, what):
  p = write_pth(tmp_path / "oob.pth", {"image_encoder.pos_embed": tensor(
      "0", numel, size, stride, offset)}, {"0": f32(numel)})
  msg = refused(p, what)
  assert "image_encoder.pos_embed" in msg


def test_storage_record_length_must_match_numel(tmp_path, torch_mode):
  p = write_pth(tmp_path / "short.pth", {"w": tensor("0", 4, (4,), (1,))}, {"0": f32(3)})
  msg = refused(p, "declares 4 elements of 4 bytes")
  assert "'w'" in msg and "12 bytes" in msg
  p = write_pth(tmp_path / "nodata.pth", {"w": tensor("7", 4, (4,), (1,))}, {"0": f32(4)})
  refused(p, "no record 'archive/data/7'")


def test_valid_views_still_load(tmp_path, torch_mode):
  """Bounds checks must not reject what torch writes: slices, transposes, scalars."""
  p = write_pth(tmp_path / "views.pth", {
      "t": tensor("0", 6, (3, 2), (1, 3)), "tail": tensor("0", 6, (2,), (1,), offset=4),
      "scalar": tensor("0", 6, (), (), offset=5), "empty": tensor("0", 6, (0, 3), (3, 1)),
      "last": tensor("0", 6, (2, 1), (3, 1), offset=2)}, {"0": f32(6)})
  sd = torchfile.load_state_dict(p)
  base = np.arange(6, dtype=np.float32)
  np.testing.assert_array_equal(sd["t"], base.reshape(2, 3).T)
  np.testing.assert_array_equal(sd["tail"], [4, 5])
  assert sd["scalar"] == 5 and sd["empty"].shape == (0, 3)
  np.testing.assert_array_equal(sd["last"], [[2], [5]])


# ----------------------------------------------------------------------------------------
# 2. Tiny files, huge allocations.
# ----------------------------------------------------------------------------------------
def test_zero_stride_giant_in_a_tiny_file(tmp_path, torch_mode):
  p = write_pth(tmp_path / "expand.pth", {"w": tensor("0", 4, (100000, 100000), (0, 0))},
                {"0": f32(4)})
  assert p.stat().st_size < 1000
  msg = refused(p, "40,000,000,000 bytes")
  assert "'w'" in msg


def test_expanded_tensors_within_budget_are_materialised(tmp_path):
  p = write_pth(tmp_path / "small.pth", {"b": tensor("0", 4, (1000, 4), (0, 1))},
                {"0": f32(4)})
  b = torchfile.load_state_dict(p)["b"]
  np.testing.assert_array_equal(b, np.broadcast_to(np.arange(4, dtype=np.float32),
                                                   (1000, 4)))
  assert b.flags.c_contiguous and b.flags.writeable
  # 80 MB from 16 kB stored: over the budget for data made from nothing.
  p = write_pth(tmp_path / "big.pth", {"b": tensor("0", 4000, (5000, 4000), (0, 1))},
                {"0": f32(4000)})
  refused(p, "overlapping .*expanded")


def test_declared_record_sizes_are_checked_before_inflating(tmp_path, torch_mode):
  # A 3 GB record (declared): refused from the zip header, before reading it.
  n = 750_000_000
  p = write_pth(tmp_path / "bomb.pth", {"w": tensor("0", n, (4,), (1,))}, {"0": f32(4)},
                zipfile.ZIP_DEFLATED)
  set_declared_size(p, "archive/data/0", n * 4)
  msg = refused(p, "3,000,000,000 bytes, more than")
  assert "'w'" in msg
  # ... and as one tensor: refused by the per-tensor cap first.
  p = write_pth(tmp_path / "bomb2.pth", {"w": tensor("0", n, (n,), (1,))}, {"0": f32(4)},
                zipfile.ZIP_DEFLATED)
  set_declared_size(p, "archive/data/0", n * 4)
  refused(p, "'w' of size .* would take 3,000,000,000 bytes")


def test_real_deflate_bomb_is_refused_by_its_ratio(tmp_path):
  n = 1 << 20  # 4 MiB of zeros deflate to ~4 kB
  p = write_pth(tmp_path / "zeros.pth", {"w": tensor("0", n, (n,), (1,))},
                {"0": bytes(4 * n)}, zipfile.ZIP_DEFLATED)
  assert p.stat().st_size < 10_000
  refused(p, "zip bomb")


def test_record_inflating_past_its_declared_size_is_not_read_past_it(tmp_path):
  n = 1 << 16
  p = write_pth(tmp_path / "liar.pth", {"w": tensor("0", 4, (4,), (1,))},
                {"0": f32(n)}, zipfile.ZIP_DEFLATED)
  set_declared_size(p, "archive/data/0", 16)  # says 4 floats; inflates to 65536
  refused(p, "corrupt or truncated|CRC|holds")


def test_total_allocation_is_capped(tmp_path):
  n = 120_000_000  # 480 MB each, under the per-tensor cap; 12 of them are 5.8 GB
  sd = {f"w{i}": tensor(str(i), n, (n,), (1,)) for i in range(12)}
  p = write_pth(tmp_path / "many.pth", sd, {str(i): f32(4) for i in range(12)})
  for i in range(12):
    set_declared_size(p, f"archive/data/{i}", 4 * n)
  refused(p, "would take 5,760,000,000 bytes")


def test_peak_memory_stays_small_on_huge_allocation_files(tmp_path):
  """Measured in a fresh process (the reader alone), so the peak is this load's."""
  n = 750_000_000
  write_pth(tmp_path / "expand.pth", {"w": tensor("0", 4, (100000, 100000), (0, 0))},
            {"0": f32(4)})
  bomb = write_pth(tmp_path / "bomb.pth", {"w": tensor("0", n, (4,), (1,))},
                   {"0": f32(4)}, zipfile.ZIP_DEFLATED)
  set_declared_size(bomb, "archive/data/0", 4 * n)
  script = textwrap.dedent(f"""
      import importlib.util, resource, sys
      def peak_kb():  # VmHWM is this process's own peak; ru_maxrss inherits the parent's
        try:
          with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
          return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      spec = importlib.util.spec_from_file_location("tf", {str(torchfile.__file__)!r})
      tf = importlib.util.module_from_spec(spec); spec.loader.exec_module(tf)
      before = peak_kb()
      for name in ("expand.pth", "bomb.pth"):
        try:
          tf.load_state_dict({str(tmp_path)!r} + "/" + name)
          sys.exit(name + " loaded")
        except tf.TorchFileError:
          pass
      print(peak_kb() - before)
  """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  assert int(r.stdout) < 32 * 1024, f"peak RSS grew by {r.stdout} kB"


# ----------------------------------------------------------------------------------------
# 3. Malformed pickles reaching allowed callables; unsupported tensor kinds.
# ----------------------------------------------------------------------------------------
_V2 = G("torch._utils._rebuild_tensor_v2")
_OD = Call(G("collections.OrderedDict"))


@pytest.mark.parametrize("value,match", [
    (Call(_V2, storage("0", 4), 0), "got 2 arguments"),
    (Call(_V2, storage("0", 4), 0, "4", (1,), False, _OD), "size '4' is not a tuple"),
    (Call(_V2, storage("0", 4), 0, (4,), (1.5,), False, _OD), "stride .* not a tuple"),
    (Call(_V2, storage("0", 4), "0", (4,), (1,), False, _OD), "offset is str"),
    (Call(_V2, "not a storage", 0, (4,), (1,), False, _OD), "its storage is str"),
    (Call(_V2, storage("0", 4), 0, (4,), (1, 1), False, _OD), "different lengths"),
    (Call(G("torch._utils._rebuild_parameter"), 5, False, _OD), "Parameter wrapping int"),
    (Call(G("torch._utils._rebuild_tensor")), "got 0 arguments"),
    (Call(G("torch._utils._rebuild_sparse_tensor"), G("torch.sparse_coo"), ()),
     "sparse tensor"),
    (Call(G("torch._utils._rebuild_tensor_v3"), Pid(("storage", G("torch.UntypedStorage"),
                                                     "0", "cpu", 16)),
          0, (4,), (1,), False, _OD, G("torch.float8_e4m3fn")), "float8_e4m3fn"),
])
def test_malformed_tensor_pickles(tmp_path, value, match):
  p = write_pth(tmp_path / "bad.pth", {"mask_decoder.iou_token.weight": value},
                {"0": f32(4)})
  msg = refused(p, match)
  assert "mask_decoder.iou_token.weight" in msg and "could run code" not in msg


@pytest.mark.parametrize("obj,match", [
    ({"w": Pid(("storage",))}, "unknown persistent id"),
    ({"w": Pid("weights")}, "unknown persistent id"),
    ({"w": Pid(("storage", G("torch.FloatStorage"), "../../etc/passwd", "cpu", 4))},
     "storage key"),
    ({"w": Pid(("storage", "FloatStorage", "0", "cpu", 4))}, "storage type"),
    ({"w": Pid(("storage", G("torch.FloatStorage"), "0", "cpu", -1))}, "-1 elements"),
    ({"w": Call(G("collections.OrderedDict"), 5)}, "malformed pickle"),
    ({"w": Call(G("torch.Size"), "big")}, "malformed pickle"),
    ([tensor("0", 4, (4,), (1,))] * 2, "does not hold a state dict"),
])
def test_malformed_containers_and_persistent_ids(tmp_path, obj, match):
  p = write_pth(tmp_path / "bad.pth", obj, {"0": f32(4)})
  assert "could run code" not in refused(p, match)


def test_pickle_build_cannot_rewrite_a_tensor(tmp_path):
  # BUILD on the tensor stand-in, trying to swap its size after the checked call.
  p = write_pth(tmp_path / "build.pth", {"w": Build(tensor("0", 4, (4,), (1,)),
                                                   {"size": (10**9,)})}, {"0": f32(4)})
  refused(p, "malformed pickle")


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning")
def test_torch_written_unsupported_tensors(tmp_path):
  torch = pytest.importorskip("torch")
  for name, value, match in [
      ("sparse", torch.eye(3).to_sparse(), "sparse tensor"),
      ("quantized", torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
       "quantized"),
      ("meta", torch.empty(2, device="meta"), "'meta' device")]:
    p = tmp_path / f"{name}.pth"
    torch.save({"prompt_encoder.not_a_point_embed.weight": value}, p)
    msg = refused(p, match)
    assert "prompt_encoder.not_a_point_embed.weight" in msg and "could run code" not in msg


def test_code_in_the_pickle_is_still_refused(tmp_path, torch_mode):
  p = write_pth(tmp_path / "evil.pth", {"w": Call(G("os.system"), "touch pwned")}, {})
  refused(p, "could run code.*refusing global os.system")


# ----------------------------------------------------------------------------------------
# 4. dtypes and non-finite weights.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tiny_ckpt):
  return ck.load_torch_state_dict(tiny_ckpt[0])


@pytest.mark.parametrize("dtype", [np.int8, np.bool_, np.int64, np.complex64])
def test_non_float_parameters_are_refused(tiny_sd, dtype):
  sd = dict(tiny_sd)
  key = "image_encoder.blocks.0.attn.qkv.weight"
  sd[key] = sd[key].astype(dtype)
  with pytest.raises(ck.CheckpointError, match="not floating point") as e:
    ck.params_from_state_dict(sd, samjax.tiny)
  assert f"{key}: {np.dtype(dtype).name}" in str(e.value)


def test_non_float_torch_tensors_passed_directly_are_refused(tiny_sd):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(np.array(v)) for k, v in tiny_sd.items()}
  sd["mask_decoder.iou_token.weight"] = sd["mask_decoder.iou_token.weight"].to(torch.int64)
  sd["mask_decoder.mask_tokens.weight"] = sd["mask_decoder.mask_tokens.weight"].to_sparse()
  with pytest.raises(ck.CheckpointError) as e:
    ck.params_from_state_dict(sd, samjax.tiny)
  assert "mask_decoder.iou_token.weight: int64" in str(e.value)
  assert "mask_decoder.mask_tokens.weight: sparse_coo layout" in str(e.value)


def test_non_float_tensors_in_a_file_are_refused(tiny_ckpt, tmp_path):
  torch = pytest.importorskip("torch")
  sd = torch.load(tiny_ckpt[0], weights_only=True)
  sd["mask_decoder.iou_token.weight"] = sd["mask_decoder.iou_token.weight"].to(torch.int8)
  p = tmp_path / "int8.pth"
  torch.save(sd, p)
  with pytest.raises(ck.CheckpointError, match="mask_decoder.iou_token.weight: int8"):
    samjax.convert_checkpoint(p, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_nonfinite_weights_are_reported_unless_allowed(tiny_ckpt, tiny_sd, tmp_path):
  sd = dict(tiny_sd)
  sd["image_encoder.pos_embed"] = sd["image_encoder.pos_embed"].copy()
  sd["image_encoder.pos_embed"][0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
  sd["mask_decoder.iou_token.weight"] = np.full_like(sd["mask_decoder.iou_token.weight"],
                                                     np.nan)
  with pytest.raises(ck.CheckpointError, match="allow_nonfinite=True") as e:
    ck.params_from_state_dict(sd, samjax.tiny)
  msg = str(e.value)
  assert "2 parameter tensor(s)" in msg and "1 NaN, 2 Inf" in msg
  assert "image_encoder.pos_embed" in msg and "mask_decoder.iou_token.weight" in msg
  params = ck.params_from_state_dict(sd, samjax.tiny, allow_nonfinite=True)
  assert np.isnan(params["image_encoder"]["pos_embed"]).any()
  # Through the files: convert refuses, opts in, and the Orbax load checks again.
  torch = pytest.importorskip("torch")
  p = tmp_path / "nan.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, p)
  with pytest.raises(ck.CheckpointError, match="NaN or Inf"):
    samjax.convert_checkpoint(p, tmp_path / "out")
  with pytest.raises(ck.CheckpointError, match="NaN or Inf"):
    samjax.load_any(p)
  samjax.convert_checkpoint(p, tmp_path / "out", allow_nonfinite=True)
  with pytest.raises(ck.CheckpointError, match="image_encoder/pos_embed"):
    samjax.load_params(tmp_path / "out")
  _, params = samjax.load_params(tmp_path / "out", allow_nonfinite=True)
  assert np.isnan(np.asarray(params["mask_decoder"]["iou_token"]["embedding"])).all()


# ----------------------------------------------------------------------------------------
# 5. Other formats under a .pth name.
# ----------------------------------------------------------------------------------------
def _safetensors_bytes():
  header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
  return struct.pack("<Q", len(header)) + header + f32(2)


def test_other_formats_are_named(tmp_path):
  cases = {
      "safetensors": (_safetensors_bytes(), "safetensors file"),
      "hdf5": (b"\x89HDF\r\n\x1a\n" + bytes(100), "HDF5"),
      "npy": (b"\x93NUMPY\x01\x00" + bytes(100), "numpy .npy"),
      "pickle": (b"\x80\x04\x95" + bytes(20), "plain pickle"),
      "gzip": (b"\x1f\x8b\x08" + bytes(20), "gzip-compressed"),
  }
  for name, (data, what) in cases.items():
    p = tmp_path / f"{name}.pth"
    p.write_bytes(data)
    msg = refused(p, what)
    assert "could run code" not in msg, name
  np.savez(tmp_path / "arrays.npz", w=np.zeros(3))
  shutil.move(tmp_path / "arrays.npz", tmp_path / "npz.pth")
  refused(tmp_path / "npz.pth", "numpy .npz")
  with zipfile.ZipFile(tmp_path / "plain.pth", "w") as z:
    z.writestr("weights/readme.txt", "hi")
  refused(tmp_path / "plain.pth", "without data.pkl.*readme.txt")


def test_legacy_torch_file_is_named(tmp_path):
  torch = pytest.importorskip("torch")
  p = tmp_path / "legacy.pth"
  torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
  refused(p, "legacy .*non-zip.* PyTorch file")


# ----------------------------------------------------------------------------------------
# 6. Integrity of our own checkpoints.
# ----------------------------------------------------------------------------------------
def test_digest_is_recorded_and_checked(tiny_ckpt, tmp_path):
  d = tmp_path / "ck"
  shutil.copytree(tiny_ckpt[1], d)
  meta = json.loads((d / ck.METADATA_FILE).read_text())
  digest = meta[ck.DIGEST_KEY]
  assert digest["algorithm"] == "sha256" and set(digest["arrays"]) == set(
      ck.param_shapes(samjax.tiny))
  # Pretend one array changed: the error names exactly that array.
  key = "mask_decoder/iou_token/embedding"
  digest["arrays"][key] = "0" * 64
  digest["all"] = ck._combined(digest["arrays"])
  (d / ck.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(ck.CheckpointError, match=f"damaged: 1 of .* arrays .*{key}"):
    samjax.load_params(d)
  samjax.load_params(d, verify=False)


def test_flipped_bytes_in_an_array_file_are_detected(tiny_ckpt, tmp_path):
  d = tmp_path / "ck"
  shutil.copytree(tiny_ckpt[1], d)
  biggest = max((f for f in (d / ck.PARAMS_DIR).rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x10
  biggest.write_bytes(bytes(data))
  with pytest.raises(ck.CheckpointError, match="damaged") as e:
    samjax.load_params(d)
  if "digest" in str(e.value):  # else the flip broke the compressed stream: also caught
    assert re.search(r"1 of \d+ arrays differ .*: \w+/\S+", str(e.value))


def test_checkpoints_without_digests_still_load():
  meta = json.loads((FIXTURE / ck.METADATA_FILE).read_text())
  assert ck.DIGEST_KEY not in meta
  config, params = samjax.load_params(FIXTURE)
  assert config == samjax.tiny and "image_encoder" in params


# ----------------------------------------------------------------------------------------
# 7. samjax.json validation.
# ----------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
  d = tmp_path / "ck"
  shutil.copytree(tiny_ckpt[1], d)
  return d


def _edit_meta(d, fn):
  meta = json.loads((d / ck.METADATA_FILE).read_text())
  out = fn(meta)
  meta = out if isinstance(out, list) else meta  # a list replaces the whole document
  (d / ck.METADATA_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format="samjax-orbax-v2", samjax_version="9.0"),
     "written by samjax 9.0 in format 'samjax-orbax-v2', newer .* upgrade samjax"),
    (lambda m: m.update(format="keras-v3"), "unknown format 'keras-v3'"),
    (lambda m: m.pop("format"), "no 'format'"),
    (lambda m: m.pop("config"), "no 'config'"),
    (lambda m: m["config"].update(patch_size=0), "patch_size is 0, expected 1"),
    (lambda m: m["config"].update(encoder_depth="4"), "encoder_depth is '4' .*not an integer"),
    (lambda m: m["config"].update(encoder_depth=True), "encoder_depth is True"),
    (lambda m: m["config"].update(patch_size=15), "image_size 256 is not a multiple of "
                                                  "patch_size 15"),
    (lambda m: m["config"].update(encoder_num_heads=5), "not a multiple of encoder_num_heads"),
    (lambda m: m["config"].update(encoder_global_attn_indexes=[1, 9]), "block indexes"),
    (lambda m: m["config"].update(pixel_std=[1, 0, 1]), "pixel_std"),
    (lambda m: m["config"].update(mlp_ratio="4"), "mlp_ratio"),
    (lambda m: m["config"].update(encoder_depth=10**6), "encoder_depth is 1000000"),
    (lambda m: m["config"].pop("window_size"), "missing fields \\['window_size'\\]"),
    (lambda m: m["config"].update(use_flash=True), "unknown fields \\['use_flash'\\]"),
    (lambda m: m.update(config=[1, 2]), "config is a list"),
    (lambda m: [m], "JSON list"),
])
def test_invalid_metadata(ckpt_copy, edit, match):
  _edit_meta(ckpt_copy, edit)
  with pytest.raises(ck.CheckpointError, match=match):
    samjax.load_params(ckpt_copy)


def test_malformed_digest_metadata(ckpt_copy):
  _edit_meta(ckpt_copy, lambda m: m[ck.DIGEST_KEY]["arrays"].popitem())
  with pytest.raises(ck.CheckpointError, match="does not list the model's arrays"):
    samjax.load_params(ckpt_copy)
  _edit_meta(ckpt_copy, lambda m: m.update({ck.DIGEST_KEY: "abc"}))
  with pytest.raises(ck.CheckpointError, match="malformed.*verify=False"):
    samjax.load_params(ckpt_copy)


# ----------------------------------------------------------------------------------------
# 8. Deleted or truncated array files: one clear error, nothing else on stderr.
# ----------------------------------------------------------------------------------------
def test_missing_array_data_gives_one_clear_error(tiny_ckpt, tmp_path):
  dirs = []
  for mode in ("delete", "truncate"):
    d = tmp_path / mode
    shutil.copytree(tiny_ckpt[1], d)
    for f in sorted((d / ck.PARAMS_DIR).rglob("*")):
      if f.is_file() and f.parent.name == "d":
        if mode == "delete":
          f.unlink()
        else:
          f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    dirs.append(str(d))
  script = textwrap.dedent(f"""
      import samjax
      for d in {dirs!r}:
        try:
          samjax.load_params(d)
          print("LOADED", d)
        except samjax.CheckpointError as e:
          print("ERROR", e)
      import gc, time
      gc.collect(); time.sleep(0.5)  # let stray callbacks of in-flight reads run
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=120, env=env, cwd=REPO)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 2 and all(x.startswith("ERROR cannot restore the checkpoint")
                                 for x in lines), r.stdout
  for d, line in zip(dirs, lines):
    assert d in line and "missing or damaged" in line and "<bound method" not in line
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr


def test_abandoned_reads_are_not_reported_after_the_error():
  # What Orbax leaves after a failed restore, made to happen every time: a read task
  # that failed and is never awaited, collected later (the report above depended on
  # when the collector ran). Another task's report must still come through.
  script = textwrap.dedent("""
      import asyncio, gc
      from samjax.io import checkpoint as ck
      async def async_deserialize():
        raise ValueError("NOT_FOUND: Error reading some array")
      async def something_else():
        raise ValueError("a real bug")
      def abandon(coro):
        loop = asyncio.new_event_loop()
        task = loop.create_task(coro())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del task
        gc.collect()
      ck._quiet_abandoned_reads()
      ck._quiet_abandoned_reads()  # installed once
      abandon(async_deserialize)
      abandon(something_else)
      print("filters", len(__import__("logging").getLogger("asyncio").filters))
  """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "filters 1"
  assert "async_deserialize" not in r.stderr, r.stderr
  assert "something_else" in r.stderr and "a real bug" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------
# 9. Overwriting only our own checkpoints; no temp dirs left behind.
# ----------------------------------------------------------------------------------------
def test_overwrite_refuses_what_is_not_a_samjax_checkpoint(tiny_ckpt, tmp_path):
  pth = tiny_ckpt[0]
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
  with pytest.raises(ck.CheckpointError, match="not a samjax checkpoint.*holiday.jpg"):
    samjax.convert_checkpoint(pth, photos, overwrite=True)
  assert (photos / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
  # A samjax checkpoint with someone's files added is not ours to delete either.
  mixed = tmp_path / "mixed"
  shutil.copytree(tiny_ckpt[1], mixed)
  (mixed / "notes.txt").write_text("mine")
  with pytest.raises(ck.CheckpointError, match="notes.txt"):
    samjax.convert_checkpoint(pth, mixed, overwrite=True)
  assert (mixed / "notes.txt").exists()
  afile = tmp_path / "model.bin"
  afile.write_bytes(b"data")
  with pytest.raises(ck.CheckpointError, match="it is a file"):
    samjax.convert_checkpoint(pth, afile, overwrite=True)
  assert afile.read_bytes() == b"data"
  with pytest.raises(FileExistsError):
    samjax.convert_checkpoint(pth, afile)
  with pytest.raises(ck.CheckpointError, match="cannot create"):
    samjax.convert_checkpoint(pth, afile / "sub" / "out")


def test_interrupted_saves_leave_nothing_that_is_not_cleaned(tiny_ckpt, tmp_path,
                                                             monkeypatch):
  parent = tmp_path / "models"
  parent.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = ck._host_tag()
  stale = parent / f".out.samjax-tmp-{host}-{dead.pid}-abc123"
  (stale / "params").mkdir(parents=True)
  (stale / ck._TMP_MARKER).write_text("")
  stale_old = parent / f".out.samjax-old-{host}-{dead.pid}-beef"
  (stale_old / "params").mkdir(parents=True)
  (stale_old / ck.METADATA_FILE).write_text("{}")
  live = parent / f".other.samjax-tmp-{host}-{os.getpid()}-zzz999"
  live.mkdir()
  (live / ck._TMP_MARKER).write_text("")
  lookalike = parent / f".photos.samjax-tmp-{host}-{dead.pid}-xyz"
  lookalike.mkdir()
  (lookalike / "holiday.jpg").write_bytes(b"x")

  # A save that fails half-way removes its own temp dir ...
  import orbax.checkpoint as ocp

  def boom(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  with pytest.raises(KeyboardInterrupt):
    samjax.convert_checkpoint(tiny_ckpt[0], parent / "out")
  monkeypatch.undo()
  assert not (parent / "out").exists()
  assert not stale.exists() and not stale_old.exists()  # ... and stale ones of ours go
  assert live.exists() and (lookalike / "holiday.jpg").exists()
  # The next convert into that parent works and leaves only the checkpoint.
  samjax.convert_checkpoint(tiny_ckpt[0], parent / "out")
  samjax.convert_checkpoint(tiny_ckpt[0], parent / "out", overwrite=True)
  assert sorted(os.listdir(parent / "out")) == sorted([ck.METADATA_FILE, ck.PARAMS_DIR])
  assert sorted(os.listdir(parent)) == sorted([live.name, lookalike.name, "out"])
