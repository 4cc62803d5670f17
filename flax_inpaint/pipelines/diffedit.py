"""DiffEdit (Couairon et al. 2022): inpainting where the mask comes from two prompts.

Three compiled programs, as in diffusers' `StableDiffusionDiffEditPipeline`:
  1. `mask_program`: noise the image latents to `mask_encode_strength`, predict the noise for the
     source and the target prompt, and threshold the channel-averaged |difference| (averaged over
     `num_maps_per_mask` noise draws) into a latent-size mask;
  2. `invert_program`: DDIM-invert the image latents with the source prompt, optionally
     regularising each noise prediction towards i.i.d. N(0, I) (Pix2Pix-Zero's auto-correlation and
     KL terms, gradient steps through `jax.grad`), and keep the latents of every inverse step;
  3. `edit_program`: denoise from the most-noised inverted latents with the target prompt,
     replacing the latents outside the mask by the inverted ones after every step.

The math lives in small pure functions (NHWC inside); the pipeline class only validates and shapes
inputs on the host. Two deliberate differences from diffusers, both invisible for one image per call:
the mask's clamp level (mean difference x `mask_thresholding_ratio`) and the KL term are computed per
image, where diffusers takes them over the whole batch, so an image's mask and inversion do not depend
on which other images share its batch (or its device, when sharded).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flax_inpaint.diffusers_compat import BaseOutput, FrozenConfig
from flax_inpaint.io import read_config, resolve_folder, write_bytes_atomic
from flax_inpaint.pipelines import callbacks, loading
from flax_inpaint.pipelines.inputs import batch_dims, check_ids, strength_steps, takes_eta
from flax_inpaint.pipelines.sampling import decode_latents, encode_image, encode_text, in_groups, place
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionPipelineOutput,
    call_layout,
    fetch,
    merge_devices,
)
from flax_inpaint.schedulers import FlaxDDIMInverseScheduler
from flax_inpaint.schedulers.common import begin_index_for_strength

Array = jax.Array
# Pix2Pix-Zero's auto-correlation loss stops pooling once the map is this small (diffusers' 8).
AUTO_CORR_MIN_SIZE = 8


# ----------------------------------------------------------------------------- the math


def guided(pred: Array, guidance_scale, do_cfg: bool) -> Array:
    """Classifier-free guidance on a [uncond; text] batch: uncond + w (text - uncond)."""
    if not do_cfg:
        return pred
    uncond, text = jnp.split(pred, 2)
    return uncond + guidance_scale * (text - uncond)


def mask_from_predictions(source: Array, target: Array, num_maps_per_mask: int, mask_thresholding_ratio):
    """DiffEdit's mask from the noise predictions of the two prompts, NHWC [B * maps, h, w, C] (the
    maps of one image adjacent). Returns (map, mask), both [B, h, w]: map = |target - source| averaged
    over the maps and the channels, clamped at `mask_thresholding_ratio` times its mean and divided by
    that level (so in [0, 1]); mask = map > 0.5, as float32 {0, 1}."""
    diff = jnp.abs(target - source)
    diff = diff.reshape(-1, num_maps_per_mask, *diff.shape[1:])
    guidance_map = jnp.mean(diff, axis=(1, 4))
    level = jnp.mean(guidance_map, axis=(1, 2), keepdims=True) * mask_thresholding_ratio
    normalised = jnp.clip(guidance_map, 0.0, level) / level
    return normalised, (normalised > 0.5).astype(jnp.float32)


def auto_corr_levels(size: int) -> int:
    """How many resolutions the auto-correlation loss visits: `size`, then halved while above 8."""
    levels = 1
    while size > AUTO_CORR_MIN_SIZE:
        size //= 2
        levels += 1
    return levels


def auto_corr_roll_bounds(size: int) -> List[int]:
    """The exclusive upper bound of each level's roll amount (half that level's height)."""
    bounds = []
    for _ in range(auto_corr_levels(size)):
        bounds.append(size // 2)
        size //= 2
    return bounds


def auto_corr_loss(eps: Array, rolls: Array) -> Array:
    """Pix2Pix-Zero's auto-correlation loss of a noise map, NHWC [B, h, w, C].

    For every example and channel, at every level of a 2x average-pooling pyramid (down to 8 px), the
    squared mean of the map times itself rolled by r along the height plus the same along the width.
    rolls: [B, C, levels] int, r per example, channel and level (in [0, level height // 2), where
    diffusers draws one with torch.randint per example, channel and level, in that order).
    """
    x = jnp.transpose(eps, (0, 3, 1, 2))  # [B, C, h, w]: per-(example, channel) maps

    def corr(m, r):  # m [h, w], r [] -> squared auto-correlations at shift r along both axes
        return jnp.mean(m * jnp.roll(m, r, axis=0)) ** 2 + jnp.mean(m * jnp.roll(m, r, axis=1)) ** 2

    per_map = jax.vmap(jax.vmap(corr))
    loss = 0.0
    for level in range(rolls.shape[-1]):
        loss = loss + jnp.sum(per_map(x, rolls[..., level]))
        if level + 1 < rolls.shape[-1]:
            b, c, h, w = x.shape
            x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    return loss


def kl_divergence(eps: Array) -> Array:
    """KL-style penalty pulling one noise map (any shape) towards N(0, 1):
    var + mean^2 - 1 - log(var + 1e-7), with the unbiased variance (torch's `var()`)."""
    return jnp.var(eps, ddof=1) + jnp.mean(eps) ** 2 - 1.0 - jnp.log(jnp.var(eps, ddof=1) + 1e-7)


def epsilon_from_output(output: Array, sample: Array, alpha_cumprod: Array, prediction_type: str) -> Array:
    """The noise the model output implies, for regularising eps whatever the model predicts."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (sample - alpha_cumprod**0.5 * output) / (1.0 - alpha_cumprod) ** 0.5
    return alpha_cumprod**0.5 * output + (1.0 - alpha_cumprod) ** 0.5 * sample  # v_prediction


@dataclasses.dataclass(frozen=True)
class Regulariser:
    """Static settings of the inversion's noise regularisation (diffusers' `invert` arguments)."""

    num_reg_steps: int = 0
    num_auto_corr_rolls: int = 5
    auto_corr: bool = True  # lambda_auto_corr > 0
    kl: bool = True  # lambda_kl > 0
    prediction_type: str = "epsilon"


def regularise(reg: Regulariser, pred: Array, sample: Array, alpha_cumprod: Array, lambdas: Array,
               rolls: Array) -> Array:
    """`reg.num_reg_steps` rounds of gradient steps on the model output `pred` (NHWC [B, h, w, C]) so that
    the noise it implies looks i.i.d. N(0, I): `num_auto_corr_rolls` steps of size
    lambda_auto_corr / num_auto_corr_rolls on the auto-correlation loss (each with its own rolls), then
    one of size lambda_kl on the per-example KL term.

    lambdas: [2] (lambda_auto_corr, lambda_kl); rolls: [num_reg_steps, num_auto_corr_rolls, B, C, levels]
    (None without the auto-correlation term).
    """
    def eps_of(p):
        return epsilon_from_output(p, sample, alpha_cumprod, reg.prediction_type)

    grad_ac = jax.grad(lambda p, r: auto_corr_loss(eps_of(p), r))
    grad_kl = jax.grad(lambda p: jnp.sum(jax.vmap(kl_divergence)(eps_of(p))))

    def one_round(p, round_rolls):
        if reg.auto_corr:
            def roll_step(q, r):
                return q - lambdas[0] * grad_ac(q, r) / reg.num_auto_corr_rolls, None

            p, _ = jax.lax.scan(roll_step, p, round_rolls)
        if reg.kl:
            p = p - lambdas[1] * grad_kl(p)
        return p, None

    pred, _ = jax.lax.scan(one_round, pred, rolls, length=reg.num_reg_steps)
    return pred


def invert_latents(unet_fn: Callable[[Array, Array], Array], sched, state, latents: Array, num_iterations: int,
                   guidance_scale, do_cfg: bool, reg: Regulariser, lambdas: Array, rolls: Optional[Array],
                   on_step: Optional[Callable[[Array, Array, Array], Any]] = None) -> Array:
    """DDIM inversion of NHWC `latents` over the first `num_iterations` inverse timesteps of `state`.

    unet_fn(x, t) -> model output for x (doubled for CFG by the caller's context). Returns the latents
    after every inverse step, [num_iterations, B, h, w, C] in step order (least noised first).
    rolls: [num_iterations, num_reg_steps, num_auto_corr_rolls, B, C, levels], or None without
    regularisation. on_step(i, t, latents): the host callbacks after step i (`_on_step`), or None.
    """
    def body(carry, i):
        x, st = carry
        t = st.timesteps[i]
        pred = guided(unet_fn(jnp.concatenate([x, x]) if do_cfg else x, t), guidance_scale, do_cfg)
        if reg.num_reg_steps:
            pred = regularise(reg, pred, x, st.alphas_cumprod[t], lambdas, None if rolls is None else rolls[i])
        out = sched.step(st, pred, t, x)
        if on_step is not None:
            on_step(i, t, out.prev_sample)
        return (out.prev_sample, out.state), out.prev_sample

    _, path = jax.lax.scan(body, (latents, state), jnp.arange(num_iterations))
    return path


# ----------------------------------------------------------------------------- the three programs


@dataclasses.dataclass(frozen=True)
class DiffEditModels:
    """The model definitions (hashable linen modules and schedulers): static under jit."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler: Any
    inverse_scheduler: Any
    safety_checker: Any = None


@dataclasses.dataclass(frozen=True)
class DiffEditOptions:
    """Static options of one program: changing one compiles anew (the others are traced)."""

    num_inference_steps: int
    do_cfg: bool
    num_maps_per_mask: int = 1  # mask
    num_iterations: int = 0  # invert: inverse steps run (inpaint_strength); edit: len(image_latents[0])
    regulariser: Regulariser = Regulariser()  # invert
    decode: bool = False  # invert: decode every inverted latent; edit: decode the result
    scheduler_takes_eta: bool = False  # edit
    # invert / edit: host callbacks (callbacks.host_switches); without them the loops have no hook
    host_callback: bool = False
    host_latents: bool = False
    decode_every: int = 0


@flax.struct.dataclass
class Prompt:
    """One prompt's traced text inputs: token ids or embeddings, and the negative ones for CFG."""

    ids: Optional[Array] = None  # [B, L] int32
    embeds: Optional[Array] = None  # [B, L, D]
    neg_ids: Optional[Array] = None
    neg_embeds: Optional[Array] = None


def prompt_context(m: DiffEditModels, params, p: Prompt, do_cfg: bool, repeat: int = 1) -> Array:
    """[neg; prompt] embeddings (just the prompt's without CFG), each prompt repeated `repeat` times."""
    def embed(ids, embeds):
        return embeds if embeds is not None else encode_text(m.text_encoder, params["text_encoder"], ids, None)

    parts = [embed(p.neg_ids, p.neg_embeds)] if do_cfg else []
    parts.append(embed(p.ids, p.embeds))
    return jnp.concatenate([jnp.repeat(x, repeat, axis=0) for x in parts]).astype(m.unet.runtime.dtype)


def _unet_fn(m: DiffEditModels, params, context: Array):
    def fn(x, t):
        tt = jnp.broadcast_to(t, (x.shape[0],))
        out = m.unet.apply({"params": params["unet"]}, x.astype(m.unet.runtime.dtype), tt, context,
                           method=m.unet.nhwc)
        return out.astype(jnp.float32)

    return fn


def _on_step(m: DiffEditModels, opts: DiffEditOptions, params, callback_ids: Optional[Array]):
    """The loops' per-step host callbacks `(i, t, latents) -> None`, or None when the call has none."""
    if not (opts.host_callback or opts.decode_every):
        return None
    decode = lambda x: decode_latents(m.vae, params["vae"], x)  # noqa: E731
    return lambda i, t, x: callbacks.send_step(opts, callback_ids, i, t, x, decode)


def _image_latents(m: DiffEditModels, params, image: Array, key: Array) -> Array:
    """NHWC scaled latents of NHWC pixels (posterior sample), or NHWC latents passed through."""
    if image.shape[-1] == m.vae.latent_channels:
        return image.astype(jnp.float32)
    return encode_image(m.vae, params["vae"], image, key)


def mask_program(m: DiffEditModels, opts: DiffEditOptions, params, image: Array, source: Prompt, target: Prompt,
                 guidance_scale, begin_index, mask_thresholding_ratio, noise: Optional[Array], key: Array):
    """diffusers' `generate_mask`: returns (map, mask), [B, h, w] each (see `mask_from_predictions`).

    image: NHWC [B, H, W, 3]; every image is encoded and noised `num_maps_per_mask` times at the
    forward scheduler's timestep `begin_index` (mask_encode_strength); noise: NHWC [B * maps, h, w, 4]
    or None to draw it from `key`.
    """
    maps, sched = opts.num_maps_per_mask, m.scheduler
    key_image, key_noise = jax.random.split(key)
    latents = _image_latents(m, params, jnp.repeat(image, maps, axis=0), key_image)
    noise = jax.random.normal(key_noise, latents.shape) if noise is None else noise
    state = sched.set_begin_index(sched.set_timesteps(params["scheduler"], opts.num_inference_steps, latents.shape),
                                  begin_index)
    t = state.timesteps[begin_index]
    noised = sched.add_noise(state, latents, noise, jnp.broadcast_to(t, latents.shape[:1]))
    halves = 4 if opts.do_cfg else 2
    context = jnp.concatenate([prompt_context(m, params, p, opts.do_cfg, maps) for p in (source, target)])
    x = sched.scale_model_input(state, jnp.concatenate([noised] * halves), t)
    pred = _unet_fn(m, params, context)(x, t)
    src, tgt = jnp.split(pred, 2)
    return mask_from_predictions(guided(src, guidance_scale, opts.do_cfg), guided(tgt, guidance_scale, opts.do_cfg),
                                 maps, mask_thresholding_ratio)


def invert_program(m: DiffEditModels, opts: DiffEditOptions, params, image: Array, prompt: Prompt, guidance_scale,
                   lambdas: Array, rolls: Optional[Array], key: Array, callback_ids: Optional[Array] = None):
    """diffusers' `invert` of NHWC `image`: returns (latents [B, n, h, w, 4], most noised first, and with
    `opts.decode` their images [B * n, H, W, 3] in [0, 1], else None).

    rolls: the auto-correlation rolls [B, n, num_reg_steps, num_auto_corr_rolls, C, levels] (batch first,
    to be split by `in_groups`) or None to draw them from `key` (see `auto_corr_loss`); callback_ids: [B, 2]
    with host callbacks, else None.
    """
    rolls = None if rolls is None else jnp.moveaxis(rolls, 0, 3)  # [n, R, A, B, C, levels]
    key_image, key_rolls = jax.random.split(key)
    latents = _image_latents(m, params, image, key_image)
    inv = m.inverse_scheduler
    state = inv.set_timesteps(inv.create_state(), opts.num_inference_steps, latents.shape)
    reg = opts.regulariser
    if reg.num_reg_steps and reg.auto_corr and rolls is None:
        b, h, _, c = latents.shape
        bounds = jnp.asarray(auto_corr_roll_bounds(h))
        shape = (opts.num_iterations, reg.num_reg_steps, reg.num_auto_corr_rolls, b, c, len(bounds))
        rolls = jax.random.randint(key_rolls, shape, 0, bounds)
    context = prompt_context(m, params, prompt, opts.do_cfg)
    path = invert_latents(_unet_fn(m, params, context), inv, state, latents, opts.num_iterations, guidance_scale,
                          opts.do_cfg, reg, lambdas, rolls, _on_step(m, opts, params, callback_ids))
    path = path[::-1]  # [n, B, h, w, C], most noised first
    images = None
    if opts.decode:
        flat = jnp.swapaxes(path, 0, 1).reshape(-1, *path.shape[2:])
        images = decode_latents(m.vae, params["vae"], flat)
    return jnp.swapaxes(path, 0, 1), images


def edit_program(m: DiffEditModels, opts: DiffEditOptions, params, prompt: Prompt, mask: Array, image_latents: Array,
                 guidance_scale, begin_index, eta, key: Array, callback_ids: Optional[Array] = None):
    """diffusers' `__call__`: returns (images [B, H, W, 3] in [0, 1] or latents NHWC, nsfw flags or None).

    mask: [B, h, w] {0, 1}; image_latents: [B, n, h, w, 4] from `invert_program` with n the iterations
    the forward scheduler runs from `begin_index` (inpaint_strength); callback_ids: [B, 2] with host
    callbacks, else None.
    """
    sched = m.scheduler
    inverted = jnp.swapaxes(image_latents.astype(jnp.float32), 0, 1)  # [n, B, h, w, C]
    state = sched.set_begin_index(
        sched.set_timesteps(params["scheduler"], opts.num_inference_steps, inverted.shape[1:]), begin_index)
    unet_fn = _unet_fn(m, params, prompt_context(m, params, prompt, opts.do_cfg))
    on_step = _on_step(m, opts, params, callback_ids)

    def body(carry, xs):
        x, st = carry
        inv, i = xs
        t = st.timesteps[st.step_index]
        x_in = sched.scale_model_input(st, jnp.concatenate([x, x]) if opts.do_cfg else x, t)
        pred = guided(unet_fn(x_in, t), guidance_scale, opts.do_cfg)
        kwargs = {"eta": eta} if opts.scheduler_takes_eta else {}
        out = sched.step(st, pred, t, x, key=jax.random.fold_in(key, i), **kwargs)
        keep = mask[..., None]
        x = out.prev_sample * keep + inv * (1.0 - keep)
        if on_step is not None:
            on_step(i, t, x)
        return (x, out.state), None

    (latents, _), _ = jax.lax.scan(body, (inverted[0], state), (inverted, jnp.arange(inverted.shape[0])))
    if not opts.decode:
        return latents, None
    images = decode_latents(m.vae, params["vae"], latents)
    if m.safety_checker is None:
        return images, None
    return m.safety_checker.apply({"params": params["safety_checker"]}, images, method=m.safety_checker.check_images)


def grouped(program: Callable) -> Callable:
    """`program` over the key groups of `sampling.in_groups`, jitted: (models, opts, params, rows, wide,
    keys, stacked_axis), with `rows` its batched keyword arguments (batch first) and `wide` the others."""
    def run_groups(m: DiffEditModels, opts: DiffEditOptions, params, rows: dict, wide: dict, keys: Array,
                   stacked_axis: Optional[str]):
        return in_groups(lambda p, r, k: program(m, opts, p, key=k, **r, **wide), params, rows, keys, stacked_axis)

    run_groups.__name__ = f"{program.__name__}_groups"
    return jax.jit(run_groups, static_argnums=(0, 1, 6))


_mask_jit = grouped(mask_program)
_invert_jit = grouped(invert_program)
_edit_jit = grouped(edit_program)


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class DiffEditInversionPipelineOutput(BaseOutput):
    """`latents`: [B, n, 4, h, w] inverted latents, most noised first (what `__call__` takes as
    `image_latents`); `images`: with decode_latents=True their decoded images, [B * n, H, W, 3] in
    [0, 1] or PIL, else None."""

    latents: Any
    images: Any


PromptLike = Union[str, Sequence[str], np.ndarray, None]


class FlaxStableDiffusionDiffEditPipeline(FlaxDiffusionPipeline):
    """DiffEdit with a plain 4-channel text-to-image model, in diffusers' three steps:

        mask = pipe.generate_mask(image, params, key, source_prompt="a bowl of fruits",
                                  target_prompt="a bowl of pears")
        inv = pipe.invert(image, params, key, prompt="a bowl of fruits").latents
        out = pipe("a bowl of pears", mask, inv, params, key).images

    Prompts are strings (or lists of them) or token ids from `tokenize`; images PIL, or NCHW arrays in
    [-1, 1] from `image_processor.preprocess`. Each step is one compiled program, run as the other
    pipelines run theirs (`sampling.place`, `sampling.in_groups`): on one device by default; with
    `mesh=` over a mesh's data axis (one key covers the batch: the images of a one-device call); with
    `jit=True` in diffusers' pmap convention: inputs [devices, per_device, ...] (`prepare_inputs`, then
    `shard` each, `jax.random.split(key, devices)` keys, `replicate(params)`), outputs with that device
    axis, each device's those of a one-device call on its rows with its key. Without `jit`, `prng_seed`
    may hold one key per prompt. Prompts, seeds, guidance, strengths, thresholds and lambdas are traced,
    while step counts, num_maps_per_mask, num_reg_steps / num_auto_corr_rolls (the latter only with
    num_reg_steps > 0) and the number of inverted latents (inpaint_strength in `invert`, whose output's
    shape it sets) are static.
    """

    _pipeline_class = "StableDiffusionDiffEditPipeline"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 inverse_scheduler: Optional[FlaxDDIMInverseScheduler] = None, dtype: Any = jnp.float32):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, dtype)
        if unet.in_channels != 4:
            raise ValueError(f"DiffEdit needs a plain text-to-image UNet (in_channels=4); this one has "
                             f"in_channels={unet.in_channels}.")
        # diffusers' DiffEdit examples build it from the scheduler's config the same way.
        self.inverse_scheduler = inverse_scheduler or FlaxDDIMInverseScheduler.from_config(scheduler.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `FlaxDiffusionPipeline.from_pretrained`; a folder's `inverse_scheduler` (diffusers'
        DiffEdit folders have one) is loaded, else it comes from the scheduler's config."""
        if "inverse_scheduler" not in kwargs:
            hub = {k: kwargs[k] for k in ("cache_dir", "proxies", "token", "force_download") if k in kwargs}
            folder = resolve_folder(pretrained_model_name_or_path, None, kwargs.get("local_files_only", False),
                                    kwargs.get("revision"), **hub)
            if (read_config(folder, cls.config_name).get("inverse_scheduler") or [None, None])[1] is not None:
                kwargs["inverse_scheduler"] = FlaxDDIMInverseScheduler.from_pretrained(folder / "inverse_scheduler")[0]
            pretrained_model_name_or_path = folder
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _model_index(self) -> dict:
        others = {k: v for k, v in self.components.items() if k != "inverse_scheduler"}
        return {**loading.model_index(self._pipeline_class, others),
                "inverse_scheduler": ["diffusers", self.inverse_scheduler.diffusers_class]}

    @property
    def config(self) -> FrozenConfig:
        return FrozenConfig(self._model_index())

    def save_pretrained(self, save_directory, params, push_to_hub: bool = False, **kwargs) -> None:
        """A diffusers StableDiffusionDiffEditPipeline folder (with its inverse_scheduler)."""
        if push_to_hub or kwargs:
            raise ValueError(f"save_pretrained(push_to_hub=True, {', '.join(kwargs)}) is not provided.")
        others = {k: v for k, v in self.components.items() if k != "inverse_scheduler"}
        loading.save_components(save_directory, self._pipeline_class, others, params)
        self.inverse_scheduler.save_pretrained(Path(save_directory) / "inverse_scheduler")
        write_bytes_atomic(Path(save_directory) / "model_index.json", json.dumps(self._model_index(), indent=2).encode())

    # -- host side ------------------------------------------------------------------------------
    def _models(self) -> DiffEditModels:
        return DiffEditModels(self.unet, self.vae, self.text_encoder, self.scheduler, self.inverse_scheduler,
                              self.safety_checker)

    def prepare_inputs(self, prompt, image) -> tuple:
        """(prompt_ids, images NCHW in [-1, 1]), one image per prompt: with jit=True `shard` both (and the
        other prompts' ids)."""
        ids, images = self.tokenize(prompt), self._pixels(image, None)
        if images.shape[0] not in (1, ids.shape[0]):
            raise ValueError(f"{images.shape[0]} images for {ids.shape[0]} prompts; pass one, or one per prompt.")
        return ids, np.broadcast_to(images, (ids.shape[0],) + images.shape[1:]).copy()

    def _prompt(self, name: str, prompt: PromptLike, embeds, negative: PromptLike, negative_embeds,
                do_cfg: bool, jit: bool, lead: Optional[tuple] = None) -> tuple:
        """Checked text inputs and their batch dims (`inputs.batch_dims`), which must be `lead` when given."""
        def ids(p, what, dims):
            if p is None:
                return None
            if isinstance(p, str) or (isinstance(p, (list, tuple)) and all(isinstance(s, str) for s in p)):
                if jit:
                    raise ValueError(f"With jit=True {what} must be token ids with a leading device axis: "
                                     "shard(pipeline.tokenize(prompts)), as prepare_inputs gives them.")
                p = self.tokenize(p)
            return check_ids(self, what, p, np.shape(p)[:-1] if dims is None else dims)

        if (prompt is None) == (embeds is None):
            raise ValueError(f"Pass exactly one of {name} and {name}_embeds; got "
                             f"{'neither' if prompt is None else 'both'}.")
        p = Prompt(ids=ids(prompt, name, None), embeds=None if embeds is None else np.asarray(embeds, np.float32))
        got = batch_dims(self, p.ids, p.embeds, jit)
        if lead is not None and got != lead:
            raise ValueError(f"{name} has batch dims {got} for images of {lead}; pass one prompt per image.")
        if do_cfg:
            neg_name = name.replace("prompt", "negative_prompt")
            if negative_embeds is not None:
                p = p.replace(neg_embeds=np.asarray(negative_embeds, np.float32))
                if p.neg_embeds.shape[:-2] != got:
                    raise ValueError(f"{neg_name}_embeds has batch dims {p.neg_embeds.shape[:-2]} for {got} in "
                                     f"{name}; pass one per prompt.")
            elif negative is None or isinstance(negative, str):  # one for every prompt
                p = p.replace(neg_ids=np.broadcast_to(self.tokenize(negative or ""), got + (self.max_length,)))
            else:
                p = p.replace(neg_ids=ids(negative, neg_name, got))
        return p, got

    def _pixels(self, image, lead: Optional[tuple]) -> np.ndarray:
        """NCHW float32 in [-1, 1] (PIL or arrays through `image_processor.preprocess`), size a multiple
        of the VAE factor, broadcast to the batch dims `lead` (with jit=True: already [devices,
        per_device, 3, H, W])."""
        jit = lead is not None and len(lead) == 2
        if jit or (isinstance(image, (np.ndarray, jax.Array)) and np.ndim(image) == 4 and np.shape(image)[1] == 3):
            image = np.asarray(image, np.float32)
        else:
            image = np.asarray(self.image_processor.preprocess(image), np.float32)
        if jit and (image.ndim != 5 or image.shape[:2] != lead or image.shape[2] != 3):
            raise ValueError(f"image has shape {image.shape}; expected {lead + (3, 'H', 'W')} with jit=True: shard() "
                             "the images like the prompt ids (prepare_inputs).")
        f = self.vae_scale_factor
        if image.shape[-1] % f or image.shape[-2] % f:
            raise ValueError(f"image is {image.shape[-2]}x{image.shape[-1]}; both sides must be multiples of {f}.")
        if lead is None or jit:
            return image
        if image.shape[0] not in (1, lead[0]):
            raise ValueError(f"{image.shape[0]} images for {lead[0]} prompts; pass one, or one per prompt.")
        return np.broadcast_to(image, lead + image.shape[1:])

    @staticmethod
    def _steps(num_inference_steps) -> int:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int >= 1.")
        return int(num_inference_steps)

    def _launch(self, program: Callable, opts: DiffEditOptions, params, prng_seed, jit: bool, mesh, lead: tuple,
                rows: dict, wide: dict):
        """One of the three programs on the call's devices (sampling's layout, as the other pipelines run):
        `rows` batched inputs [*lead, ...], `wide` call-wide values; returns its outputs as numpy arrays
        with the batch dims `lead` (one flat batch axis for outputs of several rows per example)."""
        keys, mesh = call_layout(prng_seed, params, jit, mesh, lead)
        if jit:
            rows = jax.tree_util.tree_map(merge_devices, rows)
        params, rows, wide, keys = place(params, rows, wide, keys, mesh, jit, int(np.prod(lead)))
        with jax.set_mesh(mesh):
            out = program(self._models(), opts, params, rows, wide, keys, mesh.axis_names[0] if jit else None)
        return jax.tree_util.tree_map(lambda x: x.reshape(*lead[:-1], -1, *x.shape[1:]), fetch(out))

    def generate_mask(self, image, params, prng_seed, *, target_prompt: PromptLike = None,
                      target_negative_prompt: PromptLike = None, target_prompt_embeds=None,
                      target_negative_prompt_embeds=None, source_prompt: PromptLike = None,
                      source_negative_prompt: PromptLike = None, source_prompt_embeds=None,
                      source_negative_prompt_embeds=None, num_maps_per_mask: int = 10,
                      mask_encode_strength: float = 0.5, mask_thresholding_ratio: float = 3.0,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, output_type: str = "np",
                      mask_noise=None, return_map: bool = False, jit: bool = False, mesh: Optional[Mesh] = None):
        """The latent-size mask where the two prompts disagree, [B, h, w] float32 {0, 1} (1 = edit), or
        PIL with output_type="pil"; with `return_map` also the map it thresholds ([B, h, w] in [0, 1]).

        `mask_noise` ([B * num_maps_per_mask, 4, h, w], the maps of an image adjacent) replaces the noise
        drawn from `prng_seed`. The clamp level is the mean of each image's own map (diffusers: of the
        whole batch's). `jit` and `mesh`: see the class docstring.
        """
        if not isinstance(num_maps_per_mask, (int, np.integer)) or isinstance(num_maps_per_mask, bool) \
                or num_maps_per_mask < 1:
            raise ValueError(f"num_maps_per_mask={num_maps_per_mask!r} must be a positive int.")
        if not mask_thresholding_ratio > 0:
            raise ValueError(f"mask_thresholding_ratio={mask_thresholding_ratio!r} must be > 0.")
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type={output_type!r}; use 'np' or 'pil'.")
        steps = self._steps(num_inference_steps)
        strength_steps("mask_encode_strength", mask_encode_strength, steps)
        do_cfg = guidance_scale > 1.0
        source, lead = self._prompt("source_prompt", source_prompt, source_prompt_embeds, source_negative_prompt,
                                    source_negative_prompt_embeds, do_cfg, jit)
        target, _ = self._prompt("target_prompt", target_prompt, target_prompt_embeds, target_negative_prompt,
                                 target_negative_prompt_embeds, do_cfg, jit, lead)
        image = self._pixels(image, lead)
        if mask_noise is not None:
            f = self.vae_scale_factor
            want = lead[:-1] + (lead[-1] * num_maps_per_mask, self.vae.latent_channels, image.shape[-2] // f,
                                image.shape[-1] // f)
            if np.shape(mask_noise) != want:
                raise ValueError(f"mask_noise has shape {np.shape(mask_noise)}; expected {want} "
                                 "(num_maps_per_mask per image, NCHW latents, after a device axis with jit=True).")
            mask_noise = np.moveaxis(np.asarray(mask_noise, np.float32), -3, -1)
        opts = DiffEditOptions(steps, do_cfg, num_maps_per_mask=int(num_maps_per_mask))
        begin = begin_index_for_strength(steps, mask_encode_strength, self.scheduler.order)
        rows = dict(image=np.moveaxis(image, -3, -1), source=source, target=target, noise=mask_noise)
        wide = dict(guidance_scale=np.float32(guidance_scale), begin_index=np.int32(begin),
                    mask_thresholding_ratio=np.float32(mask_thresholding_ratio))
        guidance_map, mask = self._launch(_mask_jit, opts, params, prng_seed, jit, mesh, lead, rows, wide)
        if output_type == "pil":
            mask = self.numpy_to_pil(mask.reshape(-1, *mask.shape[-2:], 1))
        return (mask, guidance_map) if return_map else mask

    def invert(self, image, params, prng_seed, *, prompt: PromptLike = None, num_inference_steps: int = 50,
               inpaint_strength: float = 0.8, guidance_scale: float = 7.5, negative_prompt: PromptLike = None,
               prompt_embeds=None, negative_prompt_embeds=None, decode_latents: bool = False,
               output_type: str = "np", return_dict: bool = True, lambda_auto_corr: float = 20.0,
               lambda_kl: float = 20.0, num_reg_steps: int = 0, num_auto_corr_rolls: int = 5,
               auto_corr_rolls=None, callback: Optional[Callable[[int, float, np.ndarray], None]] = None,
               callback_steps: int = 1, host_callbacks: Sequence[callbacks.HostCallback] = (), progress: bool = False,
               jit: bool = False, mesh: Optional[Mesh] = None):
        """DDIM-inverted latents of `image` under `prompt` for the last int(steps * inpaint_strength)
        steps, with `num_reg_steps` rounds of noise regularisation (see `regularise`).

        `auto_corr_rolls` ([n, num_reg_steps, num_auto_corr_rolls, B, 4, levels] ints, see
        `auto_corr_loss`; with jit=True a device axis first and the per-device batch for B) replaces the
        rolls drawn from `prng_seed`. The KL term is per image (diffusers: over the whole batch).
        `callback(step, timestep, latents NCHW)` every `callback_steps` inverse steps, `host_callbacks` and
        `progress` (a per-step bar): as in the other pipelines (`callbacks.CallHooks`). `jit` and `mesh`:
        see the class docstring.
        """
        steps = self._steps(num_inference_steps)
        n = strength_steps("inpaint_strength", inpaint_strength, steps)
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type={output_type!r}; use 'np' or 'pil'.")
        for name, v in (("num_reg_steps", num_reg_steps), ("num_auto_corr_rolls", num_auto_corr_rolls)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be an int >= 0.")
        do_cfg = guidance_scale > 1.0
        prompt, lead = self._prompt("prompt", prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, do_cfg,
                                    jit)
        image = self._pixels(image, lead)
        # without regularisation steps the other settings are unused: one program for any of them
        reg = Regulariser(int(num_reg_steps), int(num_auto_corr_rolls),
                          auto_corr=lambda_auto_corr > 0 and num_auto_corr_rolls > 0, kl=lambda_kl > 0,
                          prediction_type=self.inverse_scheduler.prediction_type) if num_reg_steps else Regulariser()
        if auto_corr_rolls is not None:
            levels = auto_corr_levels(image.shape[-2] // self.vae_scale_factor)
            want = lead[:-1] + (n, int(num_reg_steps), int(num_auto_corr_rolls), lead[-1], self.vae.latent_channels,
                                levels)
            if np.shape(auto_corr_rolls) != want:
                raise ValueError(f"auto_corr_rolls has shape {np.shape(auto_corr_rolls)}; expected {want}.")
            # batch first, as the program's rows are: [*lead, n, R, A, C, levels]
            auto_corr_rolls = np.moveaxis(np.asarray(auto_corr_rolls, np.int32), len(lead) + 2, len(lead) - 1)
        host = callbacks.make_host_callbacks(callback, callback_steps, n if progress else None,
                                             self._progress_bar_config, host_callbacks)
        opts = DiffEditOptions(steps, do_cfg, num_iterations=n, regulariser=reg, decode=bool(decode_latents),
                               **callbacks.host_switches(host))
        wide = dict(guidance_scale=np.float32(guidance_scale),
                    lambdas=np.array([lambda_auto_corr, lambda_kl], np.float32))
        with callbacks.host_session(lead, host) as ids:  # until the program is done
            rows = dict(image=np.moveaxis(image, -3, -1), prompt=prompt, rolls=auto_corr_rolls, callback_ids=ids)
            latents, images = self._launch(_invert_jit, opts, params, prng_seed, jit, mesh, lead, rows, wide)
        latents = np.moveaxis(latents, -1, -3)  # NCHW at the public boundary: [*lead, n, 4, h, w]
        if images is not None and output_type == "pil":
            images = self.numpy_to_pil(images.reshape(-1, *images.shape[-3:]))
        return DiffEditInversionPipelineOutput(latents, images) if return_dict else (latents, images)

    def __call__(self, prompt: PromptLike, mask_image, image_latents, params, prng_seed, *,
                 inpaint_strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: PromptLike = None, prompt_embeds=None, negative_prompt_embeds=None,
                 eta: float = 0.0, output_type: str = "np", return_dict: bool = True,
                 callback: Optional[Callable[[int, float, np.ndarray], None]] = None, callback_steps: int = 1,
                 host_callbacks: Sequence[callbacks.HostCallback] = (), progress: bool = False, jit: bool = False,
                 mesh: Optional[Mesh] = None):
        """Regenerate the masked region of the inverted image under `prompt`.

        mask_image: [B, h, w] or [h, w] (latent size, e.g. `generate_mask`'s), binarised at 0.5;
        image_latents: `invert`'s latents [B, n, 4, h, w] for the same num_inference_steps and
        inpaint_strength (with jit=True both with `invert`'s device axis first). `prng_seed` feeds the
        scheduler's noise (eta > 0 with DDIM). `callback`, `callback_steps`, `host_callbacks`, `progress`:
        as in `invert` (the latents after each step's blending, like diffusers'). `jit` and `mesh`: see
        the class docstring.
        """
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'np', 'pil' or 'latent'.")
        steps = self._steps(num_inference_steps)
        n = strength_steps("inpaint_strength", inpaint_strength, steps)
        do_cfg = guidance_scale > 1.0
        prompt, lead = self._prompt("prompt", prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, do_cfg,
                                    jit)
        image_latents = np.asarray(image_latents, np.float32)
        k = len(lead)
        if image_latents.ndim != k + 4 or image_latents.shape[:k + 2] != lead + (n, self.vae.latent_channels):
            raise ValueError(f"image_latents has shape {image_latents.shape}; expected {list(lead)} + [{n}, "
                             f"{self.vae.latent_channels}, h, w]: invert()'s latents for {lead} prompts with the "
                             "same num_inference_steps and inpaint_strength.")
        mask = np.asarray(mask_image, np.float32)
        mask = mask[None] if mask.ndim == 2 and not jit else mask
        if mask.ndim != k + 2 or mask.shape[:k] not in (lead, (1,)) or mask.shape[k:] != image_latents.shape[k + 2:]:
            raise ValueError(f"mask_image has shape {np.shape(mask_image)}; expected {list(lead)} + [h, w] "
                             f"{'' if jit else 'or [h, w] '}at the latents' size {image_latents.shape[k + 2:]} "
                             "(generate_mask's output).")
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask_image must lie in [0, 1].")
        mask = np.broadcast_to((mask >= 0.5).astype(np.float32), lead + mask.shape[k:])
        host = callbacks.make_host_callbacks(callback, callback_steps, n if progress else None,
                                             self._progress_bar_config, host_callbacks)
        opts = DiffEditOptions(steps, do_cfg, num_iterations=n, decode=output_type != "latent",
                               scheduler_takes_eta=takes_eta(type(self.scheduler)), **callbacks.host_switches(host))
        begin = begin_index_for_strength(steps, inpaint_strength, self.scheduler.order)
        wide = dict(guidance_scale=np.float32(guidance_scale), begin_index=np.int32(begin), eta=np.float32(eta))
        with callbacks.host_session(lead, host) as ids:  # until the program is done
            rows = dict(prompt=prompt, mask=mask, image_latents=np.moveaxis(image_latents, -3, -1), callback_ids=ids)
            images, nsfw = self._launch(_edit_jit, opts, params, prng_seed, jit, mesh, lead, rows, wide)
        if output_type == "latent":  # NCHW at the public boundary
            images = np.moveaxis(images, -1, -3)
        if output_type == "pil":
            images = self.numpy_to_pil(images.reshape(-1, *images.shape[-3:]))
        return FlaxStableDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)

    def edit(self, image, params, prng_seed, *, source_prompt: PromptLike, target_prompt: PromptLike,
             num_inference_steps: int = 50, guidance_scale: float = 7.5, invert_guidance_scale: float = 7.5,
             inpaint_strength: float = 0.8, num_maps_per_mask: int = 10, mask_encode_strength: float = 0.5,
             mask_thresholding_ratio: float = 3.0, negative_prompt: PromptLike = None):
        """The three steps in a row, as diffusers' DiffEdit example runs them: the mask from the two
        prompts, the image inverted under `source_prompt`, the masked region regenerated under
        `target_prompt`. Returns (mask [B, h, w] at latent size, images NHWC in [0, 1]); the CLI and
        sweeps use it."""
        mask = self.generate_mask(image, params, prng_seed, source_prompt=source_prompt, target_prompt=target_prompt,
                                  num_maps_per_mask=num_maps_per_mask, mask_encode_strength=mask_encode_strength,
                                  mask_thresholding_ratio=mask_thresholding_ratio,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        latents = self.invert(image, params, prng_seed, prompt=source_prompt, num_inference_steps=num_inference_steps,
                              inpaint_strength=inpaint_strength, guidance_scale=invert_guidance_scale).latents
        images = self(target_prompt, mask, latents, params, prng_seed, inpaint_strength=inpaint_strength,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt).images
        return mask, images
