"""The Pallas TPU flash kernel (`samjax.modeling.attention_tpu`): numerics and compiles.

Numerics run here on the CPU in the Pallas TPU interpreter, which executes the kernel
body grid step by grid step as the chip would (padding, masking, the online softmax
across key blocks), in float32 with "highest" matmuls. Both sides then compute the
same sums in different orders, so the errors are float32 rounding noise:
max |ours - ref| <= 1e-4 * max |ref| (measured ~1e-6, printed with -s).

The compile tests need libtpu (`pip install -e .[tpu]`; skipped without it): XLA's TPU
compiler builds the program for a described chip (`jax.experimental.topologies`) on
this host, and `memory_analysis()` must fit that chip's HBM. Compiling even the tiny
encoder for a TPU is slow (XLA retries small fusions in VMEM: 30-110 s for v5e, ~210 s
for v6e, on a busy 2-core host), so the encoder compile runs for v5e only unless
SAMJAX_TEST_TPU_CHIPS names more (e.g. "v5e,v6e"); the kernel alone compiles in
seconds and runs for both.
"""

from __future__ import annotations

import functools
import os

# Any JAX process that loads libtpu takes /tmp/libtpu_lockfile; without this, describing
# a chip fails while another JAX process on the host holds the lock. Read when libtpu is
# first loaded, so it must be set before that (nothing here touches a real TPU).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from samjax.modeling import attention_tpu  # noqa: E402
from samjax.modeling.attention_tpu import flash_attention_tpu, reference_attention  # noqa: E402

REL_TOL = 1e-4


def _qkv(seed, b, n, h, d, dv, q_scale=0.5, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(b, n, h, d)) * q_scale, dtype)
  k = jnp.asarray(r.normal(size=(b, n, h, d)) * 0.5, dtype)
  v = jnp.asarray(r.normal(size=(b, n, h, dv)), dtype)
  return q, k, v


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


# (B, N, heads, D, Dv, blocks): the official models' shapes, shrunk in batch and heads.
CASES = {
    # A windowed block: 196 tokens -> 200 query rows x 256 keys, three (batch, head)
    # groups per grid step, D = 64 + 14 + 14 = 92 padded to 128 lanes.
    "window196": (3, 196, 2, 92, 64, {}),
    # A small global grid (16x16, the tiny config): one block, no padding.
    "global256": (1, 256, 4, 56, 24, {}),
    # Several key blocks with a partly padded last one (300 -> 384), large logits:
    # the online softmax must rescale exactly and masked keys must weigh 0.
    "multiblock300": (2, 300, 1, 40, 24, {"block_q": 128, "block_k": 128}),
    # The official global block (64x64 tokens, ViT-H widths) with the default 512 x 512
    # tiles: 8 x 8 grid steps per (batch, head).
    "global4096": (1, 4096, 1, 208, 80, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_softmax_reference(case):
  b, n, h, d, dv, blocks = CASES[case]
  q, k, v = _qkv(0, b, n, h, d, dv, q_scale=4.0 if case == "multiblock300" else 0.5)
  with jax.default_matmul_precision("highest"):
    t0 = time.perf_counter()
    ours = jax.block_until_ready(flash_attention_tpu(q, k, v, interpret=True, **blocks))
    seconds = time.perf_counter() - t0
    ref = reference_attention(q, k, v)
  assert ours.shape == (b, n, h, dv) and ours.dtype == v.dtype
  err = _rel_err(ours, ref)
  print(f"\n{case}: max rel err {err:.2e} ({seconds:.1f}s in the interpreter)")
  assert err < REL_TOL


def test_kernel_bf16_close_to_float32_reference():
  # bf16 inputs: logits and softmax statistics stay float32 in the kernel, p is rounded
  # to bf16 for the p @ v matmul (as jax.nn.dot_product_attention does), so the error
  # is a few bf16 ulps (2^-8 = 4e-3) of the output scale, far below 3e-2.
  q, k, v = _qkv(1, 2, 196, 2, 92, 64, dtype=jnp.bfloat16)
  ours = flash_attention_tpu(q, k, v, interpret=True)
  assert ours.dtype == jnp.bfloat16
  assert _rel_err(ours, reference_attention(q, k, v)) < 3e-2


def test_kernel_rejects_bad_arguments():
  q, k, v = _qkv(0, 1, 64, 2, 16, 8)
  with pytest.raises(ValueError, match="block_k"):
    flash_attention_tpu(q, k, v, block_k=100, interpret=True)
  with pytest.raises(ValueError, match="block_g"):
    flash_attention_tpu(q, k, v, block_g=3, interpret=True)
  with pytest.raises(ValueError, match="v must be"):
    flash_attention_tpu(q, k, v[:, :32], interpret=True)


def test_default_blocks_of_the_official_shapes():
  # The padding the module docstring promises: 196 tokens run as 200 x 256, 4096 tokens
  # as 512 x 512 tiles; ViT-H batch 8 windowed: 3200 groups, 5 per grid step.
  assert attention_tpu.default_block_sizes(196, 8 * 25 * 16) == (200, 256, 5)
  assert attention_tpu.default_block_sizes(4096, 8 * 16) == (512, 512, 1)


# ----------------------------------------------------------------------------------------
# The whole tiny encoder with the flash kernel vs the official PyTorch model.
# ----------------------------------------------------------------------------------------
def _torch_embed(model, images_nhwc):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    x = torch.stack([model.preprocess(torch.from_numpy(im).permute(2, 0, 1))
                     for im in images_nhwc])
    return model.image_encoder(x).numpy()


def test_tiny_encoder_with_flash_kernel_matches_official(tiny_ckpt, tiny_params, record,
                                                         monkeypatch):
  """encode_image(attention="fold_tpu") in the TPU interpreter vs segment_anything.

  The attention setting's "fold_tpu" kernel routes the folded form through
  `attention_tpu.flash_attention_tpu` (`samjax.modeling.attention.fold_kernel`);
  `force_tpu_interpret_mode` makes that Pallas call run here. The kernel is wrapped
  to count its calls, so the test fails if the setting stops reaching it.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  import samjax  # pylint: disable=import-outside-toplevel
  from samjax.modeling import attention  # pylint: disable=import-outside-toplevel
  if "fold_tpu" not in getattr(attention, "KERNELS", ()):
    pytest.skip("this tree's attention setting has no 'fold_tpu' kernel")
  _, _, tmodel, cfg = tiny_ckpt
  calls = []

  def counted(q2, k2, v, **kw):
    calls.append(q2.shape)
    return flash_attention_tpu(q2, k2, v, **kw)

  monkeypatch.setattr(attention_tpu, "flash_attention_tpu", counted)
  # Resolved (projection order given), so one program is traced, not one per platform.
  setting = attention.AttentionConfig("fold_tpu", "fold_tpu", project_first=False)
  images = np.random.default_rng(0).uniform(0, 255, (2, cfg.image_size, cfg.image_size, 3)
                                            ).astype(np.float32)
  ref = _torch_embed(tmodel, images)
  with jax.default_matmul_precision("highest"), pltpu.force_tpu_interpret_mode():
    ours = samjax.encode_image(tiny_params, jnp.asarray(images), cfg, attention=setting)
  ours = np.asarray(ours).transpose(0, 3, 1, 2)
  # tiny: two windowed blocks (2 images x 4 windows of 196 tokens) and two global
  # blocks (256 tokens); every one must have gone through the kernel.
  assert {s[1] for s in calls} == {196, 256}, calls
  err = _rel_err(ours, ref)
  record("image encoder, tiny, Pallas TPU flash kernel (interpreted) fp32",
         max_abs=float(np.abs(ours - ref).max()), max_rel=err)
  assert err < REL_TOL


@pytest.mark.parametrize("window", [14, 0])
def test_tpu_branch_with_flash_kernel_still_runs_on_cpu(window):
  """A TPU branch that uses the kernel must not break CPU runs of the same program.

  "auto" resolves per platform through `jax.lax.platform_dependent`, which traces every
  platform's branch: with TPU_DEFAULT wired into "auto", the TPU branch holds a Pallas
  TPU call that only the TPU compiler can lower. On a CPU that branch must be dropped
  and the CPU branch (einsum) run. Tolerance: the same float32 formulas, but the
  conditional may change XLA's fusion (sum order): rounding noise.
  """
  from samjax.modeling import attention  # pylint: disable=import-outside-toplevel
  if not hasattr(attention, "attention_for_platform"):
    pytest.skip("this tree resolves attention without attention_for_platform")
  cpu = attention.AttentionConfig("einsum", "einsum", False)
  tpu = attention.AttentionConfig(*attention_tpu.TPU_DEFAULT, False)
  setting = attention.PerPlatform(cpu=cpu, gpu=cpu, tpu=tpu)
  c, heads, side = 32, 2, 16  # a 16x16 grid: padded to 28x28 for 14x14 windows
  size = window or side
  r = np.random.default_rng(4)
  arrays = [r.normal(size=s).astype(np.float32) * 0.3 for s in
            [(1, side, side, c), (c, 3 * c), (3 * c,), (c, c), (c,),
             (2 * size - 1, c // heads), (2 * size - 1, c // heads)]]
  fn = lambda a: functools.partial(attention.attention_for_platform(a, window > 0, jnp.float32),
                                   num_heads=heads, window_size=window)
  assert "pallas_call" in str(jax.make_jaxpr(fn(setting))(*arrays))  # the TPU branch
  with jax.default_matmul_precision("highest"):
    assert _rel_err(jax.jit(fn(setting))(*arrays), jax.jit(fn(cpu))(*arrays)) < 1e-5


# ----------------------------------------------------------------------------------------
# Compiles for real TPU chips, from this host (needs libtpu).
# ----------------------------------------------------------------------------------------
def _tpu_sharding(chip):
  pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e .[tpu])")
  from jax.sharding import SingleDeviceSharding  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from benchmarks.tpu_compile import chip_info, tpu_device
  return SingleDeviceSharding(tpu_device(chip)), chip_info(chip)


def _hbm_bytes(compiled):
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes, m


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize("kind", ["window", "global"])
def test_kernel_compiles_for_tpu(chip, kind):
  """ViT-H batch 8 attention (bf16) compiles for the chip and fits its HBM.

  Global: (8, 4096, 16 heads, 208): its float32 logits would be 8.6 GB; the kernel's
  temporaries are only its padded, transposed copies of q/k/v/out (0.8 GB). Windowed
  logits are small (0.5 GB), there only the fit is checked.
  """
  sharding, info = _tpu_sharding(chip)
  b, n = (8 * 25, 196) if kind == "window" else (8, 4096)
  d = 112 if kind == "window" else 208
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
  compiled = jax.jit(flash_attention_tpu).lower(
      spec(b, n, 16, d), spec(b, n, 16, d), spec(b, n, 16, 80)).compile()
  total, mem = _hbm_bytes(compiled)
  assert total <= info.hbm_capacity_bytes
  if kind == "global":
    logits = b * 16 * n * n * 4
    assert mem.temp_size_in_bytes < logits / 4, (mem.temp_size_in_bytes, logits)
  flops = compiled.cost_analysis()
  flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
  # The cost estimate is what the kernel executes, padding included.
  assert flops == attention_tpu.flops(n, b * 16, d, 80)


def _encoder_chips():
  return [c.strip() for c in os.environ.get("SAMJAX_TEST_TPU_CHIPS", "v5e").split(",")
          if c.strip()]


@pytest.mark.parametrize("chip", _encoder_chips())
def test_tiny_encoder_compiles_for_tpu(chip):
  """encode_image with the flash kernel compiles for the chip and fits its HBM.

  The tiny config cut to two blocks (one windowed with padding, one global): both kinds
  of kernel call, at a fraction of the full tiny model's compile time.
  """
  sharding, info = _tpu_sharding(chip)
  import samjax  # pylint: disable=import-outside-toplevel
  from samjax.modeling import Sam  # pylint: disable=import-outside-toplevel
  from benchmarks.tpu_compile import attention_kwarg  # pylint: disable=import-outside-toplevel
  cfg = samjax.tiny.replace(encoder_depth=2, encoder_global_attn_indexes=(1,))
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  params = jax.eval_shape(lambda x: Sam(cfg).init(jax.random.PRNGKey(0), x,
                                                  method=Sam.embed_image), images)["params"]
  on_chip = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  kw = {attention_kwarg(): "fold_tpu"}
  fn = jax.jit(lambda p, x: samjax.encode_image(p, x, cfg, jnp.bfloat16, **kw))
  lowered = fn.lower(jax.tree.map(on_chip, params), on_chip(images))
  assert lowered.as_text().count("tpu_custom_call") == 2  # one per block
  total, _ = _hbm_bytes(lowered.compile())
  assert total <= info.hbm_capacity_bytes
