"""Tiny random diffusers Stable Diffusion pipelines saved as diffusers-format folders (the reference).

The VAE's posterior variance is made negligible (logvar = -30) so PyTorch's posterior sampling and
ours agree without sharing a random generator.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import numpy as np
import torch
from flax.jax_utils import replicate
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from flax_inpaint.sweep import COMPILE_EVENT

SCHEDULERS = {
    "pndm": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}
# The UNet's encoder half, which its ControlNets mirror.
ENCODER = dict(layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
               attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
MAX_LENGTH = 16


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable-character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over single bytes plus a few merges (no download needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)


def make_pipeline(tmp: Path, in_channels: int = 9, scheduler: str = "pndm", seed: int = 0):
    """Build, save and return (folder, torch pipeline) of a tiny random SD inpaint pipeline."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, **ENCODER,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    with torch.no_grad():  # a near-deterministic posterior: logvar = -30
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    tokenizer = make_tokenizer(tmp / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
    ))
    cls, extra = SCHEDULERS[scheduler]
    pipe = StableDiffusionInpaintPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=cls(**SD_SCHEDULE, **extra), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp / f"sd-{in_channels}-{scheduler}"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def make_controlnet(seed: int = 0, **overrides) -> ControlNetModel:
    """A tiny random ControlNet for make_pipeline's UNets, taking control images 4x the latent size (the
    VAE's factor). Its zero convolutions get torch's default init instead, so its residuals matter, and its
    control image embedding He-normal weights: with the default init each of its convolutions shrinks the
    signal, so that control images would move the residuals by ~1e-4 only (below the parity tolerances)."""
    torch.manual_seed(seed)
    net = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(4, 8, 16), **{**ENCODER, **overrides})
    with torch.no_grad():
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
    return net.eval()


def flax_loader(models):
    """`load(in_channels, scheduler)` -> our (pipeline, params) from the folders of `models` ({in_channels:
    (folder, torch pipeline)}) with that scheduler configured from the torch one, each loaded once."""
    from flax_inpaint import FlaxStableDiffusionInpaintPipeline
    from flax_inpaint.pipelines.loading import scheduler_class

    cache = {}

    def load(in_channels: int, scheduler: str):
        if (in_channels, scheduler) not in cache:
            folder, torch_pipe = models[in_channels]
            cls, extra = SCHEDULERS[scheduler]
            config = cls.from_config(torch_pipe.scheduler.config, **extra).config
            flax_sched = scheduler_class(cls.__name__).from_config(dict(config))
            cache[in_channels, scheduler] = FlaxStableDiffusionInpaintPipeline.from_pretrained(
                folder, scheduler=flax_sched)
        return cache[in_channels, scheduler]

    return load


def sample_image_and_mask(size: int = 32, seed: int = 0):
    """A random RGB image and a rectangular mask (white = repaint) as PIL images."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size * 3 // 4, size // 8: size // 2] = 255
    return image, Image.fromarray(mask)


@contextlib.contextmanager
def count_compiles(only: str = ""):
    """Yields a list that gets the function name of each XLA compilation inside the `with` block,
    of functions whose name contains `only`. Entering checks that the listener sees compilations
    (a fresh jitted function must register one), and first makes a key from an int: conftest drops
    the compiled programs after each file, so the first `jax.random.key(n)` since then compiles JAX's
    own seeding programs, which are not the pipeline's."""
    jax.random.key(0)
    compiles, seen = [], []

    def listener(event, duration, fun_name="", **_):
        if event == COMPILE_EVENT:
            seen.append(fun_name)
            if only in fun_name:
                compiles.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3)(np.float32(1))
        assert len(seen) == 1, "the compile listener saw no compilation"
        compiles.clear()
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def replicated(params):
    """diffusers' pmap-convention params: flax's `replicate` of a host copy of `params`, the layout it gives
    device arrays too. From device arrays it stacks with jnp.stack, compiling two small programs per
    parameter shape (~13-20 s of CPU per test file, since conftest drops compiled programs after each)."""
    return replicate(jax.device_get(params))
