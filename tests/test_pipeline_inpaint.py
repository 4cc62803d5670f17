"""End-to-end parity of the inpaint pipeline with diffusers' StableDiffusionInpaintPipeline.

A tiny random PyTorch pipeline is saved with `save_pretrained` and loaded through our
`from_pretrained`; both run on the same prompts, image, mask and initial noise. Images must agree
within 1e-3 max abs (fp32, values in [0, 1]). The noise is drawn from a torch generator exactly as
diffusers draws it, so its generator-driven path is compared as is.
"""
import jax
import numpy as np
import pytest
import torch

import tiny_sd

ATOL = 1e-3
LATENT = (4, 8, 8)  # per image: 32x32 pixels, VAE factor 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both UNet variants, saved once: {in_channels: (folder, torch pipeline)}."""
    root = tmp_path_factory.mktemp("sd")
    return {c: tiny_sd.make_pipeline(root, in_channels=c) for c in (9, 4)}


@pytest.fixture(scope="module")
def loaded(models):
    """Our pipeline and params for (in_channels, scheduler), loaded once per module."""
    return tiny_sd.flax_loader(models)


def diffusers_noise(in_channels: int, strength: float, n_images: int = 1, seed: int = 0) -> torch.Tensor:
    """The initial noise diffusers draws from `Generator().manual_seed(seed)` for one prompt: the
    image's posterior sample (one, repeated per image) comes first when the image is encoded
    (strength < 1 or a 4-channel UNet)."""
    g = torch.Generator().manual_seed(seed)
    if strength < 1.0 or in_channels == 4:
        torch.randn((1, *LATENT), generator=g)
    return torch.randn((n_images, *LATENT), generator=g)


def run_both(models, loaded, in_channels=9, scheduler="pndm", steps=4, guidance=7.5, strength=1.0,
             negative=None, n_images=1, padding_mask_crop=None, output_type="np"):
    """(diffusers, ours) images for one prompt, float32 [n_images, 32, 32, 3]."""
    _, torch_pipe = models[in_channels]
    cls, extra = tiny_sd.SCHEDULERS[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    pipe, params = loaded(in_channels, scheduler)
    image, mask = tiny_sd.sample_image_and_mask()
    common = dict(height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                  strength=strength, num_images_per_prompt=n_images, padding_mask_crop=padding_mask_crop,
                  output_type=output_type)
    with torch.no_grad():
        ref = torch_pipe("a red cat", image=image, mask_image=mask, negative_prompt=negative,
                         generator=torch.Generator().manual_seed(0), **common).images
    noise = diffusers_noise(in_channels, strength, n_images).numpy()
    ours = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), negative_prompt=negative,
                        latents=noise, **common).images
    return np.asarray(ref, np.float32), np.asarray(ours, np.float32)


# A pairwise grid: every scheduler with both UNets, both strengths, guidance 1 (no CFG) and 7.5 with a
# negative prompt. Rows sharing (in_channels, scheduler, CFG on/off) share one compiled program.
@pytest.mark.parametrize(
    "in_channels,scheduler,strength,guidance,negative,n_images",
    [
        (9, "pndm", 1.0, 7.5, None, 1),  # CFG against the empty prompt
        (9, "pndm", 0.6, 7.5, "blurry", 1),
        (4, "pndm", 0.6, 1.0, None, 1),
        (9, "ddim", 0.6, 7.5, "blurry", 1),
        (4, "ddim", 1.0, 1.0, None, 1),
        (9, "dpm++", 1.0, 1.0, None, 1),
        (4, "dpm++", 0.6, 7.5, "blurry", 2),  # the encoded image repeated per image
        (9, "euler", 0.6, 1.0, None, 1),
        (4, "euler", 1.0, 7.5, "blurry", 1),
    ],
)
def test_matches_diffusers(models, loaded, in_channels, scheduler, strength, guidance, negative, n_images):
    ref, ours = run_both(models, loaded, in_channels, scheduler, guidance=guidance, strength=strength,
                         negative=negative, n_images=n_images)
    assert ref.shape == ours.shape == (n_images, 32, 32, 3)
    assert ref.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    if n_images > 1:
        assert np.abs(ours[0] - ours[1]).max() > 1e-2  # each image its own noise


@pytest.mark.parametrize(
    "in_channels,scheduler,strength,negative",
    [(9, "pndm", 1.0, None), (4, "euler", 0.6, "blurry")],  # the programs of grid rows
)
def test_padding_mask_crop_matches_diffusers(models, loaded, in_channels, scheduler, strength, negative):
    """With padding_mask_crop both return the crop pasted into the original image as PIL (uint8):
    rounding to 8 bits can move a value by one level where the float images differ by < 1e-3."""
    ref, ours = run_both(models, loaded, in_channels, scheduler, strength=strength, negative=negative,
                         padding_mask_crop=2, output_type="pil")
    assert ref.shape == ours.shape == (1, 32, 32, 3)
    assert np.abs(ours - ref).max() <= 1
