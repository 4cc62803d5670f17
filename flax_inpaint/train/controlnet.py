"""Train a ControlNet on your own Stable Diffusion base model and data, on every device and host.

    flax-inpaint train-controlnet --pretrained_model_name_or_path BASE --train_data_dir DATA \\
        --output_dir OUT --resolution 512 --train_batch_size 4 --learning_rate 1e-5
    python -m flax_inpaint.train.controlnet ...        (the same command)

What diffusers' `train_controlnet.py` computes, with its option names: the VAE, text encoder and
UNet are frozen, the ControlNet trains on the MSE between the UNet's prediction (with the
ControlNet's residuals added) and the noise or v target at uniform random timesteps, optionally
min-SNR weighted. A 9-channel inpainting UNet also gets a mask and the masked image's latents (the
ControlNet, as in the pipelines, sees only the noisy latents).

Parallelism: one `jax.jit` over a one-axis mesh of every device of every process; each process
builds only its rows of each batch (`dataset.make_batches`) and the gradient all-reduce is XLA's.
Every random draw of an example is a function of the seed and the example's position in the
stream, so k accumulated micro-batches are exactly one k times larger batch, 2 processes x 2
devices train exactly like 1 x 4, and a run resumed from `checkpoint-N` continues exactly like
the uninterrupted one.

Output (diffusers' layout): OUT/config.json + diffusion_pytorch_model.safetensors, the trained
ControlNet, loadable by our pipelines and by diffusers' `ControlNetModel.from_pretrained`;
OUT/checkpoint-N/ (train_state.msgpack, training.json, controlnet/), OUT/validation/step-N/*.png,
OUT/logs/ (TensorBoard).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_inpaint.cli import positive, unit  # the CLI's argument types
from flax_inpaint.io import CheckpointError, write_bytes_atomic
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.pipelines.sampling import encode_text
from flax_inpaint.runtime import data_mesh
from flax_inpaint.train import dataset as data_source
from flax_inpaint.train.loop import TrainState

Params = Any
Batch = Dict[str, jax.Array]
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNet default, for a VAE that downsamples 8x
STATE_FILE, INFO_FILE = "train_state.msgpack", "training.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")

# ----------------------------------------------------------------------------- the objective


@dataclasses.dataclass(frozen=True)
class Models:
    """The model definitions the loss applies (static under jit) and how the target is formed."""

    unet: Any
    vae: Any
    text_encoder: Any
    controlnet: FlaxControlNetModel
    prediction_type: str = "epsilon"  # or "v_prediction"
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (Hang et al. 2023)


class Draws(NamedTuple):
    """A training step's random numbers, one row per example."""

    latents: jax.Array  # [B, h, w, c] N(0, 1): the image posterior's sample is mean + std * this
    masked_latents: jax.Array  # [B, h, w, c] N(0, 1): the masked image's (inpainting UNets only)
    noise: jax.Array  # [B, h, w, c] N(0, 1): the diffusion noise (the epsilon target)
    timesteps: jax.Array  # [B] int32, uniform in [0, num_train_timesteps)


def draw(seed: int, positions: jax.Array, latent_shape: Tuple[int, int, int], num_train_timesteps: int) -> Draws:
    """Each example's draws from `fold_in(key(seed), its position in the stream)`: independent of how
    the stream is cut into batches, devices and processes."""

    def one(position):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), position), 4)
        return Draws(*(jax.random.normal(k, latent_shape, jnp.float32) for k in keys[:3]),
                     jax.random.randint(keys[3], (), 0, num_train_timesteps, jnp.int32))

    return jax.vmap(one)(positions)


def pixel_values(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 in [-1, 1], as ToTensor then Normalize([0.5], [0.5])."""
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def controlnet_loss(models: Models, params: Params, frozen: Dict[str, Any], batch: Batch, draws: Draws) -> jax.Array:
    """The loss of diffusers' train_controlnet.py on `batch` (uint8 NHWC `image` and
    `conditioning_image`, int32 `input_ids`, uint8 {0, 1} `mask` for inpainting UNets) with `draws`.

    frozen: {"unet", "vae", "text_encoder": params, "alphas_cumprod": [num_train_timesteps] fp32}.
    """
    unet, vae, net = models.unet, models.vae, models.controlnet
    factor = vae.downscale

    def latents_of(pixels, eps):  # a posterior sample, scaled
        dist = vae.apply({"params": frozen["vae"]}, pixels.astype(vae.runtime.dtype), method=vae.encode_nhwc)
        sample = dist.mean.astype(jnp.float32) + dist.std.astype(jnp.float32) * eps  # NHWC
        return sample * vae.scaling_factor

    pixels = pixel_values(batch["image"])
    latents = latents_of(pixels, draws.latents)
    t = draws.timesteps
    abar = frozen["alphas_cumprod"][t][:, None, None, None]
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    noisy = alpha * latents + sigma * draws.noise

    context = encode_text(models.text_encoder, frozen["text_encoder"], batch["input_ids"], None)
    control = batch["conditioning_image"].astype(jnp.float32) / 255.0
    down, mid = net.apply({"params": params}, noisy, t, context, control, method=net.nhwc)
    unet_in = noisy
    if unet.in_channels == 9:
        mask = batch["mask"][..., None].astype(jnp.float32)
        masked = latents_of(pixels * (mask < 0.5), draws.masked_latents)
        unet_in = jnp.concatenate([noisy, mask[:, ::factor, ::factor], masked], axis=-1)
    pred = unet.apply({"params": frozen["unet"]}, unet_in, t, context, down, mid, method=unet.nhwc)
    target = draws.noise if models.prediction_type == "epsilon" else alpha * draws.noise - sigma * latents
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    if models.snr_gamma is None:
        return jnp.mean(per_example)
    snr = jnp.square(alpha / sigma)[:, 0, 0, 0]
    weight = jnp.minimum(snr, models.snr_gamma) / (snr if models.prediction_type == "epsilon" else snr + 1.0)
    weight = jnp.where(snr == 0.0, 1.0, weight)  # a zero-terminal-SNR step would divide by zero
    return jnp.mean(per_example * weight)


def train_step(models: Models, optimizer: optax.GradientTransformation, seed: int, state: TrainState,
               frozen: Dict[str, Any], batch: Batch) -> Tuple[TrainState, jax.Array]:
    """One micro-batch: draws, loss and ControlNet gradients, then the optimiser (with
    `optax.MultiSteps` it applies the mean gradient every k micro-batches). Returns (state, loss)."""
    size = batch["image"].shape[1] // models.vae.downscale
    draws = draw(seed, batch["position"], (size, size, models.vae.latent_channels),
                 frozen["alphas_cumprod"].shape[0])
    loss, grads = jax.value_and_grad(functools.partial(controlnet_loss, models))(state.params, frozen, batch, draws)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss


# ----------------------------------------------------------------------------- optimisation


def lr_schedule(name: str, learning_rate: float, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                power: float = 1.0) -> optax.Schedule:
    """diffusers' `get_scheduler(name)` as an optax schedule of the optimiser step: linear warm-up
    from 0 (except "constant"), then constant, linear or cosine decay to 0, cosine with
    `num_cycles` hard restarts, or polynomial decay of `power` to 1e-7."""
    if name not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler {name!r}; choose from {', '.join(LR_SCHEDULERS)}.")
    lr_end = 1e-7
    if name == "polynomial" and not learning_rate > lr_end:
        raise ValueError(f"--learning_rate {learning_rate} must exceed the polynomial schedule's end value {lr_end}.")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "constant":
            return jnp.full_like(step, learning_rate)
        if name == "constant_with_warmup":
            after = jnp.ones_like(step)
        elif name == "linear":
            after = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        elif name == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        elif name == "cosine_with_restarts":
            after = jnp.where(progress >= 1.0, 0.0,
                              jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * ((num_cycles * progress) % 1.0)))))
        else:  # polynomial
            decayed = (learning_rate - lr_end) * jnp.maximum(1.0 - progress, 0.0) ** power + lr_end
            after = jnp.where(step > total_steps, lr_end, decayed) / learning_rate
        return learning_rate * jnp.where(step < warmup_steps, step / max(1, warmup_steps), after)

    return schedule


def make_optimizer(schedule: optax.Schedule, beta1: float, beta2: float, epsilon: float, weight_decay: float,
                   max_grad_norm: float, accumulation_steps: int) -> optax.GradientTransformation:
    """AdamW after global-norm clipping of the (accumulated) gradient, like torch.optim.AdamW with
    clip_grad_norm_; `accumulation_steps` > 1 wraps it in optax.MultiSteps."""
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.adamw(schedule, beta1, beta2, epsilon, weight_decay=weight_decay))
    return optax.MultiSteps(tx, accumulation_steps) if accumulation_steps > 1 else tx


# ----------------------------------------------------------------------------- models


def controlnet_from_unet(unet, unet_params: Params, embedding_channels: Sequence[int], rng: jax.Array):
    """A ControlNet whose encoder starts as the UNet's (diffusers' `ControlNetModel.from_unet`).

    For a 9-channel inpainting UNet the net sees only the latents, so conv_in keeps the kernel's
    slice for the 4 latent channels and drops the mask and masked-latent inputs.
    """
    if unet.in_channels == 9:
        latent = unet.in_channels - 5
        unet_params = dict(unet_params)
        unet_params["conv_in"] = dict(unet_params["conv_in"], kernel=unet_params["conv_in"]["kernel"][:, :, :latent])
        unet = unet.clone(in_channels=latent)
    return FlaxControlNetModel.from_unet(unet, unet_params, conditioning_embedding_out_channels=tuple(embedding_channels),
                                         rng=rng)


def _with_runtime(model, **changes):
    return model.clone(runtime=dataclasses.replace(model.runtime, **changes))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """Complete `checkpoint-N` folders of `output_dir`, oldest first (a torn one never has this name)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def save_checkpoint(output_dir: Path, step: int, state: TrainState, info: Dict[str, Any],
                    controlnet: FlaxControlNetModel, limit: Optional[int]) -> Path:
    """Write `output_dir/checkpoint-<step>` whole or not at all (built under a hidden name, then
    renamed); first remove the oldest checkpoints so that at most `limit` remain."""
    if limit is not None:
        existing = list_checkpoints(output_dir)
        for _, old in existing[: max(0, len(existing) - limit + 1)]:
            shutil.rmtree(old)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_bytes_atomic(partial / STATE_FILE, flax.serialization.to_bytes(state))
    write_bytes_atomic(partial / INFO_FILE, json.dumps(info, indent=2).encode())
    controlnet.save_pretrained(partial / "controlnet", state.params, pytorch_format=True)
    if final.exists():  # a rerun into the same output_dir: replace it
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def resolve_resume(value: Optional[str], output_dir: Path) -> Optional[Path]:
    """The checkpoint folder `--resume_from_checkpoint` names: "latest" (None if there is none yet,
    as in diffusers), a path, or a checkpoint-N name inside output_dir."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    for folder in (Path(value), output_dir / Path(value).name):
        if (folder / STATE_FILE).is_file():
            return folder
    raise ValueError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder (no {STATE_FILE} there or in "
                     f"{output_dir}); pass 'latest' or a checkpoint-N folder.")


def load_checkpoint(folder: Path, template: TrainState) -> TrainState:
    """The training state in `folder`, restored into the structure of `template`."""
    try:
        return flax.serialization.from_bytes(template, (folder / STATE_FILE).read_bytes())
    except Exception as e:
        raise CheckpointError(
            f"{folder} does not hold a training state of this ControlNet and optimiser ({type(e).__name__}: {e}); "
            "resume with the model, --gradient_accumulation_steps and optimiser of the run that wrote it."
        ) from e


# ----------------------------------------------------------------------------- multi-host helpers


def host_copy(tree):
    """numpy copies of replicated (possibly multi-process) arrays, from this process's replica."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def replicate(tree, mesh: Mesh):
    """Host arrays (the same on every process) as arrays replicated over the whole mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh):
    """This process's rows of a global batch -> arrays sharded along the mesh's data axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the run


class Run(NamedTuple):
    output_dir: Path
    global_step: int  # optimiser steps done
    resumed_from: Optional[Path]
    seconds: float


def _seed(args, info: Dict[str, Any], resume: Optional[Path]) -> int:
    """The run's seed: the checkpoint's when resuming, else --seed, else one drawn on process 0 and
    shared, so that every process draws alike."""
    if resume is not None:
        if args.seed is not None and args.seed != info["seed"]:
            raise ValueError(f"{resume} was trained with --seed {info['seed']}; resume with that seed (or none).")
        return info["seed"]
    if args.seed is not None:
        return args.seed
    from jax.experimental import multihost_utils

    drawn = np.int64(np.random.SeedSequence().entropy % 2**31)
    return int(multihost_utils.broadcast_one_to_all(drawn))


def _rows(args, seed: int, global_batch: int, devices: int):
    """The training rows (a seeded subset with --max_train_samples), their columns checked."""
    rows = data_source.open_rows(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    columns = data_source.Columns(args.image_column, args.conditioning_image_column, args.caption_column)
    columns.check(rows)
    if args.max_train_samples is not None and args.max_train_samples < len(rows):
        rows = data_source.Subset(rows, np.random.default_rng(seed).permutation(len(rows))[: args.max_train_samples])
    data_source.check_sizes(len(rows), global_batch, rows.source,
                            [f"--train_batch_size {args.train_batch_size}", f"{devices} devices"])
    return rows, columns


def _models(args, seed: int, compute):
    """(base components, their fp32 params, Models, the ControlNet's fp32 params)."""
    from flax_inpaint.pipelines.loading import load_components

    comps, params, _ = load_components(
        args.pretrained_model_name_or_path, dtype=compute, param_dtype=jnp.float32, variant=args.variant,
        revision=args.revision, skip=("safety_checker", "feature_extractor", "image_encoder", "controlnet"))
    unet, vae, scheduler = comps["unet"], comps["vae"], comps["scheduler"]
    factor = vae.downscale
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VAE's downsampling factor {factor}.")
    if scheduler.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the base model's scheduler predicts {scheduler.prediction_type!r}; training supports "
                         "'epsilon' and 'v_prediction'.")
    if args.controlnet_model_name_or_path:
        controlnet, net_params = FlaxControlNetModel.from_pretrained(
            args.controlnet_model_name_or_path, dtype=compute, param_dtype=jnp.float32)
        if controlnet.in_channels != vae.latent_channels or controlnet.cond_downscale != factor:
            raise ValueError(
                f"--controlnet_model_name_or_path takes {controlnet.in_channels} latent channels and control images "
                f"{controlnet.cond_downscale}x the latent size; this base model's VAE has {vae.latent_channels} "
                f"channels and factor {factor}. Use a ControlNet made for this base model, or none.")
    else:
        levels = int(math.log2(factor)) + 1
        channels = tuple(args.conditioning_embedding_out_channels or EMBEDDING_CHANNELS[:levels])
        if len(channels) != levels:
            raise ValueError(f"--conditioning_embedding_out_channels {list(channels)} has {len(channels)} entries; the "
                             f"VAE downsamples {factor}x, which takes {levels}.")
        controlnet, net_params = controlnet_from_unet(unet, params["unet"], channels, jax.random.key(seed))
    remat = dict(remat=bool(args.gradient_checkpointing))
    models = Models(_with_runtime(unet, **remat), vae, comps["text_encoder"], _with_runtime(controlnet, **remat),
                    scheduler.prediction_type, args.snr_gamma)
    return comps, params, models, jax.device_get(net_params)


def train(args: argparse.Namespace) -> Run:
    """Run the training that `args` (from `build_parser`) describes."""
    from tqdm.auto import tqdm

    from flax_inpaint.schedulers.common import make_alphas_cumprod
    from flax_inpaint.train import reporting

    began = time.perf_counter()
    output_dir = Path(args.output_dir)
    is_main = jax.process_index() == 0
    compute = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    pairs = reporting.validation_pairs(args.validation_prompt, args.validation_image)
    reporting.Trackers.check(args.report_to)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    info = json.loads((resume / INFO_FILE).read_text()) if resume is not None else {}
    seed = _seed(args, info, resume)
    mesh = data_mesh()
    k, devices = args.gradient_accumulation_steps, mesh.devices.size
    global_batch = args.train_batch_size * devices
    rows, columns = _rows(args, seed, global_batch, devices)

    comps, params, models, net_params = _models(args, seed, compute)
    frozen = {name: _cast(params[name], compute) for name in ("unet", "vae", "text_encoder")}
    frozen["alphas_cumprod"] = make_alphas_cumprod(comps["scheduler"])  # as diffusers' DDPMScheduler of that config

    # Data: this process's rows of every global micro-batch, `depth` micro-batches ahead.
    stream = data_source.Stream(len(rows), global_batch, seed)
    max_steps = args.max_train_steps or args.num_train_epochs * math.ceil(stream.batches_per_epoch / k)
    inpaint = models.unet.in_channels == 9
    examples = data_source.Examples(rows, columns, args.resolution, seed, args.proportion_empty_prompts,
                                    args.whole_image_mask_proportion if inpaint else None)
    tokenizer = comps["tokenizer"]

    def tokenize(captions):
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="np").input_ids.astype(np.int32)

    batches = data_source.make_batches(
        examples, stream, tokenize, data_source.shard_of_process(global_batch, jax.process_index(),
                                                                 jax.process_count()),
        args.dataloader_num_workers)

    # Optimiser and state (fp32), replicated over the mesh.
    lr = args.learning_rate * (k * args.train_batch_size * devices if args.scale_lr else 1)
    schedule = lr_schedule(args.lr_scheduler, lr, args.lr_warmup_steps, max_steps, args.lr_num_cycles, args.lr_power)
    optimizer = make_optimizer(schedule, args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.adam_weight_decay,
                               args.max_grad_norm, k)
    state = TrainState(np.zeros((), np.int32), net_params, jax.device_get(optimizer.init(net_params)))
    info_now = {"seed": seed, "train_batch_size": args.train_batch_size, "devices": devices,
                "gradient_accumulation_steps": k}
    if resume is not None:
        state = load_checkpoint(resume, state)
        changed = {key: (info.get(key), v) for key, v in info_now.items() if info.get(key) != v}
        if changed and is_main:
            print(f"warning: resuming {resume} with changed {changed} (checkpoint, now): the data order differs "
                  "from the interrupted run's.", file=sys.stderr)
    micro_start = int(state.step)
    start_step = micro_start // k
    replicated = NamedSharding(mesh, P())
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)
    step_fn = jax.jit(functools.partial(train_step, models, optimizer, seed), out_shardings=(replicated, replicated),
                      donate_argnums=0)

    trackers = reporting.Trackers(args.report_to, output_dir / args.logging_dir, args.tracker_project_name,
                                  {key: v for key, v in vars(args).items() if not isinstance(v, list)}, is_main)
    validation = None
    if pairs and is_main:
        base = {name: host_copy(frozen[name]) for name in ("unet", "vae", "text_encoder")}
        base["scheduler"] = params["scheduler"]
        validation = reporting.Validation(comps, base, models.controlnet, pairs, args.resolution,
                                          args.num_validation_images, seed)
    if is_main:
        print(f"training a ControlNet: {len(rows)} rows, {max_steps} steps of {global_batch * k} examples "
              f"({args.train_batch_size} per device x {devices} devices x {k} accumulated), "
              f"{jax.process_count()} process(es)" + (f", resuming {resume}" if resume else ""), file=sys.stderr)

    prefetch = data_source.Prefetcher(batches, lambda b: shard_batch(b, mesh), micro_start, max_steps * k)
    bar = tqdm(total=max_steps, initial=start_step, desc="Steps", disable=not is_main, dynamic_ncols=True)
    last_time = time.perf_counter()
    recent: collections.deque = collections.deque(maxlen=10)  # seconds of the last steps: a steady reading

    def report(step: int, losses: List[jax.Array]) -> None:
        nonlocal last_time
        loss = float(np.mean([float(x.addressable_data(0)) for x in losses]))  # waits for that step
        now = time.perf_counter()
        recent.append(now - last_time)
        last_time = now
        seconds = float(np.mean(recent))
        metrics = {"loss": loss, "lr": float(schedule(step - 1))}
        trackers.log(metrics, step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", step_s=f"{seconds:.3f}",
                        img_s=f"{global_batch * k / seconds:.1f}")
        bar.update(1)

    global_step = start_step
    pending: Optional[Tuple[int, List[jax.Array]]] = None
    losses: List[jax.Array] = []
    try:
        for micro, batch in enumerate(prefetch, micro_start):
            state, loss = step_fn(state, frozen, batch)
            losses.append(loss)
            if (micro + 1) % k:
                continue
            global_step += 1
            if pending is not None:  # the previous step's numbers: fetching them does not stall the device
                report(*pending)
            pending, losses = (global_step, losses), []
            save = global_step % args.checkpointing_steps == 0
            validate = validation is not None and global_step % args.validation_steps == 0
            if save or validate:  # report first: the step time excludes writing and validating
                report(*pending)
                pending = None
                host_state = host_copy(state) if is_main else None
                if save and is_main:
                    save_checkpoint(output_dir, global_step, host_state, dict(info_now, global_step=global_step),
                                    models.controlnet, args.checkpoints_total_limit)
                if validate:
                    groups = validation.run(host_state.params)
                    reporting.save_validation(groups, output_dir / "validation" / f"step-{global_step}")
                    trackers.images(groups, global_step)
                last_time = time.perf_counter()
        if pending is not None:
            report(*pending)
    finally:
        prefetch.close()
        bar.close()
        trackers.close()
    if is_main:
        models.controlnet.save_pretrained(output_dir, host_copy(state.params), pytorch_format=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("train-controlnet done")
    return Run(output_dir, global_step, resume, time.perf_counter() - began)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flax-inpaint train-controlnet", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a ControlNet on a Stable Diffusion base model (frozen) and a dataset of (image, "
                    "conditioning image, caption) rows, data-parallel over every device and process. Options are "
                    "those of diffusers' train_controlnet.py. The trained ControlNet is written to --output_dir as a "
                    "diffusers folder.")
    model = p.add_argument_group("models")
    model.add_argument("--pretrained_model_name_or_path", help="base model: a diffusers folder or hub repo id")
    model.add_argument("--controlnet_model_name_or_path", default=None,
                       help="ControlNet to start from; default: initialised from the UNet's encoder")
    model.add_argument("--revision", default=None, help="hub revision of the base model")
    model.add_argument("--variant", default=None, help="weight file variant of the base model, e.g. fp16")
    model.add_argument("--conditioning_embedding_out_channels", type=positive(int), nargs="+", default=None,
                       help="widths of a new ControlNet's control image embedding (one more than the VAE's "
                            "halvings); default: diffusers' 16 32 96 256, cut to the VAE")
    model.add_argument("--output_dir", default="controlnet-model", help="trained ControlNet, checkpoints, logs")
    model.add_argument("--cache_dir", default=None, help="where `datasets` caches downloaded datasets")
    model.add_argument("--seed", type=int, default=None, help="seed of the data order and noise (default: random, "
                                                              "kept in the checkpoints)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help="a `datasets` dataset: a hub name or a folder written by save_to_disk")
    data.add_argument("--dataset_config_name", default=None, help="its config, if it has several")
    data.add_argument("--train_data_dir", default=None,
                      help="an image folder with metadata.jsonl, a JSONL file, or a folder written by save_to_disk")
    data.add_argument("--image_column", default="image", help="column of the target image")
    data.add_argument("--conditioning_image_column", default="conditioning_image",
                      help="column of the ControlNet conditioning image")
    data.add_argument("--caption_column", default="text", help="column of a caption or a list of captions")
    data.add_argument("--max_train_samples", type=positive(int), default=None,
                      help="train on this many rows (a seeded random subset)")
    data.add_argument("--resolution", type=positive(int), default=None,
                      help="images are resized (shorter side) and centre-cropped to this size (default 512; 64 "
                           "for --make-example-dataset)")
    data.add_argument("--proportion_empty_prompts", type=unit, default=0.0,
                      help="share of captions replaced by the empty prompt")
    data.add_argument("--whole_image_mask_proportion", type=unit, default=0.75,
                      help="9-channel inpainting base models: share of whole-image masks; the others mask a random "
                           "box")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="threads decoding images (0: one)")
    data.add_argument("--make-example-dataset", dest="make_example_dataset", metavar="DIR", default=None,
                      help="write a fill50k-like folder of circles, their outlines and captions to DIR, then exit")
    data.add_argument("--num_examples", type=positive(int), default=2048, help="rows of --make-example-dataset")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=positive(int), default=4, help="batch size per device")
    opt.add_argument("--num_train_epochs", type=positive(int), default=1)
    opt.add_argument("--max_train_steps", type=positive(int), default=None,
                     help="optimiser steps; overrides --num_train_epochs")
    opt.add_argument("--gradient_accumulation_steps", type=positive(int), default=1,
                     help="micro-batches per optimiser step (optax.MultiSteps)")
    opt.add_argument("--gradient_checkpointing", action="store_true",
                     help="recompute the UNet's and ControlNet's block activations in the backward pass (less memory)")
    opt.add_argument("--learning_rate", type=float, default=5e-6)
    opt.add_argument("--scale_lr", action="store_true",
                     help="multiply the learning rate by accumulation steps x batch size x devices")
    opt.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    opt.add_argument("--lr_warmup_steps", type=int, default=500)
    opt.add_argument("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    opt.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=1e-2)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--mixed_precision", default="no", choices=("no", "bf16"),
                     help="bf16: bfloat16 compute and frozen weights, float32 ControlNet weights and optimiser")
    opt.add_argument("--snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma (5.0 is typical)")

    log = p.add_argument_group("checkpoints, validation and logs")
    log.add_argument("--checkpointing_steps", type=positive(int), default=500,
                     help="save output_dir/checkpoint-N every this many steps")
    log.add_argument("--checkpoints_total_limit", type=positive(int), default=None,
                     help="keep at most this many checkpoints")
    log.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    log.add_argument("--validation_prompt", nargs="+", default=None, help="prompts of the validation images")
    log.add_argument("--validation_image", nargs="+", default=None, help="their conditioning images")
    log.add_argument("--num_validation_images", type=positive(int), default=4, help="images per pair")
    log.add_argument("--validation_steps", type=positive(int), default=100, help="validate every this many steps")
    log.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "wandb", "all", "none"))
    log.add_argument("--logging_dir", default="logs", help="TensorBoard folder inside output_dir")
    log.add_argument("--tracker_project_name", default="train_controlnet", help="wandb project")

    multi = p.add_argument_group(
        "multi-host", "Run the same command in every process; each reads its part of every batch and process 0 "
                      "writes (--output_dir must be shared to resume). On TPU pods and SLURM --distributed alone "
                      "finds the cluster.")
    multi.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    multi.add_argument("--coordinator_address", default=None, help="host:port of process 0 (implies --distributed)")
    multi.add_argument("--num_processes", type=positive(int), default=None)
    multi.add_argument("--process_id", type=int, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.make_example_dataset is not None:
            folder = data_source.make_example_dataset(Path(args.make_example_dataset), args.num_examples,
                                                      args.resolution or 64, args.seed or 0)
            print(f"wrote {args.num_examples} examples to {folder} (metadata.jsonl, images/, conditioning_images/)")
            return
        if args.pretrained_model_name_or_path is None:
            parser.error("--pretrained_model_name_or_path is required (or --make-example-dataset DIR)")
        args.resolution = args.resolution or 512
        cluster = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}
        if args.distributed or any(v is not None for v in cluster.values()):
            jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})
        run = train(args)
    except (ValueError, OSError) as e:  # CheckpointError and DataError are ValueErrors
        print(f"flax-inpaint train-controlnet: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if jax.process_index() == 0:
        print(f"wrote the ControlNet to {run.output_dir} after {run.global_step} steps in {run.seconds:.1f} s")


if __name__ == "__main__":
    from flax_inpaint.cli import run_command

    run_command("train-controlnet", main)
