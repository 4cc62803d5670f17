"""The loaders on the SDXL pipelines, end to end against diffusers' StableDiffusionXL*Pipeline: single files
(base, refiner, 9-channel inpainting), LoRA (UNet and both text encoders, weighted adapters), textual
inversion (clip_l / clip_g) and IP-Adapter image prompts.

Tiny random SDXL pipelines (tiny_loaders.make_sdxl) with a near-deterministic VAE posterior (logvar = -30,
so both posterior samples agree without sharing a generator), the same prompts, images and noise on both
sides; images agree within 1e-3 max abs (fp32, values in [0, 1]: the same float32 math in another order
through one or two UNet steps). The model-level conversions are checked in test_single_file_sdxl.py,
test_lora_sdxl.py and test_textual_inversion_sdxl.py; here, what the pipelines feed the models.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

import tiny_loaders as tl
from flax_inpaint import FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLInpaintPipeline, \
    FlaxStableDiffusionXLPipeline
from tiny_sd import count_compiles, sample_image_and_mask

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
        ref = torch_pipe(prompt, latents=latents, **TEXT, **kw).images
    return ref, pipe.text2img(prompt, params, jax.random.key(0), latents=latents.numpy(), **TEXT, **kw).images


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
