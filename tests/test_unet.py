"""FlaxUNet2DConditionModel against diffusers' UNet2DConditionModel: tiny random models, saved with
save_pretrained, loaded through our from_pretrained, same inputs, fp32 max abs diff <= 1e-4."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file

from flax_inpaint import FlaxUNet2DConditionModel
from flax_inpaint.image_processor import nearest_indices
from flax_inpaint.models import CheckpointError
from flax_inpaint.models.unet import FlaxUNet2DConditionOutput, broadcast_timesteps, timestep_embedding
from flax_inpaint.runtime import Runtime

TOL = 1e-4

BASE = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=16,
)

CROSS_ONLY = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# name: (config overrides, (height, width)); the SD1 layout is the `sd1` fixture below.
CONFIGS = {
    "sd2": (
        dict(
            **CROSS_ONLY, use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        ),
        (16, 24),
    ),
    "inpaint9": (dict(in_channels=9, out_channels=4), (16, 16)),
    "only_cross_attention": (dict(**CROSS_ONLY, only_cross_attention=(True, False)), (8, 8)),
    "transformer_layers_2": (
        dict(**CROSS_ONLY, transformer_layers_per_block=(1, 2), layers_per_block=(1, 2)), (8, 8)
    ),
    # Also the other time-embedding options, padding-0 downsampling, a resnet-only mid block, and
    # keys we ignore because diffusers does not use them with these block types.
    "sin_first_freq_shift_1": (
        dict(
            flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, downsample_padding=0,
            mid_block_scale_factor=1.5, norm_eps=1e-6, act_fn="gelu", time_embedding_dim=40,
            time_embedding_act_fn="silu", timestep_post_act="silu", conv_in_kernel=5, conv_out_kernel=1,
            mid_block_type="UNetMidBlock2D", dropout=0.1, resnet_out_scale_factor=2.0,
            resnet_skip_time_act=True, mid_block_only_cross_attention=True, cross_attention_norm="group_norm",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8,
        ),
        (8, 8),
    ),
    # 3 heads on 16 channels: head size 5, inner dim 15 (diffusers floors channels // heads).
    # Without a mid block; 15x13 is not a multiple of 2: upsamplers resize to the skip's size.
    "heads_not_dividing_odd_size_no_mid": (dict(attention_head_dim=3, mid_block_type=None), (15, 13)),
}


def make_torch_unet(overrides, seed=0):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**{**BASE, **overrides}).eval()
    with torch.no_grad():  # norms start as identity; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def inputs(model, hw, batch=2, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    c = model.config
    x = rng.standard_normal((batch, c.in_channels, *hw), np.float32)
    ctx = rng.standard_normal((batch, tokens, c.cross_attention_dim), np.float32)
    return x, ctx


def torch_out(model, x, t, ctx, **kw):
    t = torch.tensor(t) if isinstance(t, np.ndarray) else t
    kw = {k: tuple(map(torch.tensor, v)) if isinstance(v, list) else torch.tensor(v) for k, v in kw.items()}
    with torch.no_grad():
        return model(torch.tensor(x), t, torch.tensor(ctx), **kw).sample.numpy()


def jitted(model):
    """One compiled __call__ per model (recompiled only for new shapes, dtypes or residual structure)."""
    return jax.jit(lambda p, *a, **k: model.apply({"params": p}, *a, **k).sample)


def load(folder, **kw):
    return FlaxUNet2DConditionModel.from_pretrained(folder, use_cache=False, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name, tmp_path):
    overrides, hw = CONFIGS[name]
    tm = make_torch_unet(overrides)
    model, params = load(save(tm, tmp_path))
    x, ctx = inputs(tm, hw)
    t = np.array([3, 951])
    ref = torch_out(tm, x, t, ctx)
    assert ref.shape == (2, tm.config.out_channels, *hw)
    assert ref.std() > 0.05, "reference output is trivially small; the test would prove nothing"
    np.testing.assert_allclose(jitted(model)(params, x, t, ctx), ref, rtol=0, atol=TOL)


class SD1:
    """The SD1-style model shared by the tests below, with one jitted __call__ and a reference run."""

    def __init__(self, folder):
        self.torch = make_torch_unet(SD1_CONFIG)
        self.folder = save(self.torch, folder)
        self.model, self.params = load(self.folder)
        self.run = jitted(self.model)
        self.x, self.ctx = inputs(self.torch, (8, 8))
        self.t = np.array([3, 951])
        self.out = np.asarray(self.run(self.params, self.x, self.t, self.ctx))


SD1_CONFIG = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=2,
)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return SD1(tmp_path_factory.mktemp("sd1"))


def test_parity_sd1(sd1):
    ref = torch_out(sd1.torch, sd1.x, sd1.t, sd1.ctx)
    assert ref.std() > 0.05
    np.testing.assert_allclose(sd1.out, ref, rtol=0, atol=TOL)


def test_float_and_scalar_timesteps(sd1):
    for t in (np.array([12.5, 700.25], np.float32), 37.5):
        ref = torch_out(sd1.torch, sd1.x, t, sd1.ctx)
        np.testing.assert_allclose(sd1.run(sd1.params, sd1.x, t, sd1.ctx), ref, rtol=0, atol=TOL)


def test_broadcast_timesteps():
    for t in (7, 7.5, np.array(7), np.array([7]), np.array([7, 7, 7])):
        out = broadcast_timesteps(t, 3)
        assert out.shape == (3,) and (np.asarray(out) == np.asarray(t).reshape(-1)[0]).all()
    assert broadcast_timesteps(np.array([1, 2, 3]), 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="timesteps"):
        broadcast_timesteps(np.arange(2), 3)


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding(flip, shift, dim):
    t = np.array([0, 1, 17.5, 999], np.float32)
    ref = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    np.testing.assert_allclose(timestep_embedding(t, dim, flip, shift), ref.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [(8, 15), (7, 13), (9, 17), (4, 8), (5, 5), (3, 11)])
def test_upsample_to_size_matches_torch_nearest(size_in, size_out):
    src = torch.arange(size_in, dtype=torch.float32)[None, None, :, None]
    ref = torch.nn.functional.interpolate(src, size=(size_out, 1), mode="nearest")[0, 0, :, 0]
    np.testing.assert_array_equal(nearest_indices(size_in, size_out), ref.numpy().astype(int))


def residual_shapes(model, batch, hw):
    """NCHW shapes of the ControlNet residuals: conv_in's, one per down-block layer, per downsampler."""
    ch, n, (h, w) = model.block_out_channels, len(model.block_out_channels), hw
    down = [(batch, ch[0], h, w)]
    for i in range(n):
        down += [(batch, ch[i], h >> i, w >> i)] * model.layers_per_block
        if i < n - 1:
            down.append((batch, ch[i], h >> (i + 1), w >> (i + 1)))
    return down, (batch, ch[-1], h >> (n - 1), w >> (n - 1))


def test_controlnet_residuals(sd1):
    rng = np.random.default_rng(1)
    down_shapes, mid_shape = residual_shapes(sd1.model, 2, (8, 8))
    down = [rng.standard_normal(s, np.float32) for s in down_shapes]
    mid = rng.standard_normal(mid_shape, np.float32)
    kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    ref = torch_out(sd1.torch, sd1.x, sd1.t, sd1.ctx, **kw)
    assert np.abs(ref - sd1.out).max() > 0.1, "residuals should change the output"
    np.testing.assert_allclose(sd1.run(sd1.params, sd1.x, sd1.t, sd1.ctx, **kw), ref, rtol=0, atol=TOL)

    apply = functools.partial(sd1.model.apply, {"params": sd1.params}, sd1.x, sd1.t, sd1.ctx)
    with pytest.raises(ValueError, match="down-block residuals"):
        apply(None, down[:-1], mid)  # diffusers' Flax order: added_cond_kwargs comes first
    with pytest.raises(TypeError, match="added_cond_kwargs must be a dict.*down_block_additional_residuals"):
        apply(down, mid)
    with pytest.raises(ValueError, match="down-block residuals have shapes"):
        jax.eval_shape(functools.partial(apply, None), [r[:, :, :4] for r in down], mid)
    with pytest.raises(ValueError, match="both"):
        apply(down_block_additional_residuals=down)


def test_nhwc_method_and_tuple_output(sd1):
    m, p, x, t, ctx = sd1.model, {"params": sd1.params}, sd1.x, sd1.t, sd1.ctx
    nhwc = jax.jit(lambda p: m.apply(p, x.transpose(0, 2, 3, 1), t, ctx, method="nhwc"))(p)
    np.testing.assert_array_equal(np.asarray(nhwc).transpose(0, 3, 1, 2), sd1.out)
    assert isinstance(jax.eval_shape(lambda: m.apply(p, x, t, ctx)), FlaxUNet2DConditionOutput)
    (tup,) = jax.eval_shape(lambda: m.apply(p, x, t, ctx, return_dict=False))
    assert tup.shape == sd1.out.shape


def test_diffusers_flax_keywords_train_and_added_cond_kwargs(sd1):
    """diffusers' removed Flax UNet took `train` and `added_cond_kwargs` keywords: accepted; inference is
    deterministic either way, and added conditioning (SDXL only) is refused rather than ignored."""
    m, x, t, ctx = sd1.model, sd1.x, sd1.t, sd1.ctx

    def program(**kw):  # traced, not compiled: the same program computes the same output
        return str(jax.make_jaxpr(lambda p: m.apply({"params": p}, x, t, ctx, **kw).sample)(sd1.params))

    assert program(added_cond_kwargs=None, train=True) == program(train=False) == program()
    with pytest.raises(ValueError, match=r"added_cond_kwargs=\['text_embeds', 'time_ids'\].*pass None"):
        m.apply({"params": sd1.params}, x, t, ctx, added_cond_kwargs={"text_embeds": 0, "time_ids": 0})


def test_runtime_attention_choices(sd1):
    """'xla' runs the model exactly like 'auto' (which picks xla for fp32, and on a CPU always);
    anything else is refused with the allowed values."""
    with pytest.raises(ValueError, match=r"attention='bogus' is not supported; use 'auto', 'xla', 'cudnn' or 'pallas'"):
        Runtime(attention="bogus")
    assert sd1.model.runtime.attention == "auto"
    xla = sd1.model.clone(runtime=Runtime(attention="xla"))
    np.testing.assert_array_equal(jitted(xla)(sd1.params, sd1.x, sd1.t, sd1.ctx), sd1.out)


def test_bad_inputs_raise(sd1):
    apply = functools.partial(sd1.model.apply, {"params": sd1.params})
    with pytest.raises(ValueError, match="channels"):
        apply(sd1.x[:, :3], 1, sd1.ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        apply(sd1.x, 1, sd1.ctx[..., :7])
    with pytest.raises(ValueError, match="timesteps"):
        apply(sd1.x, np.arange(3), sd1.ctx)


def test_bf16_finite_and_close(sd1):
    model, params = load(sd1.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = jitted(model)(params, sd1.x, sd1.t, sd1.ctx)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    assert np.abs(out - sd1.out).max() < 0.05 * np.abs(sd1.out).max()


def test_save_pretrained_round_trip(sd1, tmp_path):
    sd1.model.save_pretrained(tmp_path, sd1.params, pytorch_format=True)
    model, params = load(tmp_path)
    assert model.config == sd1.model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, sd1.params)
    # The PyTorch-format copy loads back into diffusers bit for bit.
    back = UNet2DConditionModel.from_pretrained(tmp_path).state_dict()
    for k, v in sd1.torch.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("num_attention_heads", 8),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_cond_proj_dim", 256),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("norm_num_groups", 6),
        ("attention_head_dim", [2, 4, 8]),
        ("cross_attention_dim", [24, 32]),
        ("transformer_layers_per_block", [[1, 2], [1, 1]]),
    ],
)
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        FlaxUNet2DConditionModel.from_config({**BASE, key: value})


def test_ignored_config_keys_are_accepted():
    model = FlaxUNet2DConditionModel.from_config(
        {**BASE, "dropout": 0.1, "resnet_out_scale_factor": 2.0, "mid_block_only_cross_attention": True,
         "_diffusers_version": "0.42.1"}
    )
    assert model.block_out_channels == (16, 32)


def test_shape_mismatch_raises_checkpoint_error(sd1, tmp_path):
    folder = sd1.folder
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state["conv_in.weight"] = state["conv_in.weight"][:, :3].contiguous()
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches.*conv_in\.weight"):
        load(tmp_path)

    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches.*attn2\.to_k\.weight"):
        load(tmp_path)


def test_truncated_safetensors_raises_checkpoint_error(sd1, tmp_path):
    folder = sd1.folder
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(tmp_path)
