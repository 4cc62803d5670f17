"""FlaxAutoencoderKL against diffusers' PyTorch AutoencoderKL, through our public from_pretrained.

Parity is measured as max|ours - torch| / max|torch| and must be <= 1e-4 in float32.
"""
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from flax_inpaint.models import FlaxAutoencoderKL
from flax_inpaint.models.vae import FlaxDiagonalGaussianDistribution

RTOL = 1e-4

TWO_BLOCKS = dict(block_out_channels=(8, 16), layers_per_block=1)
THREE_BLOCKS = dict(block_out_channels=(8, 16, 16), layers_per_block=2)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def make_vae(tmp_path, block_out_channels, layers_per_block, **config):
    """A tiny random diffusers AutoencoderKL saved as safetensors; returns (torch model, folder)."""
    n = len(block_out_channels)
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels,
        layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=4, **config,
    ).eval()
    with torch.no_grad():  # GroupNorm params away from (1, 0), so a swapped scale/bias shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    folder = tmp_path / "vae"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def images(size, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def torch_outputs(model, x):
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x)).latent_dist
        return dict(
            mean=post.mean.numpy(), logvar=post.logvar.numpy(), std=post.std.numpy(),
            kl=post.kl().numpy(), decoded=model.decode(post.mean).sample.numpy(),
            forward=model(torch.from_numpy(x)).sample.numpy(),
        )


SAMPLE_KEY = jax.random.key(0)


def nchw(x):
    """NHWC (our posterior's layout, as diffusers' Flax VAE) -> NCHW (diffusers' PyTorch)."""
    return jnp.transpose(x, (0, 3, 1, 2))


@partial(jax.jit, static_argnums=0)
def _flax_outputs(vae, params, x):
    v = {"params": params}
    post = vae.apply(v, x, method=vae.encode).latent_dist  # NHWC, like diffusers' Flax VAE
    return dict(
        posterior=post, mean=nchw(post.mean), logvar=nchw(post.logvar), std=nchw(post.std), kl=post.kl(),
        decoded=vae.apply(v, post.mean, method=vae.decode).sample, forward=vae.apply(v, x).sample,
        sampled=vae.apply(v, x, sample_posterior=True, key=SAMPLE_KEY).sample,
    )


def flax_outputs(vae, params, x):
    """Everything the tests compare, in one program compiled once per config, shape and dtype
    (XLA's CPU compile dominates these tests)."""
    return _flax_outputs(vae, params, jnp.asarray(x))


def assert_parity(ours, ref, keys=("mean", "logvar", "std", "kl", "decoded", "forward"), tol=RTOL):
    errors = {k: rel_err(ours[k], ref[k]) for k in keys}
    assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize(
    "arch, image, latent", [(TWO_BLOCKS, 16, 8), (THREE_BLOCKS, 32, 8)], ids=["2blocks", "3blocks"]
)
def test_matches_diffusers(tmp_path, arch, image, latent):
    model, folder = make_vae(tmp_path, **arch)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    assert vae.block_out_channels == arch["block_out_channels"]
    assert vae.scaling_factor == vae.config["scaling_factor"] == 0.18215
    x = images(image)
    ours = flax_outputs(vae, params, x)
    assert ours["mean"].shape == (2, 4, latent, latent)
    assert ours["forward"].shape == x.shape
    assert_parity(ours, torch_outputs(model, x))


@pytest.mark.parametrize(
    "config",
    [dict(mid_block_add_attention=False), dict(use_quant_conv=False, use_post_quant_conv=False)],
    ids=["no_mid_attention", "no_quant_convs"],
)
def test_config_variants_match_diffusers(tmp_path, config):
    model, folder = make_vae(tmp_path, **TWO_BLOCKS, **config)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    for key, value in config.items():
        assert getattr(vae, key) is value
    x = images(16)
    assert_parity(flax_outputs(vae, params, x), torch_outputs(model, x))


def test_eager_equals_jit(tmp_path):
    _, folder = make_vae(tmp_path, **TWO_BLOCKS)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    x = images(16)
    eager = vae.apply({"params": params}, jnp.asarray(x), method="encode").latent_dist
    jitted = flax_outputs(vae, params, x)["posterior"]
    np.testing.assert_allclose(eager.mean, jitted.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager.logvar, jitted.logvar, rtol=1e-5, atol=1e-6)


def test_posterior_sampling(tmp_path):
    model, folder = make_vae(tmp_path, **TWO_BLOCKS)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    x = images(16)
    out = flax_outputs(vae, params, x)
    post = out["posterior"]
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x)).latent_dist
    assert rel_err(nchw(post.var), ref.var.numpy()) <= RTOL
    np.testing.assert_array_equal(post.mode(), post.mean)

    z = post.sample(SAMPLE_KEY)
    np.testing.assert_array_equal(z, post.sample(SAMPLE_KEY))
    assert not np.allclose(z, post.sample(jax.random.key(1)))
    eps = np.asarray((z - post.mean) / post.std)  # 2 * 4 * 8 * 8 = 512 standard normal draws
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1.0) < 0.1, (eps.mean(), eps.std())

    # __call__(sample_posterior=True, key=) decodes that sample.
    with torch.no_grad():
        decoded_z = model.decode(torch.tensor(np.asarray(nchw(z)))).sample.numpy()
    assert rel_err(out["sampled"], decoded_z) <= RTOL
    assert not np.allclose(out["sampled"], out["forward"])
    # The "gaussian" rng stream diffusers' Flax VAE drew from works in place of key= (traced only:
    # past the key it is the path checked above).
    shape = jax.eval_shape(
        lambda: vae.apply({"params": params}, x, sample_posterior=True, rngs={"gaussian": SAMPLE_KEY})
    )
    assert shape.sample.shape == x.shape
    with pytest.raises(ValueError, match="sample_posterior=True needs randomness"):
        vae.apply({"params": params}, x, sample_posterior=True)


def test_distribution_math_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    moments = rng.standard_normal((2, 8, 3, 3)).astype(np.float32) * 3
    moments[0, 4, 0, 0], moments[1, 5, 1, 1] = 50.0, -50.0  # outside the [-30, 20] logvar clip
    other_moments = rng.standard_normal((2, 8, 3, 3)).astype(np.float32)
    nhwc = lambda a: jnp.transpose(jnp.asarray(a), (0, 2, 3, 1))  # noqa: E731 (ours is NHWC)
    ours = FlaxDiagonalGaussianDistribution(nhwc(moments))
    other = FlaxDiagonalGaussianDistribution(nhwc(other_moments))
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(other_moments))
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    for name in ("mean", "logvar", "std", "var"):
        assert rel_err(nchw(getattr(ours, name)), getattr(ref, name).numpy()) <= 1e-6, name
    assert rel_err(ours.kl(), ref.kl().numpy()) <= 1e-6
    assert rel_err(ours.kl(other), ref.kl(ref_other).numpy()) <= 1e-6
    sample = nhwc(other_moments[:, :4])
    assert rel_err(ours.nll(sample), ref.nll(torch.from_numpy(other_moments[:, :4])).numpy()) <= 1e-6

    frozen = FlaxDiagonalGaussianDistribution(nhwc(moments), deterministic=True)
    np.testing.assert_array_equal(frozen.sample(jax.random.key(0)), frozen.mean)
    np.testing.assert_array_equal(frozen.kl(), np.zeros(2))
    # A pytree: it crosses jit boundaries, `deterministic` stays static.
    out = jax.jit(lambda d: d)(frozen)
    assert out.deterministic and np.array_equal(out.mean, frozen.mean)


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_legacy_attention_names(tmp_path, as_conv):
    """Checkpoints from before diffusers 0.14 call the mid-block attention query/key/value/proj_attn,
    some with 1x1-conv [out, in, 1, 1] weights."""
    model, folder = make_vae(tmp_path, **TWO_BLOCKS)
    new_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in new_names.items():
            if ".mid_block.attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if as_conv and key.endswith("weight"):
                    value = value[:, :, None, None]
        legacy[key] = value.contiguous()
    assert sum(".query." in k for k in legacy) == 4  # encoder and decoder, weight and bias
    save_file(legacy, str(folder / "diffusion_pytorch_model.safetensors"))

    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    x = images(16)
    assert_parity(flax_outputs(vae, params, x), torch_outputs(model, x))


def test_bfloat16_runs_finite_and_close(tmp_path):
    model, folder = make_vae(tmp_path, **TWO_BLOCKS)
    vae32, params32 = FlaxAutoencoderKL.from_pretrained(folder)
    vae16, params16 = FlaxAutoencoderKL.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    x = images(16)
    ours16, ours32 = flax_outputs(vae16, params16, x), flax_outputs(vae32, params32, x)
    assert ours16["forward"].dtype == jnp.bfloat16
    for k in ("mean", "logvar", "decoded", "forward"):
        assert np.isfinite(np.asarray(ours16[k], np.float32)).all(), k
    assert_parity(ours16, ours32, keys=("mean", "logvar", "decoded", "forward"), tol=5e-2)
    # Same key, same noise whatever the dtype.
    assert rel_err(ours16["posterior"].sample(SAMPLE_KEY), ours32["posterior"].sample(SAMPLE_KEY)) <= 5e-2


def test_save_pretrained_round_trips(tmp_path):
    model, folder = make_vae(tmp_path, **TWO_BLOCKS, scaling_factor=0.13025, force_upcast=False)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    assert (vae.scaling_factor, vae.force_upcast) == (0.13025, False)
    x = images(16)
    expected = torch_outputs(model, x)

    msgpack_dir = tmp_path / "flax"
    vae.save_pretrained(msgpack_dir, params)
    vae2, params2 = FlaxAutoencoderKL.from_pretrained(msgpack_dir)
    assert vae2.config == vae.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)

    torch_dir = tmp_path / "torch"
    vae.save_pretrained(torch_dir, params, pytorch_format=True)
    assert json.loads((torch_dir / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    back = AutoencoderKL.from_pretrained(torch_dir).eval()
    assert back.config.scaling_factor == 0.13025 and back.config.force_upcast is False
    assert_parity(torch_outputs(back, x), expected, tol=0.0)


def test_config_validation():
    base = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
    ok = FlaxAutoencoderKL.from_config({**base, "shift_factor": None, "latents_mean": None})
    assert ok.block_out_channels == (8, 16)
    with pytest.raises(ValueError, match=r"shift_factor=0\.1159"):
        FlaxAutoencoderKL.from_config({**base, "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="latents_mean"):
        FlaxAutoencoderKL.from_config({**base, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="only 'DownEncoderBlock2D' is implemented"):
        FlaxAutoencoderKL.from_config({**base, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="up_block_types has 1 entries but block_out_channels has 2"):
        FlaxAutoencoderKL.from_config({**base, "up_block_types": ["UpDecoderBlock2D"]})
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=32"):
        FlaxAutoencoderKL.from_config({**base, "norm_num_groups": 32})
    with pytest.raises(ValueError, match="Unsupported activation 'tanhh'"):
        FlaxAutoencoderKL.from_config({**base, "act_fn": "tanhh"})


def test_bad_inputs_are_named(tmp_path):
    _, folder = make_vae(tmp_path, **TWO_BLOCKS)
    vae, params = FlaxAutoencoderKL.from_pretrained(folder)
    nhwc = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"sample must be NCHW \[batch, 3, height, width\].*looks NHWC"):
        vae.apply({"params": params}, nhwc, method=vae.encode)
    with pytest.raises(ValueError, match=r"latents has shape \(4, 8, 8\); expected NCHW \[B, 4, h, w\] or NHWC"):
        vae.apply({"params": params}, jnp.zeros((4, 8, 8)), method=vae.decode)
    with pytest.raises(ValueError, match=r"latents has shape \(1, 3, 8, 8\)"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), method=vae.decode)
    # Like diffusers' Flax VAE, decode reads latents as NHWC when their last axis has latent_channels.
    z = jax.random.normal(jax.random.key(0), (1, 4, 8, 8))
    np.testing.assert_array_equal(vae.apply({"params": params}, z, method=vae.decode).sample,
                                  vae.apply({"params": params}, z.transpose(0, 2, 3, 1), method=vae.decode).sample)
