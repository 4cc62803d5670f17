"""IP-Adapter against diffusers/transformers: the image encoder, the image projections (plain and "plus")
and the UNet with an adapter loaded, on tiny random models and random adapter weights saved in the
published layout (safetensors with image_proj./ip_adapter. prefixes, and a torch.save'd .bin dict).
fp32, max abs diff <= 1e-4: the same float32 math in another order (XLA's fused dots vs torch's).
"""
import re
import types

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import IPAdapterMixin
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from flax_inpaint.loaders.ip_adapter import (
    convert_image_proj,
    ip_adapter_inputs,
    ip_adapter_scale,
    load_ip_adapter,
    read_ip_adapter,
    set_ip_adapter_scale,
    unload_ip_adapter,
)
from flax_inpaint.models import CheckpointError, FlaxUNet2DConditionModel
from flax_inpaint.models.clip_vision import FlaxCLIPVisionModelWithProjection
from flax_inpaint.models.unet import cross_attention_paths
from test_unet import make_torch_unet
from tiny_sd import count_compiles

TOL = 1e-4
CROSS = 24  # the UNet's cross_attention_dim: the width of the image tokens
# Cross-attention everywhere, two transformer blocks in the deeper level: 11 attn2 layers, whose order
# (down, up, mid) the adapter keys and the scales must follow.
UNET = dict(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
    attention_head_dim=4, transformer_layers_per_block=(1, 2),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
ENCODER = dict(hidden_size=32, intermediate_size=37, projection_dim=20, num_hidden_layers=3, num_attention_heads=4,
               image_size=30, patch_size=6)
PLUS = dict(hidden=64, queries=5, depth=4)  # diffusers fixes depth 4 and 64-wide heads


def _randn(rng, *shape, scale=0.2):
    return torch.tensor(rng.standard_normal(shape, np.float32) * scale)


def plain_image_proj(rng, embed_dim=ENCODER["projection_dim"], tokens=4, cross=CROSS):
    return {"proj.weight": _randn(rng, tokens * cross, embed_dim), "proj.bias": _randn(rng, tokens * cross),
            "norm.weight": 1 + _randn(rng, cross), "norm.bias": _randn(rng, cross)}


def plus_image_proj(rng, width=ENCODER["hidden_size"], hidden=PLUS["hidden"], cross=CROSS):
    state = {"latents": _randn(rng, 1, PLUS["queries"], hidden, scale=hidden**-0.5),
             "proj_in.weight": _randn(rng, hidden, width), "proj_in.bias": _randn(rng, hidden),
             "proj_out.weight": _randn(rng, cross, hidden), "proj_out.bias": _randn(rng, cross),
             "norm_out.weight": 1 + _randn(rng, cross), "norm_out.bias": _randn(rng, cross)}
    for i in range(PLUS["depth"]):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"layers.{i}.{norm}.weight"] = 1 + _randn(rng, hidden)
            state[f"layers.{i}.{norm}.bias"] = _randn(rng, hidden)
        state[f"layers.{i}.0.to_q.weight"] = _randn(rng, hidden, hidden)
        state[f"layers.{i}.0.to_kv.weight"] = _randn(rng, 2 * hidden, hidden)
        state[f"layers.{i}.0.to_out.weight"] = _randn(rng, hidden, hidden)
        state[f"layers.{i}.1.1.weight"] = _randn(rng, 4 * hidden, hidden)
        state[f"layers.{i}.1.3.weight"] = _randn(rng, hidden, 4 * hidden)
    return state


def ip_attention(rng, unet):
    """{"{2k+1}.to_k_ip.weight": [channels, cross_attention_dim], ...} for the k-th attn2 of a torch UNet."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    to_k = [unet.get_submodule(n[: -len(".processor")]).to_k for n in names]
    return {f"{2 * k + 1}.to_{kv}_ip.weight": _randn(rng, t.out_features, t.in_features, scale=0.5)
            for k, t in enumerate(to_k) for kv in "kv"}


def save_published(state, path):
    if path.suffix == ".safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, sd in state.items() for k, v in sd.items()}, path)
    else:
        torch.save(state, path)
    return path


def torch_unet():
    return make_torch_unet(UNET)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    tm = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    folder = tmp_path_factory.mktemp("image_encoder")
    tm.save_pretrained(folder)
    model, params = FlaxCLIPVisionModelWithProjection.from_pretrained(folder, use_cache=False)
    return tm, model, params


def test_image_encoder_matches_transformers(encoder):
    tm, model, params = encoder
    pixels = np.random.default_rng(0).standard_normal((2, 3, 30, 30), np.float32)
    with torch.no_grad():
        ref = tm(torch.tensor(pixels), output_hidden_states=True)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params, pixels)
    assert ref.image_embeds.std() > 0.1
    np.testing.assert_allclose(out.image_embeds, ref.image_embeds.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), rtol=0, atol=TOL)
    assert len(out.hidden_states) == len(ref.hidden_states) == ENCODER["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_image_projection_matches_diffusers(variant):
    rng = np.random.default_rng(1)
    state = plain_image_proj(rng) if variant == "plain" else plus_image_proj(rng)
    reference = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, state, low_cpu_mem_usage=False)
    shape = (3, ENCODER["projection_dim"]) if variant == "plain" else (3, 26, ENCODER["hidden_size"])
    x = rng.standard_normal(shape, np.float32)
    with torch.no_grad():
        ref = reference.eval()(torch.tensor(x)).numpy()
    module, params = convert_image_proj({k: v.numpy() for k, v in state.items()})
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
    assert out.shape == ref.shape == (3, 4 if variant == "plain" else PLUS["queries"], CROSS)
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_unsupported_image_projection_is_named():
    with pytest.raises(CheckpointError, match="FaceID"):
        convert_image_proj({"proj.0.weight": np.zeros((8, 4)), "norm.weight": np.ones(4)})


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    tm = torch_unet()
    folder = tmp_path_factory.mktemp("unet")
    tm.save_pretrained(folder, safe_serialization=True)
    model, params = FlaxUNet2DConditionModel.from_pretrained(folder, use_cache=False)
    run = jax.jit(lambda p, x, t, ctx, embeds: model.apply(
        {"params": p["unet"]}, x, t, ctx, **ip_adapter_inputs(p, embeds)).sample)
    return types.SimpleNamespace(torch=tm, model=model, params={"unet": params}, run=run)


def test_cross_attention_order_is_diffusers():
    tm = torch_unet()
    names = [n for n in tm.attn_processors if n.endswith("attn2.processor")]
    paths = cross_attention_paths(FlaxUNet2DConditionModel.from_config(UNET))
    ours = [re.sub(r"_(\d+)", r".\1", ".".join(p)) for p in paths]
    assert ours == [n.replace(".processor", "") for n in names]
    assert len(ours) == 11


# per-layer scales as diffusers' set_ip_adapter_scale takes them; unnamed layers get 0
SCALE_DICT = {"down": {"block_1": 0.8}, "up": {"block_0": [0.0, 1.2], "block_1": 0.5}, "mid": 0.3}


@pytest.mark.parametrize("scale", [0.6, SCALE_DICT])
def test_scale_table_matches_diffusers(scale):
    tm = torch_unet()
    rng = np.random.default_rng(2)
    tm._load_ip_adapter_weights([{"image_proj": plain_image_proj(rng), "ip_adapter": ip_attention(rng, tm)}])
    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=tm), scale)
    expected = [p.scale for n, p in tm.attn_processors.items() if n.endswith("attn2.processor")]
    ours = ip_adapter_scale(FlaxUNet2DConditionModel.from_config(UNET), scale)
    np.testing.assert_array_equal(ours, np.asarray(expected, np.float32))


def test_bad_scales_are_refused():
    model = FlaxUNet2DConditionModel.from_config(UNET)
    with pytest.raises(ValueError, match="block_5"):
        ip_adapter_scale(model, {"down": {"block_5": 1.0}})
    with pytest.raises(ValueError, match="takes 1 or 2 scales"):
        ip_adapter_scale(model, {"up": {"block_0": [1.0, 1.0, 1.0]}})
    with pytest.raises(ValueError, match="unknown keys"):
        ip_adapter_scale(model, {"middle": 1.0})


def _image_embeds(rng, variant, batch=2):
    if variant == "plain":  # pooled projected embeddings, one image per prompt
        return rng.standard_normal((batch, 1, ENCODER["projection_dim"]), np.float32)
    tokens = (ENCODER["image_size"] // ENCODER["patch_size"]) ** 2 + 1  # penultimate hidden states
    return rng.standard_normal((batch, 1, tokens, ENCODER["hidden_size"]), np.float32)


# plain adapters saved as safetensors, "plus" ones as .bin; two adapters at once with a scale config each
@pytest.mark.parametrize("variants", [("plain",), ("plus",), ("plain", "plus")])
def test_unet_with_ip_adapter_matches_diffusers(unet, variants, tmp_path):
    rng = np.random.default_rng(3)
    states = [{"image_proj": plain_image_proj(rng) if v == "plain" else plus_image_proj(rng),
               "ip_adapter": ip_attention(rng, unet.torch)} for v in variants]
    tm = torch_unet()
    tm._load_ip_adapter_weights(states)
    params = unet.params
    for i, (variant, state) in enumerate(zip(variants, states)):
        path = save_published(state, tmp_path / f"ip-adapter-{i}{'.safetensors' if variant == 'plain' else '.bin'}")
        params = load_ip_adapter(params, tmp_path, weight_name=path.name, unet=unet.model)
    assert set(params) == {"unet", "ip_adapter"} and "ip_adapter" not in unet.params

    x = rng.standard_normal((2, 4, 8, 8), np.float32)
    ctx = rng.standard_normal((2, 5, CROSS), np.float32)
    t = np.array([3, 951])
    embeds = [_image_embeds(rng, v) for v in variants]
    with torch.no_grad():
        without = unet.torch(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    for scale in (0.6, SCALE_DICT) if len(variants) == 1 else ([0.6, SCALE_DICT],):
        IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=tm), scale)
        with torch.no_grad():
            ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                     added_cond_kwargs={"image_embeds": [torch.tensor(e) for e in embeds]}).sample.numpy()
        assert np.abs(ref - without).max() > 0.05, "the adapter barely changes the output; the test would prove little"
        out = unet.run(set_ip_adapter_scale(params, scale, unet=unet.model), x, t, ctx, embeds)
        np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_image_encoder_round_trips_to_transformers(encoder, tmp_path):
    tm, model, params = encoder
    model.save_pretrained(tmp_path, params, pytorch_format=True)
    again = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    for (name, theirs), ours in zip(tm.state_dict().items(), again.state_dict().values()):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=name)


def test_safetensors_and_bin_load_the_same(tmp_path):
    rng = np.random.default_rng(4)
    state = {"image_proj": plus_image_proj(rng), "ip_adapter": {"1.to_k_ip.weight": _randn(rng, 16, CROSS)}}
    a = read_ip_adapter(save_published(state, tmp_path / "a.safetensors"))
    b = read_ip_adapter(save_published(state, tmp_path / "a.bin"))
    for part in ("image_proj", "ip_adapter"):
        assert a[part].keys() == b[part].keys() == state[part].keys()
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k])


def test_adapter_for_another_unet_is_refused(unet, tmp_path):
    rng = np.random.default_rng(5)
    attn = ip_attention(rng, unet.torch)
    attn["3.to_k_ip.weight"] = _randn(rng, 8, CROSS)
    del attn["21.to_v_ip.weight"]
    path = save_published({"image_proj": plain_image_proj(rng), "ip_adapter": attn}, tmp_path / "x.safetensors")
    expected = r"(?s)missing \(1\): 21.to_v_ip.weight.*shape mismatches \(1\): 3.to_k_ip"
    with pytest.raises(CheckpointError, match=expected):
        load_ip_adapter(unet.params, path, unet=unet.model)


def with_plain_adapter(unet, rng, path, dtype=torch.float32):
    """The UNet's params with random plain IP-Adapter weights, saved to `path` and loaded from there."""
    state = {"image_proj": plain_image_proj(rng), "ip_adapter": ip_attention(rng, unet.torch)}
    state = {part: {k: v.to(dtype) for k, v in sd.items()} for part, sd in state.items()}
    return load_ip_adapter(unet.params, save_published(state, path), unet=unet.model)


def test_new_scales_and_images_do_not_recompile(unet, tmp_path):
    rng = np.random.default_rng(6)
    params = with_plain_adapter(unet, rng, tmp_path / "a.safetensors")
    x = rng.standard_normal((2, 4, 8, 8), np.float32)
    ctx = rng.standard_normal((2, 5, CROSS), np.float32)
    t = np.array([3, 951])
    first = unet.run(params, x, t, ctx, [_image_embeds(rng, "plain")])
    with count_compiles() as compiles:
        second = unet.run(set_ip_adapter_scale(params, SCALE_DICT, unet=unet.model), x, t, ctx,
                          [_image_embeds(rng, "plain")])
        zero = unet.run(set_ip_adapter_scale(params, 0.0, unet=unet.model), x, t, ctx, [_image_embeds(rng, "plain")])
    assert compiles == []
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3
    # scale 0 everywhere is the UNet without the adapter
    np.testing.assert_allclose(zero, unet.model.apply({"params": unet.params["unet"]}, x, t, ctx).sample, atol=1e-5)


def test_two_adapters_then_unload(unet, tmp_path):
    # published files are often float16; the adapter takes the UNet params' dtype
    params = with_plain_adapter(unet, np.random.default_rng(7), tmp_path / "a.safetensors", torch.float16)
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    two = load_ip_adapter(params, tmp_path / "a.safetensors", unet=unet.model)
    assert two["ip_adapter"]["scale"].shape == (11, 2) and len(two["ip_adapter"]["image_proj"]) == 2
    restored = unload_ip_adapter(two)
    assert "ip_adapter" not in restored
    assert jax.tree_util.tree_structure(restored["unet"]) == jax.tree_util.tree_structure(unet.params["unet"])


def test_tokens_without_adapter_weights_are_refused(unet):
    x, ctx, tokens = np.zeros((2, 4, 8, 8), np.float32), np.ones((2, 5, CROSS), np.float32), [np.ones((2, 4, CROSS))]
    with pytest.raises(ValueError, match="params hold fewer IP-Adapters"):
        unet.model.apply({"params": unet.params["unet"]}, x, 1, ctx, ip_hidden_states=tokens)
