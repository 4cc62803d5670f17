"""SDXL single files (Stability's SGM layout) against diffusers' `from_single_file`: base, refiner and
9-channel inpainting.

Each tiny random SDXL pipeline is written as one file with flax_inpaint's inverse table; diffusers'
StableDiffusionXL*Pipeline.from_single_file(..., config=<the tiny folder>) loads it back to exactly the
original weights (so the table is checked against diffusers' own mapping). Ours must load every tensor
equal to diffusers' and give the same UNet and text-encoder outputs: fp32, max abs diff <= 1e-4 (the same
math in another framework; the outputs are O(1)).
"""
import re

import jax
import numpy as np
import pytest
import torch

import tiny_loaders as tl
from flax_inpaint import FlaxCLIPTextModelWithProjection, FlaxStableDiffusionInpaintPipeline, FlaxUNet2DConditionModel
from flax_inpaint.io import CheckpointError
from flax_inpaint.loaders import single_file as sf
from flax_inpaint.models.conversion import to_torch_state_dict

TOL = 1e-4


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """kind -> (diffusers folder, torch pipeline, single file), written once."""
    root = tmp_path_factory.mktemp("sdxl-single")
    out = {}
    for kind in tl.SDXL_KINDS:
        folder, pipe = tl.make_sdxl(root, kind)
        out[kind] = folder, pipe, tl.write_file(tl.sdxl_original_state(pipe), root / f"sdxl-{kind}.safetensors")
    return out


def assert_same_tensors(ours: dict, ref: dict, what: str):
    assert set(ours) == set(ref), f"{what}: keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{what}: {k}")


def components(pipe):
    return [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c) is not None]


def unet_inputs(unet_config, n_ids: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, unet_config.in_channels, 8, 8), np.float32)
    ctx = rng.standard_normal((2, 7, unet_config.cross_attention_dim), np.float32)
    added = {"text_embeds": rng.standard_normal((2, tl.POOLED), np.float32),
             "time_ids": rng.uniform(0, 128, (2, n_ids)).astype(np.float32)}
    return x, np.array([3, 951]), ctx, added


@pytest.mark.parametrize("kind", list(tl.SDXL_KINDS))
def test_sdxl_file_matches_diffusers(sdxl_files, kind):
    folder, pipe, path = sdxl_files[kind]
    ref = tl.SDXL_KINDS[kind][0].from_single_file(str(path), config=str(folder))
    names = components(pipe)
    assert names == components(ref)
    for name in names:  # our writer put every tensor where diffusers' reader expects it
        assert_same_tensors(tl.diffusers_state(getattr(ref, name)), tl.diffusers_state(getattr(pipe, name)), name)

    kwargs, params = sf.load_pipeline(path, folder, sdxl=True)
    for name in names:
        assert_same_tensors(to_torch_state_dict(params[name]), tl.diffusers_state(getattr(ref, name)), name)
    assert (kwargs["text_encoder"] is None) == (kind == "refiner") == (kwargs["tokenizer"] is None)
    assert kwargs["tokenizer_2"].pad_token == "!" and type(kwargs["scheduler"]).__name__ == "FlaxEulerDiscreteScheduler"
    assert kwargs["vae"].scaling_factor == 0.13025

    unet = kwargs["unet"]
    assert (unet.in_channels, unet.addition_embed_type) == (tl.SDXL_KINDS[kind][2], "text_time")
    x, t, ctx, added = unet_inputs(ref.unet.config, 5 if kind == "refiner" else 6)
    with torch.no_grad():
        expected = ref.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                            added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()}).sample.numpy()
    got = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx, added).sample)(params["unet"])
    assert expected.std() > 0.05
    np.testing.assert_allclose(np.asarray(got), expected, atol=TOL, rtol=0)

    ids = np.asarray(pipe.tokenizer_2(["a red cat", "cat"], padding="max_length").input_ids)
    for name in names[2:]:
        te = kwargs[name]
        with torch.no_grad():
            want = getattr(ref, name)(torch.tensor(ids), output_hidden_states=True)
        out = te.apply({"params": params[name]}, ids, output_hidden_states=True)
        np.testing.assert_allclose(out.hidden_states[-2], want.hidden_states[-2].numpy(), atol=TOL, rtol=0)
        if name == "text_encoder_2":  # the pooled, projected embedding SDXL's add_embedding takes
            np.testing.assert_allclose(out.text_embeds, want.text_embeds.numpy(), atol=TOL, rtol=0)


def test_sdxl_model_classes_read_their_component(sdxl_files):
    """The SDXL UNet and text_encoder_2 classes read their part of a pipeline file (as diffusers' model
    classes do with config=<folder>, subfolder=...)."""
    from diffusers import UNet2DConditionModel

    folder, pipe, path = sdxl_files["inpaint"]
    ref = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet")
    unet, params = FlaxUNet2DConditionModel.from_single_file(path, config=folder)
    assert unet.in_channels == 9 and unet.projection_class_embeddings_input_dim == tl.POOLED + 6 * tl.TIME_DIM
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(ref), "unet")
    te, te_params = FlaxCLIPTextModelWithProjection.from_single_file(path, config=folder)
    assert te.projection_dim == tl.POOLED
    assert_same_tensors(to_torch_state_dict(te_params), tl.diffusers_state(pipe.text_encoder_2), "text_encoder_2")


class SDXLComponents(sf.FromSingleFileMixin):
    """A pipeline class taking SDXL's components (as the SDXL pipelines' constructors do)."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, dtype=None):
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2 = (text_encoder, text_encoder_2,
                                                                                    tokenizer, tokenizer_2)


def test_pipeline_classes_with_text_encoder_2_load_sdxl_files(sdxl_files):
    """from_single_file on a class whose constructor takes text_encoder_2 reads the SDXL components; the
    refiner's file leaves text_encoder and tokenizer None; tokenizer_2= replaces the built one."""
    folder, pipe, path = sdxl_files["refiner"]
    ours, params = SDXLComponents.from_single_file(path, config=folder, tokenizer_2=pipe.tokenizer_2)
    assert ours.text_encoder is None and ours.tokenizer is None and ours.tokenizer_2 is pipe.tokenizer_2
    assert set(params) == {"unet", "vae", "text_encoder_2", "scheduler"}
    assert_same_tensors(to_torch_state_dict(params["text_encoder_2"]), tl.diffusers_state(pipe.text_encoder_2),
                        "text_encoder_2")


def test_sdxl_and_sd_pipelines_refuse_each_others_files(sdxl_files, tmp_path):
    _, pipe, path = sdxl_files["base"]
    with pytest.raises(CheckpointError, match="is an SDXL checkpoint .* load it with an SDXL pipeline"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path)
    sd_folder, sd_pipe = tl.make_sd(tmp_path, "sd1", 9)
    sd_path = tl.write_file(tl.original_state(sd_pipe, "sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(CheckpointError, match="not an SDXL one; load it with an SD 1.x/2.x pipeline"):
        sf.load_pipeline(sd_path, sd_folder, sdxl=True)


def test_sdxl_unused_and_missing_tensors_are_listed(sdxl_files, tmp_path):
    folder, pipe, _ = sdxl_files["base"]
    state = tl.sdxl_original_state(pipe)
    del state[sf.UNET_PREFIX + "label_emb.0.2.bias"]
    state[sf.SDXL_OPENCLIP_PREFIX + "stray"] = np.zeros(3, np.float32)
    path = tl.write_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        sf.load_pipeline(path, folder, sdxl=True)
    assert "model.diffusion_model.label_emb.0.2.bias (for unet add_embedding.linear_2.bias)" in str(err.value)
    assert sf.SDXL_OPENCLIP_PREFIX + "stray" in str(err.value)


# ------------------------------------------------------------------ the released SDXL sizes, without config=
# Stability's sd_xl_base.yaml / sd_xl_refiner.yaml (network_config), the input of diffusers' own config
# builders, which serve as the reference for what the family defaults and the tensors give.
SGM = {
    "base": dict(adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
                 num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
                 transformer_depth=[1, 2, 10], context_dim=2048, num_classes="sequential"),
    "refiner": dict(adm_in_channels=2560, in_channels=4, out_channels=4, model_channels=384,
                    attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                    use_linear_in_transformer=True, transformer_depth=4, context_dim=[1280] * 4,
                    num_classes="sequential"),
}
VAE_DDCONFIG = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4)
# The released text encoders' configs (SDXL's text_encoder: CLIP ViT-L; text_encoder_2: OpenCLIP ViT-bigG), with
# their token ids (eos_token_id=2, written before transformers' fix: CLIP then pools at the highest token id).
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", **TOKEN_IDS)
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu",
            projection_dim=1280, **TOKEN_IDS)


def zero_state(model_class, config, prefix, layout_kind, component, keep=lambda k: True):
    """(original-layout zero-stride tensors of a torch model built on the meta device, its diffusers shapes)."""
    with torch.device("meta"):
        model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if keep(k)}
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    cfg = config if isinstance(config, dict) else {}
    return sf.to_original(zeros, sf.Layout(component, prefix, layout_kind), cfg), shapes


@pytest.fixture(scope="module", params=[("base", 4), ("base", 9), ("refiner", 4)],
                ids=["base", "inpainting", "refiner"])
def released(request):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind, channels = request.param
    original = {"model": {"params": {"scale_factor": 0.13025,
                                     "network_config": {"params": {**SGM[kind], "in_channels": channels}},
                                     "first_stage_config": {"params": {"ddconfig": VAE_DDCONFIG}}}}}
    openclip = sf.SDXL_OPENCLIP_PREFIX if kind == "base" else sf.REFINER_OPENCLIP_PREFIX
    probe = {openclip + "transformer.resblocks.9.mlp.c_proj.bias": torch.empty(1280, device="meta"),
             sf.UNET_PREFIX + "input_blocks.0.0.weight": torch.empty((320, channels, 3, 3), device="meta")}
    refs = {"unet": create_unet_diffusers_config_from_ldm(original, probe),
            "vae": create_vae_diffusers_config_from_ldm(original, probe), "text_encoder_2": BIGG}
    state, expected = {}, {}
    for name, cls, prefix, layout_kind in (("unet", UNet2DConditionModel, sf.UNET_PREFIX, "unet"),
                                           ("vae", AutoencoderKL, sf.VAE_PREFIX, "vae")):
        part, expected[name] = zero_state(cls, refs[name], prefix, layout_kind, name)
        state.update(part)
    # The text encoders without their q/k/v (fusing those into OpenCLIP's in_proj would allocate them): the
    # tensors their configs are read from.
    no_qkv = lambda k: not re.search(r"self_attn\.[qkv]_proj", k)  # noqa: E731
    texts = [("text_encoder_2", CLIPTextModelWithProjection, openclip, "openclip", BIGG)]
    if kind == "base":
        refs["text_encoder"] = CLIP_L
        texts.append(("text_encoder", CLIPTextModel, sf.SDXL_CLIP_PREFIX, "clip", CLIP_L))
    for name, cls, prefix, layout_kind, config in texts:
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)
        part, _ = zero_state(cls, config, prefix, layout_kind, name, no_qkv)
        state.update(part)
    return kind, channels, state, refs, expected


def test_released_sdxl_sizes_infer_diffusers_configs(released):
    kind, channels, state, refs, _ = released
    layouts = sf.find_layouts(state)
    family = sf.family_of(state, layouts)
    assert family.name == ("SDXL" if kind == "base" else "SDXL refiner")
    assert set(layouts) == set(refs)
    for name in refs:
        ours = sf.component_config(state, layouts[name], None, family, "file")
        for key, value in refs[name].items():
            if key != "sample_size" and (key in ours or value is not None):
                assert sf._same(ours.get(key), value), (name, key, ours.get(key), value)
    assert (refs["unet"]["sample_size"], refs["vae"]["sample_size"]) == (128, 1024) == (
        family.image_size(channels, None) // 8, family.image_size(channels, None))
    assert family.scheduler(channels, None)["_class_name"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("released", [("base", 4), ("refiner", 4)], ids=["base", "refiner"], indirect=True)
def test_released_sdxl_unet_and_vae_convert_every_tensor(released):
    """Our table maps every UNet and VAE tensor of a released-size file onto every parameter (names and
    shapes), and diffusers' reader agrees on the UNet's names (the inpainting UNet differs in conv_in only)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, _, state, refs, expected = released
    layouts = sf.find_layouts(state)
    family = sf.family_of(state, layouts)
    problems, used = sf.Problems(), set()
    for name in ("unet", "vae"):
        config = sf.component_config(state, layouts[name], None, family, "file")
        model = sf._model_class(name).from_config(config)
        got = sf.to_diffusers(state, layouts[name], config, sf.expected_keys(model), problems, used)
        assert {k: v.shape for k, v in got.items()} == expected[name], name
    problems.unused += sf.unused_keys(state, used, [sf.UNET_PREFIX, sf.VAE_PREFIX], layouts, {})
    problems.raise_if_any("file")
    meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items() if k.startswith(sf.UNET_PREFIX)}
    assert {k: tuple(v.shape) for k, v in convert_ldm_unet_checkpoint(meta, refs["unet"]).items()} == expected["unet"]
