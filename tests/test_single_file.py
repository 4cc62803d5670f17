"""Single-file checkpoints (original Stable Diffusion layout) against diffusers' `from_single_file`.

Each tiny random model is written as one file with flax_inpaint's inverse table; diffusers loads it
(`from_single_file(..., config=<the tiny diffusers folder>)`) back to exactly the original weights, which
checks that table against diffusers' own mapping. Ours must then load every tensor equal to diffusers'
and produce the same images (fp32, 1e-3 max abs on values in [0, 1]).
"""
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import (
    FlaxControlNetModel,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxUNet2DConditionModel,
)
from flax_inpaint.loaders import families
from flax_inpaint.loaders import single_file as sf
from flax_inpaint.io import CheckpointError
from flax_inpaint.models.conversion import to_torch_state_dict

ATOL = 1e-3
STEPS = 3
COMPONENTS = ("unet", "vae", "text_encoder")
CASES = {  # id: (family, in_channels, prediction_type, file suffix)
    "sd1-inpaint-safetensors": ("sd1", 9, "epsilon", ".safetensors"),
    "sd1-ckpt": ("sd1", 4, "epsilon", ".ckpt"),
    "sd2-inpaint": ("sd2", 9, "epsilon", ".safetensors"),
    "sd2-v": ("sd2", 4, "v_prediction", ".safetensors"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """id -> (diffusers folder, torch pipeline, single file) for every case, written once."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, (family, channels, prediction, suffix) in CASES.items():
        folder, pipe = tl.make_sd(root, family, channels, prediction)
        path = tl.write_file(tl.original_state(pipe, family), root / f"{name}{suffix}")
        out[name] = folder, pipe, path
    return out


def assert_same_tensors(ours: dict, ref: dict, what: str):
    assert set(ours) == set(ref), f"{what}: keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{what}: {k}")


def diffusers_images(pipe, in_channels, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    with torch.no_grad():
        return pipe("a red cat", image=image, mask_image=mask, height=tl.SIZE, width=tl.SIZE,
                    num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images


def diffusers_noise(in_channels: int) -> np.ndarray:
    """diffusers' initial noise from Generator().manual_seed(0): a 4-channel UNet encodes the image first."""
    g = torch.Generator().manual_seed(0)
    if in_channels == 4:
        torch.randn((1, *tl.LATENT), generator=g)
    return torch.randn((1, *tl.LATENT), generator=g).numpy()


def our_images(pipe, params, in_channels, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    return pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), height=tl.SIZE, width=tl.SIZE,
                        num_inference_steps=STEPS, latents=diffusers_noise(in_channels), output_type="np",
                        **kwargs).images


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_file_matches_diffusers(files, case):
    family, channels, prediction, _ = CASES[case]
    folder, pipe, path = files[case]
    ref = StableDiffusionInpaintPipeline.from_single_file(str(path), config=str(folder), safety_checker=None)
    if prediction != "epsilon":
        ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config, prediction_type=prediction)
    for name in COMPONENTS:  # our writer put every tensor where diffusers' reader expects it
        assert_same_tensors(tl.diffusers_state(getattr(ref, name)), tl.diffusers_state(getattr(pipe, name)), name)

    # The v model's folder says epsilon: the override must win, as it does for diffusers above.
    ours, params = FlaxStableDiffusionInpaintPipeline.from_single_file(
        path, config=folder, prediction_type=None if prediction == "epsilon" else prediction)
    assert ours.scheduler.prediction_type == prediction and ours.unet.in_channels == channels
    for name in COMPONENTS:
        assert_same_tensors(to_torch_state_dict(params[name]), tl.diffusers_state(getattr(ref, name)), name)

    expected = diffusers_images(ref, channels)
    got = our_images(ours, params, channels)
    assert expected.shape == got.shape == (1, tl.SIZE, tl.SIZE, 3)
    assert expected.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def controlnet_files(files, tmp_path_factory):
    """A ControlNet as a standalone original-layout file, and inside a whole-pipeline file (the layout of
    the original ControlNet releases); its diffusers folder sits in the pipeline folder as `controlnet/`."""
    root = tmp_path_factory.mktemp("cn")
    folder, pipe, _ = files["sd1-inpaint-safetensors"]
    net = tl.make_controlnet()
    net.save_pretrained(folder / "controlnet", safe_serialization=True)
    layout = sf.Layout("controlnet", sf.CONTROLNET_PREFIX, "controlnet")
    alone = tl.write_file(sf.to_original(tl.diffusers_state(net), layout, tl.torch_config(net)),
                          root / "control_sd15_tiny.safetensors")
    whole = tl.write_file(tl.original_state(pipe, "sd1", controlnet=net), root / "sd_with_control.safetensors")
    return folder, pipe, net, alone, whole


def test_controlnet_file_matches_diffusers(controlnet_files):
    folder, pipe, net, alone, whole = controlnet_files
    ref_net = ControlNetModel.from_single_file(str(alone), config=str(folder / "controlnet"))
    assert_same_tensors(tl.diffusers_state(ref_net), tl.diffusers_state(net), "controlnet")
    model, params = FlaxControlNetModel.from_single_file(alone, config=folder / "controlnet")
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(ref_net), "controlnet")

    # The ControlNet pipeline: the SD file and the ControlNet file, or one file holding both.
    sd_file = tl.write_file(tl.original_state(pipe, "sd1"), alone.parent / "sd.safetensors")
    ours, ours_params = FlaxStableDiffusionControlNetInpaintPipeline.from_single_file(sd_file, config=folder,
                                                                                      controlnet=alone)
    both, both_params = FlaxStableDiffusionControlNetInpaintPipeline.from_single_file(whole, config=folder)
    for name in (*COMPONENTS, "controlnet"):
        assert_same_tensors(to_torch_state_dict(both_params[name]), to_torch_state_dict(ours_params[name]), name)

    ref = StableDiffusionControlNetInpaintPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=ref_net,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    control, _ = tiny_sd.sample_image_and_mask(tl.SIZE, seed=1)
    expected = diffusers_images(ref, 9, control_image=control)
    ids, masked, mask_in, image_in, control_in = ours.prepare_inputs("a red cat", image, mask, control)
    got = ours(ids, mask_in, masked, ours_params, jax.random.key(0), num_inference_steps=STEPS,
               control_image=control_in, image=image_in, latents=diffusers_noise(9)).images
    assert expected.std() > 0.02
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ the released families at full size
# The original configs of the released checkpoints (v1-inference.yaml, v2-inference-v.yaml), the input
# of diffusers' own config builders, which serve as the reference for what we infer from tensors.
LDM_UNET = dict(model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                transformer_depth=1, out_channels=4)
VAE_DDCONFIG = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, in_channels=3, out_ch=3, z_channels=4)
ORIGINAL = {
    "sd1": dict(num_heads=8, context_dim=768),
    "sd2": dict(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024),
}
TEXT = {  # the released text encoders' configs (openai/clip-vit-large-patch14; SD 2's OpenCLIP ViT-H, 23 layers)
    "sd1": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                hidden_act="gelu"),
}


def meta_state(model_class, config) -> dict:
    """name -> shape of a torch model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


def zeros(shapes: dict) -> dict:
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


@pytest.fixture(scope="module", params=[("sd1", 9), ("sd2", 4)], ids=["sd1-inpainting", "sd2-768-v"])
def released(request):
    """A released-size file (zero-stride arrays) written from diffusers' meta models with our inverse table,
    and diffusers' reference configs for it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    family, channels = request.param
    original = {"model": {"params": {
        "unet_config": {"params": {**LDM_UNET, **ORIGINAL[family], "in_channels": channels}},
        "first_stage_config": {"params": {"ddconfig": VAE_DDCONFIG}}}}}
    kind = tl.FAMILIES[family]["text_kind"]
    parts = [("unet", sf.UNET_PREFIX, "unet", UNet2DConditionModel), ("vae", sf.VAE_PREFIX, "vae", AutoencoderKL),
             ("text_encoder", sf.CLIP_PREFIX if kind == "clip" else sf.OPENCLIP_PREFIX, kind, CLIPTextModel)]
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **TEXT[family])
    state, refs, expected = {}, {}, {}
    probe = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty((320, channels, 3, 3), device="meta"),
             "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
                 torch.empty((320, ORIGINAL[family]["context_dim"]), device="meta")}
    refs["unet"] = create_unet_diffusers_config_from_ldm(original, probe)
    refs["vae"] = create_vae_diffusers_config_from_ldm(original, probe)
    refs["text_encoder"] = TEXT[family]
    for name, prefix, layout_kind, cls in parts:
        shapes, model = meta_state(cls, refs[name] if name != "text_encoder" else text_config)
        if name == "text_encoder":
            shapes = {(k if k.startswith("text_model.") else f"text_model.{k}"): s for k, s in shapes.items()}
        expected[name] = shapes
        config = refs[name] if name != "text_encoder" else {}
        state.update(sf.to_original(zeros(shapes), sf.Layout(name, prefix, layout_kind), config))
    if kind == "openclip":  # the released file's 24th layer (unused) and contrastive head
        state.update({k.replace("resblocks.22.", "resblocks.23."): v for k, v in state.items() if "resblocks.22." in k})
        state[sf.OPENCLIP_PREFIX + "text_projection"] = np.broadcast_to(np.float32(0), (1024, 1024))
    return family, channels, state, refs, expected


def test_released_sizes_infer_diffusers_configs(released):
    family, channels, state, refs, _ = released
    layouts = sf.find_layouts(state)
    found = sf.family_of(state, layouts)
    assert found is sf.FAMILIES[0 if family == "sd1" else 1]
    for name in COMPONENTS:
        ours = sf.component_config(state, layouts[name], None, found, "file")
        for key, value in refs[name].items():
            if key != "sample_size" and (key in ours or value is not None):
                assert sf._same(ours.get(key), value), (name, key, ours.get(key), value)
    size = found.image_size(channels, None)  # the sizes load() sets
    assert (refs["unet"]["sample_size"], refs["vae"]["sample_size"]) == (size // 8, size)
    scheduler = found.scheduler(channels, None)
    assert (scheduler["_class_name"], scheduler["prediction_type"]) == (
        ("PNDMScheduler", "epsilon") if family == "sd1" else ("DDIMScheduler", "v_prediction"))
    assert found.image_size(channels, None) == (512 if family == "sd1" else 768)
    assert found.scheduler(channels, families.SD2_BASE_GLOBAL_STEP)["prediction_type"] == "epsilon"  # SD 2 512-base


def test_released_sizes_convert_every_tensor(released):
    """Our table maps every tensor of a released-size file onto every parameter (names and shapes)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    family, _, state, refs, expected = released
    layouts = sf.find_layouts(state)
    problems, used, configs = sf.Problems(), set(), {}
    for name in COMPONENTS:
        configs[name] = sf.component_config(state, layouts[name], None, sf.family_of(state, layouts), "file")
        model = sf._model_class(name).from_config(configs[name])
        got = sf.to_diffusers(state, layouts[name], configs[name], sf.expected_keys(model), problems, used)
        assert {k: v.shape for k, v in got.items()} == expected[name], name
    problems.unused += sf.unused_keys(state, used, [""], layouts, configs)
    problems.raise_if_any("file")
    # diffusers' own readers agree on the UNet and VAE names of the file we wrote
    meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    assert {k: tuple(v.shape) for k, v in convert_ldm_unet_checkpoint(meta, refs["unet"]).items()} == expected["unet"]
    assert {k: tuple(v.shape) for k, v in convert_ldm_vae_checkpoint(meta, refs["vae"]).items()} == expected["vae"]


def test_builtin_tokenizer_is_clips():
    """Known ids of CLIP's tokenizer (openai/clip-vit-large-patch14): "a photo of a cat" and its specials;
    SD2's pads with "!" (id 0)."""
    tok = sf.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.convert_ids_to_tokens([0, 256, 49405]) == ["!", "!</w>", "jekyll</w>"]
    assert sf.clip_tokenizer("!")("cat", padding="max_length", max_length=5).input_ids == [49406, 2368, 49407, 0, 0]


# ------------------------------------------------------------------ other behaviour and errors
def test_openclip_last_layer_is_ignored_and_save_converts_once(files, tmp_path):
    """SD2 files keep OpenCLIP's last layer, which SD2 does not use: a file with it loads the same params.
    save_pretrained writes a diffusers folder that loads to the same params."""
    folder, pipe, path = files["sd2-inpaint"]
    longer = tl.write_file(tl.original_state(pipe, "sd2", extra_text_layer=True), tmp_path / "sd2-24.safetensors")
    ours, params = FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=folder)
    _, params_longer = FlaxStableDiffusionInpaintPipeline.from_single_file(longer, config=folder)
    ours.save_pretrained(tmp_path / "converted", params)
    _, reloaded = FlaxStableDiffusionInpaintPipeline.from_pretrained(tmp_path / "converted")
    for name in COMPONENTS:
        ref = to_torch_state_dict(params[name])
        assert_same_tensors(to_torch_state_dict(params_longer[name]), ref, name)
        assert_same_tensors(to_torch_state_dict(reloaded[name]), ref, name)


def test_model_class_reads_its_component_of_a_pipeline_file(files):
    folder, pipe, path = files["sd1-ckpt"]
    unet, params = FlaxUNet2DConditionModel.from_single_file(path, config=folder, image_size=128)
    assert unet.sample_size == 128 // 8
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(pipe.unet), "unet")


def test_components_missing_from_the_file_come_from_config(files, tmp_path):
    """A file without a text encoder (e.g. a UNet+VAE export) takes it from config='s folder weights."""
    folder, pipe, _ = files["sd1-ckpt"]
    state = {k: v for k, v in tl.original_state(pipe, "sd1").items() if not k.startswith(sf.CLIP_PREFIX)}
    path = tl.write_file(state, tmp_path / "no-text.safetensors")
    _, params = FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=folder)
    assert_same_tensors(to_torch_state_dict(params["text_encoder"]), tl.diffusers_state(pipe.text_encoder),
                        "text_encoder")
    partial = shutil.copytree(folder, tmp_path / "partial", ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(CheckpointError, match="has no text_encoder .* and config= supplies none"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=partial)


def test_standalone_vae_file(files, tmp_path):
    """A VAE-only file (no prefix, like vae-ft-mse-840000) loads into the VAE class."""
    from flax_inpaint import FlaxAutoencoderKL

    folder, pipe, _ = files["sd1-ckpt"]
    layout = sf.Layout("vae", "", "vae")
    path = tl.write_file(sf.to_original(tl.diffusers_state(pipe.vae), layout, tl.torch_config(pipe.vae)),
                         tmp_path / "vae.safetensors")
    _, params = FlaxAutoencoderKL.from_single_file(path, config=folder / "vae")
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(pipe.vae), "vae")


@pytest.mark.parametrize("keys,family", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "Stable Diffusion 3"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    ({"string_to_param.*": (1, 4)}, "textual-inversion"),
    ({"conv_in.weight": (4, 4, 3, 3), "conv_in.bias": (4,)}, "diffusers-format weights file"),
])
def test_other_families_are_named(tmp_path, keys, family):
    path = tl.write_file({k: np.zeros(s, np.float32) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=family):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path)


def test_unused_and_missing_tensors_are_listed(files, tmp_path):
    folder, pipe, _ = files["sd1-inpaint-safetensors"]
    state = tl.original_state(pipe, "sd1")
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.stray.weight"] = np.zeros(3, np.float32)
    path = tl.write_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=folder)
    assert "model.diffusion_model.out.2.bias (for unet conv_out.bias)" in str(err.value)
    assert "model.diffusion_model.stray.weight" in str(err.value)


def test_config_of_another_architecture_is_refused(files):
    _, _, path = files["sd1-inpaint-safetensors"]
    other, _, _ = files["sd2-v"]
    with pytest.raises(CheckpointError, match="use_linear_projection: file False, config True"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=other)


def test_unknown_sizes_need_a_config(files):
    _, _, path = files["sd1-ckpt"]
    with pytest.raises(CheckpointError, match="pass config= a local diffusers folder"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path)


def test_num_in_channels_must_match_the_file(files):
    folder, _, path = files["sd1-ckpt"]
    with pytest.raises(CheckpointError, match="num_in_channels=9, but the UNet .* takes 4"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path, config=folder, num_in_channels=9)


class Payload:
    """An arbitrary object: pickles holding one need code execution to load."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path)
