"""SDXL ControlNet pipelines: text-to-image, image-to-image and inpainting guided by SDXL ControlNets (diffusers'
API).

They are the SDXL pipelines with the ControlNet pipelines' nets, control images and per-step scales
(controlnet.py): each net takes the UNet's added conditioning (pooled prompt embeddings and size
conditioning; in guess mode with CFG, the text half only), as diffusers' StableDiffusionXLControlNet*
pipelines give it. Scales, guidance windows, sizes and strength are traced values; `guess_mode` is static.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax.numpy as jnp
from jax.sharding import Mesh

from flax_inpaint.pipelines.controlnet import (
    ControlNets,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionControlNetPipeline,
    _ControlNetMixin,
)
from flax_inpaint.pipelines.stable_diffusion_xl import (
    FlaxStableDiffusionXLImg2ImgPipeline,
    FlaxStableDiffusionXLInpaintPipeline,
    FlaxStableDiffusionXLPipeline,
    FlaxStableDiffusionXLPipelineBase,
)


class _SDXLControlNetMixin(_ControlNetMixin):
    """The ControlNet pipelines' additions on an SDXL pipeline; constructors in the order of diffusers' PyTorch
    SDXL ControlNet pipelines (no watermarker), dtype last."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet: ControlNets,
                 scheduler, requires_aesthetics_score: bool = False, force_zeros_for_empty_prompt: bool = True,
                 feature_extractor=None, image_encoder=None, dtype: Any = jnp.float32):
        FlaxStableDiffusionXLPipelineBase.__init__(
            self, text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, dtype=dtype, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            requires_aesthetics_score=requires_aesthetics_score)
        self._set_controlnets(controlnet)


class FlaxStableDiffusionXLControlNetPipeline(_SDXLControlNetMixin, FlaxStableDiffusionControlNetPipeline,
                                              FlaxStableDiffusionXLPipeline):
    """SDXL text-to-image guided by one or more ControlNets (diffusers' StableDiffusionXLControlNetPipeline)."""

    _pipeline_class = "StableDiffusionXLControlNetPipeline"

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet: ControlNets,
                 scheduler, force_zeros_for_empty_prompt: bool = True, feature_extractor=None, image_encoder=None,
                 dtype: Any = jnp.float32):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         feature_extractor=feature_extractor, image_encoder=image_encoder, dtype=dtype)

    def text2img(self, prompt, image, params, prng_seed, *, negative_prompt=None, height: Optional[int] = None,
                 width: Optional[int] = None, output_type: str = "pil", **kwargs):
        """PyTorch-style convenience: prompt strings (with prompt_2, negative_prompt_2) and control images
        (PIL, or a list with one per ControlNet) in, images out (PIL by default); the output has the control
        images' size, or height x width. Other keywords go to `__call__`."""
        control = self.prepare_control_image(image, height, width)
        return self._convenience(prompt, params, prng_seed, negative_prompt, output_type, kwargs, control)

    def __call__(self, prompt_ids, image, params, prng_seed, num_inference_steps: int = 50, guidance_scale=5.0,
                 latents=None, neg_prompt_ids=None, controlnet_conditioning_scale=1.0, return_dict: bool = True,
                 jit: bool = False, *, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, num_images_per_prompt: int = 1, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 clip_skip: Optional[int] = None, eta: float = 0.0, output_type: str = "np",
                 original_size: Optional[Tuple[int, int]] = None, crops_coords_top_left: Tuple[int, int] = (0, 0),
                 target_size: Optional[Tuple[int, int]] = None,
                 negative_original_size: Optional[Tuple[int, int]] = None,
                 negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
                 negative_target_size: Optional[Tuple[int, int]] = None, denoising_end: Optional[float] = None,
                 mesh: Optional[Mesh] = None, ip_adapter_image=None, ip_adapter_image_embeds=None, **hooks):
        """Generate images the size of the control images `image` (from `prepare_image_inputs`: one NCHW
        array, or a list with one per ControlNet), from `prompt_ids` [B, 2, L] (`prepare_inputs`).
        Positional arguments as diffusers' Flax ControlNet pipeline, keywords as its PyTorch SDXL ControlNet
        pipeline (size conditioning, pooled embeddings, denoising_end); `controlnet_conditioning_scale` and
        `control_guidance_start/end` are floats or lists with one per ControlNet; `hooks`: the per-step
        keywords of `CallHooks`."""
        return self._call(locals())


class FlaxStableDiffusionXLControlNetInpaintPipeline(_SDXLControlNetMixin, FlaxStableDiffusionControlNetInpaintPipeline,
                                                     FlaxStableDiffusionXLInpaintPipeline):
    """SDXL inpainting guided by one or more ControlNets, with 9-channel SDXL inpainting UNets or 4-channel
    ones by latent blending (diffusers' StableDiffusionXLControlNetInpaintPipeline, whose negative size
    conditioning repeats the positive one)."""

    _pipeline_class = "StableDiffusionXLControlNetInpaintPipeline"
    _time_id_rule = "controlnet_inpaint"

    def __call__(self, prompt_ids, mask, masked_image, params, prng_seed, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=5.0,
                 latents=None, neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *,
                 control_image, controlnet_conditioning_scale=1.0, guess_mode: bool = False,
                 control_guidance_start=0.0, control_guidance_end=1.0, image=None, strength: float = 1.0,
                 eta: float = 0.0, num_images_per_prompt: int = 1, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, masked_image_latents=None,
                 clip_skip: Optional[int] = None, output_type: str = "np",
                 original_size: Optional[Tuple[int, int]] = None, crops_coords_top_left: Tuple[int, int] = (0, 0),
                 target_size: Optional[Tuple[int, int]] = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: Optional[float] = None,
                 denoising_end: Optional[float] = None, mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Inpaint as `FlaxStableDiffusionXLInpaintPipeline.__call__`, guided by `control_image` (from
        `prepare_inputs`: NCHW at the mask's size; a list with one per ControlNet for several).
        `controlnet_conditioning_scale` and `control_guidance_start/end` are floats or lists with one per
        ControlNet; with strength < 1 (or denoising_start) the guidance windows are fractions of the steps
        that run. `inpaint(prompt, image, mask_image, control_image, params, prng_seed, **kwargs)` is the
        PyTorch-style convenience (strength 0.9999 by default, as diffusers')."""
        return self._call(locals())


class FlaxStableDiffusionXLControlNetImg2ImgPipeline(_SDXLControlNetMixin, FlaxStableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image guided by one or more ControlNets (diffusers' StableDiffusionXLControlNetImg2ImgPipeline;
    with `requires_aesthetics_score`, the refiner's size conditioning)."""

    _pipeline_class = "StableDiffusionXLControlNetImg2ImgPipeline"

    def img2img(self, prompt, image, control_image, params, prng_seed, *, height: Optional[int] = None,
                width: Optional[int] = None, **kwargs):
        """PyTorch-style convenience: prompt strings, a PIL image and control images (PIL, or a list with one
        per ControlNet) in, images out. As in diffusers, both are processed at height x width (default: each
        its own size, which must then agree); other keywords as `FlaxStableDiffusionXLImg2ImgPipeline.img2img`."""
        control = self.prepare_control_image(control_image, height, width)
        return super().img2img(prompt, image, params, prng_seed, height=height, width=width, control_image=control,
                               **kwargs)

    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.8, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=5.0, noise=None,
                 neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *, control_image,
                 controlnet_conditioning_scale=0.8, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, num_images_per_prompt: int = 1, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 clip_skip: Optional[int] = None, eta: float = 0.0, output_type: str = "np",
                 original_size: Optional[Tuple[int, int]] = None, crops_coords_top_left: Tuple[int, int] = (0, 0),
                 target_size: Optional[Tuple[int, int]] = None,
                 negative_original_size: Optional[Tuple[int, int]] = None,
                 negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
                 negative_target_size: Optional[Tuple[int, int]] = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Image to image as `FlaxStableDiffusionXLImg2ImgPipeline.__call__` (diffusers' defaults here: strength
        0.8, controlnet_conditioning_scale 0.8), guided by `control_image` (NCHW in [0, 1] at the image's size,
        from `prepare_control_image`; a list with one per ControlNet for several); the guidance windows are
        fractions of the steps that run."""
        return self._call(locals())


__all__ = ["FlaxStableDiffusionXLControlNetPipeline", "FlaxStableDiffusionXLControlNetImg2ImgPipeline",
           "FlaxStableDiffusionXLControlNetInpaintPipeline"]
