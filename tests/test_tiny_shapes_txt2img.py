"""The bundled 4-channel tiny shapes model (flax_inpaint/assets/tiny-shapes-txt2img) does what it was
trained for: text-to-image draws the prompted circle, and DiffEdit turns a red circle blue.

The DiffEdit cases are benchmarks/diffedit_tiny_shapes.py's (24 scenes x 3 seeds, its numbers are in the
README; one batched call per step and seed); the thresholds are the acceptance bars, checked on every seed.
Text-to-image and img2img are a subset of that script's.
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from flax_inpaint.pipelines import FlaxStableDiffusionPipeline
from flax_inpaint.pipelines.diffedit import FlaxStableDiffusionDiffEditPipeline
from flax_inpaint.train import data, quality

MODEL = resources.files("flax_inpaint.assets") / "tiny-shapes-txt2img"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def diffedit():
    return FlaxStableDiffusionDiffEditPipeline.from_pretrained(MODEL, safety_checker=None)


def test_bundle_shares_the_inpainting_models_vae_and_text_encoder():
    inpaint = resources.files("flax_inpaint.assets") / "tiny-shapes-inpaint"
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (MODEL / name).read_bytes() == (inpaint / name).read_bytes()


@pytest.mark.parametrize("seed", SEEDS)
def test_diffedit_masks_the_red_circle_and_paints_it_blue(diffedit, seed):
    pipe, params = diffedit
    cases = quality.diffedit_cases(24, seed)
    scores = quality.diffedit_scores(pipe, params, cases, seed)
    assert scores["mask_iou_mean"] >= 0.6, scores
    assert scores["target_colour_accuracy"] >= 0.75, scores


def test_text_to_image_draws_a_red_circle():
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    scores = quality.text_to_image_circles(pipe, params, "a red circle on a blue background", range(4))
    assert scores["colour_area_px_min"] >= 50, scores  # a circle of radius >= 4 px in every image
    assert scores["circle_iou_mean"] >= 0.7, scores


def test_img2img_recolours_the_circle():
    """img2img at strength 0.7 from a red circle towards "a yellow circle ...": the circle turns yellow."""
    from flax_inpaint.pipelines import FlaxStableDiffusionImg2ImgPipeline

    import jax

    pipe, params = FlaxStableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None)
    cases = quality.diffedit_cases(4, 0, target="yellow")
    ids = pipe.tokenize(cases.target)
    images = np.transpose(cases.images * 2 - 1, (0, 3, 1, 2))
    out = pipe(ids, images, params, jax.random.key(0), strength=0.7, num_inference_steps=25,
               guidance_scale=4.0).images
    yellow = data.COLOURS.index("yellow")
    hits = [quality.nearest_colour(o[inside].mean(axis=0)) == yellow for o, inside in zip(out, cases.interior)]
    assert np.mean(hits) >= 0.75, hits
