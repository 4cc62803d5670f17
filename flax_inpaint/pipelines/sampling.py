"""The one compiled program behind every Stable Diffusion pipeline.

`generate` is a pure function: text encoding, latent preparation, the whole denoising loop in one
`lax.fori_loop` (classifier-free guidance as one doubled batch), VAE decoding and the safety checker.
Its static arguments are the model definitions (`Components`) and shape/step options (`Options`);
params, inputs and keys are traced, so new prompts, seeds, masks, guidance or strength reuse the
compiled program. The pipelines differ only in which `Batch` fields they fill.

Randomness: one key covers the batch it is called with (the initial noise is one draw of the
batch's shape), so a mesh call over a global batch equals a single-device call on that batch.
`generate_groups` splits the rows into as many groups as it gets keys, each sampled with its key: one
key per prompt (like diffusers' list of generators) gives each prompt the images of a call on that
prompt alone, one key per device (the pmap convention) each device's rows those of a call on them.
`run` is the one execution path: `generate_groups` jitted over a mesh of one or more devices, its
inputs laid out by `place` (which DiffEdit's programs share, run through `in_groups`).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_inpaint.loaders.lora import merge_adapters
from flax_inpaint.pipelines import callbacks
from flax_inpaint.pipelines.guidance import rescale_noise_cfg
from flax_inpaint.pipelines.ip_adapter import image_prompt
from flax_inpaint.pipelines.sdxl_conditioning import encode_hidden_states

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Components:
    """The model definitions (hashable linen modules and scheduler): static under jit."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler: Any
    safety_checker: Any = None
    controlnets: Tuple[Any, ...] = ()  # their residuals are summed, as diffusers' MultiControlNetModel does
    image_encoder: Any = None  # ip_adapter.ImageEncoder: IP-Adapter reference images -> embeddings
    text_encoder_2: Any = None  # SDXL's second encoder (with projection); text_encoder is None on the refiner


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options: changing one of these compiles a new program."""

    num_inference_steps: int
    height: int
    width: int
    do_cfg: bool
    output_type: str = "np"  # "np" (images in [0, 1]) or "latent"
    clip_skip: Optional[int] = None
    num_images_per_prompt: int = 1
    scheduler_takes_eta: bool = False
    guess_mode: bool = False  # ControlNets: residuals scaled up with depth; with CFG, on the text half only
    step_end: Optional[callbacks.StepEnd] = None  # callback_on_step_end, traced into the loop
    host_callback: bool = False  # one io_callback per step to the host (progress, callback/callback_steps, previews)
    host_latents: bool = False  # ... sending the latents too
    early_stop: bool = False  # a while_loop that ends when the call's StopFlag is set
    decode_every: int = 0  # > 0: VAE-decoded images to the host every so many steps (VAE previews)


@flax.struct.dataclass
class Batch:
    """Per-call traced inputs, NHWC: images in [-1, 1], masks in {0, 1}, latents at the VAE's size."""

    prompt_ids: Optional[Array] = None  # [B, L] int32; SDXL: [B, text encoders, L]
    neg_prompt_ids: Optional[Array] = None  # [B, L] int32; SDXL: [B, text encoders, L]
    prompt_embeds: Optional[Array] = None  # [B, L, D]
    negative_prompt_embeds: Optional[Array] = None  # [B, L, D]
    # SDXL: the pooled prompt embeddings [B, P] and the size conditioning [B, k] (the UNet's
    # added_cond_kwargs), and whether the negative embeddings are zeros (force_zeros_for_empty_prompt).
    pooled_prompt_embeds: Optional[Array] = None
    negative_pooled_prompt_embeds: Optional[Array] = None
    add_time_ids: Optional[Array] = None
    negative_add_time_ids: Optional[Array] = None
    zero_negative: Optional[Array] = None  # [] bool
    image: Optional[Array] = None  # [B, H, W, 3] pixels: img2img start / blending, encoded in the program
    image_latents: Optional[Array] = None  # [B, h, w, C] scaled latents, given instead of `image`
    mask: Optional[Array] = None  # [B, H, W, 1]
    masked_image: Optional[Array] = None  # [B, H, W, 3]
    masked_image_latents: Optional[Array] = None  # [B, h, w, C], already scaled
    # [B, h, w, C] unscaled noise: the start is noise * init_noise_sigma, or at strength < 1
    # add_noise(image latents, noise, first timestep); 4-channel blending re-noises with it too.
    latents: Optional[Array] = None
    guidance_scale: Array = 7.5  # [B] or scalar
    begin_index: Array = 0  # first loop iteration (strength, denoising_start), int32
    end_index: Optional[Array] = None  # one past the last loop iteration (denoising_end), int32; None: all
    strength_is_max: Array = True  # strength == 1: start from pure noise
    add_noise: Array = True  # False (denoising_start): start from the image latents as given, un-noised
    eta: Array = 0.0
    control_images: Optional[Tuple[Array, ...]] = None  # per ControlNet [B, H, W, C], in [0, 1] (-1: masked)
    controlnet_scales: Optional[Array] = None  # [num_iterations, num_controlnets] fp32: scale x keep per iteration
    guidance_rescale: Optional[Array] = None  # [] fp32, diffusers' rescale_noise_cfg factor (None: off)
    lora_scale: Optional[Array] = None  # [] fp32, cross_attention_kwargs["scale"]: multiplies every LoRA adapter
    schedule: Optional[Any] = None  # custom timesteps= / sigmas=: the scheduler state fields they set
    callback_ids: Optional[Array] = None  # [B, 2] int32 (call id, prompt row): host callbacks find their call
    # IP-Adapter image prompts, one entry per adapter: reference images [n, H, W, 3] in [0, 1] for every
    # prompt, or embeddings per prompt [B, n, D] (plain) / [B, n, seq, w] ("plus"), negatives with CFG.
    ip_adapter_images: Optional[Tuple[Array, ...]] = None
    ip_adapter_image_embeds: Optional[Tuple[Array, ...]] = None
    ip_adapter_negative_image_embeds: Optional[Tuple[Array, ...]] = None

    def rows(self) -> dict:
        """The per-example fields that are set (all but `CALL_WIDE_FIELDS`), by name."""
        return {f.name: v for f in dataclasses.fields(self)
                if f.name not in CALL_WIDE_FIELDS and (v := getattr(self, f.name)) is not None}


# Batch fields that hold one value for the whole call, not one per example: a mesh replicates them,
# the key groups of `generate_groups` share them.
CALL_WIDE_FIELDS = ("begin_index", "end_index", "strength_is_max", "add_noise", "zero_negative", "eta",
                    "controlnet_scales", "guidance_rescale", "lora_scale", "schedule", "ip_adapter_images")


def encode_text(text_encoder, params, ids: Array, clip_skip: Optional[int]) -> Array:
    """Prompt embeddings; with `clip_skip`, an earlier layer's hidden state through the final norm."""
    if clip_skip is None:
        return text_encoder.apply({"params": params}, ids).last_hidden_state
    out = text_encoder.apply({"params": params}, ids, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    return text_encoder.apply({"params": params}, hidden, method=text_encoder.final_layer_norm)


def encode_image(vae, params, image: Array, key: Array) -> Array:
    """Scaled VAE latents of NHWC images, sampling the posterior like diffusers."""
    dist = vae.apply({"params": params}, image.astype(vae.runtime.dtype), method=vae.encode_nhwc)
    return dist.sample(key).astype(jnp.float32) * vae.scaling_factor


def decode_latents(vae, params, latents: Array) -> Array:
    """NHWC images in [0, 1] from scaled NHWC latents."""
    x = (latents.astype(jnp.float32) / vae.scaling_factor).astype(vae.runtime.dtype)
    decoded = vae.apply({"params": params}, x, method=vae.decode_nhwc)
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _per_image(x: Array, opts: Options) -> Array:
    """Rows [B] (or [negatives; prompts] with CFG) repeated num_images_per_prompt times each, in that layout."""
    if opts.num_images_per_prompt == 1:
        return x
    n, halves = opts.num_images_per_prompt, 2 if opts.do_cfg else 1
    b = x.shape[0] // halves
    x = jnp.repeat(x.reshape(halves, b, *x.shape[1:]), n, axis=1)
    return x.reshape(halves * b * n, *x.shape[2:])


def _sdxl_conditioning(c: Components, opts: Options, params, batch: Batch) -> Tuple[Array, dict]:
    """SDXL's context (both encoders' penultimate hidden states) and added_cond_kwargs (pooled embeddings,
    size conditioning), [negatives; prompts] with CFG, as diffusers' SDXL encode_prompt and __call__."""
    names = [n for n in ("text_encoder", "text_encoder_2") if getattr(c, n) is not None]
    encoders, enc_params = tuple(getattr(c, n) for n in names), tuple(params[n] for n in names)

    def embed(ids, layer):
        return encode_hidden_states(encoders, enc_params, tuple(ids[:, k] for k in range(len(names))), layer)

    layer = -2 if opts.clip_skip is None else -(opts.clip_skip + 2)
    given = batch.prompt_embeds is not None
    if opts.do_cfg and not given and batch.negative_prompt_embeds is None and layer == -2:
        ctx, pooled = embed(jnp.concatenate([batch.neg_prompt_ids, batch.prompt_ids]), -2)  # one pass
        (uncond, cond), (uncond_pooled, pooled) = jnp.split(ctx, 2), jnp.split(pooled, 2)
    else:
        cond, pooled = (batch.prompt_embeds, batch.pooled_prompt_embeds) if given else embed(batch.prompt_ids, layer)
        if opts.do_cfg:  # the negatives always from the penultimate layer, as diffusers
            uncond, uncond_pooled = (batch.negative_prompt_embeds, batch.negative_pooled_prompt_embeds) \
                if batch.negative_prompt_embeds is not None else embed(batch.neg_prompt_ids, -2)
    time_ids = batch.add_time_ids
    if opts.do_cfg:
        zero = batch.zero_negative
        uncond, uncond_pooled = (jnp.where(zero, jnp.zeros_like(x), x) for x in (uncond, uncond_pooled))
        cond, pooled = jnp.concatenate([uncond, cond]), jnp.concatenate([uncond_pooled, pooled])
        time_ids = jnp.concatenate([batch.negative_add_time_ids, time_ids])
    added = {"text_embeds": _per_image(pooled, opts).astype(jnp.float32),
             "time_ids": _per_image(time_ids, opts).astype(jnp.float32)}
    return _per_image(cond, opts).astype(c.unet.runtime.dtype), added


def _prompt_context(c: Components, opts: Options, params, batch: Batch) -> Tuple[Array, Optional[dict]]:
    """The UNet's context [2B or B, L, D] and added_cond_kwargs (SDXL; None for SD)."""
    if c.text_encoder_2 is not None:
        return _sdxl_conditioning(c, opts, params, batch)

    def embed(ids, embeds, clip_skip):
        if embeds is not None:
            return embeds
        return encode_text(c.text_encoder, params["text_encoder"], ids, clip_skip)

    one_pass = opts.do_cfg and opts.clip_skip is None and batch.prompt_embeds is None \
        and batch.negative_prompt_embeds is None
    if one_pass:  # [negative; prompt] through the text encoder at once: the program holds one encoder
        cond = embed(jnp.concatenate([batch.neg_prompt_ids, batch.prompt_ids]), None, None)
    else:
        cond = embed(batch.prompt_ids, batch.prompt_embeds, opts.clip_skip)
        if opts.do_cfg:
            # diffusers encodes the negative prompt from the last layer whatever `clip_skip` says.
            uncond = embed(batch.neg_prompt_ids, batch.negative_prompt_embeds, None)
            cond = jnp.concatenate([uncond, cond])
    return _per_image(cond, opts).astype(c.unet.runtime.dtype), None


def _repeat(x: Optional[Array], n: int) -> Optional[Array]:
    return x if x is None or n == 1 else jnp.repeat(x, n, axis=0)


def _controlnet_residuals(c: Components, opts: Options, params, control_images, scales: Array, x_in: Array,
                          t: Array, context: Array, added: Optional[dict] = None):
    """Every ControlNet's residuals at one step, summed (NHWC; what `unet.nhwc` adds to its own).

    scales: [num_controlnets], each net's conditioning scale (0 outside its guidance window). In guess
    mode with CFG the nets run on the text half only and the unconditional half gets zero residuals.
    """
    text_only = opts.guess_mode and opts.do_cfg
    if text_only:
        half = x_in.shape[0] // 2
        x_in, context = x_in[half:], context[half:]
        added = None if added is None else {k: v[half:] for k, v in added.items()}
    t = jnp.broadcast_to(t, (x_in.shape[0],))
    down = mid = None
    for k, (net, image) in enumerate(zip(c.controlnets, control_images)):
        d, m = net.apply({"params": params["controlnet"][k]}, x_in, t, context, image, scales[k], opts.guess_mode,
                         method=net.nhwc, added_cond_kwargs=added)
        down, mid = (d, m) if down is None else (tuple(a + b for a, b in zip(down, d)), mid + m)
    if text_only:
        def pad(r):
            return jnp.concatenate([jnp.zeros_like(r), r])

        down, mid = tuple(map(pad, down)), pad(mid)
    return down, mid


def generate(c: Components, opts: Options, params, batch: Batch, key: Array):
    """Run the full sampling program; returns (images or latents, nsfw flags or None)."""
    unet, vae, sched = c.unet, c.vae, c.scheduler
    params = merge_adapters(params, batch.lora_scale)  # LoRA adapters at their (traced) weights, once per call
    n_img = opts.num_images_per_prompt
    context, added = _prompt_context(c, opts, params, batch)
    bsz = context.shape[0] // (2 if opts.do_cfg else 1)
    factor = vae.downscale
    shape = (bsz, opts.height // factor, opts.width // factor, vae.latent_channels)
    key_noise, key_image, key_masked, key_loop = jax.random.split(key, 4)
    ip = image_prompt(c.image_encoder, params, batch, bsz // n_img, n_img, opts.do_cfg, unet.runtime)

    state = sched.set_timesteps(params["scheduler"], opts.num_inference_steps, shape)
    if batch.schedule is not None:  # custom timesteps= / sigmas=: traced values of the same length
        state = state.replace(**batch.schedule)
    state = sched.set_begin_index(state, batch.begin_index)
    timesteps = state.timesteps
    n_iter = timesteps.shape[0]
    end = n_iter if batch.end_index is None else batch.end_index

    if batch.latents is not None:
        noise = batch.latents.astype(jnp.float32)
    else:
        noise = jax.random.normal(key_noise, shape, jnp.float32)

    image_latents = None
    if batch.image is not None:
        image_latents = encode_image(vae, params["vae"], _repeat(batch.image, n_img), key_image)
    elif batch.image_latents is not None:  # e.g. another pipeline's output_type="latent"
        image_latents = _repeat(batch.image_latents, n_img).astype(jnp.float32)
    if image_latents is not None:
        t0 = jnp.broadcast_to(timesteps[batch.begin_index], (bsz,))
        noised = sched.add_noise(state, image_latents, noise, t0)
        latents = jnp.where(batch.strength_is_max, noise * state.init_noise_sigma, noised)
        latents = jnp.where(batch.add_noise, latents, image_latents)
    else:
        latents = noise * state.init_noise_sigma

    mask = masked_latents = None
    if batch.mask is not None:
        mask = _repeat(batch.mask, n_img)[:, ::factor, ::factor].astype(jnp.float32)
        if batch.masked_image_latents is not None:
            masked_latents = _repeat(batch.masked_image_latents, n_img).astype(jnp.float32)
        elif unet.in_channels == 9:
            masked_latents = encode_image(vae, params["vae"], _repeat(batch.masked_image, n_img), key_masked)

    guidance = jnp.broadcast_to(jnp.asarray(batch.guidance_scale, jnp.float32).reshape(-1), (bsz // n_img,))
    guidance = jnp.repeat(guidance, n_img)[:, None, None, None]
    cfg = (lambda x: jnp.concatenate([x, x])) if opts.do_cfg else (lambda x: x)
    extra = None
    if unet.in_channels == 9:
        extra = cfg(jnp.concatenate([mask, masked_latents], axis=-1).astype(unet.runtime.dtype))
    step_kwargs = {"eta": batch.eta} if opts.scheduler_takes_eta else {}
    controls = ()
    if c.controlnets:
        double = cfg if opts.do_cfg and not opts.guess_mode else (lambda x: x)
        controls = tuple(double(_repeat(x, n_img)) for x in batch.control_images)

    live = {}  # the tensors a step-end callback may replace ride in the loop carry
    if opts.step_end is not None:
        live = {"context": context, "guidance": guidance, **({"extra": extra} if extra is not None else {}),
                **({"mask": mask} if mask is not None and unet.in_channels == 4 else {})}

    def body(i, carry):
        latents, state, live = carry
        ctx, g, ex, m = (live.get(k, v) for k, v in (("context", context), ("guidance", guidance), ("extra", extra),
                                                      ("mask", mask)))
        t = timesteps[i]
        x_in = sched.scale_model_input(state, cfg(latents), t)
        x_in = x_in.astype(unet.runtime.dtype)
        down = mid = None
        if c.controlnets:  # they see the latents only, not an inpainting UNet's mask channels
            down, mid = _controlnet_residuals(c, opts, params, controls, batch.controlnet_scales[i], x_in, t,
                                              ctx, added)
        if ex is not None:
            x_in = jnp.concatenate([x_in, ex], axis=-1)
        tt = jnp.broadcast_to(t, (x_in.shape[0],))
        eps = unet.apply({"params": params["unet"]}, x_in, tt, ctx, down, mid, method=unet.nhwc,
                         added_cond_kwargs=added, **ip)
        eps = eps.astype(jnp.float32)
        if opts.do_cfg:  # examples with guidance <= 1 take the text prediction, as without CFG
            uncond, text = jnp.split(eps, 2)
            guide = g > 1.0  # first, as before guidance_rescale: without it the program is unchanged
            guided = uncond + g * (text - uncond)
            if batch.guidance_rescale is not None:
                guided = rescale_noise_cfg(guided, text, batch.guidance_rescale)
            eps = jnp.where(guide, guided, text)
        out = sched.step(state, eps, t, latents, key=jax.random.fold_in(key_loop, i), **step_kwargs)
        latents, state = out.prev_sample, out.state
        if unet.in_channels == 4 and mask is not None:
            nxt = timesteps[jnp.minimum(i + 1, n_iter - 1)]
            renoised = sched.add_noise(state, image_latents, noise, jnp.broadcast_to(nxt, (bsz,)))
            proper = jnp.where(i < end - 1, renoised, image_latents)
            latents = (1 - m) * proper + m * latents
        if opts.early_stop:  # what a stop returns: the x0 estimate, outside the mask the image
            est = latents if out.pred_original_sample is None else out.pred_original_sample.astype(latents.dtype)
            blend = m is not None and unet.in_channels == 4
            live = {**live, "estimate": (1 - m) * image_latents + m * est if blend else est}
        if opts.step_end is not None:
            latents, live = callbacks.step_end(opts.step_end, i - batch.begin_index, t, latents, live, opts.do_cfg)
        if opts.host_callback or opts.decode_every:
            done = callbacks.send_step(opts, batch.callback_ids, i - batch.begin_index, t, latents,
                                       lambda x: decode_latents(vae, params["vae"], x))
            live = {**live, "done": done} if opts.early_stop and done is not None else live
        return latents, state, live

    if opts.early_stop:
        live = {**live, "estimate": latents, "done": jnp.zeros((), jnp.int32)}
        latents = callbacks.loop_until_stopped(body, batch.begin_index, end, (latents, state, live),
                                               batch.callback_ids)
    else:
        latents, _, _ = jax.lax.fori_loop(batch.begin_index, end, body, (latents, state, live))

    if opts.output_type == "latent":
        return latents, None
    images = decode_latents(vae, params["vae"], latents)
    nsfw = None
    if c.safety_checker is not None:
        images, nsfw = c.safety_checker.apply(
            {"params": params["safety_checker"]}, images, method=c.safety_checker.check_images
        )
    return images, nsfw


def _unreplicate(params, axis: str):
    """One copy of `params` stacked along the mesh `axis` (diffusers' pmap convention, flax's `replicate`):
    each device keeps the copy it holds, so nothing moves."""
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
    return jax.shard_map(first, in_specs=P(axis), out_specs=P(), check_vma=False)(params)


def in_groups(fn: Callable[[Any, dict, Array], Any], params, rows: dict, keys: Array,
              stacked_axis: Optional[str] = None):
    """`fn(params, rows, key)` on each of G = len(keys) equal, consecutive groups of `rows` (arrays with
    the batch first) with that group's key, as one program; returns fn's outputs (batch first), the
    groups' rows in order.

    G = 1: one key for the whole batch; G = batch size: one key per prompt; G = devices: diffusers' pmap
    convention, each device's rows with its key. With `stacked_axis`, params hold one copy per device
    stacked along that mesh axis (the pmap convention); otherwise they are replicated.
    """
    if stacked_axis is not None:
        params = _unreplicate(params, stacked_axis)
    groups = keys.shape[0]
    if groups == 1:
        return fn(params, rows, keys[0])
    split = jax.tree_util.tree_map(lambda x: x.reshape(groups, -1, *x.shape[1:]), rows)
    out = jax.vmap(lambda group, key: fn(params, group, key))(split, keys)
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def generate_groups(c: Components, opts: Options, params, batch: Batch, keys: Array,
                    stacked_axis: Optional[str] = None):
    """`generate` over the key groups of `in_groups` (the call-wide fields shared)."""
    def one(p, group, key):
        return generate(c, opts, p, batch.replace(**group), key)

    return in_groups(one, params, batch.rows(), keys, stacked_axis)


_generate_groups_jit = jax.jit(generate_groups, static_argnums=(0, 1, 5))


# The sharding and (weak references to) the leaves of the last tree `_place` found laid out already: the
# same params in the next call are then recognised without looking at each leaf. Arrays are immutable, so
# the same objects are laid out the same; a new or changed params tree has other leaves and is checked anew.
_last_kept: Tuple[Any, list] = (None, [])


def _place(tree, sharding: NamedSharding):
    """`tree` laid out as `sharding` (rows of a global batch when it splits the first axis: each process
    gives its own). Leaves already laid out so (on one device, or over this very mesh) are kept as they
    are: params placed once cost nothing per call (moving a leaf again costs ~15 us, and params have
    hundreds; checking them leaf by leaf ~1 us each, so the last params found in place are remembered)."""
    global _last_kept
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    kept_sharding, refs = _last_kept
    if kept_sharding == sharding and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
        return tree
    layouts = [(x.sharding, x.ndim) if isinstance(x, jax.Array) else None for x in leaves]
    # jit takes one mesh per program: a NamedSharding must be over this one
    kept = {key for key in set(layouts) if key is not None
            and getattr(key[0], "mesh", sharding.mesh) == sharding.mesh and key[0].is_equivalent_to(sharding, key[1])}
    todo = [i for i, key in enumerate(layouts) if key not in kept]
    if not todo:
        _last_kept = (sharding, [weakref.ref(x) for x in leaves])
        return tree
    if jax.process_count() > 1 and sharding.spec:
        moved = [jax.make_array_from_process_local_data(sharding, np.asarray(leaves[i]))
                 if not isinstance(leaves[i], jax.Array) else jax.device_put(leaves[i], sharding) for i in todo]
    else:
        moved = jax.device_put([leaves[i] for i in todo], sharding)
    for i, x in zip(todo, moved):
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def place(params, rows, wide, keys: Array, mesh: Optional[Mesh], stacked: bool, batch_size: int):
    """The inputs of a program jitted over `mesh` (see `run`), laid out: `rows` (batch first) and `keys`
    sharded along the mesh's first (data) axis, the call-wide values `wide` replicated, `params`
    replicated or, `stacked`, one copy per device along that axis. `batch_size`: this process's rows.
    No mesh: one device, the inputs as they are (jit moves host arrays to the params' device itself, in
    C++ as the program starts: placing them first costs ~0.5 ms a call on a CPU).
    Returns (params, rows, wide, keys)."""
    if mesh is None:
        return params, rows, wide, keys
    axis = mesh.axis_names[0]
    global_batch = batch_size * jax.process_count()
    if global_batch % mesh.shape[axis]:
        raise ValueError(
            f"The batch of {global_batch} is not divisible by the mesh's {axis!r} axis of size "
            f"{mesh.shape[axis]}; pad the batch or change the mesh."
        )
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
    rows, wide = _place(rows, sharded), _place(wide, replicated)
    impl = jax.random.key_impl(keys)
    data = np.asarray(jax.random.key_data(keys))  # this process's keys
    keys = jax.random.wrap_key_data(_place(data, sharded if keys.shape[0] > 1 else replicated), impl=impl)
    return _place(params, sharded if stacked else replicated), rows, wide, keys


def run(c: Components, opts: Options, params, batch: Batch, keys: Array, mesh: Optional[Mesh],
        stacked: bool = False):
    """The one execution path: `generate_groups` jitted over `mesh` (None: one device, the params'),
    inputs laid out by `place` (the call-wide fields replicated). With several processes each passes its
    local rows of the global batch; returns global arrays."""
    wide = {f: getattr(batch, f) for f in CALL_WIDE_FIELDS}
    params, rows, wide, keys = place(params, batch.replace(**dict.fromkeys(wide)), wide, keys, mesh, stacked,
                                     batch.guidance_scale.shape[0])
    # The mesh in context lets the TPU attention kernel run per device (runtime.attention).
    with jax.set_mesh(mesh):
        axis = mesh.axis_names[0] if stacked else None
        return _generate_groups_jit(c, opts, params, rows.replace(**wide), keys, axis)
