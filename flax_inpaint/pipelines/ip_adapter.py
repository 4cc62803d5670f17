"""IP-Adapter image prompts inside the sampling program: reference images -> the UNet's image tokens.

The call gives either reference images (the image encoder, with its CLIP preprocessing, runs in the
program, as the safety checker's does) or precomputed image embeddings (diffusers'
`ip_adapter_image_embeds`). As diffusers' `encode_image` does, plain adapters take the encoder's
`image_embeds` with zeros as the negative (CFG) embedding; "plus" adapters take its penultimate hidden
states, with those of an all-zero pixel input as the negative. The scales are params
(`set_ip_adapter_scale`), so new scales and new images of the same size reuse the program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from flax_inpaint.loaders.ip_adapter import ip_adapter_inputs
from flax_inpaint.models.safety import CLIPImagePreprocessing


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """A `FlaxCLIPVisionModelWithProjection` and the CLIP preprocessing of its input (static under jit)."""

    model: Any
    preprocessing: CLIPImagePreprocessing

    @classmethod
    def of(cls, model: Any, feature_extractor: Optional[Mapping[str, Any]]) -> "ImageEncoder":
        """The preprocessing of the pipeline's feature extractor config or, without one, the
        `CLIPImageProcessor(size=image_size, crop_size=image_size)` diffusers' `load_ip_adapter` makes."""
        if feature_extractor is not None:
            return cls(model, CLIPImagePreprocessing.from_config(feature_extractor))
        size = model.image_size
        return cls(model, CLIPImagePreprocessing(size=size, crop_size=(size, size)))


def _encode(encoder: ImageEncoder, params, images: jax.Array, plus: bool):
    """(embeds, negative embeds) of NHWC images in [0, 1] [n, H, W, 3]: [n, D] plain, [n, seq, w] plus."""
    pixels = encoder.preprocessing(images)
    model = encoder.model
    if not plus:
        embeds = model.apply({"params": params}, pixels).image_embeds.astype(jnp.float32)
        return embeds, jnp.zeros_like(embeds)
    both = model.apply({"params": params}, jnp.concatenate([pixels, jnp.zeros_like(pixels)]),
                       output_hidden_states=True).hidden_states[-2].astype(jnp.float32)
    return jnp.split(both, 2)


def image_prompt(image_encoder: Optional[ImageEncoder], params, batch, rows: int, num_images_per_prompt: int,
                 do_cfg: bool, runtime) -> Dict[str, Any]:
    """The UNet's `ip_hidden_states` / `ip_adapter_scale` keywords for a call's `rows` prompts (each
    repeated num_images_per_prompt times; [negative; positive] with CFG), or {} without an image prompt."""
    if batch.ip_adapter_images is not None:
        pos, neg = [], []
        for images, proj in zip(batch.ip_adapter_images, params["ip_adapter"]["image_proj"]):
            e, n = _encode(image_encoder, params["image_encoder"], images, plus="image_embeds" not in proj)
            pos.append(jnp.broadcast_to(e, (rows,) + e.shape))  # the same images for every prompt
            neg.append(jnp.broadcast_to(n, (rows,) + n.shape))
    elif batch.ip_adapter_image_embeds is not None:
        pos, neg = batch.ip_adapter_image_embeds, batch.ip_adapter_negative_image_embeds
    else:
        return {}

    def per_image(x):
        return jnp.repeat(jnp.asarray(x, jnp.float32), num_images_per_prompt, axis=0)

    embeds = [jnp.concatenate([per_image(n), per_image(p)]) if do_cfg else per_image(p) for p, n in
              zip(pos, neg if do_cfg else pos)]
    return ip_adapter_inputs(params, embeds, runtime)
