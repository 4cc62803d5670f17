"""FlaxControlNetModel against diffusers' ControlNetModel: tiny random models, saved with
save_pretrained (safetensors), loaded through our from_pretrained, same inputs; every residual
(and a UNet fed with them) agrees to fp32 max abs diff <= 1e-4."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from flax_inpaint import FlaxControlNetModel, FlaxUNet2DConditionModel
from flax_inpaint.models import FlaxControlNetOutput
from flax_inpaint.models.conversion import to_torch_state_dict

TOL = 1e-4
HW = (8, 8)  # latent size

BASE = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    layers_per_block=1,
    cross_attention_dim=24,
    attention_head_dim=2,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16),
)
SD1 = dict(layers_per_block=2)
CONTROLNET_ONLY = (
    "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order", "conditioning_channels",
    "global_pool_conditions",
)
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")

CONFIGS = {
    "sd1": SD1,
    "sd2_linear_heads_bgr": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), use_linear_projection=True,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), upcast_attention=True,
        controlnet_conditioning_channel_order="bgr",
    ),
    # The other time-embedding options, padding-0 downsampling, a resnet-only mid block, a
    # one-channel control image 4x the latent size.
    "resnet_mid_gray_cond": dict(
        mid_block_type="UNetMidBlock2D", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        mid_block_scale_factor=1.5, norm_eps=1e-6, act_fn="gelu", only_cross_attention=(True, False),
        conditioning_channels=1, conditioning_embedding_out_channels=(4, 8, 16),
    ),
    "global_pool": dict(SD1, global_pool_conditions=True),
}


def randomize(model, seed=0):
    """Give the zero convolutions torch's default init and perturb the norms, so every weight matters."""
    torch.manual_seed(seed + 1)
    zero = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    zero.append(model.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for m in zero:
            m.reset_parameters()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def make_torch_controlnet(overrides, seed=0):
    torch.manual_seed(seed)
    return randomize(ControlNetModel(**{**BASE, **overrides}).eval(), seed)


def make_torch_unet(overrides, seed=0):
    torch.manual_seed(seed)
    cfg = {k: v for k, v in {**BASE, **overrides}.items() if k not in CONTROLNET_ONLY}
    return UNet2DConditionModel(**cfg, up_block_types=UP_BLOCKS).eval()


def inputs(cfg, batch=2, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    x = rng.standard_normal((batch, cfg.in_channels, *HW), np.float32)
    ctx = rng.standard_normal((batch, tokens, cfg.cross_attention_dim), np.float32)
    cond = rng.uniform(0, 1, (batch, cfg.conditioning_channels, HW[0] * f, HW[1] * f)).astype(np.float32)
    return x, np.array([3, 951]), ctx, cond


def torch_residuals(model, x, t, ctx, cond, **kw):
    with torch.no_grad():
        out = model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(cond), **kw)
    return [r.numpy() for r in out.down_block_res_samples], out.mid_block_res_sample.numpy()


def load(folder, **kw):
    return FlaxControlNetModel.from_pretrained(folder, use_cache=False, **kw)


def jitted(model):
    """One compiled __call__ per model; conditioning_scale is traced, guess_mode static."""

    @functools.partial(jax.jit, static_argnames="guess_mode")
    def run(params, x, t, ctx, cond, scale, guess_mode=False):
        out = model.apply({"params": params}, x, t, ctx, cond, scale, guess_mode=guess_mode)
        return out.down_block_res_samples, out.mid_block_res_sample

    return run


def assert_residuals_close(ours, ref):
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down)
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


class Case:
    """A torch ControlNet saved to a folder, our loaded copy, one jitted __call__, and inputs."""

    def __init__(self, name, folder):
        self.overrides = CONFIGS[name]
        self.torch = make_torch_controlnet(self.overrides)
        self.torch.save_pretrained(folder, safe_serialization=True)
        self.folder = folder
        self.model, self.params = load(folder)
        self.run = jitted(self.model)
        self.args = inputs(self.torch.config)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Case(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name,scale,guess_mode",
    [
        ("sd1", 1.0, False),
        ("sd1", 0.6, True),  # guess mode: per-residual scales logspace(-1, 0) * conditioning_scale
        ("sd2_linear_heads_bgr", 0.75, False),
        ("resnet_mid_gray_cond", 1.0, False),
        ("global_pool", 0.5, True),  # pooling switches guess mode's scales off
    ],
)
def test_parity(cases, name, scale, guess_mode):
    c = cases(name)
    ref = torch_residuals(c.torch, *c.args, conditioning_scale=scale, guess_mode=guess_mode)
    assert min(r.std() for r in ref[0]) > 0.01, "reference residuals are trivially small"
    assert_residuals_close(c.run(c.params, *c.args, scale, guess_mode=guess_mode), ref)


def test_control_image_and_channel_order_matter(cases):
    """The conditioning embedding is live: another image, or its channels reversed, changes the residuals."""
    c = cases("sd2_linear_heads_bgr")
    x, t, ctx, cond = c.args
    base = c.run(c.params, *c.args, 1.0)[1]
    flipped = c.run(c.params, x, t, ctx, cond[:, ::-1], 1.0)[1]
    assert np.abs(base - flipped).max() > 1e-2


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A tiny SD1-layout diffusers UNet and our loaded copy."""
    tunet = make_torch_unet(SD1, seed=1)
    folder = tmp_path_factory.mktemp("unet")
    tunet.save_pretrained(folder, safe_serialization=True)
    return (tunet, *FlaxUNet2DConditionModel.from_pretrained(folder, use_cache=False))


@pytest.mark.parametrize("name", ["sd1", "global_pool"])  # global pooling: [B, C, 1, 1] residuals broadcast
def test_residuals_drive_unet_like_diffusers(cases, unet, name):
    """Our residuals into our UNet match diffusers' residuals into diffusers' UNet (same weights)."""
    c, (tunet, model, unet_params) = cases(name), unet
    x, t, ctx, cond = c.args
    down, mid = torch_residuals(c.torch, *c.args, conditioning_scale=0.8)
    with torch.no_grad():
        ref = tunet(
            torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
            down_block_additional_residuals=tuple(map(torch.tensor, down)),
            mid_block_additional_residual=torch.tensor(mid),
        ).sample.numpy()
        plain = tunet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    assert np.abs(ref - plain).max() > 0.05, "the residuals should change the UNet's output"

    @jax.jit
    def controlled(cn_params, unet_params, x, cond, scale):
        def nhwc(a):
            return jnp.transpose(a, (0, 2, 3, 1))

        down, mid = c.model.apply({"params": cn_params}, nhwc(x), t, ctx, nhwc(cond), scale, method="nhwc")
        out = model.apply({"params": unet_params}, nhwc(x), t, ctx, down, mid, method="nhwc")
        return jnp.transpose(out, (0, 3, 1, 2))

    np.testing.assert_allclose(controlled(c.params, unet_params, x, cond, 0.8), ref, rtol=0, atol=TOL)


def test_tuple_output_and_nhwc_shapes(cases):
    c = cases("sd1")
    p, (x, t, ctx, cond) = {"params": c.params}, c.args
    out = jax.eval_shape(lambda: c.model.apply(p, x, t, ctx, cond))
    assert isinstance(out, FlaxControlNetOutput) and len(out.down_block_res_samples) == 6
    down, mid = jax.eval_shape(lambda: c.model.apply(p, x, t, ctx, cond, return_dict=False))
    assert [r.shape for r in down] == [r.shape for r in out.down_block_res_samples]
    assert mid.shape == (2, 32, 4, 4)
    nhwc = functools.partial(np.transpose, axes=(0, 2, 3, 1))
    down, mid = jax.eval_shape(lambda: c.model.apply(p, nhwc(x), t, ctx, nhwc(cond), method="nhwc"))
    assert mid.shape == (2, 4, 4, 32) and down[0].shape == (2, 8, 8, 16)


def test_bf16_finite_and_close(cases):
    c = cases("sd1")
    model, params = load(c.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    down, mid = jitted(model)(params, *c.args, 1.0)
    ref_down, ref_mid = c.run(c.params, *c.args, 1.0)
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_from_unet_matches_diffusers(tmp_path):
    """Config and weights of from_unet equal diffusers' ControlNetModel.from_unet; the result saves
    in diffusers' format and loads back into diffusers."""
    tunet = make_torch_unet(CONFIGS["sd2_linear_heads_bgr"])
    tunet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "unet", use_cache=False)
    kw = dict(
        controlnet_conditioning_channel_order="bgr", conditioning_embedding_out_channels=(4, 8, 16),
        conditioning_channels=1,
    )
    model, params = FlaxControlNetModel.from_unet(unet, unet_params, **kw)
    ref = ControlNetModel.from_unet(tunet, **kw)
    assert model.config == {k: _as_tuple(ref.config[k]) for k in model.config}

    ours, theirs = to_torch_state_dict(params), ref.state_dict()
    assert set(ours) == set(theirs)
    random_init = ("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.blocks")
    for k, v in theirs.items():
        if k.startswith(random_init):  # Flax's initialisers, not torch's (biases start at zero)
            assert ours[k].shape == tuple(v.shape) and (k.endswith("bias") or ours[k].any())
        else:  # copied from the UNet, or a zero convolution
            np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)

    model.save_pretrained(tmp_path / "cn", params, pytorch_format=True)
    back = ControlNetModel.from_pretrained(tmp_path / "cn").state_dict()
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), ours[k], err_msg=k)


def _as_tuple(v):
    return tuple(v) if isinstance(v, list) else v


def test_init_weights_zero_convs():
    """Fresh weights (also from_unet(load_weights_from_unet=False)) start with zero convolutions."""
    tiny = dict(
        block_out_channels=(8,), down_block_types=("DownBlock2D",), mid_block_type="UNetMidBlock2D",
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        conditioning_embedding_out_channels=(4,),
    )
    model = FlaxControlNetModel(**tiny)
    flat = to_torch_state_dict(model.init_weights(jax.random.key(0)))
    zero = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    zeroed = [k for k in flat if k.startswith(zero)]
    assert len(zeroed) == 2 * 4  # weight and bias of 2 down-block zero convs, the mid one, conv_out
    assert not any(flat[k].any() for k in zeroed)
    assert all(flat[k].any() for k in flat if k.endswith("weight") and k not in zeroed)


def test_save_pretrained_round_trip(cases, tmp_path):
    c = cases("sd2_linear_heads_bgr")
    c.model.save_pretrained(tmp_path, c.params)
    model, params = load(tmp_path)
    assert model.config == c.model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, c.params)


def test_bad_inputs_raise(cases):
    c = cases("sd1")
    x, t, ctx, cond = c.args
    apply = functools.partial(c.model.apply, {"params": c.params})
    with pytest.raises(ValueError, match=r"controlnet_cond has shape .*\[2, 16, 16, 3\]"):
        apply(x, t, ctx, cond[:, :, :8])
    with pytest.raises(ValueError, match="controlnet_cond"):
        apply(x, t, ctx, cond[:, :1])
    with pytest.raises(ValueError, match="sample"):
        apply(x[:, :3], t, ctx, cond)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        apply(x, t, ctx[..., :7], cond)


@pytest.mark.parametrize(
    "key,value",
    [
        ("controlnet_conditioning_channel_order", "rgba"),
        ("mid_block_type", None),
        ("num_attention_heads", [2, 4, 8]),  # one per block, as attention_head_dim
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim", 32),
        ("conditioning_embedding_out_channels", []),
    ],
)
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        FlaxControlNetModel.from_config({**BASE, key: value})


def test_from_unet_rejects_unmirrorable_unet():
    cfg = {k: v for k, v in BASE.items() if k not in CONTROLNET_ONLY}
    unet = FlaxUNet2DConditionModel(**cfg, up_block_types=UP_BLOCKS, conv_in_kernel=5)
    with pytest.raises(ValueError, match="conv_in_kernel=5"):
        FlaxControlNetModel.from_unet(unet, {})
