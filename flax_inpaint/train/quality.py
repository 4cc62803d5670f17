"""Measured quality of the tiny shapes models (what `benchmarks/quality_tiny_shapes.py` prints).

* colour accuracy: scenes from `data.sample_scenes`; the captioned shape's silhouette, grown by
  2 px, is masked and the prompt asks for that shape in another colour. A case passes when the mean
  colour inside the mask is closer to the prompted palette colour than to any other palette colour.
* overlay: with `apply_overlay=True` every unmasked pixel of the input comes back exactly.
* ControlNet (fill the circle): a circle's outline is the control image, the whole image is masked
  and the prompt names the circle's and the background's colours. The filled region (pixels nearer
  the prompted circle colour than the background colour) is compared with the outline's interior
  by intersection over union.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple

import jax
import numpy as np
from PIL import Image

from flax_inpaint.train import data

MASK_GROWTH = 0.5  # px past the shape edge: the mask covers every pixel the old shape touched


class InpaintCase(NamedTuple):
    image: Image.Image
    mask: Image.Image
    prompt: str
    colour: int  # index into data.COLOURS


def _pil(images: np.ndarray) -> List[Image.Image]:
    return [Image.fromarray(np.round(x * 255).astype(np.uint8)) for x in images]


def colour_cases(n: int, seed: int = 0, size: int = 64) -> List[InpaintCase]:
    """`n` inpainting cases; shapes cycle through SHAPES, prompted colours through the palette
    (skipping the background's and the shape's original colour)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        shape = i % len(data.SHAPES)
        scenes = data.sample_scenes(rng, 1, size, shapes=(shape,), min_radius=0.15)
        avoid = {int(scenes.background[0]), int(scenes.colour[0])}
        allowed = [c for c in range(len(data.COLOURS)) if c not in avoid]
        colour = allowed[(i // len(data.SHAPES)) % len(allowed)]
        mask = (scenes.distance()[0] < MASK_GROWTH).astype(np.uint8) * 255
        prompt = data.caption(shape, colour, int(scenes.background[0]))
        cases.append(InpaintCase(_pil(scenes.images)[0], Image.fromarray(mask), prompt, colour))
    return cases


def nearest_colour(rgb: np.ndarray) -> int:
    """Index of the palette colour nearest (Euclidean, RGB in [0, 1]) to `rgb`."""
    return int(np.argmin(np.linalg.norm(data.RGB - rgb, axis=-1)))


def inpaint_cases(pipe, params, cases: List[InpaintCase], seed: int, steps: int, guidance: float,
                  apply_overlay: bool = False) -> List[np.ndarray]:
    """Inpaint each case (one call per case, one compiled program); HWC floats in [0, 1]."""
    out = []
    for i, case in enumerate(cases):
        result = pipe.inpaint(
            case.prompt, case.image, case.mask, params, jax.random.key(seed + i), num_inference_steps=steps,
            guidance_scale=guidance, apply_overlay=apply_overlay, output_type="np",
        )
        out.append(np.asarray(result.images[0], np.float32))
    return out


def colour_accuracy(cases: List[InpaintCase], results: List[np.ndarray]) -> Dict[str, float]:
    """Share of cases whose mean colour inside the mask is nearest to the prompted colour."""
    hits = []
    for case, result in zip(cases, results):
        inside = np.asarray(case.mask) > 127
        hits.append(nearest_colour(result[inside].mean(axis=0)) == case.colour)
    return {"colour_accuracy": float(np.mean(hits)), "colour_cases": len(hits)}


def overlay_preserved(cases: List[InpaintCase], results: List[np.ndarray]) -> Dict[str, float]:
    """Share of unmasked pixels (over all cases) returned exactly, for results made with
    apply_overlay=True."""
    kept, total = 0, 0
    for case, result in zip(cases, results):
        outside = np.asarray(case.mask) <= 127
        original = np.asarray(case.image)
        got = np.round(result * 255).astype(np.uint8)
        kept += int(np.all(got[outside] == original[outside], axis=-1).sum())
        total += int(outside.sum())
    return {"overlay_unchanged_fraction": kept / total}


def evaluate_inpaint(pipe, params, n_cases: int = 36, steps: int = 25, guidance: float = 4.0,
                     seed: int = 0, overlay_cases: int = 4) -> Dict[str, float]:
    """Colour accuracy over `n_cases` and the overlay check over the first `overlay_cases`."""
    cases = colour_cases(n_cases, seed)
    scores = colour_accuracy(cases, inpaint_cases(pipe, params, cases, seed, steps, guidance))
    few = cases[:overlay_cases]
    scores.update(overlay_preserved(few, inpaint_cases(pipe, params, few, seed, steps, guidance, True)))
    return scores


class ControlCase(NamedTuple):
    image: Image.Image  # the background the prompt names (irrelevant under the whole-image mask)
    mask: Image.Image  # all white: generate everything
    control: Image.Image  # the circle's outline, white on black
    interior: np.ndarray  # [H, W] bool, inside the outline
    prompt: str
    colour: int
    background: int


def control_cases(n: int, seed: int = 0, size: int = 64) -> List[ControlCase]:
    """`n` fill-the-circle cases: random circles, colours and backgrounds (plain and textured)."""
    rng = np.random.default_rng(seed)
    scenes = data.sample_scenes(rng, n, size, shapes=(data.SHAPES.index("circle"),), distractor=0.0,
                                min_radius=0.15)
    outlines = _pil(data.circle_outlines(scenes))
    backgrounds = _pil(data.backgrounds(rng, scenes.background, size, textured=0.3))
    full = Image.fromarray(np.full((size, size), 255, np.uint8))
    return [
        ControlCase(backgrounds[i], full, outlines[i], scenes.distance()[i] < 0, scenes.captions[i],
                    int(scenes.colour[i]), int(scenes.background[i]))
        for i in range(n)
    ]


def filled_region(result: np.ndarray, colour: int, background: int) -> np.ndarray:
    """[H, W] bool: pixels nearer the palette's `colour` than its `background` colour."""
    near = np.linalg.norm(result[..., None, :] - data.RGB[[colour, background]], axis=-1)
    return near[..., 0] < near[..., 1]


def controlnet_iou(pipe, params, cases: List[ControlCase], seed: int, steps: int, guidance: float,
                   conditioning_scale: float = 1.0) -> Dict[str, float]:
    """Mean IoU of the filled region with the outline's interior, and the share of cases >= 0.7."""
    ious = []
    for i, case in enumerate(cases):
        out = pipe.inpaint(
            case.prompt, case.image, case.mask, case.control, params, jax.random.key(seed + i),
            num_inference_steps=steps, guidance_scale=guidance, controlnet_conditioning_scale=conditioning_scale,
            output_type="np",
        )
        filled = filled_region(np.asarray(out.images[0], np.float32), case.colour, case.background)
        ious.append((filled & case.interior).sum() / max(1, (filled | case.interior).sum()))
    return {"controlnet_iou": float(np.mean(ious)), "controlnet_iou_min": float(np.min(ious)),
            "controlnet_cases_iou_ge_0.7": float(np.mean(np.asarray(ious) >= 0.7)), "controlnet_cases": len(ious)}


# ----------------------------------------------------------------------------- DiffEdit and text-to-image
#
# DiffEdit cases: a red circle (no distractor) on a background that is neither red nor blue, plain or
# textured; source prompt "a red circle on a <bg> background", target "a blue circle on ...". The mask
# (latent size, upsampled by the VAE factor) is compared with the circle by IoU; the edit passes when the
# mean colour inside the circle is nearest to blue.

class DiffEditCases(NamedTuple):
    images: np.ndarray  # [N, H, W, 3] in [0, 1]
    interior: np.ndarray  # [N, H, W] bool, inside the circle
    source: List[str]
    target: List[str]


def diffedit_cases(n: int, seed: int = 0, size: int = 64, source: str = "red", target: str = "blue") -> DiffEditCases:
    rng = np.random.default_rng(seed)
    src, tgt = data.COLOURS.index(source), data.COLOURS.index(target)
    allowed = np.array([c for c in range(len(data.COLOURS)) if c not in (src, tgt)])
    background = allowed[np.arange(n) % len(allowed)]
    images = data.backgrounds(rng, background, size, textured=0.3)
    radius = rng.uniform(0.15, 0.3, n) * size
    centre = rng.uniform(radius[:, None] + 1, size - radius[:, None] - 1, (n, 2))
    distance = data.signed_distance(np.zeros(n, int), centre, radius, size)
    images = images + data.coverage(distance)[..., None] * (data.RGB[src] - images)
    circle = data.SHAPES.index("circle")
    return DiffEditCases(images.astype(np.float32), distance < 0,
                         [data.caption(circle, src, b) for b in background],
                         [data.caption(circle, tgt, b) for b in background])


def diffedit_scores(pipe, params, cases: DiffEditCases, seed: int, steps: int = 25, guidance: float = 4.0,
                    num_maps_per_mask: int = 10, mask_encode_strength: float = 0.5,
                    mask_thresholding_ratio: float = 3.0, inpaint_strength: float = 1.0,
                    invert_guidance: float = 1.0) -> Dict[str, float]:
    """The three DiffEdit steps on every case (one batched call each) with `jax.random.key(seed)`:
    mask IoU with the circle and the share of edits whose circle turned the target colour.

    The inversion runs without guidance by default: with guidance 4 this small model's DDIM inversion
    drifts, and edits come out washed-out (0.25 target colour accuracy at strength 0.8, against 0.8-0.9)."""
    key = jax.random.key(seed)
    images = np.transpose(cases.images * 2 - 1, (0, 3, 1, 2))
    mask, edited = pipe.edit(images, params, key, source_prompt=cases.source, target_prompt=cases.target,
                             num_inference_steps=steps, guidance_scale=guidance, invert_guidance_scale=invert_guidance,
                             inpaint_strength=inpaint_strength, num_maps_per_mask=num_maps_per_mask,
                             mask_encode_strength=mask_encode_strength,
                             mask_thresholding_ratio=mask_thresholding_ratio)
    f = pipe.vae_scale_factor
    pixels = np.repeat(np.repeat(mask > 0.5, f, axis=1), f, axis=2)
    iou = (pixels & cases.interior).sum((1, 2)) / np.maximum(1, (pixels | cases.interior).sum((1, 2)))
    target = data.COLOURS.index(cases.target[0].split()[1])
    hits = [nearest_colour(e[inside].mean(axis=0)) == target for e, inside in zip(edited, cases.interior)]
    outside = ~pixels
    change = np.abs(edited - cases.images)[outside].mean() if outside.any() else 0.0
    return {"mask_iou_mean": float(iou.mean()), "mask_iou_min": float(iou.min()),
            "cases_iou_ge_0.6": float(np.mean(iou >= 0.6)), "target_colour_accuracy": float(np.mean(hits)),
            "mean_abs_change_outside_mask": float(change), "cases": len(iou)}


def text_to_image_circles(pipe, params, prompt: str, seeds, steps: int = 25, guidance: float = 4.0,
                          colour: str = "red") -> Dict[str, float]:
    """For "a <colour> circle on a <bg> background": per seed, the region nearest `colour` in the
    palette and its IoU with the disc of the same area at its centroid (1 for a perfect circle)."""
    want = data.COLOURS.index(colour)
    areas, roundness = [], []
    for seed in seeds:
        out = pipe(pipe.prepare_inputs(prompt), params, jax.random.key(seed), num_inference_steps=steps,
                   guidance_scale=guidance)
        image = np.asarray(out.images[0], np.float32)
        nearest = np.argmin(np.linalg.norm(image[..., None, :] - data.RGB, axis=-1), axis=-1)
        region = nearest == want
        area = int(region.sum())
        areas.append(area)
        if area == 0:
            roundness.append(0.0)
            continue
        ys, xs = np.nonzero(region)
        yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
        disc = np.hypot(xx - xs.mean(), yy - ys.mean()) <= np.sqrt(area / np.pi)
        roundness.append(float((region & disc).sum() / (region | disc).sum()))
    return {"colour_area_px_min": int(min(areas)), "circle_iou_mean": float(np.mean(roundness)),
            "circle_iou_min": float(np.min(roundness)), "seeds": len(areas)}
