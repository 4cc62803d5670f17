"""The loaders on the SDXL pipelines, end to end against diffusers' StableDiffusionXL*Pipeline: single files
(base, refiner, 9-channel inpainting), LoRA (UNet and both text encoders, weighted adapters), textual
inversion (clip_l / clip_g) and IP-Adapter image prompts.

Tiny random SDXL pipelines (tiny_loaders.make_sdxl) with a near-deterministic VAE posterior (logvar = -30,
so both posterior samples agree without sharing a generator), the same prompts, images and noise on both
sides; images agree within 1e-3 max abs (fp32, values in [0, 1]: the same float32 math in another order
through one or two UNet steps). The model-level conversions are checked in test_single_file_sdxl.py,
test_lora_sdxl.py and test_textual_inversion_sdxl.py; here, what the pipelines feed the models.
"""
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from flax.training.common_utils import shard
from jax.sharding import Mesh
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import tiny_loaders as tl
from flax_inpaint import FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLInpaintPipeline, \
    FlaxStableDiffusionXLPipeline
from test_ip_adapter import ENCODER, ip_attention, plain_image_proj, plus_image_proj, save_published
from test_pipeline_ip_adapter import reference_image
from tiny_sd import count_compiles, replicated, sample_image_and_mask

ATOL = 1e-3
SIZE = tl.SIZE
OURS = {"base": FlaxStableDiffusionXLPipeline, "refiner": FlaxStableDiffusionXLImg2ImgPipeline,
        "inpaint": FlaxStableDiffusionXLInpaintPipeline}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """kind -> (diffusers folder, torch pipeline, its single file)."""
    root = tmp_path_factory.mktemp("sdxl-loaders")
    out = {}
    for kind in OURS:
        folder, pipe = tl.make_sdxl(root, kind)
        with torch.no_grad():  # a near-deterministic posterior: logvar = -30
            pipe.vae.quant_conv.weight[4:] = 0
            pipe.vae.quant_conv.bias[4:] = -30
        pipe.save_pretrained(folder, safe_serialization=True)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = SimpleNamespace(folder=folder, torch=pipe, root=root,
                                    file=tl.write_file(tl.sdxl_original_state(pipe), root / f"{kind}.safetensors"))
    return out


def noise(seed=0, encoded=False):
    """The initial noise diffusers draws from Generator().manual_seed(seed), after the image's posterior
    sample where it encodes the image first."""
    g = torch.Generator().manual_seed(seed)
    if encoded:
        torch.randn((1, *tl.LATENT), generator=g)
    return torch.randn((1, *tl.LATENT), generator=g)


def check(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert ref.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


TEXT = dict(negative_prompt="blurry", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")


def text2img(torch_pipe, pipe, params, prompt="a red cat", seed=0, **kw):
    """(diffusers' images, ours) of one text-to-image call."""
    latents = noise(seed)
    with torch.no_grad():
        ref = torch_pipe(prompt, latents=latents, **{**TEXT, **kw}).images
    return ref, pipe.text2img(prompt, params, jax.random.key(0), latents=latents.numpy(), **{**TEXT, **kw}).images


@pytest.mark.parametrize("kind", list(OURS))
def test_single_file_pipelines_match_diffusers(sdxl, kind):
    """StableDiffusionXL*Pipeline.from_single_file(file, config=<folder>) and ours give the same images: the
    base's text-to-image, the refiner's image-to-image (aesthetic scores), 9-channel inpainting."""
    s = sdxl[kind]
    ref_pipe = tl.SDXL_KINDS[kind][0].from_single_file(str(s.file), config=str(s.folder))
    ref_pipe.set_progress_bar_config(disable=True)
    pipe, params = OURS[kind].from_single_file(s.file, config=s.folder)
    assert type(pipe) is OURS[kind]
    for name in ("requires_aesthetics_score", "force_zeros_for_empty_prompt"):
        assert getattr(pipe, name, False) == ref_pipe.config.get(name, False), name
    image, mask = sample_image_and_mask(SIZE)
    if kind == "base":
        ref, out = text2img(ref_pipe, pipe, params)
    elif kind == "refiner":
        kw = dict(strength=0.6, num_inference_steps=2, aesthetic_score=7.0, output_type="np")
        with torch.no_grad():
            ref = ref_pipe("a red cat", image=image, generator=torch.Generator().manual_seed(0), **kw).images
        out = pipe.img2img("a red cat", image, params, jax.random.key(0), noise=noise(encoded=True).numpy(),
                           **kw).images
    else:
        with torch.no_grad():
            ref = ref_pipe("a red cat", image=image, mask_image=mask, strength=1.0,
                           generator=torch.Generator().manual_seed(0), latents=noise(), **TEXT).images
        out = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), strength=1.0,
                           latents=noise().numpy(), **TEXT).images
    check(out, ref)


def test_lora_and_textual_inversion_match_diffusers_without_recompiling(sdxl):
    """A kohya LoRA (lora_unet_, lora_te1_, lora_te2_, LoCon convs) and a PEFT one (unet., text_encoder.,
    text_encoder_2.) at set_adapters weights, merged inside the program, with an SDXL embedding file (clip_l
    and clip_g, two vectors each, loaded whole) whose token the prompt and negative prompt use: each
    tokenizer expands it (diffusers' maybe_convert_prompt on both). Diffusers' images; new adapter weights
    reuse the compiled program."""
    s = sdxl["base"]
    rng = np.random.default_rng(0)
    embedding = s.root / "unaesthetic.safetensors"
    save_file({"clip_l": rng.standard_normal((2, tl.SDXL_TEXT["hidden_size"])).astype(np.float32),
               "clip_g": rng.standard_normal((2, tl.SDXL_TEXT_2["hidden_size"])).astype(np.float32)}, str(embedding))
    names = ["kohya", "peft"]
    files = {fmt: tl.write_lora(s.torch, fmt, s.root / f"lora-{fmt}.safetensors", seed=k)
             for k, fmt in enumerate(names)}
    ref = StableDiffusionXLPipeline.from_pretrained(s.folder)
    ref.set_progress_bar_config(disable=True)
    tensors = load_torch_file(str(embedding))  # diffusers' docs: each part into its encoder
    ref.load_textual_inversion(tensors["clip_g"], token="unaesthetic", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(tensors["clip_l"], token="unaesthetic", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(s.folder)
    params = pipe.load_textual_inversion(params, embedding)
    ids = pipe.prepare_inputs("a unaesthetic red cat")
    for k, tokenizer in enumerate((pipe.tokenizer, pipe.tokenizer_2)):
        assert tokenizer.convert_tokens_to_ids("unaesthetic_1") in ids[0, k]
    for fmt, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=fmt)
        params = pipe.load_lora_weights(params, path, adapter_name=fmt)
    prompts = dict(prompt="a unaesthetic red cat", negative_prompt="unaesthetic")
    ref.set_adapters(names, adapter_weights=[0.7, -0.4])
    want, got = text2img(ref, pipe, pipe.set_adapters(params, names, [0.7, -0.4]), **prompts)
    check(got, want)
    weights = [0.2, {"unet": 0.9, "text_encoder": 0.5, "text_encoder_2": -1.0}]
    ref.set_adapters(names, adapter_weights=weights)
    with count_compiles() as compiles:
        want_2, got_2 = text2img(ref, pipe, pipe.set_adapters(params, names, weights), **prompts)
    assert compiles == []
    check(got_2, want_2)
    assert np.abs(got_2 - got).max() > 1e-2  # the adapters' weights matter


SCALE = 0.7
CROSS = tl.SDXL_UNET["cross_attention_dim"]


@pytest.fixture(scope="module")
def ip(sdxl):
    """(kind, variant) -> (diffusers pipeline, ours, params) with a tiny image encoder and a random SDXL
    IP-Adapter in the published layout (image_proj + ip_adapter) at scale SCALE: the plain adapter on the
    base and 9-channel inpainting, the "plus" one (a resampler over the encoder's penultimate hidden states)
    on the base."""
    root = sdxl["base"].root
    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    encoder.save_pretrained(root / "image_encoder")
    out, paths = {}, {}
    for kind, variant in (("base", "plain"), ("base", "plus"), ("inpaint", "plain")):
        s = sdxl[kind]
        theirs = tl.SDXL_KINDS[kind][0].from_pretrained(s.folder, image_encoder=encoder)
        theirs.set_progress_bar_config(disable=True)
        if variant not in paths:  # an adapter serves both UNets (same layers)
            rng = np.random.default_rng(len(paths))
            proj = plain_image_proj(rng, cross=CROSS) if variant == "plain" else plus_image_proj(rng, cross=CROSS)
            paths[variant] = save_published({"image_proj": proj, "ip_adapter": ip_attention(rng, theirs.unet)},
                                            root / f"ip-adapter-{variant}_sdxl.safetensors")
        theirs.load_ip_adapter(str(root), subfolder="", weight_name=paths[variant].name)
        theirs.set_ip_adapter_scale(SCALE)
        pipe, params = OURS[kind].from_pretrained(s.folder, image_encoder=root / "image_encoder")
        params = pipe.load_ip_adapter(params, root, weight_name=paths[variant].name)
        out[kind, variant] = theirs, pipe, pipe.set_ip_adapter_scale(params, SCALE)
    return out


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_ip_adapter_text2img_matches_diffusers(ip, variant):
    """Scale SCALE, then InstantStyle's per-layer scales (a list per block's attention layers) with another
    reference image through the same program."""
    theirs, pipe, params = ip["base", variant]
    want, got = text2img(theirs, pipe, params, ip_adapter_image=reference_image(1))
    check(got, want)
    per_layer = {"down": {"block_2": [0.0]}, "up": {"block_0": [1.2, 0.0]}}
    theirs.set_ip_adapter_scale(per_layer)
    with count_compiles() as compiles:
        want_2, got_2 = text2img(theirs, pipe, pipe.set_ip_adapter_scale(params, per_layer),
                                 ip_adapter_image=reference_image(3))
        _, without = text2img(theirs, pipe, pipe.set_ip_adapter_scale(params, 0.0), ip_adapter_image=reference_image(1))
    theirs.set_ip_adapter_scale(SCALE)
    assert compiles == []
    check(got_2, want_2)
    assert np.abs(got - without).max() > 0.02, "the image prompt barely changes the image; the test would prove little"


def test_ip_adapter_inpaint_matches_diffusers(ip):
    theirs, pipe, params = ip["inpaint", "plain"]
    image, mask = sample_image_and_mask(SIZE)
    with torch.no_grad():
        want = theirs("a red cat", image=image, mask_image=mask, strength=1.0, ip_adapter_image=reference_image(2),
                      generator=torch.Generator().manual_seed(0), latents=noise(), **TEXT).images
    got = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), strength=1.0, latents=noise().numpy(),
                       ip_adapter_image=reference_image(2), **TEXT).images
    check(got, want)


def test_ip_adapter_inpaint_on_a_mesh_and_with_pmap_convention_matches_single_device_calls(ip):
    """mesh= over 8 fake devices, 8 prompts with their own noise: each row's images are those of a one-device
    call on it alone (the latents are given and the VAE posterior is near-deterministic); jit=True (inputs
    [devices, 1, ...], replicated params, one key per device) gives the same images."""
    _, pipe, params = ip["inpaint", "plain"]
    n = jax.device_count()
    image, mask = sample_image_and_mask(SIZE)
    ids, masked, masks, images = pipe.prepare_inputs(["a red cat", "a cat"] * (n // 2), image, mask, return_image=True)
    latents = np.random.default_rng(0).standard_normal((n, *tl.LATENT), np.float32)
    keys = jax.random.split(jax.random.key(0), n)
    opts = dict(ip_adapter_image=reference_image(2), num_inference_steps=2, guidance_scale=5.0)
    out = pipe(ids, masks, masked, params, keys, mesh=Mesh(np.array(jax.devices()), ("data",)), image=images,
               latents=latents, **opts).images
    for d in (0, n - 1):
        rows = slice(d, d + 1)
        one = pipe(ids[rows], masks[rows], masked[rows], params, keys[d], image=images[rows], latents=latents[rows],
                   **opts).images
        np.testing.assert_allclose(out[rows], one, atol=1e-5, rtol=0)
    assert np.abs(out[0] - out[1]).max() > 1e-2  # other prompts and noise
    pmapped = pipe(shard(ids), shard(masks), shard(masked), replicated(params), keys, jit=True, image=shard(images),
                   latents=shard(latents), **opts).images
    assert pmapped.shape == (n, 1, *out.shape[1:])
    # our two layouts' programs (params stacked per device vs replicated) may sum in other orders: 1e-5 as above
    np.testing.assert_allclose(pmapped[:, 0], out, atol=1e-5, rtol=0)


def test_single_file_settings_without_a_pipeline_config(sdxl, tmp_path):
    """A config folder without model_index.json (or no config): the settings of the released models, the
    refiner's read off its UNet (five size values); keywords override them."""
    shutil.copytree(sdxl["refiner"].folder, tmp_path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model_index.json", "*.safetensors"))
    pipe, _ = FlaxStableDiffusionXLImg2ImgPipeline.from_single_file(sdxl["refiner"].file, config=tmp_path)
    assert pipe.requires_aesthetics_score and not pipe.force_zeros_for_empty_prompt
    pipe, _ = FlaxStableDiffusionXLImg2ImgPipeline.from_single_file(sdxl["base"].file, config=sdxl["base"].folder,
                                                                    requires_aesthetics_score=True)
    assert pipe.requires_aesthetics_score and pipe.force_zeros_for_empty_prompt
