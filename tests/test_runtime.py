"""The runtime: kernel choice is configuration, part of every compile key, resolved
for the platform the program is compiled for; and the layering rule that only the
runtime compiles the encoder and places parameters."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samjax
from samjax.modeling import attention as A
from samjax.modeling import kernel_probe as kernels
from samjax.runtime import Runtime, engine

ROOT = Path(__file__).resolve().parent.parent


def test_two_settings_two_programs(tiny_params):
  """Changing the attention setting compiles a new program (no stale cache hit)."""
  cfg = samjax.tiny
  s = cfg.image_size
  images = np.zeros((1, s, s, 3), np.uint8)
  hw = np.array([[s, s]], np.int32)
  encode = engine.compiled_functions()["encode"]
  rt_a = Runtime(cfg, attention="einsum")
  rt_b = Runtime(cfg, attention="einsum/fold_xla")
  assert rt_a != rt_b and hash(rt_a) != hash(rt_b)
  assert Runtime(cfg, attention="einsum") == rt_a  # equal settings share compilations
  n0 = encode._cache_size()
  emb_a = rt_a.encode(tiny_params, images, hw)
  n1 = encode._cache_size()
  emb_b = rt_b.encode(tiny_params, images, hw)
  n2 = encode._cache_size()
  rt_a.encode(tiny_params, images, hw)
  assert (n1 - n0, n2 - n1, encode._cache_size() - n2) == (1, 1, 0)
  # Different programs: the einsum path adds the relative positions to explicit
  # (heads, qh, qw, kh, kw) logits of the global blocks; the folded one never has them.
  g = s // cfg.patch_size
  logits = f"tensor<1x{cfg.encoder_num_heads}x{g}x{g}x{g}x{g}xf32>"
  text_a = rt_a.lower_encode(1).as_text()
  text_b = rt_b.lower_encode(1).as_text()
  assert logits in text_a and logits not in text_b
  np.testing.assert_allclose(np.asarray(emb_a), np.asarray(emb_b), rtol=1e-4, atol=1e-5)


def test_predictor_attention_reaches_the_compiled_program(tiny_ckpt):
  p1 = samjax.Predictor.from_checkpoint(tiny_ckpt[1], attention="einsum")
  p2 = samjax.Predictor.from_checkpoint(tiny_ckpt[1], attention="fold_xla")
  assert p1.model.runtime.attention.global_attn == "einsum"
  assert p2.model.runtime.attention.global_attn == "fold_xla"
  gen = samjax.AutomaticMaskGenerator(p2, points_per_side=2)
  assert gen.runtime.attention == p2.model.runtime.attention
  gen = samjax.AutomaticMaskGenerator(p2, points_per_side=2, attention="xla")
  assert gen.runtime.attention.window == "xla"


def test_functional_auto_is_lowered_per_platform(tiny_params):
  """`encode_image(attention="auto")` inside a user's jit: a program lowered for a TPU
  from this CPU host gets the TPU's kernels, the CPU program the CPU's."""
  cfg = samjax.tiny
  s = cfg.image_size
  x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  traced = jax.jit(lambda p, im: samjax.encode_image(p, im, cfg)).trace(tiny_params, x)
  g = s // cfg.patch_size
  logits = f"tensor<1x{cfg.encoder_num_heads}x{g}x{g}x{g}x{g}xf32>"
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert logits in cpu  # einsum: relative positions added to explicit logits
  assert logits not in tpu  # folded into q/k


def test_runtime_resolves_for_its_devices_not_the_default_backend():
  """A Runtime over TPU devices (a topology description, on this CPU host) resolves
  TPU kernels; one over CPU devices the CPU's."""
  assert Runtime(samjax.tiny).attention == A.resolve(A.AttentionConfig(), "cpu", jnp.float32)
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc("v5e:2x2", "tpu")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU compiler here ({type(e).__name__}: {str(e)[:100]})")
  rt = Runtime(samjax.tiny, dtype=jnp.bfloat16, devices=topo.devices[:1])
  assert rt.platform == "tpu"
  assert rt.attention == A.resolve(A.AttentionConfig(), "tpu", jnp.bfloat16)
  compiled = rt.lower_encode(1).compile()
  assert compiled.memory_analysis() is not None


def test_environment_sets_the_default_at_construction_only(monkeypatch):
  monkeypatch.setenv(engine.ENV_ATTENTION, "einsum/fold_xla")
  rt = Runtime(samjax.tiny)
  assert (rt.attention.window, rt.attention.global_attn) == ("einsum", "fold_xla")
  monkeypatch.setenv(engine.ENV_ATTENTION, "xla")
  assert rt.attention.global_attn == "fold_xla"  # already built: unchanged
  # A GPU-only kernel named by the environment is ignored where it cannot run...
  monkeypatch.setenv(engine.ENV_ATTENTION, "fold_mla")
  with pytest.warns(RuntimeWarning, match="cannot run"):
    assert Runtime(samjax.tiny).attention.global_attn == "einsum"
  # ...but asked for explicitly it is a clear error, and nonsense is named.
  with pytest.raises(ValueError, match="GPUs only"):
    Runtime(samjax.tiny, attention="fold_mla")
  monkeypatch.setenv(engine.ENV_ATTENTION, "nonsense")
  with pytest.raises(ValueError, match="SAMJAX_ATTENTION_IMPL"):
    Runtime(samjax.tiny)


def test_probe_tells_unsupported_from_transient():
  dev = jax.devices()[0]
  calls = []

  def unsupported():
    calls.append(1)
    raise NotImplementedError("kernel not supported for this shape")

  key = ("test-unsupported", len(kernels._CACHE))  # pylint: disable=protected-access
  assert kernels.probe(key, unsupported, dev) is False
  assert kernels.probe(key, unsupported, dev) is False
  assert len(calls) == 1  # a definite answer is cached

  def transient():
    calls.append(2)
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

  key = ("test-transient", len(kernels._CACHE))  # pylint: disable=protected-access
  for _ in range(2):
    with pytest.raises(kernels.TransientProbeError):
      kernels.probe(key, transient, dev)
  assert calls.count(2) == 2  # not cached: asked again next time
  assert kernels.probe(("test-ok",), lambda: jnp.zeros(2) + 1, dev) is True


# ----------------------------------------------------------------------------------------
# Layering: one runtime under every entry point.
# ----------------------------------------------------------------------------------------
def _dotted(node) -> str:
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return getattr(node, "id", "?")


def _calls(path: Path, names):
  """(line, name) of calls to `names` (bare, or as attributes of jax modules)."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      dotted = _dotted(node.func)
      last = dotted.rsplit(".", 1)[-1]
      owner = dotted.rsplit(".", 1)[0] if "." in dotted else ""
      if last in names and (not owner or owner.split(".")[0] in ("jax", "sharding")
                            or last in ("encode_image", "NamedSharding")):
        yield node.lineno, dotted


def test_only_the_runtime_compiles_the_encoder_and_places_params():
  # The model's own modules call their parts; functional.py defines encode_image.
  allowed = {"samjax/runtime/engine.py", "samjax/runtime/mesh.py", "samjax/modeling/kernel_probe.py",
             "samjax/functional.py", "samjax/modeling/sam.py"}
  offenders = []
  for path in sorted((ROOT / "samjax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel in allowed:
      continue
    for line, name in _calls(path, {"encode_image", "embed_image", "NamedSharding",
                                    "device_put", "shard_map"}):
      offenders.append(f"{rel}:{line} calls {name}")
  assert not offenders, "\n".join(offenders)


def test_no_environment_reads_while_tracing():
  """The attention setting is never read from the environment inside the model code."""
  for path in (ROOT / "samjax" / "modeling").rglob("*.py"):
    assert not re.search(r"os\.environ|getenv", path.read_text()), path
