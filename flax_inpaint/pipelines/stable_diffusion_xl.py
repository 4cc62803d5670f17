"""SDXL pipelines: text-to-image, image-to-image (the refiner) and inpainting, on the one sampling program.

They differ from the Stable Diffusion pipelines only in their inputs: two text encoders (`prompt_ids`
[B, 2, L], one row per tokenizer, as diffusers' Flax SDXL pipeline stacks them; the refiner has the second
alone: [B, 1, L]), the pooled prompt embedding and the size conditioning `add_time_ids` (sdxl_conditioning.py)
fed to the UNet as `added_cond_kwargs`. Sizes, aesthetic scores, `denoising_start` / `denoising_end` and the
zeroing of empty negative prompts are traced values: changing them never recompiles.

Ensemble of experts (diffusers' base + refiner): the base pipeline with `denoising_end=0.8,
output_type="latent"` returns noisy latents, which the refiner (img2img or inpaint pipeline) takes as
`image=` with `denoising_start=0.8`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flax_inpaint.pipelines.callbacks import INPAINT_TENSOR_INPUTS
from flax_inpaint.pipelines.ip_adapter import ImageEncoder
from flax_inpaint.pipelines.sampling import Components
from flax_inpaint.pipelines.sdxl_conditioning import encode_hidden_states, prompt_ids
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipelineOutput,
)


class FlaxStableDiffusionXLPipelineBase(FlaxDiffusionPipeline):
    """Components, tokenization and call checks shared by the SDXL pipelines (diffusers' component names)."""

    _config_names = ("force_zeros_for_empty_prompt",)
    _optional_components = ("text_encoder", "tokenizer")  # the refiner's folder has neither
    _time_id_rule = "text2img"  # which diffusers pipeline's add_time_ids rules (sdxl_conditioning.TIME_ID_RULES)

    def __init__(self, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, unet, scheduler,
                 dtype: Any = jnp.float32, image_encoder=None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("SDXL pipelines need text_encoder_2 and tokenizer_2 (the pooled prompt embedding comes "
                             "from text_encoder_2); load an SDXL folder or pass both.")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("Pass text_encoder and tokenizer together, or neither (the refiner has neither).")
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, feature_extractor=feature_extractor,
                         dtype=dtype, image_encoder=image_encoder)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)

    @property
    def tokenizers(self) -> tuple:
        """The tokenizers present, in text encoder order."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def ids_shape(self) -> Tuple[int, ...]:
        return (len(self.tokenizers), self.max_length)

    @property
    def context_width(self) -> int:
        return sum(e.hidden_size for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    def tokenize(self, prompt) -> np.ndarray:
        """Token ids [B, tokenizers, max_length] of `prompt` with each tokenizer (diffusers' Flax SDXL layout)."""
        return np.stack(prompt_ids(self.tokenizers, prompt).ids, axis=1)

    def _prompt_inputs(self, prompt, negative_prompt, kwargs: dict) -> tuple:
        """(prompt_ids, neg_prompt_ids) with prompt_2 / negative_prompt_2 (popped from `kwargs`) read by the second
        tokenizer; neg_prompt_ids is None where diffusers zeroes the negative embeddings
        (force_zeros_for_empty_prompt without a negative_prompt)."""
        ids = prompt_ids(self.tokenizers, prompt, kwargs.pop("prompt_2", None), negative_prompt,
                         kwargs.pop("negative_prompt_2", None), self.force_zeros_for_empty_prompt)
        negative = None if ids.zero_negative else np.stack(ids.negative_ids, axis=1)
        return np.stack(ids.ids, axis=1), negative

    def _components(self) -> Components:
        encoder = None if self.image_encoder is None else ImageEncoder.of(self.image_encoder, self.feature_extractor)
        return Components(self.unet, self.vae, self.text_encoder, self.scheduler, image_encoder=encoder,
                          text_encoder_2=self.text_encoder_2)

    def _call(self, args: Dict[str, Any]):
        given = {n: args.get(n) is not None for n in ("prompt_embeds", "pooled_prompt_embeds",
                                                      "negative_prompt_embeds", "negative_pooled_prompt_embeds")}
        for embeds in ("prompt_embeds", "negative_prompt_embeds"):
            pooled = embeds.replace("prompt_embeds", "pooled_prompt_embeds")
            if given[embeds] != given[pooled]:
                raise ValueError(f"Pass {pooled} with {embeds} (and only with it): SDXL's UNet takes both.")
        args["zero_negative"] = (args["neg_prompt_ids"] is None and not given["negative_prompt_embeds"]
                                 and self.force_zeros_for_empty_prompt)
        return super()._call(args)

    def _convenience(self, prompt, params, prng_seed, negative_prompt, output_type: str, kwargs: dict, *images):
        """A PyTorch-style call: prompt strings to ids, `images` (processed) before params, PIL images out."""
        ids, neg = self._prompt_inputs(prompt, negative_prompt, kwargs)
        return self(ids, *images, params, prng_seed, neg_prompt_ids=neg, output_type=output_type, **kwargs)


class FlaxStableDiffusionXLPipeline(FlaxStableDiffusionXLPipelineBase):
    """SDXL text-to-image: diffusers' Flax `FlaxStableDiffusionXLPipeline` API plus the PyTorch pipeline's
    keywords."""

    _pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, unet, scheduler,
                 dtype: Any = jnp.float32, image_encoder=None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = True):
        """Components in the order of diffusers' Flax SDXL pipeline (dtype eighth, as there)."""
        super().__init__(text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, unet, scheduler, dtype,
                         image_encoder, feature_extractor, force_zeros_for_empty_prompt)

    def prepare_inputs(self, prompt) -> np.ndarray:
        """Token ids [B, 2, max_length]: each tokenizer's ids of `prompt`."""
        return self.tokenize(prompt)

    def get_embeddings(self, prompt_ids, params) -> Tuple[jax.Array, jax.Array]:
        """(prompt_embeds [B, L, D1 + D2], pooled text_embeds [B, P]) of ids [B, 2, L] (unreplicated params)."""
        ids = jnp.asarray(prompt_ids)
        return encode_hidden_states((self.text_encoder, self.text_encoder_2),
                                    (params["text_encoder"], params["text_encoder_2"]), (ids[:, 0], ids[:, 1]), -2)

    def text2img(self, prompt, params, prng_seed, *, negative_prompt=None, guidance_scale=5.0,
                 output_type: str = "pil", **kwargs):
        """PyTorch-style convenience: prompt strings in (with prompt_2, negative_prompt_2), images out (PIL by
        default), guidance_scale 5.0 as diffusers' StableDiffusionXLPipeline; other keywords go to `__call__`."""
        kwargs["guidance_scale"] = guidance_scale
        return self._convenience(prompt, params, prng_seed, negative_prompt, output_type, kwargs)

    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50, guidance_scale=7.5,
                 height: Optional[int] = None, width: Optional[int] = None, latents=None, neg_prompt_ids=None,
                 return_dict: bool = True, output_type: Optional[str] = None, jit: bool = False, *,
                 num_images_per_prompt: int = 1, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip: Optional[int] = None,
                 eta: float = 0.0, original_size: Optional[Tuple[int, int]] = None,
                 crops_coords_top_left: Tuple[int, int] = (0, 0), target_size: Optional[Tuple[int, int]] = None,
                 negative_original_size: Optional[Tuple[int, int]] = None,
                 negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
                 negative_target_size: Optional[Tuple[int, int]] = None, denoising_end: Optional[float] = None,
                 mesh: Optional[Mesh] = None, ip_adapter_image=None, ip_adapter_image_embeds=None, **hooks):
        """Text to image. Positional arguments as diffusers' Flax SDXL pipeline (`prompt_ids` [B, 2, L] from
        `prepare_inputs`; `neg_prompt_ids` None gives zero negative embeddings where the folder's
        force_zeros_for_empty_prompt says so); keywords as its PyTorch pipeline (the size conditioning,
        `denoising_end` to hand noisy latents to a refiner with output_type="latent"); `hooks`: the
        per-step keywords of `CallHooks` (guidance_rescale, callbacks, ...). `latents`: the unscaled
        initial noise (one per image)."""
        output_type = output_type or "np"
        return self._call(locals())


class FlaxStableDiffusionXLImg2ImgPipeline(FlaxStableDiffusionXLPipelineBase):
    """SDXL image-to-image, and the refiner (`requires_aesthetics_score`: aesthetic scores instead of the
    target size; its folder has text_encoder_2 alone)."""

    _pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    _config_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
    _time_id_rule = "img2img"
    _inputs = {"image_required": True}

    def prepare_inputs(self, prompt, image, height: Optional[int] = None, width: Optional[int] = None):
        """(prompt_ids [B, tokenizers, L], images NCHW in [-1, 1])."""
        return self.tokenize(prompt), self.image_processor.preprocess(image, height, width)

    def img2img(self, prompt, image, params, prng_seed, *, negative_prompt=None, height: Optional[int] = None,
                width: Optional[int] = None, output_type: str = "pil", **kwargs):
        """PyTorch-style convenience: prompt strings and a PIL image (or scaled latents [B, 4, h, w], e.g. the
        base's output_type="latent") in, images out; other keywords go to `__call__` (strength,
        denoising_start, aesthetic_score, ...)."""
        if np.ndim(image) == 4 and np.shape(image)[1] == self.vae.latent_channels:
            images = np.asarray(image, np.float32)
        else:
            images = self.image_processor.preprocess(image, height, width)
        return self._convenience(prompt, params, prng_seed, negative_prompt, output_type, kwargs, images)

    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.3, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=5.0, noise=None,
                 neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *, num_images_per_prompt: int = 1,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, clip_skip: Optional[int] = None, eta: float = 0.0,
                 output_type: str = "np", original_size: Optional[Tuple[int, int]] = None,
                 crops_coords_top_left: Tuple[int, int] = (0, 0), target_size: Optional[Tuple[int, int]] = None,
                 negative_original_size: Optional[Tuple[int, int]] = None,
                 negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
                 negative_target_size: Optional[Tuple[int, int]] = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: Optional[float] = None,
                 denoising_end: Optional[float] = None, mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Image to image (defaults strength 0.3 and guidance 5.0 as diffusers' SDXL img2img). `image`: NCHW
        pixels in [-1, 1] or scaled latents; `noise`: the unscaled noise added at the first timestep;
        `denoising_start` replaces strength and starts from `image`'s latents as given (the refiner's half of
        an ensemble of experts)."""
        return self._call(locals())


class FlaxStableDiffusionXLInpaintPipeline(FlaxStableDiffusionXLPipelineBase, FlaxStableDiffusionInpaintPipeline):
    """SDXL inpainting with 9-channel UNets (stable-diffusion-xl-1.0-inpainting-0.1) or by latent blending with
    4-channel ones (the base or the refiner)."""

    _pipeline_class = "StableDiffusionXLInpaintPipeline"
    _config_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
    _time_id_rule = "img2img"
    _inputs = {"inpainting": True}
    _callback_tensor_inputs = INPAINT_TENSOR_INPUTS

    def inpaint(self, prompt, image, mask_image, params, prng_seed, *, strength: float = 0.9999, **kwargs):
        """PyTorch-style convenience as `FlaxStableDiffusionInpaintPipeline.inpaint` (padding_mask_crop,
        apply_overlay), with prompt_2 / negative_prompt_2 and the SDXL keywords; strength defaults to
        0.9999 as in diffusers' StableDiffusionXLInpaintPipeline."""
        return super().inpaint(prompt, image, mask_image, params, prng_seed, strength=strength, **kwargs)

    def __call__(self, prompt_ids, mask, masked_image, params, prng_seed, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=7.5,
                 latents=None, neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *,
                 image=None, strength: float = 1.0, eta: float = 0.0, num_images_per_prompt: int = 1,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, masked_image_latents=None, clip_skip: Optional[int] = None,
                 output_type: str = "np", original_size: Optional[Tuple[int, int]] = None,
                 crops_coords_top_left: Tuple[int, int] = (0, 0), target_size: Optional[Tuple[int, int]] = None,
                 negative_original_size: Optional[Tuple[int, int]] = None,
                 negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
                 negative_target_size: Optional[Tuple[int, int]] = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: Optional[float] = None,
                 denoising_end: Optional[float] = None, mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Inpaint: arguments as `FlaxStableDiffusionInpaintPipeline.__call__` (`latents` is the noise), plus
        SDXL's pooled embeddings, size conditioning, aesthetic scores (refiner) and denoising_start /
        denoising_end."""
        return self._call(locals())


__all__ = ["FlaxStableDiffusionXLPipeline", "FlaxStableDiffusionXLImg2ImgPipeline",
           "FlaxStableDiffusionXLInpaintPipeline", "FlaxStableDiffusionPipelineOutput"]
