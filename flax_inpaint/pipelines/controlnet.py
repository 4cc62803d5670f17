"""ControlNet pipelines: text-to-image, img2img and inpainting guided by control images (diffusers' API).

They are the Stable Diffusion pipelines with one or more `FlaxControlNetModel`s in the static
`Components` of `sampling.generate`: every step, each net sees the scaled latents (never an
inpainting UNet's mask channels, as in diffusers), its control image and its conditioning scale,
and the UNet adds the nets' summed residuals to its own. The scales and the guidance windows
(`control_guidance_start/end`) become one traced table of per-step scales, so changing them reuses
the compiled program; `guess_mode` is static.

Control images are NCHW floats in [0, 1] (diffusers' control image processor: RGB, not normalised)
at the generated size; inpaint ControlNets take `make_inpaint_condition`'s image, -1 where masked.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.sharding import Mesh

from flax_inpaint.image_processor import CropCoords, ImageInput, VaeImageProcessor
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.pipelines.sampling import Components
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
)

ControlNets = Union[FlaxControlNetModel, Sequence[FlaxControlNetModel]]


def make_inpaint_condition(image: ImageInput, mask_image: ImageInput) -> np.ndarray:
    """The control image of inpaint ControlNets (e.g. control_v11p_sd15_inpaint), as diffusers' docs
    build it: the RGB image in [0, 1] with every pixel whose mask value exceeds 0.5 set to -1.

    image / mask_image: PIL images (or channels-last arrays in [0, 1]) of one size, or lists of them.
    Returns float32 NCHW [N, 3, H, W] at the image's own size; the pipelines resize it (nearest
    neighbour, like diffusers resizes a tensor) to the generated size.
    """
    pixels = VaeImageProcessor(do_resize=False, do_normalize=False, do_convert_rgb=True)
    masks = VaeImageProcessor.for_masks(do_resize=False, do_binarize=False)
    rgb = pixels.preprocess(image, input_name="image")
    mask = masks.preprocess(mask_image, input_name="mask_image")
    if rgb.shape[2:] != mask.shape[2:] or mask.shape[0] not in (1, rgb.shape[0]):
        raise ValueError(
            f"image is {rgb.shape[0]} of {rgb.shape[3]}x{rgb.shape[2]} but mask_image {mask.shape[0]} of "
            f"{mask.shape[3]}x{mask.shape[2]}; pass masks of the image's size, one or one per image."
        )
    return np.where(mask > 0.5, np.float32(-1.0), rgb)


class _ControlNetMixin:
    """What the ControlNet pipelines add to a Stable Diffusion pipeline: the nets, control images and
    per-step conditioning scales. `controlnet` is one FlaxControlNetModel (params["controlnet"] is its
    params) or a list of them (params["controlnet"] a tuple of their params, in order)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet: ControlNets, scheduler, safety_checker=None,
                 feature_extractor=None, dtype: Any = jnp.float32, image_encoder=None):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, dtype,
                         image_encoder=image_encoder)
        multi = isinstance(controlnet, (list, tuple))
        nets = tuple(controlnet) if multi else (controlnet,)
        if not nets or not all(isinstance(n, FlaxControlNetModel) for n in nets):
            raise TypeError(f"controlnet must be a FlaxControlNetModel or a non-empty list of them; got "
                            f"{[type(n).__name__ for n in nets] if multi else type(controlnet).__name__}.")
        for k, net in enumerate(nets):
            if net.in_channels != vae.latent_channels:
                raise ValueError(
                    f"ControlNet {k} has in_channels={net.in_channels}; it is fed the VAE's {vae.latent_channels} "
                    "latent channels (an inpainting UNet's mask channels go to the UNet only, as in diffusers)."
                )
            if net.cond_downscale != self.vae_scale_factor:
                raise ValueError(
                    f"ControlNet {k} takes control images {net.cond_downscale}x its latent size, but the VAE "
                    f"downsamples by {self.vae_scale_factor}; use a ControlNet made for this VAE."
                )
        self.controlnet = nets if multi else controlnet
        self.controlnets: Tuple[FlaxControlNetModel, ...] = nets
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def _passed_component(cls, name: str, value: Any, params: dict, load: dict) -> Any:
        """`from_pretrained(controlnet=...)` also takes a ControlNet folder (or hub id) or a list of them,
        loaded with the pipeline's dtypes into params["controlnet"] (a tuple for a list). Models passed
        as objects bring no params: set params["controlnet"] = controlnet_params yourself."""
        if name != "controlnet":
            return value
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        is_path = [isinstance(x, (str, os.PathLike)) for x in items]
        if not any(is_path):
            return value
        if not all(is_path):
            raise ValueError("controlnet mixes folders and FlaxControlNetModel objects; pass folders only "
                             "(loaded with their params) or models only (with params['controlnet'] set by you).")
        models, nets_params = zip(*(FlaxControlNetModel.from_pretrained(x, **load) for x in items))
        multi = isinstance(value, (list, tuple))
        params["controlnet"] = tuple(nets_params) if multi else nets_params[0]
        return tuple(models) if multi else models[0]

    @classmethod
    def from_single_file(cls, path: Union[str, os.PathLike], config: Optional[Union[str, os.PathLike]] = None, *,
                         controlnet: Any = None, dtype: Any = jnp.float32, param_dtype: Optional[Any] = None,
                         attention: str = "auto", **kwargs):
        """`FlaxDiffusionPipeline.from_single_file` plus the ControlNet(s). controlnet: None reads it from the file itself (the
        original ControlNet releases hold the whole pipeline); a ControlNet single file or diffusers folder, or a
        list of them, is loaded into params["controlnet"]; FlaxControlNetModel(s) are used as given (then set
        params["controlnet"] yourself)."""
        common = dict(dtype=dtype, param_dtype=param_dtype, attention=attention)
        items = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if controlnet is None or not all(isinstance(x, (str, os.PathLike)) for x in items):
            extra = {} if controlnet is None else {"controlnet": controlnet}
            return super().from_single_file(path, config, **common, **extra, **kwargs)
        runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention=attention)
        loaded = [FlaxControlNetModel.from_single_file(x, config, **runtime) if os.path.isfile(x)
                  else FlaxControlNetModel.from_pretrained(x, **runtime) for x in items]
        models, nets_params = (tuple(x) for x in zip(*loaded))
        multi = isinstance(controlnet, (list, tuple))
        pipe, params = super().from_single_file(path, config, controlnet=models if multi else models[0], **common,
                                                **kwargs)
        return pipe, {**params, "controlnet": nets_params if multi else nets_params[0]}

    @classmethod
    def _controlnet_in_file(cls, path, components: dict) -> bool:
        return "controlnet" not in components

    # -- host-side inputs -----------------------------------------------------------------------
    def _per_net(self, name: str, value) -> list:
        """`value` given once for all ControlNets, or as a list with one entry per ControlNet."""
        k = len(self.controlnets)
        if isinstance(value, (list, tuple)):
            if len(value) != k:
                raise ValueError(f"{name} has {len(value)} entries for {k} ControlNet{'s' * (k > 1)}; give one per "
                                 "ControlNet, in order, or a single value for all.")
            return list(value)
        return [value] * k

    def _net_images(self, name: str, image) -> list:
        """Per-ControlNet control images: several nets take a list with one entry (image or batch) each."""
        if len(self.controlnets) == 1:
            return [image]
        if not isinstance(image, (list, tuple)):
            raise ValueError(f"{name} must be a list with one control image (or batch) per ControlNet for the "
                             f"{len(self.controlnets)} ControlNets; got {type(image).__name__}.")
        return self._per_net(name, image)

    def prepare_control_image(self, image, height: Optional[int] = None, width: Optional[int] = None,
                              crops_coords: Optional[CropCoords] = None, resize_mode: str = "default"):
        """Control images for `__call__`: float32 NCHW at height x width (default: the image's size
        floored to a multiple of the VAE factor), one array per ControlNet (a list for several).

        An image (PIL, or a channels-last array in [0, 1], or a list of them) goes through diffusers'
        control image processing: RGB, resized, values kept in [0, 1]. An array that is already NCHW
        with the net's conditioning channels (e.g. `make_inpaint_condition`'s) is taken as processed and
        only resized, nearest neighbour, as diffusers treats a tensor.
        """
        out = []
        for net, x in zip(self.controlnets, self._net_images("control_image", image)):
            c = net.conditioning_channels
            if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1] == c and x.shape[-1] != c:
                x = np.transpose(x.astype(np.float32), (0, 2, 3, 1))
                h, w = self.control_image_processor.get_default_height_width(x, height, width)
                out.append(np.ascontiguousarray(self.control_image_processor.resize(x, h, w).transpose(0, 3, 1, 2)))
            else:
                out.append(self.control_image_processor.preprocess(
                    x, height, width, resize_mode=resize_mode, crops_coords=crops_coords, input_name="control_image"))
        return out if len(self.controlnets) > 1 else out[0]

    def _program_params(self, params) -> dict:
        """`params` with params["controlnet"] as a tuple in the nets' order (what `generate` reads)."""
        if "controlnet" not in params:
            raise ValueError("params has no 'controlnet' entry; set params['controlnet'] = controlnet_params (from "
                             "FlaxControlNetModel.from_pretrained; a tuple with one per ControlNet for several).")
        nets = params["controlnet"]
        if isinstance(self.controlnet, tuple):
            if not isinstance(nets, (list, tuple)) or len(nets) != len(self.controlnets):
                raise ValueError(f"params['controlnet'] must be a tuple with the params of each of the "
                                 f"{len(self.controlnets)} ControlNets, in order; got {type(nets).__name__}.")
            nets = tuple(nets)
        else:
            nets = (nets,)
        return {**params, "controlnet": nets}

    def _components(self) -> Components:
        return dataclasses.replace(super()._components(), controlnets=self.controlnets)


class FlaxStableDiffusionControlNetPipeline(_ControlNetMixin, FlaxDiffusionPipeline):
    """Text-to-image guided by one or more ControlNets (diffusers' Flax API)."""

    _pipeline_class = "StableDiffusionControlNetPipeline"
    _renamed = {"image": "control_image"}  # diffusers' name here for the control images
    _inputs = {"control_name": "image"}

    def prepare_image_inputs(self, image, height: Optional[int] = None, width: Optional[int] = None):
        """Control images as `__call__` takes them (see `prepare_control_image`)."""
        return self.prepare_control_image(image, height, width)

    def __call__(self, prompt_ids, image, params, prng_seed, num_inference_steps: int = 50, guidance_scale=7.5,
                 latents=None, neg_prompt_ids=None, controlnet_conditioning_scale=1.0, return_dict: bool = True,
                 jit: bool = False, *, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, num_images_per_prompt: int = 1, prompt_embeds=None,
                 negative_prompt_embeds=None, clip_skip: Optional[int] = None, eta: float = 0.0,
                 output_type: str = "np", mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Generate images the size of the control images `image` (from `prepare_image_inputs`: one
        NCHW array, or a list with one per ControlNet). `controlnet_conditioning_scale` and
        `control_guidance_start/end` are floats, or lists with one per ControlNet; `hooks`: the per-step
        keywords of `CallHooks`."""
        return self._call(locals())


class FlaxStableDiffusionControlNetInpaintPipeline(_ControlNetMixin, FlaxStableDiffusionInpaintPipeline):
    """Inpainting guided by one or more ControlNets, with 9-channel inpainting or plain 4-channel UNets.

    Called like the inpaint pipeline plus the keyword `control_image`; diffusers' default
    controlnet_conditioning_scale here is 0.5.
    """

    _pipeline_class = "StableDiffusionControlNetInpaintPipeline"

    def prepare_inputs(self, prompt, image, mask, control_image, height: Optional[int] = None,
                       width: Optional[int] = None, padding_mask_crop: Optional[int] = None):
        """(prompt_ids, masked_images, masks, images, control_images), one row per prompt.

        As the inpaint pipeline's (with `return_image=True`), plus the control images processed at the
        same size and crop (see `prepare_control_image`; a list with one per ControlNet for several).
        """
        ids, masked, masks, images = super().prepare_inputs(prompt, image, mask, height, width, True,
                                                            padding_mask_crop)
        control = self._prepare_control_like_mask(control_image, mask, images.shape[2], images.shape[3],
                                                  padding_mask_crop)
        n = ids.shape[0]
        per_net = control if isinstance(control, list) else [control]
        for k, c in enumerate(per_net):
            if c.shape[0] not in (1, n):
                raise ValueError(f"{c.shape[0]} control images (ControlNet {k}) for {n} prompts; pass one, or one "
                                 "per prompt.")
        per_net = [np.broadcast_to(c, (n,) + c.shape[1:]).copy() for c in per_net]
        return ids, masked, masks, images, per_net if isinstance(control, list) else per_net[0]

    def _prepare_control_like_mask(self, control_image, mask, height: int, width: int, padding_mask_crop):
        """Control images at height x width, cut to the crop box `padding_mask_crop` gives the mask."""
        crops = None
        if padding_mask_crop is not None and isinstance(mask, PIL.Image.Image):  # else the inpaint preprocessing raises
            crops = self.mask_processor.get_crop_region(mask, width, height, pad=padding_mask_crop)
        return self.prepare_control_image(control_image, height, width, crops, "default" if crops is None else "fill")

    def inpaint(self, prompt, image, mask_image, control_image, params, prng_seed, *,
                height: Optional[int] = None, width: Optional[int] = None,
                padding_mask_crop: Optional[int] = None, **kwargs):
        """PyTorch-style convenience: strings and PIL images in, images out (one device).

        `control_image`: images for the control image processor, or `make_inpaint_condition`'s output
        (a list with one per ControlNet for several). Other arguments as the inpaint pipeline's
        `inpaint` and this pipeline's `__call__`.
        """
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        control = self._prepare_control_like_mask(control_image, mask_image, height, width, padding_mask_crop)
        return super().inpaint(prompt, image, mask_image, params, prng_seed, height=height, width=width,
                               padding_mask_crop=padding_mask_crop, control_image=control, **kwargs)

    def __call__(self, prompt_ids, mask, masked_image, params, prng_seed, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=7.5,
                 latents=None, neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *,
                 control_image, controlnet_conditioning_scale=0.5, guess_mode: bool = False,
                 control_guidance_start=0.0, control_guidance_end=1.0, image=None, strength: float = 1.0,
                 eta: float = 0.0, num_images_per_prompt: int = 1, prompt_embeds=None,
                 negative_prompt_embeds=None, masked_image_latents=None, clip_skip: Optional[int] = None,
                 output_type: str = "np", mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Inpaint as `FlaxStableDiffusionInpaintPipeline.__call__`, guided by `control_image` (from
        `prepare_inputs`: NCHW at the mask's size; a list with one per ControlNet for several).
        `controlnet_conditioning_scale` and `control_guidance_start/end` are floats or lists with one
        per ControlNet; with strength < 1 the guidance windows are fractions of the steps that run."""
        return self._call(locals())


class FlaxStableDiffusionControlNetImg2ImgPipeline(_ControlNetMixin, FlaxStableDiffusionImg2ImgPipeline):
    """Image-to-image guided by one or more ControlNets (diffusers' StableDiffusionControlNetImg2ImgPipeline):
    the img2img pipeline plus the keyword `control_image`. Defaults as diffusers': strength 0.8,
    controlnet_conditioning_scale 0.8."""

    _pipeline_class = "StableDiffusionControlNetImg2ImgPipeline"

    def prepare_inputs(self, prompt, image, control_image, height: Optional[int] = None,
                       width: Optional[int] = None):
        """(prompt_ids, images NCHW in [-1, 1], control images at the images' size; see
        `prepare_control_image`, a list with one per ControlNet for several)."""
        ids, images = super().prepare_inputs(prompt, image, height, width)
        return ids, images, self.prepare_control_image(control_image, images.shape[2], images.shape[3])

    def img2img(self, prompt, image, control_image, params, prng_seed, *, height: Optional[int] = None,
                width: Optional[int] = None, **kwargs):
        """PyTorch-style convenience: strings and PIL images in, images out (one device). `control_image`:
        images for the control image processor (a list with one per ControlNet for several). Other
        arguments as `FlaxStableDiffusionImg2ImgPipeline.img2img` and this pipeline's `__call__`."""
        height, width = self.image_processor.get_default_height_width(image, height, width)
        control = self.prepare_control_image(control_image, height, width)
        return super().img2img(prompt, image, params, prng_seed, height=height, width=width, control_image=control,
                               **kwargs)

    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.8,
                 num_inference_steps: int = 50, height: Optional[int] = None, width: Optional[int] = None,
                 guidance_scale=7.5, noise=None, neg_prompt_ids=None, return_dict: bool = True,
                 jit: bool = False, *, control_image, controlnet_conditioning_scale=0.8, guess_mode: bool = False,
                 control_guidance_start=0.0, control_guidance_end=1.0, num_images_per_prompt: int = 1,
                 prompt_embeds=None, negative_prompt_embeds=None, clip_skip: Optional[int] = None,
                 eta: float = 0.0, output_type: str = "np", mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Image to image as `FlaxStableDiffusionImg2ImgPipeline.__call__`, guided by `control_image` (from
        `prepare_inputs`: NCHW at the image's size; a list with one per ControlNet for several).
        `controlnet_conditioning_scale` and `control_guidance_start/end` are floats or lists with one per
        ControlNet; the guidance windows are fractions of the steps that run at `strength`."""
        return self._call(locals())
