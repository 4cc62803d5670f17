"""The TPU path of the one attention function, checked without a TPU.

The Pallas TPU flash kernel runs on the CPU in Pallas' TPU interpret mode (same kernel code, each
block simulated with XLA ops), and is compared with `jax.nn.dot_product_attention` (XLA, float32) at
Stable Diffusion's head dims. Lowering the sampling program for TPU on the CPU (`jax.export`) shows
the kernel's `tpu_custom_call` taking the place of every long self-attention. What stays unverified
without a TPU: Mosaic's compilation of the kernel, its speed and its memory use.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from flax_inpaint import (
    FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxPNDMScheduler, FlaxUNet2DConditionModel, Runtime,
)
from flax_inpaint.pipelines.sampling import Batch, Components, Options, generate
from flax_inpaint.runtime import attention, flash_applies, flash_block_size

PALLAS = Runtime(attention="pallas", flash_min_length=128)


def qkv(length: int, heads: int, head_dim: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (2, length, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


# SD1.5's UNet head dims at 8 heads (40, 80, 160), SD2's (64), the VAE's single 512-wide head. 384 tokens
# are three 128-token blocks, so the kernel's running max and sum carry across key blocks.
@pytest.mark.parametrize("head_dim,heads,length", [(40, 2, 384), (64, 2, 384), (80, 2, 384), (160, 2, 384),
                                                   (512, 1, 256)])
def test_flash_kernel_matches_xla_float32(head_dim, heads, length):
    """float32: within 2e-6 of XLA's attention. Both sum exp(logits) and the weighted values in float32,
    in a different order (the kernel per 128-key block with running rescales): a few float32 ulps of
    outputs below 4 in magnitude."""
    q, k, v = qkv(length, heads, head_dim, jnp.float32)
    ref = jax.nn.dot_product_attention(q, k, v)
    assert flash_applies(q, k, PALLAS, None, False)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda *a: attention(*a, PALLAS))(q, k, v)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert float(jnp.abs(ref).std()) > 0.05  # not a constant output
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("head_dim", [40, 160])
def test_flash_kernel_bfloat16_close_to_float32(head_dim):
    """bfloat16 inputs: within 4e-3 of float32 attention on the same (bf16-rounded) inputs. The kernel
    rounds the probabilities to bf16 before the value matmul and the output to bf16 (half an ulp is
    2**-9 ~ 2e-3 for outputs in [0.5, 1)); XLA's bf16 attention rounds the same way."""
    q, k, v = qkv(384, 2, head_dim, jnp.bfloat16, seed=1)
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda *a: attention(*a, PALLAS))(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0, atol=4e-3)


def test_which_attention_the_kernel_takes():
    """Long unmasked attention in whole 128-token blocks; cross-attention to 77 tokens, masks, causal
    attention and sequences below `flash_min_length` stay with XLA. On a CPU, "auto" never picks it."""
    def takes(q_len, kv_len, runtime=Runtime(), mask=None, causal=False):
        q, k = jnp.zeros((1, q_len, 8, 40)), jnp.zeros((1, kv_len, 8, 40))
        return flash_applies(q, k, runtime, mask, causal)

    assert takes(4096, 4096) and takes(1024, 1024)  # SD1.5 at 512px: 64x64 and 32x32 latents
    assert not takes(256, 256) and not takes(4096, 77)  # the 16x16 level; cross-attention
    assert not takes(4096, 4096, mask=jnp.ones((1, 1, 4096, 4096), bool)) and not takes(4096, 4096, causal=True)
    assert not takes(1152, 1000)  # keys not in whole blocks
    assert takes(256, 256, Runtime(flash_min_length=256))

    q = jnp.zeros((1, 4096, 8, 40), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda q: attention(q, q, q, Runtime()))(q))
    assert "pallas_call" not in jaxpr and jax.default_backend() == "cpu"
    jaxpr = str(jax.make_jaxpr(lambda q: attention(q, q, q, Runtime(attention="pallas")))(q))
    assert "pallas_call" in jaxpr


def test_flash_block_sizes_for_sd_shapes():
    """512-token blocks for SD's padded head dims (128 for 40/64/80, 256 for 160) in bf16; smaller
    blocks where they must divide the length or where the VAE's 512-wide float32 head needs VMEM."""
    assert flash_block_size(4096, 4096, 128, 2) == 512
    assert flash_block_size(1024, 1024, 256, 2) == 512
    assert flash_block_size(4096, 4096, 512, 2) == 512
    assert flash_block_size(4096, 4096, 512, 4) == 256
    assert flash_block_size(2304, 2304, 128, 2) == 256  # SD2 at 768px: 48x48 latents
    assert flash_block_size(384, 384, 128, 4) == 128


def test_kernel_runs_per_device_under_a_mesh():
    """XLA cannot split a custom call across devices, so under a mesh (the pipelines' `mesh=` sets it)
    the kernel is lowered for TPU inside a manual computation over the data axis: each of the 8
    devices runs it on its own row of the batch. Without a mesh it is called on the whole batch."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    q, k, v = qkv(256, 2, 40, jnp.bfloat16)
    q, k, v = (jnp.concatenate([x] * 4) for x in (q, k, v))  # batch 8

    def lowered_for_tpu():
        fn = jax.jit(lambda *a: attention(*a, PALLAS))
        return fn.trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()

    plain = lowered_for_tpu()
    assert "manual_computation" not in plain and kernel_calls(plain) == 1
    with jax.set_mesh(mesh):
        text = lowered_for_tpu()
    manual = re.search(r"sdy\.manual_computation.*in_shardings=\[<@mesh, \[\{\"data\"\}", text)
    assert manual and kernel_calls(text) == 1
    assert re.search(r"tensor<1x2x256x128xbf16>.*tpu_custom_call|tpu_custom_call.*tensor<1x2x256x128xbf16>", text)


def test_runtime_validates_flash_min_length():
    for bad in (0, -1, 1.5, True, "1024"):
        with pytest.raises(ValueError, match=r"flash_min_length=.* must be an int >= 1"):
            Runtime(flash_min_length=bad)
    with pytest.raises(ValueError, match=r"attention='tpu' is not supported; use 'auto', 'xla', 'cudnn' or 'pallas'"):
        Runtime(attention="tpu")


# A tiny inpainting pipeline at 64x64 pixels: 16x16 = 256-token latents at the UNet's attention level
# and in the VAE's mid blocks, the "long" sequences once flash_min_length is 256.
UNET = dict(sample_size=16, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
VAE = dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
           up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=4, latent_channels=4)
TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, vocab_size=1000, hidden_act="quick_gelu")


def tpu_program_text(attention_impl: str) -> str:
    """StableHLO of the whole sampling program (2 PNDM steps, CFG) exported for TPU, from abstract params."""
    rt = Runtime(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attention_impl, flash_min_length=256)
    unet = FlaxUNet2DConditionModel.from_config(UNET, runtime=rt)
    vae = FlaxAutoencoderKL.from_config(VAE, runtime=rt)
    text = FlaxCLIPTextModel.from_config(TEXT, runtime=rt)
    sched = FlaxPNDMScheduler.from_config(dict(skip_prk_steps=True, steps_offset=1))
    params = {name: jax.eval_shape(m.init_weights, jax.random.key(0))
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    params["scheduler"] = sched.create_state()
    ids = np.zeros((1, 16), np.int32)
    batch = Batch(prompt_ids=ids, neg_prompt_ids=ids, mask=np.ones((1, 64, 64, 1), np.float32),
                  masked_image=np.zeros((1, 64, 64, 3), np.float32), guidance_scale=np.full((1,), 7.5, np.float32),
                  begin_index=np.int32(0), strength_is_max=np.bool_(True), eta=np.float32(0.0))
    opts = Options(num_inference_steps=2, height=64, width=64, do_cfg=True)
    program = jax.jit(generate, static_argnums=(0, 1))
    exported = jax.export.export(program, platforms=["tpu"])(
        Components(unet, vae, text, sched), opts, params, batch, jax.random.key(0))
    assert exported.platforms == ("tpu",)
    return exported.mlir_module()


def runs(text: str, pattern: str) -> int:
    """How many times a lowered program runs lines matching `pattern` (a while loop's body once): jax
    outlines each nested jit (the kernel's, a repeated model block) as a function, so a function's
    matches count once per call along the call graph from @main."""
    bodies = dict(re.findall(r"func\.func (?:public |private )?@([\w.$-]+)(.*?)(?=\n  func\.func |\Z)", text, re.S))

    def count(name: str) -> int:
        body = bodies[name]
        return len(re.findall(pattern, body)) + sum(map(count, re.findall(r"(?<!_)call @([\w.$-]+)\(", body)))

    return count("main")


def kernel_calls(text: str) -> int:
    return runs(text, r"stablehlo\.custom_call @tpu_custom_call")


def score_matmuls(text: str) -> int:
    """XLA matmuls producing 256 x 256 attention logits, whatever the layout of the other dims."""
    return runs(text, r"stablehlo\.dot_general [^\n]*-> tensor<(?:\d+x)*256x(?:\d+x)*256x[a-z]")


def test_sampling_program_lowered_for_tpu_uses_the_kernel():
    """Every 256-token self-attention (UNet down and up blocks: 1 + 2 layers; VAE encoder and decoder mid
    blocks: 2) becomes a kernel call, and no [.., 256, 256] score tensor is left in the XLA program."""
    xla, pallas = tpu_program_text("xla"), tpu_program_text("pallas")
    assert score_matmuls(xla) == 5 and kernel_calls(xla) == 0
    assert kernel_calls(pallas) == 5
    assert score_matmuls(pallas) == 0 and not re.search(r"x256x256x", pallas)
