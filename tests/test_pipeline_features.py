"""Pipeline features: text2img and img2img parity, per-example guidance, num_images_per_prompt, user
latents, masked_image_latents, prompt embeddings, clip_skip, latent outputs chained into inpainting,
eta, apply_overlay, no recompilation for new inputs, and clear errors.

The reference is diffusers' PyTorch pipelines over tiny random components (tiny_sd) that are saved with
`save_pretrained` and loaded through our `from_pretrained`. Images agree within 1e-3 max abs (fp32,
values in [0, 1]); latents within 1e-3 max abs too. Every test uses DDIM with 3 steps at 32x32, so a few
compiled programs serve many tests.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import tiny_sd
from flax_inpaint import (
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
)

ATOL = 1e-3
STEPS = 3
LATENT = (4, 8, 8)  # per image: 32x32 pixels, VAE factor 4
COMMON = dict(num_inference_steps=STEPS, output_type="np")


@pytest.fixture(scope="module")
def sd4(tmp_path_factory):
    """4-channel UNet: our text2img, img2img and inpaint pipelines over one loaded set of params."""
    folder, torch_pipe = tiny_sd.make_pipeline(tmp_path_factory.mktemp("sd4"), in_channels=4, scheduler="ddim")
    t2i, params = FlaxStableDiffusionPipeline.from_pretrained(folder)
    return SimpleNamespace(torch=torch_pipe, t2i=t2i, params=params,
                           i2i=FlaxStableDiffusionImg2ImgPipeline.from_pipe(t2i))


@pytest.fixture(scope="module")
def sd9(tmp_path_factory):
    """9-channel inpainting UNet."""
    folder, torch_pipe = tiny_sd.make_pipeline(tmp_path_factory.mktemp("sd9"), in_channels=9, scheduler="ddim")
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)
    return SimpleNamespace(torch=torch_pipe, pipe=pipe, params=params)


@pytest.fixture(scope="module")
def picture():
    image, mask = tiny_sd.sample_image_and_mask()
    return SimpleNamespace(image=image, mask=mask)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *LATENT), generator=torch.Generator().manual_seed(seed))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def assert_parity(ours, ref, atol=ATOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    assert ref.std() > 0.02  # a real output, not a constant
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def inpaint_base(sd9, picture, prompt="a red cat", key=0, mask=None, **kwargs):
    """The 9-channel inpaint call shared by several tests (one compiled program): batch 1, random noise."""
    pipe = sd9.pipe
    ids, masked, mask_arr, image = pipe.prepare_inputs(prompt, picture.image, mask or picture.mask,
                                                       return_image=True)
    return pipe(ids, mask_arr, masked, sd9.params, jax.random.key(key), image=image, **COMMON,
                **kwargs).images


# ---------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text2img_matches_diffusers(sd4, guidance):
    """Default size (unet.sample_size x VAE factor), user latents; guidance <= 1 turns CFG off, so
    the negative prompt is unused."""
    lat = noise(1)
    with torch.no_grad():
        ref = StableDiffusionPipeline.from_pipe(sd4.torch)(
            "a red cat", guidance_scale=guidance, latents=lat, **COMMON).images
    ids = sd4.t2i.prepare_inputs("a red cat")
    ours = sd4.t2i(ids, sd4.params, jax.random.key(0), guidance_scale=guidance, latents=lat.numpy(),
                   **COMMON).images
    assert ours.shape == (1, 32, 32, 3)
    assert_parity(ours, ref)
    pil = sd4.t2i(ids, sd4.params, jax.random.key(0), guidance_scale=guidance, latents=lat.numpy(),
                  num_inference_steps=STEPS, output_type="pil").images  # the same program, then 8 bits
    np.testing.assert_array_equal(np.asarray(pil[0]), np.round(ours[0] * 255).astype(np.uint8))
    if guidance <= 1:
        other = sd4.t2i(ids, sd4.params, jax.random.key(0), guidance_scale=guidance, latents=lat.numpy(),
                        neg_prompt_ids=sd4.t2i.tokenize("blurry"), **COMMON).images
        np.testing.assert_array_equal(other, ours)


def test_img2img_matches_diffusers(sd4, picture):
    """diffusers draws the posterior sample (negligible variance in tiny_sd), then the noise."""
    g = generator()
    torch.randn((1, *LATENT), generator=g)
    eps = torch.randn((1, *LATENT), generator=g)
    with torch.no_grad():
        ref = StableDiffusionImg2ImgPipeline.from_pipe(sd4.torch)(
            ["a red cat"], image=picture.image, strength=0.6, generator=generator(), **COMMON).images
    ids, image = sd4.i2i.prepare_inputs("a red cat", picture.image)
    ours = sd4.i2i(ids, image, sd4.params, jax.random.key(0), strength=0.6, noise=eps.numpy(), **COMMON).images
    assert_parity(ours, ref)


@pytest.fixture(scope="module")
def t2i_latents(sd4):
    """Our text2img output_type="latent" (NCHW, scaled) and the np images of the same call."""
    ids = sd4.t2i.prepare_inputs("a red cat")
    kwargs = dict(guidance_scale=7.5, latents=noise(1).numpy(), num_inference_steps=STEPS)
    latents = sd4.t2i(ids, sd4.params, jax.random.key(0), output_type="latent", **kwargs).images
    images = sd4.t2i(ids, sd4.params, jax.random.key(0), output_type="np", **kwargs).images
    return latents, images


def test_latent_output_matches_diffusers_and_decodes_to_np(sd4, t2i_latents):
    """output_type="latent" gives diffusers' latents; decoding them gives the output_type="np" images
    (the same VAE decode, compiled separately: agreement within 1e-5)."""
    latents, images = t2i_latents
    with torch.no_grad():
        ref = StableDiffusionPipeline.from_pipe(sd4.torch)(
            "a red cat", guidance_scale=7.5, latents=noise(1), num_inference_steps=STEPS,
            output_type="latent").images
    assert latents.shape == (1, *LATENT)
    assert_parity(latents, ref.numpy())
    np.testing.assert_allclose(sd4.t2i.decode_latents(latents, sd4.params), images, atol=1e-5, rtol=0)


def test_inpaint_chains_text2img_latents(sd9, picture, t2i_latents):
    """text2img -> inpaint in latent space: the text2img latents as `image` (noised at strength 0.6)
    and, masked in latent space, as `masked_image_latents`; diffusers takes both the same way. Two
    images per prompt: both latent inputs are repeated, each image gets its own noise."""
    latents, _ = t2i_latents
    pipe = sd9.pipe
    ids, _, mask = pipe.prepare_inputs("a red cat", picture.image, picture.mask)
    masked_latents = latents * (mask[:, :, ::4, ::4] < 0.5)
    eps = noise(2)  # diffusers' only draw: both latent inputs skip the VAE encoder
    with torch.no_grad():
        ref = sd9.torch("a red cat", image=torch.tensor(latents), mask_image=picture.mask,
                        masked_image_latents=torch.tensor(masked_latents), strength=0.6,
                        num_images_per_prompt=2, generator=generator(), **COMMON).images
    ours = pipe(ids, mask, None, sd9.params, jax.random.key(0), image=latents, strength=0.6,
                masked_image_latents=masked_latents, latents=eps.numpy(), num_images_per_prompt=2,
                **COMMON).images
    assert ours.shape == (2, 32, 32, 3)
    assert_parity(ours, ref)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # other noise, another image


def test_prompts_guidance_per_example_and_images_per_prompt(sd9, picture):
    """Two prompts in one batch, each with its own guidance (0.5: no CFG for that example), two images
    per prompt: each prompt's pair equals a diffusers run with that scalar guidance,
    num_images_per_prompt=2 and that pair's latents."""
    prompts, guidance = ["a red cat", "a cat"], np.array([0.5, 6.0], np.float32)
    lat = noise(4)
    pipe = sd9.pipe
    ids, masked, mask = pipe.prepare_inputs(prompts, picture.image, picture.mask)
    ours = pipe(ids, mask, masked, sd9.params, jax.random.key(0), guidance_scale=guidance,
                num_images_per_prompt=2, latents=lat.numpy(), **COMMON).images
    assert ours.shape == (4, 32, 32, 3)
    for i, (prompt, g) in enumerate(zip(prompts, guidance)):
        with torch.no_grad():
            ref = sd9.torch(prompt, image=picture.image, mask_image=picture.mask, guidance_scale=float(g),
                            num_images_per_prompt=2, latents=lat[2 * i: 2 * i + 2], generator=generator(),
                            **COMMON).images
        assert_parity(ours[2 * i: 2 * i + 2], ref)


def test_prompt_embeds_match_diffusers(sd9, picture):
    """Embeddings the text encoder cannot produce (diffusers' scaled by 1.5) go in unchanged."""
    with torch.no_grad():
        embeds, neg_embeds = sd9.torch.encode_prompt("a red cat", "cpu", 1, True, negative_prompt="blurry")
        embeds, neg_embeds = embeds * 1.5, neg_embeds * 1.5
        ref = sd9.torch(prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, image=picture.image,
                        mask_image=picture.mask, latents=noise(1), generator=generator(), **COMMON).images
    pipe = sd9.pipe
    _, masked, mask = pipe.prepare_inputs("", picture.image, picture.mask)
    ours = pipe(None, mask, masked, sd9.params, jax.random.key(0), prompt_embeds=embeds.numpy(),
                negative_prompt_embeds=neg_embeds.numpy(), latents=noise(1).numpy(), **COMMON).images
    assert_parity(ours, ref)


def test_clip_skip_matches_diffusers(sd9, picture, monkeypatch):
    """clip_skip=1: the prompt from the second-to-last layer (through the final norm); diffusers encodes
    the negative prompt from the last layer regardless. diffusers 0.42 reaches the final norm as
    `text_encoder.text_model.final_layer_norm`, which transformers 5 flattened to
    `text_encoder.final_layer_norm`: an alias restores the path."""
    encoder = sd9.torch.text_encoder
    monkeypatch.setattr(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm),
                        raising=False)
    with torch.no_grad():
        ref = sd9.torch("a red cat", negative_prompt="blurry", image=picture.image, mask_image=picture.mask,
                        clip_skip=1, latents=noise(1), generator=generator(), **COMMON).images
    pipe = sd9.pipe
    ids, masked, mask = pipe.prepare_inputs("a red cat", picture.image, picture.mask)
    ours = pipe(ids, mask, masked, sd9.params, jax.random.key(0), neg_prompt_ids=pipe.tokenize("blurry"),
                clip_skip=1, latents=noise(1).numpy(), **COMMON).images
    assert_parity(ours, ref)


# ------------------------------------------------------------------------ behaviour without a reference

def test_eta_is_reproducible_and_adds_noise(sd9, picture):
    """DDIM eta > 0 draws fresh noise every step from the call's key: the same key repeats the image,
    eta = 0 or another key changes it."""
    a = inpaint_base(sd9, picture, eta=0.7)
    np.testing.assert_array_equal(inpaint_base(sd9, picture, eta=0.7), a)
    assert np.abs(inpaint_base(sd9, picture, eta=0.0) - a).max() > 1e-2
    assert np.abs(inpaint_base(sd9, picture, eta=0.7, key=1) - a).max() > 1e-2


def test_new_inputs_do_not_recompile(sd9, picture):
    """Prompts, seeds, masks, guidance, strength and eta are traced: after one call, none compiles."""
    other_mask = picture.mask.rotate(90)
    inpaint_base(sd9, picture)
    with tiny_sd.count_compiles() as compiles:
        inpaint_base(sd9, picture, prompt="a cat", key=1, mask=other_mask, guidance_scale=3.0,
                     strength=0.6, eta=0.3)
        inpaint_base(sd9, picture, prompt="red", key=2, guidance_scale=np.array([9.0]), strength=0.9)
    assert compiles == []


def test_apply_overlay_keeps_unmasked_pixels(sd9, picture):
    """inpaint(apply_overlay=True) returns the input's pixels exactly wherever the mask is black."""
    out = sd9.pipe.inpaint("a red cat", picture.image, picture.mask, sd9.params, jax.random.key(0),
                           num_inference_steps=STEPS, apply_overlay=True).images
    result, original = np.asarray(out[0]), np.asarray(picture.image)
    keep = np.asarray(picture.mask) == 0
    assert result.shape == original.shape
    np.testing.assert_array_equal(result[keep], original[keep])
    assert np.abs(result[~keep].astype(int) - original[~keep]).max() > 10  # the hole was repainted
    plain = sd9.pipe.inpaint("a red cat", picture.image, picture.mask, sd9.params, jax.random.key(0),
                             num_inference_steps=STEPS).images
    assert np.any(np.asarray(plain[0])[keep] != original[keep])  # without the overlay the VAE alters them


# ---------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def arrays(sd9, picture):
    ids, masked, mask, image = sd9.pipe.prepare_inputs("a red cat", picture.image, picture.mask,
                                                       return_image=True)
    return SimpleNamespace(ids=ids, masked=masked, mask=mask, image=image)


def call(sd9, a, **kwargs):
    args = dict(prompt_ids=a.ids, mask=a.mask, masked_image=a.masked, params=sd9.params,
                prng_seed=jax.random.key(0), num_inference_steps=STEPS)
    args.update(kwargs)
    return sd9.pipe(**args)


def test_error_mask_size_mismatch(sd9, arrays):
    with pytest.raises(ValueError, match=r"mask is 24x24 but height x width = 32x32"):
        call(sd9, arrays, mask=arrays.mask[:, :, :24, :24])
    with pytest.raises(ValueError, match=r"image is 24x24 but height x width = 32x32"):
        call(sd9, arrays, image=arrays.image[:, :, :24, :24])


def test_error_size_not_multiple_of_vae_factor(sd9, sd4, arrays):
    with pytest.raises(ValueError, match=r"height=30 must be a positive multiple of 4"):
        call(sd9, arrays, masked_image=arrays.masked[:, :, :30, :30], mask=arrays.mask[:, :, :30, :30])
    with pytest.raises(ValueError, match=r"width=34 must be a positive multiple of 4"):
        sd4.t2i(sd4.t2i.tokenize("a"), sd4.params, jax.random.key(0), STEPS, 32, 34)


def test_error_prompt_ids_length(sd9, arrays):
    with pytest.raises(ValueError, match=r"prompt_ids has shape \(1, 10\); expected \(1, 16\)"):
        call(sd9, arrays, prompt_ids=arrays.ids[:, :10])
    with pytest.raises(ValueError, match=r"neg_prompt_ids has shape \(2, 16\); expected \(1, 16\)"):
        call(sd9, arrays, neg_prompt_ids=np.concatenate([arrays.ids] * 2))


def test_error_strength_out_of_range(sd9, sd4, arrays, picture):
    with pytest.raises(ValueError, match=r"strength=1.5 must lie in \[0, 1\]"):
        call(sd9, arrays, image=arrays.image, strength=1.5)
    ids, image = sd4.i2i.prepare_inputs("a", picture.image)
    with pytest.raises(ValueError, match=r"strength=-0.1 must lie in \[0, 1\]"):
        sd4.i2i(ids, image, sd4.params, jax.random.key(0), strength=-0.1)


def test_error_too_few_steps_for_strength(sd9, arrays):
    with pytest.raises(ValueError, match=r"strength=0.2 with num_inference_steps=3 runs no denoising step"):
        call(sd9, arrays, image=arrays.image, strength=0.2)


def test_error_unet_channels(sd9):
    p = sd9.pipe
    with pytest.raises(ValueError, match=r"in_channels=5; these pipelines support 4 \(plain\) or 9"):
        FlaxStableDiffusionInpaintPipeline(p.vae, p.text_encoder, p.tokenizer, p.unet.clone(in_channels=5),
                                           p.scheduler)


def test_error_missing_image(sd9, sd4, arrays):
    inpaint4 = FlaxStableDiffusionInpaintPipeline.from_pipe(sd4.t2i)
    with pytest.raises(ValueError, match=r"image is required because a 4-channel UNet blends with it"):
        inpaint4(arrays.ids, arrays.mask, arrays.masked, sd4.params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"image is required because strength=0.5 < 1"):
        call(sd9, arrays, strength=0.5)


def test_error_other_inputs(sd9, arrays):
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 4, 4\); expected \(1, 4, 8, 8\)"):
        call(sd9, arrays, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 8, 8\); expected \(2, 4, 8, 8\)"):
        call(sd9, arrays, latents=np.zeros((1, 4, 8, 8), np.float32), num_images_per_prompt=2)
    with pytest.raises(ValueError, match=r"guidance_scale has shape \(3,\)"):
        call(sd9, arrays, guidance_scale=np.ones(3))
    with pytest.raises(ValueError, match=r"exactly one of prompt_ids .* and prompt_embeds; got both"):
        call(sd9, arrays, prompt_embeds=np.zeros((1, 16, 32), np.float32))
    with pytest.raises(ValueError, match=r"num_inference_steps=0 must be an int >= 1"):
        call(sd9, arrays, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"clip_skip=3 must lie in \[0, 2\]"):
        call(sd9, arrays, clip_skip=3)
    with pytest.raises(ValueError, match=r"image holds latents of shape \(1, 4, 4, 4\), i.e. a 16x16 image"):
        call(sd9, arrays, image=np.zeros((1, 4, 4, 4), np.float32))
