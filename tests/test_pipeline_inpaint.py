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
from flax_inpaint import FlaxStableDiffusionInpaintPipeline
from flax_inpaint.pipelines.loading import scheduler_class

ATOL = 1e-3
LATENT_SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both UNet variants, saved once: {in_channels: (folder, torch pipeline)}."""
    root = tmp_path_factory.mktemp("sd")
    return {c: tiny_sd.make_pipeline(root, in_channels=c) for c in (9, 4)}


def diffusers_noise(in_channels: int, strength: float, seed: int = 0) -> torch.Tensor:
    """The initial noise diffusers draws from `Generator().manual_seed(seed)`: the image's posterior
    sample comes first when the image is encoded (strength < 1 or a 4-channel UNet)."""
    g = torch.Generator().manual_seed(seed)
    if strength < 1.0 or in_channels == 4:
        torch.randn(LATENT_SHAPE, generator=g)
    return torch.randn(LATENT_SHAPE, generator=g)


def run_both(models, in_channels=9, scheduler="pndm", steps=4, guidance=7.5, strength=1.0,
             negative=None, padding_mask_crop=None, output_type="np"):
    folder, torch_pipe = models[in_channels]
    cls, extra = tiny_sd.SCHEDULERS[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    flax_sched = scheduler_class(cls.__name__).from_config(dict(torch_pipe.scheduler.config))
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder, scheduler=flax_sched)
    image, mask = tiny_sd.sample_image_and_mask()
    common = dict(height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                  strength=strength, padding_mask_crop=padding_mask_crop, output_type=output_type)
    with torch.no_grad():
        ref = torch_pipe("a red cat", image=image, mask_image=mask, negative_prompt=negative,
                         generator=torch.Generator().manual_seed(0), **common).images
    noise = diffusers_noise(in_channels, strength).numpy()
    ours = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), negative_prompt=negative,
                        latents=noise, **common).images
    return np.asarray(ref, np.float32), np.asarray(ours, np.float32)


@pytest.mark.parametrize(
    "in_channels,scheduler,strength,guidance,negative",
    [
        (9, "pndm", 1.0, 7.5, None),
        (9, "ddim", 0.6, 7.5, "blurry"),
        (9, "dpm++", 1.0, 1.0, None),
        (9, "euler", 0.6, 7.5, None),
        (4, "pndm", 1.0, 7.5, "blurry"),
        (4, "ddim", 0.6, 1.0, None),
        (4, "dpm++", 0.6, 7.5, None),
        (4, "euler", 1.0, 7.5, None),
    ],
)
def test_matches_diffusers(models, in_channels, scheduler, strength, guidance, negative):
    ref, ours = run_both(models, in_channels, scheduler, guidance=guidance, strength=strength,
                         negative=negative)
    assert ref.shape == ours.shape == (1, 32, 32, 3)
    assert ref.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_padding_mask_crop_matches_diffusers(models):
    """With padding_mask_crop both return the crop pasted into the original image as PIL (uint8):
    rounding to 8 bits can move a value by one level where the float images differ by < 1e-3."""
    ref, ours = run_both(models, 9, padding_mask_crop=2, output_type="pil")
    assert ref.shape == ours.shape == (1, 32, 32, 3)
    assert np.abs(ours - ref).max() <= 1
