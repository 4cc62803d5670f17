"""User inputs -> a checked `Batch` and `Options`: the one place every pipeline validates its call.

Each pipeline's `__call__` states its signature (diffusers' Flax API) and hands its arguments to
`build`. Inputs carry "batch dims" `lead`: `(B,)` unsharded, or `(devices, per_device)` with `jit=True`
(diffusers' pmap calling convention). Errors name the argument and the fix; nothing below this layer
re-checks what is checked here.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from typing import Optional, Sequence

import jax
import numpy as np
import PIL.Image

from flax_inpaint.pipelines.sampling import Batch, Options
from flax_inpaint.pipelines.sdxl_conditioning import check_add_time_ids, get_add_time_ids
from flax_inpaint.schedulers.common import begin_index_for_strength


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked call: its traced `batch`, static `opts` and the batch dims `lead` of the user's inputs."""

    batch: Batch
    opts: Options
    lead: tuple


def strength_steps(name: str, strength: float, num_inference_steps: int) -> int:
    """How many of `num_inference_steps` denoising steps run at `strength` (diffusers' img2img rule); raises
    ValueError naming the argument `name` when it is out of [0, 1] or runs no step. The CLI and sweeps check
    their options with it before loading anything else."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"{name}={strength!r} must lie in [0, 1].")
    n = num_inference_steps - begin_index_for_strength(num_inference_steps, strength)
    if n < 1:
        raise ValueError(f"{name}={strength} with num_inference_steps={num_inference_steps} runs no denoising "
                         f"step; raise {name} or num_inference_steps (need int(num_inference_steps * strength) >= 1).")
    return n


def strength_fields(scheduler, num_inference_steps: int, strength: float) -> dict:
    """The Batch fields of `strength` (first loop iteration, whether sampling starts from pure noise), checked
    by `strength_steps`."""
    strength_steps("strength", strength, num_inference_steps)
    begin = begin_index_for_strength(num_inference_steps, strength, scheduler.order)
    return dict(begin_index=np.int32(begin), strength_is_max=np.bool_(strength == 1.0))


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """Raw key data [len(seeds), 2] of `jax.random.key(seed)` per seed: one key per prompt."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])


def build(pipe, jit: bool, *, prompt_ids, num_inference_steps: int, guidance_scale, neg_prompt_ids=None,
          prompt_embeds=None, negative_prompt_embeds=None, height: Optional[int] = None,
          width: Optional[int] = None, latents=None, noise=None, image=None, mask=None, masked_image=None,
          masked_image_latents=None, strength: float = 1.0, eta: float = 0.0, num_images_per_prompt: int = 1,
          clip_skip: Optional[int] = None, output_type: str = "np", control_image=None,
          controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
          guess_mode: bool = False, ip_adapter_image=None, ip_adapter_image_embeds=None, inpainting: bool = False,
          image_required: bool = False, control_name: str = "control_image", denoising_start: Optional[float] = None,
          denoising_end: Optional[float] = None, params=None, **sdxl) -> Prepared:
    """Check every input of a pipeline call against the pipeline's components and each other.

    `inpainting`: mask and masked_image (or masked_image_latents) are inputs; `image_required`: `image`
    (img2img) must be given; `noise` is img2img's name for `latents`; `control_name` is what the
    pipeline calls its control images (the ControlNet text-to-image pipeline: "image"). `denoising_start` /
    `denoising_end` (SDXL's "ensemble of experts") start / end the loop at a fraction of the schedule;
    `sdxl`: the SDXL pipelines' pooled embeddings and size conditioning (see `_sdxl_fields`); `params`: the
    call's params (an image prompt needs one IP-Adapter loaded in them per image).
    """
    spatial = _Spatial(height, width)
    if inpainting:
        mask = np.asarray(mask, np.float32)
        if masked_image_latents is None:
            masked_image = spatial.check("masked_image", np.asarray(masked_image, np.float32))
        else:
            masked_image = None
        spatial.check("mask", mask, channels=1)
    image_latents = None
    if image is not None:
        image, image_latents = _image_input(pipe, image, spatial)
    elif image_required or denoising_start is not None or (inpainting and (pipe.unet.in_channels == 4
                                                                            or strength < 1.0)):
        why = "a 4-channel UNet blends with it" if pipe.unet.in_channels == 4 else f"strength={strength} < 1"
        why = f"denoising_start={denoising_start} starts from it" if denoising_start is not None else why
        raise ValueError(f"image is required because {why}: use prepare_inputs(..., return_image=True) and pass "
                         "image=images.")
    if control_image is not None and spatial.height is None:
        first = np.shape(pipe._net_images(control_name, control_image)[0])
        if len(first) < 4:
            raise ValueError(f"{control_name} has shape {first}; expected NCHW control images (from "
                             "prepare_image_inputs).")
        spatial = _Spatial(first[-2], first[-1])
    if spatial.height is None:
        default_h, default_w = pipe.default_size()
        spatial = _Spatial(height or default_h, width or default_w)

    opts = _options(pipe, num_inference_steps, spatial.height, spatial.width, guidance_scale, output_type,
                    clip_skip, num_images_per_prompt)
    lead = batch_dims(pipe, prompt_ids, prompt_embeds, jit, ids_ndim=2 if _is_sdxl(pipe) else 1)
    for name, arr in (("mask", mask), ("masked_image", masked_image), ("image", image), ("image", image_latents)):
        if arr is not None:
            _check_batch(name, arr, lead)
    masked_image_latents = _check_latents(pipe, "masked_image_latents", masked_image_latents, lead, opts,
                                          per_prompt=True)
    latents = _check_latents(pipe, "noise" if noise is not None else "latents", noise if noise is not None else latents,
                             lead, opts)
    text = _sdxl_fields(pipe, opts, lead, **sdxl) if _is_sdxl(pipe) else {}
    # the loop's bounds: denoising_start replaces strength
    loop = {**strength_fields(pipe.scheduler, num_inference_steps, strength if denoising_start is None else 1.0),
            **denoising_fields(pipe.scheduler, num_inference_steps, strength, denoising_start, denoising_end)}
    if image_required:  # img2img noises the image at strength 1 too (add_noise, as diffusers' img2img pipelines)
        loop["strength_is_max"] = np.bool_(False)
    batch = Batch(
        **text, **_text_fields(pipe, prompt_ids, neg_prompt_ids, prompt_embeds, negative_prompt_embeds, lead,
                               opts.do_cfg, guidance_scale),
        image=_nhwc(image), image_latents=_nhwc(image_latents), mask=_nhwc(mask), masked_image=_nhwc(masked_image),
        masked_image_latents=_nhwc(masked_image_latents), latents=_nhwc(latents),
        eta=np.float32(eta), **loop,
        **_image_prompt(pipe, params or {}, ip_adapter_image, ip_adapter_image_embeds, lead, opts.do_cfg),
    )
    if control_image is not None:
        batch, opts = _with_control(pipe, batch, opts, lead, control_name, control_image,
                                    controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                                    guess_mode)
    return Prepared(batch, opts, lead)


@dataclasses.dataclass
class _Spatial:
    """The generated size, fixed by the first image input (or the call's height / width)."""

    height: Optional[int]
    width: Optional[int]

    def check(self, name: str, arr: np.ndarray, channels: int = 3) -> np.ndarray:
        if arr.ndim < 4:
            raise ValueError(f"{name} must be NCHW (with a leading device axis under jit=True); got shape "
                             f"{arr.shape}. Use pipeline.prepare_inputs.")
        if arr.shape[-3] != channels:
            raise ValueError(f"{name} has {arr.shape[-3]} channels in shape {arr.shape}; expected {channels} (NCHW).")
        h, w = arr.shape[-2:]
        if (self.height is not None and self.height != h) or (self.width is not None and self.width != w):
            raise ValueError(f"{name} is {h}x{w} but height x width = {self.height}x{self.width}; they must match "
                             "(image, mask and masked_image all share one size).")
        self.height, self.width = h, w
        return arr


def _nhwc(x) -> Optional[np.ndarray]:
    """An NCHW input (after any batch dims) as the NHWC array the program takes."""
    return None if x is None else np.moveaxis(np.asarray(x), -3, -1)


def _image_input(pipe, image, spatial: _Spatial) -> tuple:
    """(pixels, None) for NCHW pixels, (None, latents) for scaled latents [..., latent_channels, h, w]
    (e.g. another pipeline's output_type="latent" output); sets the generated size from them."""
    shape = np.shape(image)
    c, f = pipe.vae.latent_channels, pipe.vae_scale_factor
    if len(shape) < 4 or shape[-3] not in (3, c):
        raise ValueError(f"image has shape {shape}; expected NCHW pixels with 3 channels or latents with "
                         f"{c} (a leading device axis first with jit=True). Use pipeline.prepare_inputs.")
    image = np.asarray(image, np.float32)
    if shape[-3] == 3:
        return spatial.check("image", image), None
    h, w = shape[-2] * f, shape[-1] * f
    if (spatial.height or h, spatial.width or w) != (h, w):
        raise ValueError(f"image holds latents of shape {shape}, i.e. a {h}x{w} image, but height x width = "
                         f"{spatial.height}x{spatial.width}; they must match.")
    spatial.height, spatial.width = h, w
    return None, image


def _options(pipe, num_inference_steps, height, width, guidance_scale, output_type, clip_skip,
             num_images_per_prompt) -> Options:
    if output_type not in ("np", "pil", "latent"):
        raise ValueError(f"output_type={output_type!r}; use 'np', 'pil' or 'latent'.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int >= 1.")
    for name, v in (("height", height), ("width", width)):
        if v % pipe.vae_scale_factor or v <= 0:
            raise ValueError(
                f"{name}={v} must be a positive multiple of {pipe.vae_scale_factor} (the VAE's "
                "downsampling factor); resize the image or pass a valid size."
            )
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an int >= 1.")
    layers = (pipe.text_encoder or pipe.text_encoder_2).num_hidden_layers
    if clip_skip is not None and not 0 <= clip_skip <= layers:
        raise ValueError(f"clip_skip={clip_skip} must lie in [0, {layers}] (the text encoder has {layers} "
                         "layers; clip_skip=k uses the output of layer num_layers - k).")
    return Options(
        num_inference_steps=int(num_inference_steps), height=int(height), width=int(width),
        do_cfg=bool(np.any(np.asarray(guidance_scale) > 1.0)),
        output_type="latent" if output_type == "latent" else "np",
        clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
        scheduler_takes_eta=takes_eta(type(pipe.scheduler)),
    )


@functools.lru_cache(maxsize=None)
def takes_eta(scheduler_class: type) -> bool:
    """Whether a scheduler's `step` takes `eta` (DDIM): read once per class, not per call (~0.1 ms)."""
    return "eta" in inspect.signature(scheduler_class.step).parameters


def batch_dims(pipe, prompt_ids, prompt_embeds, jit: bool, ids_ndim: int = 1) -> tuple:
    """The batch dims of a call's inputs, read from its prompt ids (`ids_ndim` trailing dims: SDXL's are
    [text encoders, L]) or embeddings: (B,), or with `jit=True` (devices, per_device)."""
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of prompt_ids (from prepare_inputs) and prompt_embeds; got "
                         f"{'neither' if prompt_ids is None else 'both'}.")
    ref = np.shape(prompt_ids if prompt_ids is not None else prompt_embeds)
    lead = ref[:-ids_ndim] if prompt_ids is not None else ref[:-2]
    if jit:
        n = jax.local_device_count()
        if len(lead) != 2 or lead[0] != n:
            raise ValueError(
                f"With jit=True inputs need a leading device axis of {n} (local devices): got "
                f"batch dims {lead}. Use flax.training.common_utils.shard(x) (batch divisible by {n}) "
                "and replicate(params)."
            )
    elif len(lead) != 1:
        raise ValueError(f"Expected unsharded inputs with one batch axis, got batch dims {lead}; "
                         "pass jit=True for sharded inputs.")
    return tuple(lead)


def _check_batch(name: str, arr: np.ndarray, lead: tuple):
    """`arr` [*lead, C, H, W]: the batch dims of prompt_ids (device axis, per-device batch with jit=True)."""
    if arr.ndim == len(lead) + 3 and tuple(arr.shape[: len(lead)]) == lead:
        return
    want = lead + tuple(arr.shape[-3:])
    fix = (f"with jit=True shard() every input alike: a leading device axis of {lead[0]}, then the per-device "
           f"batch of {lead[1]}" if len(lead) == 2 else "give one per prompt")
    raise ValueError(f"{name} has shape {arr.shape}; expected {want} (the batch dims of prompt_ids, then C, H, W): "
                     f"{fix}.")


def check_ids(pipe, name: str, ids, lead: tuple):
    """Token ids `[*lead, max_length]` as int32 (None stays None)."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    want = lead + pipe.ids_shape
    if ids.shape != want:
        raise ValueError(
            f"{name} has shape {ids.shape}; expected {want} (batch dims of prompt_ids, then "
            f"{'one row per tokenizer, ' if len(pipe.ids_shape) > 1 else ''}the tokenizer's max_length "
            f"{pipe.max_length}). Use "
            "pipeline.prepare_inputs / tokenize, and shard() every input alike with jit=True."
        )
    return ids.astype(np.int32)


def _text_fields(pipe, prompt_ids, neg_prompt_ids, prompt_embeds, negative_prompt_embeds, lead, do_cfg: bool,
                 guidance_scale) -> dict:
    prompt_ids = check_ids(pipe, "prompt_ids", prompt_ids, lead)
    neg_prompt_ids = check_ids(pipe, "neg_prompt_ids", neg_prompt_ids, lead)
    hidden = pipe.context_width
    embed_shape = lead + (pipe.max_length, hidden)
    if prompt_embeds is not None:
        embed_shape = np.shape(prompt_embeds)
        if embed_shape[-1] != hidden:
            raise ValueError(f"prompt_embeds has shape {embed_shape}; its last axis must be the text "
                             f"encoders' hidden_size {hidden} (summed for SDXL's two).")
    if negative_prompt_embeds is not None and np.shape(negative_prompt_embeds) != embed_shape:
        raise ValueError(f"negative_prompt_embeds has shape {np.shape(negative_prompt_embeds)}; it must match "
                         f"the prompt embeddings' shape {embed_shape}.")
    if do_cfg and neg_prompt_ids is None and negative_prompt_embeds is None:
        neg_prompt_ids = np.broadcast_to(pipe.prepare_text_inputs(""), lead + pipe.ids_shape)
    if not do_cfg:
        neg_prompt_ids = negative_prompt_embeds = None
    g = np.asarray(guidance_scale, np.float32)
    if g.ndim and g.shape != lead[-g.ndim:] and g.shape != lead:
        raise ValueError(f"guidance_scale has shape {g.shape}; use a scalar or one value per prompt {lead}"
                         + (" (shard() it like prompt_ids)." if len(lead) == 2 else "."))
    return dict(prompt_ids=prompt_ids, neg_prompt_ids=neg_prompt_ids, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                guidance_scale=np.broadcast_to(g, lead).astype(np.float32))


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@functools.lru_cache(maxsize=64)
def _timesteps(scheduler, num_inference_steps: int) -> np.ndarray:
    """The scheduler's loop timesteps for a step count, on the host."""
    state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, (1, 1, 1, 1))
    return np.asarray(state.timesteps)


def _cutoff(scheduler, name: str, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff of a denoising_start / denoising_end fraction."""
    if isinstance(fraction, bool) or not isinstance(fraction, float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{name}={fraction!r} must be a float strictly between 0 and 1 (the fraction of the "
                         "schedule where this pipeline starts / ends denoising).")
    n_train = scheduler.config.num_train_timesteps
    return int(round(n_train - fraction * n_train))


def denoising_fields(scheduler, num_inference_steps: int, strength: float, denoising_start: Optional[float],
                     denoising_end: Optional[float]) -> dict:
    """Batch fields of SDXL's `denoising_start` / `denoising_end` ("ensemble of experts"), as diffusers'
    SDXL pipelines cut the schedule: denoising_start replaces strength (the loop starts at the first
    timestep below its cutoff, from the image latents un-noised); denoising_end stops the loop before the
    first timestep below its cutoff. Both are traced values: changing them does not recompile."""
    if denoising_start is None and denoising_end is None:
        return {}
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be smaller than denoising_end={denoising_end}.")
    timesteps = _timesteps(scheduler, num_inference_steps)
    fields = {}
    begin = begin_index_for_strength(num_inference_steps, strength, scheduler.order)
    if denoising_start is not None:
        count = int(np.sum(timesteps < _cutoff(scheduler, "denoising_start", denoising_start)))
        if scheduler.order == 2 and count % 2 == 0:  # end after a second-order step, as diffusers
            count += 1
        begin = len(timesteps) - count
        if count < 1:
            raise ValueError(f"denoising_start={denoising_start} leaves no denoising step of {num_inference_steps}; "
                             "lower it or raise num_inference_steps.")
        fields.update(begin_index=np.int32(begin), add_noise=np.bool_(False))
    if denoising_end is not None:
        cutoff = _cutoff(scheduler, "denoising_end", denoising_end)
        fields["end_index"] = np.int32(begin + np.sum(timesteps[begin:] >= cutoff))
    return fields


def _sdxl_fields(pipe, opts: Options, lead: tuple, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 zero_negative=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> dict:
    """SDXL's Batch fields: pooled embeddings (given with prompt_embeds), the size conditioning of
    `get_add_time_ids` under the pipeline's rule (values: new sizes never recompile) and the traced flag
    that zeroes the negative embeddings."""
    rows = lead
    for name, x in (("pooled_prompt_embeds", pooled_prompt_embeds),
                    ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
        if x is not None and np.shape(x) != rows + (pipe.text_encoder_2.projection_dim,):
            raise ValueError(f"{name} has shape {np.shape(x)}; expected {rows + (pipe.text_encoder_2.projection_dim,)}"
                             " (one per prompt, text_encoder_2's projection_dim).")
    ids, negative = get_add_time_ids(
        opts.height, opts.width, original_size, crops_coords_top_left, target_size, negative_original_size,
        negative_crops_coords_top_left, negative_target_size, pipe.requires_aesthetics_score, aesthetic_score,
        negative_aesthetic_score, rule=pipe._time_id_rule)
    check_add_time_ids(pipe.unet, len(ids), pipe.text_encoder_2.projection_dim)
    negative_pooled_prompt_embeds = negative_pooled_prompt_embeds if opts.do_cfg else None
    return dict(pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                add_time_ids=np.broadcast_to(ids, rows + ids.shape), zero_negative=np.bool_(bool(zero_negative)),
                negative_add_time_ids=np.broadcast_to(negative, rows + negative.shape) if opts.do_cfg else None)


def _check_latents(pipe, name: str, latents, lead: tuple, opts: Options, per_prompt: bool = False):
    """Latent inputs: [*batch dims, latent_channels, height / f, width / f], one per image (the last
    batch dim times num_images_per_prompt) or, with `per_prompt`, one per prompt."""
    if latents is None:
        return None
    f, n = pipe.vae_scale_factor, 1 if per_prompt else opts.num_images_per_prompt
    want = lead[:-1] + (lead[-1] * n, pipe.vae.latent_channels, opts.height // f, opts.width // f)
    if tuple(np.shape(latents)) != want:
        per = "prompt" if per_prompt else "image (batch x num_images_per_prompt)"
        raise ValueError(
            f"{name} has shape {np.shape(latents)}; expected {want}: one per {per}, latent_channels, "
            f"height / {f}, width / {f}, after a leading device axis with jit=True."
        )
    return latents


# -- IP-Adapter image prompts --------------------------------------------------------------------

def _image_prompt(pipe, params, ip_adapter_image, ip_adapter_image_embeds, lead: tuple, do_cfg: bool) -> dict:
    """Batch fields of an IP-Adapter image prompt: reference images (a PIL image or HWC array per adapter,
    or a list of them for several images; diffusers' `ip_adapter_image`) or embeddings (diffusers'
    `ip_adapter_image_embeds`: a list with one array per adapter, [negative; positive] halves with CFG),
    one per IP-Adapter loaded in `params`."""
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("Pass ip_adapter_image or ip_adapter_image_embeds, not both.")
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        return {}
    if ip_adapter_image_embeds is not None and not isinstance(ip_adapter_image_embeds, (list, tuple)):
        raise ValueError("ip_adapter_image_embeds must be a list with one array per IP-Adapter (as diffusers'); got "
                         f"{type(ip_adapter_image_embeds).__name__}.")
    given = ip_adapter_image_embeds if ip_adapter_image is None else (
        ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image])
    loaded = len(params.get("ip_adapter", {}).get("image_proj", ()))
    if len(given) != loaded:
        raise ValueError(f"{len(given)} IP-Adapter image prompts (ip_adapter_image / ip_adapter_image_embeds) "
                         f"for {loaded} loaded IP-Adapters: pass one per adapter (pipe.load_ip_adapter).")
    if ip_adapter_image is not None:
        if pipe.image_encoder is None:
            raise ValueError("ip_adapter_image needs an image encoder: load a model folder with an image_encoder "
                             "folder, or from_pretrained(..., image_encoder=<its folder>); or pass "
                             "ip_adapter_image_embeds.")
        return {"ip_adapter_images": tuple(_reference_images(x, k) for k, x in enumerate(given))}
    rows = int(np.prod(lead))
    pos, neg = [], []
    for k, e in enumerate(ip_adapter_image_embeds):
        e = np.asarray(e, np.float32)
        halves = 2 if do_cfg else 1
        if e.ndim not in (3, 4) or e.shape[0] not in (halves, halves * rows):
            cfg = " (its negative half first: with guidance_scale > 1 diffusers' CFG layout)" if do_cfg else ""
            raise ValueError(f"ip_adapter_image_embeds[{k}] has shape {e.shape}; expected [{halves} or "
                             f"{halves * rows}, images, embed_dim] or [..., images, seq, width] (plus){cfg}: one for "
                             "every prompt or one per prompt, over the whole batch (unsharded, also with jit=True).")
        parts = np.split(e, halves)
        pos.append(np.broadcast_to(parts[-1], (rows,) + e.shape[1:]).reshape(lead + e.shape[1:]))
        if do_cfg:
            neg.append(np.broadcast_to(parts[0], (rows,) + e.shape[1:]).reshape(lead + e.shape[1:]))
    return {"ip_adapter_image_embeds": tuple(pos), "ip_adapter_negative_image_embeds": tuple(neg) if do_cfg else None}


def _reference_images(images, k: int) -> np.ndarray:
    """[n, H, W, 3] float32 in [0, 1] from a PIL image, an HWC / NHWC array (uint8, or floats in [0, 1]) or a
    list of them of one size."""
    items = images if isinstance(images, list) else [images]
    arrays = []
    for x in items:
        if isinstance(x, PIL.Image.Image):
            x = np.asarray(x.convert("RGB"))
        x = np.asarray(x)
        x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)
        arrays.extend(x if x.ndim == 4 else [x])
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[-1] != 3:
        raise ValueError(f"ip_adapter_image (adapter {k}) must be PIL images or HWC RGB arrays of one size; got "
                         f"shapes {sorted(shapes)}.")
    return np.stack(arrays)


# -- ControlNets ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _num_iterations(scheduler, num_inference_steps: int) -> int:
    """Length of the sampling loop: the scheduler's timesteps (e.g. one more than the steps for PNDM)."""
    state = jax.eval_shape(lambda: scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, (1, 1, 1, 1)))
    return state.timesteps.shape[0]


def controlnet_scales(scales: Sequence[float], starts: Sequence[float], ends: Sequence[float], begin: int,
                      num_iterations: int) -> np.ndarray:
    """[num_iterations, num_nets] fp32: each ControlNet's conditioning scale at each loop iteration.

    Like diffusers' `controlnet_keep`: of the T iterations that run (from `begin`, set by strength),
    net k is off at the j-th when j / T < start_k or (j + 1) / T > end_k, compared in float64 as
    diffusers' Python floats are (a float32 comparison on the device could flip at a window's edge).
    Iterations before `begin` never run; their rows are 0.
    """
    total = num_iterations - begin
    j = np.arange(total, dtype=np.float64)[:, None]
    off = (j / total < np.asarray(starts, np.float64)) | ((j + 1) / total > np.asarray(ends, np.float64))
    table = np.zeros((num_iterations, len(scales)), np.float32)
    table[begin:] = np.asarray(scales, np.float64) * (1.0 - off)
    return table


def _numbers(pipe, name: str, value) -> list:
    values = pipe._per_net(name, value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
            raise ValueError(f"{name}={value!r}: expected a finite float or one per ControlNet.")
    return [float(v) for v in values]


def _control_images(pipe, name: str, image, lead: tuple, height: int, width: int) -> tuple:
    """Processed control images checked against the nets and the generated size, broadcast to `lead`
    (NHWC)."""
    images = pipe._net_images(name, image)
    out = []
    for k, (net, x) in enumerate(zip(pipe.controlnets, images)):
        label = name if len(images) == 1 else f"{name}[{k}]"
        x = np.asarray(x, np.float32)
        item = (net.conditioning_channels, height, width)
        batch_ok = x.ndim == len(lead) + 3 and all(d in (1, n) for d, n in zip(x.shape, lead))
        if not batch_ok or x.shape[-3:] != item:
            raise ValueError(
                f"{label} has shape {x.shape}; expected {lead + item}: NCHW with the ControlNet's "
                f"{item[0]} conditioning channels at the generated size {height}x{width}, one per prompt or "
                "one for all (after a leading device axis with jit=True). Use prepare_control_image."
            )
        out.append(_nhwc(np.broadcast_to(x, lead + item)))
    return tuple(out)


def _with_control(pipe, batch: Batch, opts: Options, lead: tuple, name: str, image, scale, start, end,
                  guess_mode: bool):
    """`batch` with the control images and per-step scales, `opts` with guess mode (diffusers turns
    it on for global-pooling ControlNets)."""
    scales = _numbers(pipe, "controlnet_conditioning_scale", scale)
    starts = _numbers(pipe, "control_guidance_start", start)
    ends = _numbers(pipe, "control_guidance_end", end)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start={s} and control_guidance_end={e}: need 0 <= start < end "
                             "<= 1 (the fractions of the denoising steps during which a ControlNet acts).")
    images = _control_images(pipe, name, image, lead, opts.height, opts.width)
    n_iter = _num_iterations(pipe.scheduler, opts.num_inference_steps)
    table = controlnet_scales(scales, starts, ends, int(batch.begin_index), n_iter)
    guess = bool(guess_mode) or pipe.controlnets[0].global_pool_conditions
    return (batch.replace(control_images=images, controlnet_scales=table),
            dataclasses.replace(opts, guess_mode=guess))

