"""SDXL's models against their PyTorch references: tiny random SDXL-shaped models saved as users have
them (diffusers / transformers save_pretrained, safetensors; sharded and fp16 variants), loaded through
our from_pretrained, same inputs. fp32 max abs diff <= 1e-4 (VAE: relative to the output's max)."""
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from flax_inpaint import FlaxCLIPTextModelWithProjection, FlaxControlNetModel, FlaxUNet2DConditionModel
from flax_inpaint.loaders.ip_adapter import ip_adapter_inputs, load_ip_adapter, set_ip_adapter_scale
from flax_inpaint.models import FlaxAutoencoderKL, FlaxCLIPTextModelWithProjectionOutput
from flax_inpaint.models.conversion import to_torch_state_dict
from flax_inpaint.models.unet import cross_attention_paths

TOL = 1e-4
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
POOLED = 20  # text_encoder_2's projection_dim (SDXL: 1280)

# SDXL base's layout at toy widths: a resnet-only first level, deeper transformers further down,
# linear projections, per-level heads, size conditioning; upcast_attention null as in its config.json.
SDXL = dict(
    block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=24,
    use_linear_projection=True, upcast_attention=None, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, sample_size=16,
)
UNETS = {
    "base": (SDXL, 6),
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: 9 input channels; and per-layer transformer
    # depths (asymmetric UNets such as SSD-1B), which need the reversed list for the up blocks.
    "inpaint9_per_layer_depths": (
        dict(SDXL, in_channels=9, transformer_layers_per_block=(1, (1, 2), 2),
             reverse_transformer_layers_per_block=((2, 1, 1), (1, 2, 1), 1)),
        6,
    ),
    # The refiner: a resnet-only last level too, one transformer depth, another context width, and
    # five size values (aesthetic score instead of the target size).
    "refiner": (
        dict(SDXL, block_out_channels=(16, 32, 32, 32), attention_head_dim=(2, 4, 4, 8),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=2, cross_attention_dim=16,
             projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM),
        5,
    ),
}


def perturb_norms(model, seed=0):
    """Norms start as identity in torch; move them so a swapped scale and bias would show."""
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def conditioning(batch, n_ids, seed=0):
    """SDXL's added conditioning: pooled text embeddings and size values like (1024, 1024, 0, 0, 1024, 1024)."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((batch, POOLED), np.float32)
    sizes = np.array([1024, 1024, 0, 0, 1024, 1024][:n_ids], np.float32)
    ids = sizes + rng.integers(0, 300, (batch, n_ids)).astype(np.float32)
    return {"text_embeds": text, "time_ids": ids}


def unet_inputs(config, hw, n_ids, batch=2):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, config.in_channels, *hw), np.float32)
    ctx = rng.standard_normal((batch, 7, config.cross_attention_dim), np.float32)
    return x, np.array([3, 951]), ctx, conditioning(batch, n_ids)


def torch_tensors(d):
    return {k: torch.tensor(v) for k, v in d.items()}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_parity(name, tmp_path):
    config, n_ids = UNETS[name]
    torch.manual_seed(0)
    tm = perturb_norms(UNet2DConditionModel(**config).eval())
    tm.save_pretrained(tmp_path, safe_serialization=True)
    model, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path, use_cache=False)
    x, t, ctx, added = unet_inputs(tm.config, (16, 8), n_ids)
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), added_cond_kwargs=torch_tensors(added)).sample
        ref = ref.numpy()
        other = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                   added_cond_kwargs=torch_tensors(conditioning(2, n_ids, seed=5))).sample.numpy()
    assert ref.std() > 0.05 and np.abs(ref - other).max() > 1e-2, "the added conditioning must matter"
    out = jax.jit(lambda p, *a: model.apply({"params": p}, *a).sample)(params, x, t, ctx, added)
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_ip_adapter_on_per_layer_depths(tmp_path):
    """IP-Adapter scales and weights land on the right attn2 layers when transformer depths differ per
    layer (diffusers' processor order; each attentions_i takes its own rows of the scale table)."""
    from diffusers.loaders import IPAdapterMixin

    from test_ip_adapter import ip_attention, plain_image_proj, save_published

    config, n_ids = UNETS["inpaint9_per_layer_depths"]
    torch.manual_seed(0)
    tm = perturb_norms(UNet2DConditionModel(**config).eval())
    names = [n.removesuffix(".processor") for n in tm.attn_processors if n.endswith("attn2.processor")]
    model = FlaxUNet2DConditionModel.from_config(config)
    assert [re.sub(r"_(\d+)", r".\1", ".".join(p)) for p in cross_attention_paths(model)] == names
    tm.save_pretrained(tmp_path / "unet", safe_serialization=True)
    model, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "unet", use_cache=False)
    rng = np.random.default_rng(3)
    state = {"image_proj": plain_image_proj(rng), "ip_adapter": ip_attention(rng, tm)}
    params = load_ip_adapter({"unet": params}, tmp_path, weight_name=save_published(state, tmp_path / "ip.bin").name,
                             unet=model)
    tm._load_ip_adapter_weights([state])
    scale = {"down": {"block_1": [0.4, 1.1]}, "up": {"block_0": [0.0, 1.2, 0.7], "block_1": 0.5}, "mid": 0.3}
    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=tm), scale)
    params = set_ip_adapter_scale(params, scale, unet=model)
    x, t, ctx, added = unet_inputs(tm.config, (8, 8), n_ids)
    embeds = [rng.standard_normal((2, 1, 20), np.float32)]
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                 added_cond_kwargs={**torch_tensors(added), "image_embeds": [torch.tensor(embeds[0])]}).sample.numpy()
    out = jax.jit(lambda p, e: model.apply({"params": p["unet"]}, x, t, ctx, added, **ip_adapter_inputs(p, e)).sample)
    np.testing.assert_allclose(out(params, embeds), ref, rtol=0, atol=TOL)
    assert np.abs(np.asarray(out(params, [embeds[0] + 1])) - ref).max() > 1e-2, "the image tokens must matter"


def test_unet_added_cond_kwargs_are_checked():
    model = FlaxUNet2DConditionModel.from_config(SDXL)
    x, t, ctx, added = unet_inputs(model, (8, 8), 6)

    def shapes(**kw):
        return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx, **kw))

    assert shapes(added_cond_kwargs=added)  # the six size values of the base model
    with pytest.raises(ValueError, match=r"added_cond_kwargs has \[\]; .*'text_time' takes exactly"):
        shapes()
    with pytest.raises(ValueError, match=r"added_cond_kwargs has \['text_embeds'\]"):
        shapes(added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        shapes(added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :5]})


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(addition_embed_type="text"), "addition_embed_type"),
        (dict(addition_time_embed_dim=None), "addition_time_embed_dim"),
        (dict(transformer_layers_per_block=(1, (1, 2), 2)), "reverse_transformer_layers_per_block"),
        (dict(transformer_layers_per_block=(1, (1, 2), 2), reverse_transformer_layers_per_block=((2, 1), 1, 1)),
         r"reverse_transformer_layers_per_block: the entry \[2, 1\] must .* 3 layers"),
        (dict(num_attention_heads=(2, 4, 8)), "num_attention_heads"),
    ],
)
def test_unet_unsupported_sdxl_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        FlaxUNet2DConditionModel.from_config({**SDXL, **overrides})


def test_unet_nested_lists_from_config_json_are_hashable(tmp_path):
    """config.json holds nested lists; the model keeps tuples, so jit can take it as a static argument."""
    config = {**UNETS["inpaint9_per_layer_depths"][0]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = FlaxUNet2DConditionModel.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert model.transformer_layers_per_block == (1, (1, 2), 2)
    assert hash(model) == hash(FlaxUNet2DConditionModel.from_config(config))


def test_sharded_fp16_variant_folder(tmp_path):
    """diffusers' save_pretrained with shards and variant="fp16" (how SDXL folders ship their weights):
    `diffusion_pytorch_model.safetensors.index.fp16.json` naming `...fp16-0000k-of-0000n` shards."""
    torch.manual_seed(0)
    tm = perturb_norms(UNet2DConditionModel(**SDXL).eval())
    x, t, ctx, added = unet_inputs(tm.config, (8, 8), 6)

    def reference():
        with torch.no_grad():
            return tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                      added_cond_kwargs=torch_tensors(added)).sample.float().numpy()

    ref32 = reference()
    tm.save_pretrained(tmp_path / "fp32", safe_serialization=True, max_shard_size="100KB")
    tm.half().save_pretrained(tmp_path / "fp16", safe_serialization=True, max_shard_size="100KB", variant="fp16")
    tm.float()
    ref16 = reference()  # the fp16-rounded weights, widened: what our fp16 load computes with
    assert (tmp_path / "fp32" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list((tmp_path / "fp16").glob("*.fp16-0*.safetensors"))) > 2

    for folder, variant, ref in (("fp32", None, ref32), ("fp16", "fp16", ref16)):
        model, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / folder, variant=variant, use_cache=False)
        assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
        out = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx, added).sample)(params)
        np.testing.assert_allclose(out, ref, rtol=0, atol=TOL, err_msg=folder)
    assert np.abs(ref16 - ref32).max() > 1e-6  # the variant's own weights were read


# ----------------------------------------------------------------------------- ControlNet

CONTROLNETS = {
    # diffusers/controlnet-*-sdxl-1.0 layout at toy widths.
    "sdxl": dict(
        block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=24,
        use_linear_projection=True, upcast_attention=None, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
        conditioning_embedding_out_channels=(8, 16),
    ),
}
# Heads given as num_attention_heads (which diffusers' ControlNet accepts) and per-layer depths.
CONTROLNETS["heads_per_layer_depths"] = dict(
    CONTROLNETS["sdxl"], num_attention_heads=(1, 2, 4), transformer_layers_per_block=(1, (2, 1), 1),
)


@pytest.mark.parametrize("name", list(CONTROLNETS))
def test_controlnet_parity(name, tmp_path):
    torch.manual_seed(0)
    tm = ControlNetModel(**CONTROLNETS[name]).eval()
    with torch.no_grad():  # torch's default init for the zero convolutions, so every weight matters
        for m in [*tm.controlnet_down_blocks, tm.controlnet_mid_block, tm.controlnet_cond_embedding.conv_out]:
            m.reset_parameters()
    perturb_norms(tm).save_pretrained(tmp_path, safe_serialization=True)
    model, params = FlaxControlNetModel.from_pretrained(tmp_path, use_cache=False)
    x, t, ctx, added = unet_inputs(tm.config, (8, 8), 6)
    cond = np.random.default_rng(2).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        out = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(cond), conditioning_scale=0.7,
                 added_cond_kwargs=torch_tensors(added))
    ref = [r.numpy() for r in (*out.down_block_res_samples, out.mid_block_res_sample)]
    assert min(r.std() for r in ref) > 0.01

    @jax.jit
    def run(p, added):
        out = model.apply({"params": p}, x, t, ctx, cond, 0.7, added_cond_kwargs=added)
        return [*out.down_block_res_samples, out.mid_block_res_sample]

    ours = run(params, added)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    moved = run(params, conditioning(2, 6, seed=5))
    assert np.abs(np.asarray(moved[-1]) - ref[-1]).max() > 1e-2, "the added conditioning must matter"


def test_controlnet_from_sdxl_unet_matches_diffusers(tmp_path):
    """from_unet mirrors the SDXL settings (add embedding included) as diffusers' from_unet does."""
    torch.manual_seed(0)
    tunet = UNet2DConditionModel(**SDXL).eval()
    tunet.save_pretrained(tmp_path, safe_serialization=True)
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(tmp_path, use_cache=False)
    model, params = FlaxControlNetModel.from_unet(unet, unet_params, conditioning_embedding_out_channels=(8, 16))
    ref = ControlNetModel.from_unet(tunet, conditioning_embedding_out_channels=(8, 16))
    as_tuple = {k: tuple(v) if isinstance(v, list) else v for k, v in ref.config.items()}
    assert model.config == {k: as_tuple[k] for k in model.config}
    ours = to_torch_state_dict(params)
    assert set(ours) == set(ref.state_dict())
    for k in ("add_embedding.linear_1.weight", "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight"):
        np.testing.assert_array_equal(ours[k], ref.state_dict()[k].numpy(), err_msg=k)


# ----------------------------------------------------------------------------- text encoder 2

VOCAB = 100


@pytest.fixture(scope="module")
def text_encoder_2(tmp_path_factory):
    """SDXL's text_encoder_2 layout (gelu, projection, legacy eos_token_id=2) at toy widths."""
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        hidden_act="gelu", projection_dim=POOLED, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        max_position_embeddings=16,
    )
    tm = CLIPTextModelWithProjection(config).eval()
    folder = tmp_path_factory.mktemp("text_encoder_2")
    tm.save_pretrained(folder)
    return tm, folder


def test_clip_with_projection_parity(text_encoder_2):
    tm, folder = text_encoder_2
    model, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder, use_cache=False)
    ids = np.zeros((2, 12), np.int64)  # bos, words, eos (the largest id), "!"-style padding (id 0)
    rng = np.random.default_rng(0)
    for row, n in enumerate((5, 9)):
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = 0, rng.integers(3, VOCAB - 1, n - 2), VOCAB - 1
    with torch.no_grad():
        ref = tm(torch.tensor(ids), output_hidden_states=True)
    out = jax.jit(lambda p: model.apply({"params": p}, ids, output_hidden_states=True))(params)
    assert isinstance(out, FlaxCLIPTextModelWithProjectionOutput)
    np.testing.assert_allclose(out.text_embeds, ref.text_embeds.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), rtol=0, atol=TOL)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    # SDXL conditions on the penultimate layer's output, without the final layer norm.
    np.testing.assert_allclose(out["hidden_states"][-2], ref.hidden_states[-2].numpy(), rtol=0, atol=TOL)
    text_embeds, last = model.apply({"params": params}, ids, return_dict=False)
    np.testing.assert_array_equal(text_embeds, out.text_embeds)


def test_clip_with_projection_saves_for_transformers(text_encoder_2, tmp_path):
    tm, folder = text_encoder_2
    model, params = FlaxCLIPTextModelWithProjection.from_pretrained(folder, use_cache=False)
    model.save_pretrained(tmp_path, params, pytorch_format=True)
    back = CLIPTextModelWithProjection.from_pretrained(tmp_path).state_dict()
    for k, v in tm.state_dict().items():
        if not k.endswith("position_ids"):
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="projection_dim"):
        FlaxCLIPTextModelWithProjection(projection_dim=None)


def test_tokenizer_2_pads_with_the_folders_pad_token(tmp_path):
    """SDXL's tokenizer_2 folder sets pad_token "!" (tokenizer pads with <|endoftext|>): loading the
    folder keeps it, so prompts pad with the id text_encoder_2 was trained with."""
    from flax_inpaint.loaders.single_file import clip_tokenizer

    clip_tokenizer(pad_token="!").save_pretrained(tmp_path / "tokenizer_2")
    clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2")
    tok1 = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0 and tok1.pad_token_id == 49407
    ids = tok2("a cat", padding="max_length", max_length=tok2.model_max_length).input_ids
    assert ids[:4] == tok1("a cat").input_ids and set(ids[4:]) == {0} and len(ids) == 77


# ----------------------------------------------------------------------------- VAE

SDXL_VAE = dict(  # stabilityai/sdxl-vae's config at toy widths
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
    scaling_factor=0.13025, force_upcast=True, sample_size=1024,
)


def test_sdxl_vae_parity_and_upcast(tmp_path):
    torch.manual_seed(0)
    tm = perturb_norms(AutoencoderKL(**SDXL_VAE).eval())
    tm.save_pretrained(tmp_path, safe_serialization=True)
    vae, params = FlaxAutoencoderKL.from_pretrained(tmp_path, use_cache=False)
    assert vae.scaling_factor == 0.13025 and vae.force_upcast and not vae.needs_upcasting
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        mean = tm.encode(torch.tensor(x)).latent_dist.mean
        ref_mean, ref_dec = mean.numpy(), tm.decode(mean).sample.numpy()

    @jax.jit
    def run(p, x):
        mean = vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean
        return jnp.transpose(mean, (0, 3, 1, 2)), vae.apply({"params": p}, mean, method=vae.decode).sample

    for ours, ref in zip(run(params, x), (ref_mean, ref_dec)):
        assert np.abs(np.asarray(ours) - ref).max() <= TOL * np.abs(ref).max()

    # force_upcast: a bf16 VAE decodes in float32 through upcasted(), from bf16 params as they are.
    half, half_params = FlaxAutoencoderKL.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          use_cache=False)
    assert half.needs_upcasting and half.upcasted().runtime.dtype == jnp.float32
    assert half.upcasted().runtime.param_dtype == jnp.bfloat16
    latents = jnp.asarray(ref_mean, jnp.bfloat16)
    up = half.upcasted()
    decoded = up.apply({"params": half_params}, latents, method=up.decode).sample
    widened = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), half_params)
    exact = vae.apply({"params": widened}, latents.astype(jnp.float32), method=vae.decode).sample
    assert decoded.dtype == jnp.float32
    np.testing.assert_array_equal(decoded, exact)
    fix = half.clone(force_upcast=False)  # madebyollin/sdxl-vae-fp16-fix: runs in half precision
    assert not fix.needs_upcasting and fix.upcasted() is fix
