"""The PyTorch -> Orbax converter: layouts, model detection, and every failure mode."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import samjax
from samjax.io import checkpoint as ck
from samjax import reference


def test_cli_convert_roundtrip(tiny_ckpt, tmp_path):
  from samjax.cli import main
  pth, _, _, cfg = tiny_ckpt
  dst = tmp_path / "converted"
  assert main(["convert", str(pth), str(dst)]) == 0
  meta = json.loads((dst / ck.METADATA_FILE).read_text())
  assert meta["model_type"] == "tiny"
  assert meta["source_sha256"] == ck.sha256_file(pth)
  assert meta["source_file"] == pth.name
  config, params = samjax.load_params(dst)
  assert config == cfg
  sd = ck.load_torch_state_dict(pth)
  back = ck.state_dict_from_params(params, config)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Refuses to overwrite unless asked.
  assert main(["convert", str(pth), str(dst)]) != 0
  assert main(["convert", str(pth), str(dst), "--overwrite"]) == 0


def test_cli_forced_model_type_mismatch(tiny_ckpt, tmp_path, capsys):
  from samjax.cli import main
  assert main(["convert", str(tiny_ckpt[0]), str(tmp_path / "x"), "--model-type", "vit_b"]) == 2
  err = capsys.readouterr().err
  assert "vit_b" in err and "tiny" in err
  assert not (tmp_path / "x").exists()


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  bad = tmp_path / "evil.pth"
  torch.save({"image_encoder.patch_embed.proj.weight": _Evil(marker)}, bad)
  with pytest.raises(ck.CheckpointError, match="refusing to load"):
    ck.load_torch_state_dict(bad)
  with pytest.raises(ck.CheckpointError):
    samjax.convert_checkpoint(bad, tmp_path / "out")
  assert not marker.exists()
  # A raw pickle (not a torch zip) with the same payload is refused too.
  raw = tmp_path / "raw.pth"
  raw.write_bytes(pickle.dumps(_Evil(marker)))
  with pytest.raises(ck.CheckpointError):
    ck.load_torch_state_dict(raw)
  assert not marker.exists()


def test_truncated_empty_missing_and_directory(tiny_ckpt, tmp_path):
  data = tiny_ckpt[0].read_bytes()
  trunc = tmp_path / "trunc.pth"
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
    ck.load_torch_state_dict(trunc)
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(ck.CheckpointError, match="empty"):
    ck.load_torch_state_dict(empty)
  with pytest.raises(ck.CheckpointError, match="not found"):
    ck.load_torch_state_dict(tmp_path / "nope.pth")
  with pytest.raises(ck.CheckpointError, match="directory"):
    ck.load_torch_state_dict(tmp_path)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"\x00not a checkpoint" * 100)
  with pytest.raises(ck.CheckpointError):
    ck.load_torch_state_dict(garbage)


def test_not_a_sam_checkpoint(tmp_path):
  p = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, p)
  with pytest.raises(ck.CheckpointError, match="not a SAM checkpoint"):
    samjax.convert_checkpoint(p, tmp_path / "out")
  q = tmp_path / "list.pth"
  torch.save([torch.zeros(3)], q)
  with pytest.raises(ck.CheckpointError, match="does not hold a state dict"):
    ck.load_torch_state_dict(q)


def test_one_error_lists_missing_unexpected_and_misshaped(tiny_ckpt):
  sd = dict(ck.load_torch_state_dict(tiny_ckpt[0]))
  del sd["mask_decoder.iou_token.weight"]
  sd["mask_decoder.extra.weight"] = np.zeros(3)
  sd["prompt_encoder.no_mask_embed.weight"] = np.zeros((1, 7))
  with pytest.raises(ck.CheckpointError) as e:
    ck.params_from_state_dict(sd, samjax.tiny)
  msg = str(e.value)
  assert "1 missing" in msg and "mask_decoder.iou_token.weight" in msg
  assert "1 unexpected" in msg and "mask_decoder.extra.weight" in msg
  assert "1 mis-shaped" in msg and "prompt_encoder.no_mask_embed.weight" in msg


def test_wrapped_and_prefixed_state_dicts(tiny_ckpt, tmp_path):
  sd = torch.load(tiny_ckpt[0], weights_only=True)
  p = tmp_path / "wrapped.pth"
  torch.save({"model": {"module." + k: v for k, v in sd.items()}}, p)
  assert ck.detect_config(ck.load_torch_state_dict(p)) == samjax.tiny


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_layouts_match_key_for_key(name):
  """Full-size official B/L/H state dicts (shapes only, on torch's meta device)."""
  cfg = samjax.get_config(name)
  with torch.device("meta"):
    model = reference.build_official(cfg)
  sd = model.state_dict()
  assert ck.detect_config(sd) == cfg
  table = ck.check_state_dict(sd, cfg)
  assert len(table) == len(sd)
  assert {e.torch_key for e in table} == set(sd)
  for e in table:
    assert tuple(sd[e.torch_key].shape) == e.torch_shape
  with pytest.raises(ck.CheckpointError, match="requested"):
    ck.resolve_config(sd, "vit_b" if name != "vit_b" else "vit_h")


def test_convert_randomized_vit_l_structure(tmp_path):
  """A randomized full-size ViT-L state dict converts value-for-value (no forward pass)."""
  cfg = samjax.vit_l
  model = reference.randomize_(reference.build_official(cfg), seed=3)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  del model
  params = ck.params_from_state_dict(sd, cfg)
  shapes = ck.param_shapes(cfg)
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params, sep="/")
  assert {k: v.shape for k, v in flat.items()} == shapes
  np.testing.assert_array_equal(flat["image_encoder/blocks_5/attn/qkv/kernel"],
                                sd["image_encoder.blocks.5.attn.qkv.weight"].T)
  np.testing.assert_array_equal(flat["image_encoder/patch_embed/proj/kernel"],
                                sd["image_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["mask_decoder/output_upscaling_0/kernel"],
                                sd["mask_decoder.output_upscaling.0.weight"].transpose(2, 3, 0, 1))


def test_corrupt_orbax_checkpoint(tiny_ckpt, tmp_path):
  import shutil
  d = tmp_path / "ck"
  shutil.copytree(tiny_ckpt[1], d)
  with pytest.raises(ck.CheckpointError, match="not a samjax checkpoint"):
    samjax.load_params(tmp_path)
  (d / ck.METADATA_FILE).write_text("{not json")
  with pytest.raises(ck.CheckpointError, match="corrupt"):
    samjax.load_params(d)
  shutil.copy(tiny_ckpt[1] / ck.METADATA_FILE, d / ck.METADATA_FILE)
  for f in (d / ck.PARAMS_DIR).rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b"\x00" * 10)
  with pytest.raises(ck.CheckpointError, match="cannot restore"):
    samjax.load_params(d)


def test_torch_free_reader_matches_torch_and_refuses_code(tiny_ckpt, tmp_path, monkeypatch):
  """Without torch installed, .pth files are read by samjax's allow-list unpickler."""
  import sys
  from samjax.io import torchfile
  ref = {k: v.numpy() for k, v in torch.load(tiny_ckpt[0], weights_only=True).items()}
  ours = torchfile.load_state_dict(tiny_ckpt[0])
  assert set(ours) == set(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  # Non-contiguous / offset storages and other dtypes.
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  odd = {"t": base.t(), "slice": base[1:, 2:], "half": torch.ones(3, dtype=torch.float16),
         "bf16": torch.full((2,), 1.5, dtype=torch.bfloat16), "i": torch.tensor([1, -2])}
  p = tmp_path / "odd.pth"
  torch.save(odd, p)
  got = torchfile.load_state_dict(p)
  for k, v in odd.items():
    np.testing.assert_array_equal(got[k], v.float().numpy() if k == "bf16" else v.numpy())
  # The whole converter path with torch made unimportable.
  monkeypatch.setitem(sys.modules, "torch", None)
  sd = ck.load_torch_state_dict(tiny_ckpt[0])
  np.testing.assert_array_equal(sd["mask_decoder.iou_token.weight"],
                                ref["mask_decoder.iou_token.weight"])
  marker = tmp_path / "pwned"
  monkeypatch.delitem(sys.modules, "torch")
  bad = tmp_path / "evil.pth"
  torch.save({"x": _Evil(marker)}, bad)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ck.CheckpointError, match="refusing to load"):
    ck.load_torch_state_dict(bad)
  assert not marker.exists()
