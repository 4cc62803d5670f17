"""End-to-end parity of the SDXL pipelines with diffusers' StableDiffusionXLPipeline, StableDiffusionXLInpaintPipeline
and StableDiffusionXLImg2ImgPipeline (the refiner), on tiny random SDXL-shaped models saved with save_pretrained and
loaded through our from_pretrained. Same prompts, images, masks and noise (drawn from a torch generator in
diffusers' order, or passed to both); images agree within 1e-3 max abs (fp32, values in [0, 1]: the same float32
math in another order through a few UNet steps). The VAE's posterior variance is made negligible (logvar = -30),
as in tiny_sd, so both posterior samples agree without sharing a generator.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from flax.training.common_utils import shard
from jax.sharding import Mesh

from flax_inpaint import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionXLImg2ImgPipeline,
    FlaxStableDiffusionXLInpaintPipeline,
    FlaxStableDiffusionXLPipeline,
)
from test_sdxl_conditioning import WIDTHS, text_and_vae
from test_sdxl_models import POOLED, SDXL, TIME_DIM
from tiny_sd import MAX_LENGTH, SD_SCHEDULE, count_compiles, replicated, sample_image_and_mask

ATOL = 1e-3
SIZE = 32  # pixels; the VAE halves them: latents [4, 16, 16]
LATENT = (4, SIZE // 2, SIZE // 2)
N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8
# SDXL's UNet layout (a resnet-only first level, size conditioning, linear projections) at two levels and one
# layer per block: what the pipelines feed it is under test here, its blocks in test_sdxl_models.
UNET = dict(SDXL, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), layers_per_block=1)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Torch pipelines (base, 9-channel inpainting, refiner) and ours loaded from their saved folders."""
    tmp = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    tokenizer, tokenizer_2, te1, te2, vae = text_and_vae(tmp)
    with torch.no_grad():  # a near-deterministic posterior: logvar = -30
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    unet = dict(UNET, cross_attention_dim=sum(WIDTHS))
    text = dict(text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    base = StableDiffusionXLPipeline(vae=vae, unet=UNet2DConditionModel(**unet).eval(), scheduler=scheduler, **text)
    inpaint = StableDiffusionXLInpaintPipeline(vae=vae, unet=UNet2DConditionModel(**unet, in_channels=9).eval(),
                                               scheduler=scheduler, **text)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**dict(UNET, cross_attention_dim=WIDTHS[1],
                                          projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)).eval(),
        scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    ours = {}
    for name, pipe in (("base", base), ("inpaint", inpaint), ("refiner", refiner)):
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp / name, safe_serialization=True)
        ours[name] = FlaxDiffusionPipeline.from_pretrained(tmp / name)  # the class model_index.json names
    # the base's 4-channel UNet inpainting by latent blending, diffusers' way and ours
    ours["blend"] = (FlaxStableDiffusionXLInpaintPipeline.from_pipe(ours["base"][0]), ours["base"][1])
    torch_pipes = dict(base=base, inpaint=inpaint, refiner=refiner,
                       blend=StableDiffusionXLInpaintPipeline(**base.components))
    return SimpleNamespace(torch=torch_pipes, ours=ours, tmp=tmp)


def noise(n=1, seed=0, encoded=False):
    """The initial noise diffusers draws from Generator().manual_seed(seed), after the image's posterior
    sample where it encodes the image first."""
    g = torch.Generator().manual_seed(seed)
    if encoded:
        torch.randn((1, *LATENT), generator=g)
    return torch.randn((n, *LATENT), generator=g)


def check(ours, ref, shape):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape == shape
    assert ref.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_loads_the_class_model_index_names(sdxl):
    assert type(sdxl.ours["base"][0]) is FlaxStableDiffusionXLPipeline
    assert type(sdxl.ours["inpaint"][0]) is FlaxStableDiffusionXLInpaintPipeline
    refiner = sdxl.ours["refiner"][0]
    assert type(refiner) is FlaxStableDiffusionXLImg2ImgPipeline and refiner.text_encoder is None
    assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
    assert sdxl.ours["base"][0].force_zeros_for_empty_prompt


SIZES = dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(40, 48))
NEGATIVE_SIZES = dict(negative_original_size=(24, 20), negative_crops_coords_top_left=(2, 6),
                      negative_target_size=(28, 36))


def test_text2img_matches_diffusers(sdxl):
    """CFG with prompt_2 / negative_prompt_2, size conditioning unlike the output size, guidance_rescale and two
    images per prompt, in one call. (Negative sizes: see the next test.)"""
    kw = dict(prompt_2=["red red", "a cat cat"], negative_prompt="ca", negative_prompt_2=["red", "cat red"],
              guidance_scale=6.0, guidance_rescale=0.7, num_images_per_prompt=2, num_inference_steps=2, **SIZES)
    latents = noise(4)
    with torch.no_grad():
        ref = sdxl.torch["base"](["a red cat", "cat"], height=SIZE, width=SIZE, latents=latents, output_type="np",
                                 **kw).images
    pipe, params = sdxl.ours["base"]
    out = pipe.text2img(["a red cat", "cat"], params, jax.random.key(0), height=SIZE, width=SIZE,
                        latents=latents.numpy(), output_type="np", **kw).images
    check(out, ref, (4, SIZE, SIZE, 3))


def test_flax_api_zero_negatives_match_diffusers(sdxl):
    """diffusers' Flax call: prepare_inputs ids [B, 2, L], no negative prompt: zero negative embeddings
    (force_zeros_for_empty_prompt), as the PyTorch pipeline without negative_prompt; with negative sizes.

    On one image: diffusers' StableDiffusionXLPipeline (0.42) tiles the pair [negative, positive] of time ids over
    all 2 x batch rows (`torch.cat(...).repeat(batch * n, 1)`), so with more images its unconditional rows
    alternate between negative and positive sizes; we give each half its own (as its img2img and inpaint
    pipelines do), which agrees with it on one image."""
    latents = noise(1, seed=1)
    with torch.no_grad():
        ref = sdxl.torch["base"]("a red cat", height=SIZE, width=SIZE, latents=latents, num_inference_steps=2,
                                 guidance_scale=5.0, output_type="np", **NEGATIVE_SIZES).images
    pipe, params = sdxl.ours["base"]
    ids = pipe.prepare_inputs("a red cat")
    assert ids.shape == (1, 2, MAX_LENGTH)
    out = pipe(ids, params, jax.random.key(0), 2, 5.0, SIZE, SIZE, latents.numpy(), **NEGATIVE_SIZES).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_prompt_embeds_match_diffusers(sdxl):
    """prompt_embeds / pooled_prompt_embeds (and negatives) from diffusers' encode_prompt give its images."""
    torch_pipe = sdxl.torch["base"]
    latents = noise(1, seed=3)
    with torch.no_grad():
        embeds = torch_pipe.encode_prompt("a red cat", device="cpu", negative_prompt="ca", prompt_2="red")
        ref = torch_pipe("a red cat", prompt_2="red", negative_prompt="ca", height=SIZE, width=SIZE, latents=latents,
                         num_inference_steps=2, output_type="np").images
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    pipe, params = sdxl.ours["base"]
    out = pipe(None, params, jax.random.key(0), 2, 5.0, SIZE, SIZE, latents.numpy(),
               **{n: x.numpy() for n, x in zip(names, embeds)}).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_clip_skip_and_eta_match_diffusers(sdxl):
    """clip_skip=1 takes both encoders' hidden states one layer earlier (the negatives stay at the penultimate
    layer, as diffusers encodes them); eta is accepted and unused by Euler, as in diffusers."""
    latents = noise(1, seed=4)
    with torch.no_grad():
        ref = sdxl.torch["base"]("a red cat", negative_prompt="ca", height=SIZE, width=SIZE, latents=latents,
                                 num_inference_steps=2, clip_skip=1, eta=0.5, output_type="np").images
    pipe, params = sdxl.ours["base"]
    out = pipe.text2img("a red cat", params, jax.random.key(0), negative_prompt="ca", height=SIZE, width=SIZE,
                        latents=latents.numpy(), num_inference_steps=2, clip_skip=1, eta=0.5, output_type="np").images
    check(out, ref, (1, SIZE, SIZE, 3))
    plain = pipe.text2img("a red cat", params, jax.random.key(0), negative_prompt="ca", height=SIZE, width=SIZE,
                          latents=latents.numpy(), num_inference_steps=2, output_type="np").images
    assert np.abs(np.asarray(plain) - np.asarray(out)).max() > 1e-3  # the earlier layer really is used


INPAINT_CASES = {  # pipeline, strength, negative prompt, denoising_end
    "9ch": ("inpaint", 1.0, None, None),
    "9ch_strength": ("inpaint", 0.6, "blurry", None),
    "4ch_blend_strength": ("blend", 0.6, "blurry", None),
    "4ch_blend_denoising_end": ("blend", 1.0, None, 0.6),
}


@pytest.mark.parametrize("case", list(INPAINT_CASES))
def test_inpaint_matches_diffusers(sdxl, case):
    kind, strength, negative, end = INPAINT_CASES[case]
    image, mask = sample_image_and_mask(SIZE)
    kw = dict(negative_prompt=negative, strength=strength, num_inference_steps=3, height=SIZE, width=SIZE,
              denoising_end=end, original_size=(48, 40), output_type="np")
    with torch.no_grad():
        ref = sdxl.torch[kind]("a red cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0),
                               **kw).images
    pipe, params = sdxl.ours[kind]
    shared = noise(encoded=strength < 1 or kind == "blend").numpy()
    out = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), latents=shared, **kw).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_padding_mask_crop_matches_diffusers(sdxl):
    """padding_mask_crop: both inpaint the mask's padded box and paste it into the image, as PIL (uint8):
    rounding to 8 bits can move a value by one level where the float images differ by < 1e-3. The 9ch
    case's program."""
    image, mask = sample_image_and_mask(SIZE)
    kw = dict(strength=1.0, num_inference_steps=3, height=SIZE, width=SIZE, original_size=(48, 40),
              padding_mask_crop=2, output_type="pil")
    with torch.no_grad():
        ref = sdxl.torch["inpaint"]("a red cat", image=image, mask_image=mask,
                                    generator=torch.Generator().manual_seed(0), **kw).images
    pipe, params = sdxl.ours["inpaint"]
    out = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), latents=noise().numpy(), **kw).images
    ref, out = (np.stack([np.asarray(p, np.int32) for p in x]) for x in (ref, out))
    assert ref.shape == out.shape == (1, SIZE, SIZE, 3)
    assert np.abs(out - ref).max() <= 1


def test_refiner_img2img_matches_diffusers(sdxl):
    """The refiner's layout (text_encoder_2 alone, aesthetic scores in the size conditioning, "" encoded for
    the negative prompt) with strength < 1, sharing the noise."""
    image, _ = sample_image_and_mask(SIZE, seed=1)
    kw = dict(strength=0.6, num_inference_steps=3, aesthetic_score=7.0, negative_aesthetic_score=1.5,
              negative_prompt_2="red", guidance_scale=6.0, output_type="np")
    with torch.no_grad():
        ref = sdxl.torch["refiner"]("a red cat", image=image, generator=torch.Generator().manual_seed(0), **kw).images
    pipe, params = sdxl.ours["refiner"]
    out = pipe.img2img("a red cat", image, params, jax.random.key(0), noise=noise(encoded=True).numpy(), **kw).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_base_denoising_end_into_refiner_denoising_start(sdxl):
    """diffusers' ensemble of experts: the base stops at denoising_end and hands its noisy latents to the
    refiner, which starts at denoising_start from them un-noised."""
    latents = noise(1, seed=2)
    steps = dict(num_inference_steps=4)
    with torch.no_grad():
        ref_latents = sdxl.torch["base"]("a red cat", height=SIZE, width=SIZE, latents=latents, denoising_end=0.5,
                                         output_type="latent", **steps).images
        ref = sdxl.torch["refiner"]("a red cat", image=ref_latents, denoising_start=0.5, output_type="np",
                                    generator=torch.Generator().manual_seed(0), **steps).images
    base, base_params = sdxl.ours["base"]
    refiner, refiner_params = sdxl.ours["refiner"]
    handed = base.text2img("a red cat", base_params, jax.random.key(0), height=SIZE, width=SIZE,
                           latents=latents.numpy(), denoising_end=0.5, output_type="latent", **steps).images
    np.testing.assert_allclose(handed, ref_latents.numpy(), atol=ATOL, rtol=0)
    out = refiner.img2img("a red cat", handed, refiner_params, jax.random.key(0), denoising_start=0.5,
                          output_type="np", **steps).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_new_inputs_do_not_recompile(sdxl):
    """New prompts, seeds, size conditioning, guidance, strength, masks and denoising fractions reuse the
    compiled programs (those of the parity tests above: same step counts and options)."""
    pipe, params = sdxl.ours["inpaint"]
    image, mask = sample_image_and_mask(SIZE)
    image_2, mask_2 = sample_image_and_mask(SIZE, seed=3)
    common = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    first = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), strength=0.7, **common).images
    base, base_params = sdxl.ours["base"]
    steps = dict(num_inference_steps=4, output_type="latent", height=SIZE, width=SIZE)
    base_first = base.text2img("cat", base_params, jax.random.key(0), denoising_end=0.5, **steps).images
    with count_compiles() as compiles:
        out = pipe.inpaint("cat", image_2, mask_2, params, jax.random.key(1), strength=0.5, guidance_scale=3.0,
                           original_size=(64, 48), crops_coords_top_left=(4, 2), negative_prompt="red", **common)
        base_out = base.text2img("a red cat", base_params, jax.random.key(5), denoising_end=0.7, guidance_scale=4.0,
                                 target_size=(24, 16), negative_prompt="cat", **steps)
    assert compiles == []
    assert np.abs(out.images - first).max() > 1e-2 and np.abs(base_out.images - base_first).max() > 1e-2


def test_pmap_and_mesh_give_one_devices_images(sdxl):
    """jit=True (diffusers' pmap convention over 8 fake devices, one key per device) and a mesh call with
    one key per prompt both give, per prompt, the images of a one-device call on that prompt with its key."""
    assert jax.local_device_count() == N_DEV
    pipe, params = sdxl.ours["base"]
    ids = pipe.prepare_inputs(["a red cat", "cat"] * (N_DEV // 2))
    kw = dict(num_inference_steps=1, height=SIZE, width=SIZE, original_size=(64, 48), guidance_scale=3.0)
    keys = jax.random.split(jax.random.key(0), N_DEV)
    pmapped = pipe(shard(ids), replicated(params), keys, jit=True, **kw).images
    meshed = pipe(ids, params, keys, mesh=Mesh(np.array(jax.devices()), ("data",)), **kw).images
    assert pmapped.shape == (N_DEV, 1, SIZE, SIZE, 3) and meshed.shape == (N_DEV, SIZE, SIZE, 3)
    for d in (0, N_DEV - 1):
        one = pipe(ids[d:d + 1], params, keys[d], **kw).images
        np.testing.assert_allclose(pmapped[d], one, atol=1e-5, rtol=0)
        np.testing.assert_allclose(meshed[d:d + 1], one, atol=1e-5, rtol=0)
    assert np.abs(meshed[0] - meshed[2]).max() > 1e-2  # same prompt, another key: another image


def test_save_pretrained_keeps_the_pipeline_config(sdxl, tmp_path):
    """Our save_pretrained writes a folder diffusers loads, with the refiner's config values."""
    pipe, params = sdxl.ours["refiner"]
    pipe.save_pretrained(tmp_path, params)
    again = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path)
    assert again.config.requires_aesthetics_score and not again.config.force_zeros_for_empty_prompt
    assert again.text_encoder is None and again.tokenizer_2.pad_token == "!"


def test_sharded_fp16_variant_folder_loads(sdxl, tmp_path):
    """A diffusers SDXL folder with sharded variant="fp16" weight files loads to the same params."""
    sdxl.torch["base"].save_pretrained(tmp_path, safe_serialization=True, variant="fp16", max_shard_size="40KB")
    assert list(tmp_path.glob("unet/*.fp16-00001-of-*.safetensors"))
    pipe, params = FlaxDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert type(pipe) is FlaxStableDiffusionXLPipeline
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sdxl.ours["base"][1])):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_fix(sdxl):
    pipe, params = sdxl.ours["base"]
    ids = pipe.prepare_inputs("cat")
    with pytest.raises(ValueError, match="Pass pooled_prompt_embeds with prompt_embeds"):
        pipe(None, params, jax.random.key(0), prompt_embeds=np.zeros((1, MAX_LENGTH, sum(WIDTHS)), np.float32))
    with pytest.raises(ValueError, match="denoising_end=1.5 must be a float strictly between 0 and 1"):
        pipe(ids, params, jax.random.key(0), denoising_end=1.5)
    with pytest.raises(ValueError, match="expected \\(1, 2, 16\\)"):
        pipe(ids, params, jax.random.key(0), neg_prompt_ids=ids[:, :1])
