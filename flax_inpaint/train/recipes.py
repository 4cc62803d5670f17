"""Training recipes for the tiny shapes models: a KL autoencoder, then a CLIP text encoder trained
jointly with a 9-channel inpainting UNet on the denoising loss (the VAE frozen), then a ControlNet
on fill-the-circle (everything else frozen), and a plain 4-channel text-to-image UNet on the same
scenes (fine-tuned from the inpainting UNet; VAE and text encoder frozen and shared).

Everything is sized to train on a small CPU (2 cores) in well under an hour: 64x64 images, a VAE with scale factor 4
(16x16x4 latents), a two-level UNet and a two-layer text encoder with a word-level vocabulary. The
stages write diffusers-format folders into `out_dir`, so each stage can run on its own and the
result loads through the same `from_pretrained` as any real checkpoint:

    out_dir/checkpoints/<stage>.ckpt.msgpack   resumable training state
    out_dir/vae/                               FlaxAutoencoderKL (scaling_factor measured)
    out_dir/tokenizer/                         CLIP BPE tokenizer files
    out_dir/tiny-shapes-inpaint/               the inpainting pipeline (DDIM, v-prediction)
    out_dir/tiny-shapes-controlnet/            the ControlNet (diffusers ControlNetModel folder)
    out_dir/tiny-shapes-txt2img/               the text-to-image pipeline (4-channel UNet, DDIM)
    out_dir/sample_image.png, sample_mask.png  the demo's inputs
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.models.clip import FlaxCLIPTextModel
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.models.unet import FlaxUNet2DConditionModel
from flax_inpaint.models.vae import FlaxAutoencoderKL
from flax_inpaint.pipelines.sampling import encode_text
from flax_inpaint.schedulers import FlaxDDIMScheduler
from flax_inpaint.schedulers.common import make_alphas_cumprod
from flax_inpaint.train import data
from flax_inpaint.train.controlnet import controlnet_from_unet
from flax_inpaint.train.loop import Batch, FitResult, TrainConfig, checkpoint_path, fit

IMAGE_SIZE = 64
LATENT_SIZE = IMAGE_SIZE // 4  # the VAE's three levels downsample twice
MAX_LENGTH = 16
CFG_DROPOUT = 0.1  # fraction of captions replaced by "" so the UNet also learns the unconditional score
MASK_LOSS_WEIGHT = 4.0  # extra loss weight of latents under the mask: the hole is what inpainting must learn
KL_WEIGHT = 1e-3  # per latent element, against a per-pixel L1 + L2 reconstruction loss
# Stable Diffusion's training noise schedule; the exported DDIM scheduler uses the same betas.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=9, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", pad_token_id=1,
)

VAE_TRAINING = TrainConfig(steps=800, batch_size=16, learning_rate=2e-3, warmup_steps=50)
INPAINT_TRAINING = TrainConfig(steps=8000, batch_size=32, learning_rate=1e-3, warmup_steps=200)
INPAINT_SCENES = 8192  # scenes encoded once by the frozen VAE, then sampled in epochs
CONTROLNET_TRAINING = TrainConfig(steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=100)
CONTROLNET_SCENES = 2048
CONTROLNET_FULL_MASKS = 0.75  # share of whole-image masks (text-to-image, placed by the outline alone)
CONTROLNET_EMBEDDING = (8, 16, 32)  # conditioning embedding widths: 2 stride-2 convs = the VAE's factor 4
TXT2IMG_TRAINING = TrainConfig(steps=1500, batch_size=32, learning_rate=5e-4, warmup_steps=100)
TXT2IMG_SCENES = 8192


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def _init_unless_resuming(init: Callable[[], Any], out_dir: Path, name: str):
    """`init()`, or zeros of its shapes when stage `name` resumes from its checkpoint in `out_dir`, which
    `fit` restores over them: a resumed stage does not compile the random initialisation it would discard."""
    if checkpoint_path(out_dir, name).is_file():
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(init))
    return init()


# ----------------------------------------------------------------------------- VAE


def vae_batches(seed: int, batch_size: int) -> Callable[[int], Batch]:
    def batch(step: int) -> Batch:
        scenes = data.sample_scenes(_rng(seed, step, 0), batch_size, IMAGE_SIZE)
        return {"image": np.transpose(scenes.images * 2 - 1, (0, 3, 1, 2))}

    return batch


def vae_loss(vae: FlaxAutoencoderKL, params, frozen, batch: Batch, key: jax.Array):
    """Per-pixel L1 + L2 reconstruction through a posterior sample, plus a small KL to N(0, I)."""
    del frozen
    posterior = vae.apply({"params": params}, batch["image"], method=vae.encode).latent_dist
    recon = vae.apply({"params": params}, posterior.sample(key), method=vae.decode).sample
    err = recon - batch["image"]
    rec = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
    kl = jnp.mean(posterior.kl()) / np.prod(posterior.mean.shape[1:])
    return rec + KL_WEIGHT * kl, {"rec": rec, "kl": kl}


# Jitted at module level with the model static (linen modules compare by config): a resumed or later stage
# reuses the program an earlier one compiled for the same VAE and shapes.
@functools.partial(jax.jit, static_argnums=0)
def _posterior_sample(vae: FlaxAutoencoderKL, params, images: jax.Array, key: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, images, method=vae.encode).latent_dist.sample(key)


@functools.partial(jax.jit, static_argnums=0)
def _posterior_moments(vae: FlaxAutoencoderKL, params, images: jax.Array, masks: jax.Array):
    """(mean, std) of the posteriors of `images` and of `images * (masks < 0.5)`, NHWC."""
    def posterior(x):
        dist = vae.apply({"params": params}, x, method=vae.encode).latent_dist
        return dist.mean, dist.std

    return (*posterior(images), *posterior(images * (masks < 0.5)))


def latent_scaling_factor(vae: FlaxAutoencoderKL, params, seed: int, batches: int = 4) -> float:
    """1 / std of the posterior samples over a few batches, so scaled latents have unit variance
    (how Stable Diffusion's 0.18215 was chosen)."""
    make = vae_batches(seed + 1, 64)
    samples = [np.asarray(_posterior_sample(vae, params, make(i)["image"], jax.random.key(i))) for i in range(batches)]
    return float(1.0 / np.std(np.concatenate(samples)))


def train_vae(out_dir: Path, config: TrainConfig = VAE_TRAINING, model_config: Dict[str, Any] = VAE_CONFIG,
              progress: bool = True):
    """Train the VAE, measure its scaling factor and save it to `out_dir/vae`; returns
    (vae, params, FitResult)."""
    out_dir = Path(out_dir)
    vae = FlaxAutoencoderKL.from_config(model_config)
    params = _init_unless_resuming(lambda: vae.init_weights(jax.random.key(config.seed)), out_dir / "checkpoints",
                                   "vae")
    result = fit("vae", functools.partial(vae_loss, vae), params, vae_batches(config.seed, config.batch_size),
                 config, out_dir / "checkpoints", progress=progress)
    vae = vae.clone(scaling_factor=latent_scaling_factor(vae, result.params, config.seed))
    vae.save_pretrained(out_dir / "vae", result.params, pytorch_format=True)
    return vae, result.params, result


# ----------------------------------------------------------------------------- text encoder + UNet


@dataclasses.dataclass(frozen=True)
class Models:
    """The model definitions the losses apply (hashable linen modules, static under jit)."""

    unet: FlaxUNet2DConditionModel
    text_encoder: FlaxCLIPTextModel
    vae: FlaxAutoencoderKL
    controlnet: Optional[FlaxControlNetModel] = None


def _scenes_and_masks(rng: np.random.Generator, n: int, task: str):
    """Inpainting: any scene, `data.inpaint_masks`. Text-to-image: any scene, the mask is the
    captioned shape's silhouette grown by a pixel (it only weighs the loss). ControlNet (fill the
    circle): one circle, no distractor, mostly whole-image masks (the outline alone must place the
    circle)."""
    if task == "inpaint":
        scenes = data.sample_scenes(rng, n, IMAGE_SIZE)
        return scenes, data.inpaint_masks(rng, scenes)
    if task == "txt2img":
        scenes = data.sample_scenes(rng, n, IMAGE_SIZE)
        return scenes, (scenes.distance() < 1.0).astype(np.float32)
    scenes = data.sample_scenes(rng, n, IMAGE_SIZE, shapes=(data.SHAPES.index("circle"),), distractor=0.0)
    full = rng.random(n) < CONTROLNET_FULL_MASKS
    return scenes, np.where(full[:, None, None], np.float32(1.0), data.inpaint_masks(rng, scenes))


def encode_scenes(vae: FlaxAutoencoderKL, vae_params, seed: int, n: int, task: str = "inpaint",
                  chunk: int = 64) -> Batch:
    """`n` scenes with their masks, VAE-encoded once (the frozen VAE's encoder costs as much as a
    tiny UNet step, so it runs once per scene, not once per step).

    Stores what the pipeline conditions on: posterior mean and std of the image and of the masked
    image (`image * (mask < 0.5)`), NHWC, the mask at latent resolution (strided like
    `sampling.generate`), the caption and, for task="controlnet", the circle's outline (uint8 HW).
    The losses sample both posteriors afresh each step.
    """
    factor = vae.downscale
    parts: Dict[str, list] = {}
    for start in range(0, n, chunk):
        scenes, masks = _scenes_and_masks(_rng(seed, start, 1), chunk, task)
        images = np.transpose(scenes.images * 2 - 1, (0, 3, 1, 2))
        stats = _posterior_moments(vae, vae_params, images, masks[:, None])
        arrays = dict(zip(("mean", "std", "masked_mean", "masked_std"), map(np.asarray, stats)))
        arrays.update(mask=masks[:, ::factor, ::factor, None], caption=np.asarray(scenes.captions))
        if task == "controlnet":
            arrays["control"] = np.round(data.circle_outlines(scenes)[..., 0] * 255).astype(np.uint8)
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v)[:n] for k, v in parts.items()}


def scene_batches(dataset: Batch, seed: int, batch_size: int, tokenizer) -> Callable[[int], Batch]:
    """Epochs over `dataset` in a fresh order each; a CFG_DROPOUT share of captions become ""."""
    n = len(dataset["caption"])
    ids = data.tokenize(tokenizer, list(dataset["caption"]))
    empty = data.tokenize(tokenizer, [""])

    def batch(step: int) -> Batch:
        epoch, pos = divmod(step * batch_size, n)
        order = _rng(seed, epoch, 2).permutation(n)
        take = np.take(order, np.arange(pos, pos + batch_size), mode="wrap")
        drop = _rng(seed, step, 3).random(batch_size) < CFG_DROPOUT
        arrays = {k: v[take] for k, v in dataset.items() if k != "caption"}
        return {**arrays, "ids": np.where(drop[:, None], empty, ids[take])}

    return batch


def noised_and_target(alphas_cumprod: jax.Array, latents: jax.Array, noise: jax.Array, t: jax.Array):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the v-prediction target
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022).

    v rather than eps: at high noise an eps-model's tiny errors become large x0 errors (x0 is
    recovered by dividing by sqrt(abar_t) ~ 0.07), so a small UNet trained on eps never learns to
    copy the unmasked latents through; v weighs x0 and eps evenly across timesteps.
    """
    abar = alphas_cumprod[t][:, None, None, None]
    signal, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    return signal * latents + sigma * noise, signal * noise - sigma * latents


def _denoising_example(models: Models, alphas_cumprod, batch: Batch, key: jax.Array):
    """(x_t, v target, t, the inpainting UNet's extra channels [mask, masked latents]), NHWC, with
    both latents drawn from the stored VAE posteriors and scaled by the VAE's scaling_factor."""
    key_image, key_masked, key_noise, key_t = jax.random.split(key, 4)
    scale = models.vae.scaling_factor

    def sample(k, mean, std):
        return (mean + std * jax.random.normal(k, mean.shape)) * scale

    latents = sample(key_image, batch["mean"], batch["std"])
    masked_latents = sample(key_masked, batch["masked_mean"], batch["masked_std"])
    t = jax.random.randint(key_t, latents.shape[:1], 0, SCHEDULE["num_train_timesteps"])
    noisy, target = noised_and_target(alphas_cumprod, latents, jax.random.normal(key_noise, latents.shape), t)
    return noisy, target, t, jnp.concatenate([batch["mask"], masked_latents], axis=-1)


def masked_weighted_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE with latents under the mask weighted 1 + MASK_LOSS_WEIGHT (normalised by the mean weight).

    A shape's hole covers a few percent of the latent; unweighted, most of the gradient teaches
    copying the visible latents through, and a small UNet paints shapes smaller than the hole."""
    weight = 1.0 + MASK_LOSS_WEIGHT * mask
    return jnp.mean(weight * jnp.square(pred - target)) / jnp.mean(weight)


def inpaint_loss(models: Models, params, frozen, batch: Batch, key: jax.Array):
    """Mask-weighted v-prediction MSE at uniform timesteps; gradients reach the UNet and the text
    encoder. The UNet sees [noisy latents, mask, masked-image latents] as in `sampling.generate`."""
    noisy, target, t, extra = _denoising_example(models, frozen["alphas_cumprod"], batch, key)
    context = encode_text(models.text_encoder, params["text_encoder"], batch["ids"], None)
    unet = models.unet
    pred = unet.apply({"params": params["unet"]}, jnp.concatenate([noisy, extra], -1), t, context, method=unet.nhwc)
    return masked_weighted_mse(pred, target, batch["mask"]), {}


def controlnet_loss(models: Models, params, frozen, batch: Batch, key: jax.Array):
    """The inpainting loss with the UNet and text encoder frozen and a ControlNet's residuals added:
    the net sees the noisy latents and the outline (RGB in [0, 1]), as in `sampling.generate`."""
    noisy, target, t, extra = _denoising_example(models, frozen["alphas_cumprod"], batch, key)
    context = encode_text(models.text_encoder, frozen["text_encoder"], batch["ids"], None)
    control = jnp.repeat(batch["control"][..., None], 3, axis=-1).astype(jnp.float32) / 255.0
    net, unet = models.controlnet, models.unet
    down, mid = net.apply({"params": params}, noisy, t, context, control, method=net.nhwc)
    pred = unet.apply({"params": frozen["unet"]}, jnp.concatenate([noisy, extra], -1), t, context, down, mid,
                      method=unet.nhwc)
    return masked_weighted_mse(pred, target, batch["mask"]), {}


def txt2img_loss(models: Models, params, frozen, batch: Batch, key: jax.Array):
    """v-prediction MSE of the 4-channel UNet on the noisy latents alone, the captioned shape's
    latents weighted like the inpainting hole (the shape is what the caption is about; unweighted,
    a small UNet learns the background first and the shape's colour last)."""
    noisy, target, t, _ = _denoising_example(models, frozen["alphas_cumprod"], batch, key)
    context = encode_text(models.text_encoder, frozen["text_encoder"], batch["ids"], None)
    pred = models.unet.apply({"params": params}, noisy, t, context, method=models.unet.nhwc)
    return masked_weighted_mse(pred, target, batch["mask"]), {}


def ddim_scheduler() -> FlaxDDIMScheduler:
    return FlaxDDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction")


def load_tokenizer(out_dir: Path):
    """The word-level CLIP tokenizer of this run (built once into out_dir/tokenizer)."""
    folder = Path(out_dir) / "tokenizer"
    if (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH)
    return data.build_tokenizer(folder, MAX_LENGTH)


def train_inpaint(out_dir: Path, config: TrainConfig = INPAINT_TRAINING, scenes: int = INPAINT_SCENES,
                  unet_config: Dict[str, Any] = UNET_CONFIG, text_config: Dict[str, Any] = TEXT_CONFIG,
                  progress: bool = True):
    """Train text encoder + UNet on `out_dir/vae` (frozen) and save the pipeline to
    `out_dir/tiny-shapes-inpaint`; returns (pipeline, params, FitResult)."""
    from flax_inpaint.pipelines import FlaxStableDiffusionInpaintPipeline

    out_dir = Path(out_dir)
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(out_dir / "vae", use_cache=False)
    tokenizer = load_tokenizer(out_dir)
    text_encoder = FlaxCLIPTextModel.from_config(
        dict(text_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
             eos_token_id=tokenizer.eos_token_id)
    )
    unet = FlaxUNet2DConditionModel.from_config(unet_config)
    key_unet, key_text = jax.random.split(jax.random.key(config.seed))
    params = _init_unless_resuming(
        lambda: {"unet": unet.init_weights(key_unet), "text_encoder": text_encoder.init_weights(key_text)},
        out_dir / "checkpoints", "inpaint")
    frozen = {"alphas_cumprod": make_alphas_cumprod(ddim_scheduler())}
    models = Models(unet, text_encoder, vae)
    dataset = encode_scenes(vae, vae_params, config.seed, scenes)
    result = fit("inpaint", functools.partial(inpaint_loss, models), params,
                 scene_batches(dataset, config.seed, config.batch_size, tokenizer), config,
                 out_dir / "checkpoints", frozen=frozen, progress=progress)
    scheduler = ddim_scheduler()
    pipe = FlaxStableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe_params = {**result.params, "vae": vae_params, "scheduler": scheduler.create_state()}
    pipe.save_pretrained(out_dir / "tiny-shapes-inpaint", pipe_params)
    return pipe, pipe_params, result


def unet_from_inpaint(unet: FlaxUNet2DConditionModel, params, in_channels: int = 4):
    """A copy of the inpainting UNet taking only the first `in_channels` latent channels: every
    weight is kept except conv_in's kernel rows for the mask and masked-image channels. A head start
    for text-to-image (the inpainting UNet already paints whole-image holes from the caption)."""
    conv_in = dict(params["conv_in"], kernel=params["conv_in"]["kernel"][:, :, :in_channels])  # HWIO
    return unet.clone(in_channels=in_channels), {**params, "conv_in": conv_in}


def train_txt2img(out_dir: Path, config: TrainConfig = TXT2IMG_TRAINING, scenes: int = TXT2IMG_SCENES,
                  progress: bool = True):
    """Train a 4-channel text-to-image UNet, initialised from `out_dir/tiny-shapes-inpaint`'s UNet,
    with that folder's VAE and text encoder frozen, and save the pipeline (same VAE, text encoder,
    tokenizer and DDIM scheduler) to `out_dir/tiny-shapes-txt2img`; returns (pipeline, params,
    FitResult)."""
    from flax_inpaint.pipelines import FlaxStableDiffusionInpaintPipeline, FlaxStableDiffusionPipeline

    out_dir = Path(out_dir)
    inpaint, inpaint_params = FlaxStableDiffusionInpaintPipeline.from_pretrained(
        out_dir / "tiny-shapes-inpaint", safety_checker=None)
    unet, params = unet_from_inpaint(inpaint.unet, inpaint_params["unet"])
    models = Models(unet, inpaint.text_encoder, inpaint.vae)
    frozen = {"text_encoder": inpaint_params["text_encoder"], "alphas_cumprod": make_alphas_cumprod(ddim_scheduler())}
    dataset = encode_scenes(inpaint.vae, inpaint_params["vae"], config.seed, scenes, task="txt2img")
    result = fit("txt2img", functools.partial(txt2img_loss, models), params,
                 scene_batches(dataset, config.seed, config.batch_size, inpaint.tokenizer), config,
                 out_dir / "checkpoints", frozen=frozen, progress=progress)
    scheduler = ddim_scheduler()
    pipe = FlaxStableDiffusionPipeline(vae=inpaint.vae, text_encoder=inpaint.text_encoder,
                                       tokenizer=inpaint.tokenizer, unet=unet, scheduler=scheduler)
    pipe_params = {"unet": result.params, "text_encoder": inpaint_params["text_encoder"],
                   "vae": inpaint_params["vae"], "scheduler": scheduler.create_state()}
    pipe.save_pretrained(out_dir / "tiny-shapes-txt2img", pipe_params)
    return pipe, pipe_params, result


# ----------------------------------------------------------------------------- ControlNet


def train_controlnet(out_dir: Path, config: TrainConfig = CONTROLNET_TRAINING, scenes: int = CONTROLNET_SCENES,
                     embedding_channels: Sequence[int] = CONTROLNET_EMBEDDING, progress: bool = True):
    """Train a ControlNet on fill-the-circle (outline -> filled circle in the prompted colour) on top
    of `out_dir/tiny-shapes-inpaint` (frozen) and save it to `out_dir/tiny-shapes-controlnet`;
    returns (controlnet, params, FitResult). `embedding_channels`: the conditioning embedding's widths,
    one more than the VAE's stride-2 downsamplings."""
    from flax_inpaint.pipelines import FlaxStableDiffusionInpaintPipeline

    out_dir = Path(out_dir)
    pipe, pipe_params = FlaxStableDiffusionInpaintPipeline.from_pretrained(
        out_dir / "tiny-shapes-inpaint", safety_checker=None)
    controlnet, params = controlnet_from_unet(pipe.unet, pipe_params["unet"], embedding_channels,
                                              jax.random.key(config.seed))
    models = Models(pipe.unet, pipe.text_encoder, pipe.vae, controlnet)
    frozen = {"unet": pipe_params["unet"], "text_encoder": pipe_params["text_encoder"],
              "alphas_cumprod": make_alphas_cumprod(ddim_scheduler())}
    dataset = encode_scenes(pipe.vae, pipe_params["vae"], config.seed, scenes, task="controlnet")
    result = fit("controlnet", functools.partial(controlnet_loss, models), params,
                 scene_batches(dataset, config.seed, config.batch_size, pipe.tokenizer), config,
                 out_dir / "checkpoints", frozen=frozen, progress=progress)
    controlnet.save_pretrained(out_dir / "tiny-shapes-controlnet", result.params, pytorch_format=True)
    return controlnet, result.params, result


# ----------------------------------------------------------------------------- all stages


def write_demo_sample(folder: Path) -> None:
    """The demo's inputs, `sample_image.png` and `sample_mask.png` (see `data.demo_sample`)."""
    from PIL import Image

    image, mask = data.demo_sample(IMAGE_SIZE)
    Path(folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(Path(folder) / "sample_image.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(Path(folder) / "sample_mask.png")


def export_assets(out_dir: Path, assets_dir: Path) -> None:
    """Copy a run's models and demo inputs into `assets_dir` (the package's bundled assets) as plain
    diffusers folders: config.json, safetensors and tokenizer files; our msgpack copies are left out,
    so the bundled model loads through the same conversion path as any diffusers checkpoint."""
    import shutil

    out_dir, assets_dir = Path(out_dir), Path(assets_dir)
    for name in ("tiny-shapes-inpaint", "tiny-shapes-controlnet", "tiny-shapes-txt2img"):
        if not (out_dir / name).is_dir():
            continue
        shutil.rmtree(assets_dir / name, ignore_errors=True)
        shutil.copytree(out_dir / name, assets_dir / name, ignore=shutil.ignore_patterns("*.msgpack"))
    for name in ("sample_image.png", "sample_mask.png"):
        shutil.copyfile(out_dir / name, assets_dir / name)


STAGES = ("vae", "inpaint", "controlnet", "txt2img")


def train_all(out_dir: Path, vae_steps: Optional[int] = None, inpaint_steps: Optional[int] = None,
              controlnet_steps: Optional[int] = None, txt2img_steps: Optional[int] = None, batch_size: Optional[int] = None, seed: int = 0,
              stages: Sequence[str] = STAGES, progress: bool = True) -> Dict[str, FitResult]:
    """The `stages` in order (VAE, text encoder + UNet, ControlNet, text-to-image UNet; the last two
    need the inpainting stage's output in `out_dir`, which needs the VAE's), each resuming from its checkpoint, plus the demo inputs. Steps and batch
    size default to each recipe's; returns each stage's FitResult."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages={list(stages)}: unknown {unknown}; choose from {list(STAGES)}.")
    recipes = {
        "vae": (train_vae, VAE_TRAINING, vae_steps),
        "inpaint": (train_inpaint, INPAINT_TRAINING, inpaint_steps),
        "controlnet": (train_controlnet, CONTROLNET_TRAINING, controlnet_steps),
        "txt2img": (train_txt2img, TXT2IMG_TRAINING, txt2img_steps),
    }
    results = {}
    for stage in stages:
        train, base, steps = recipes[stage]
        changes: Dict[str, Any] = {"seed": seed}
        if steps is not None:
            changes["steps"] = steps
        if batch_size is not None:
            changes["batch_size"] = batch_size
        results[stage] = train(out_dir, dataclasses.replace(base, **changes), progress=progress)[-1]
    write_demo_sample(out_dir)
    return results
