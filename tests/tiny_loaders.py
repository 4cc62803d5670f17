"""Tiny random models in the files users share: SD1/SD2-shaped pipelines (3-level UNet, 4-level VAE with
Stable Diffusion's factor 8) saved as diffusers folders, and single files in the original layout.

The single files are written with flax_inpaint's inverse table (`single_file.to_original`); the tests load
them with diffusers' own `from_single_file` too, so the table is checked against diffusers' mapping
instead of being trusted twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import tiny_sd
from flax_inpaint.loaders import single_file as sf

SIZE = 64  # pixels; the VAE downsamples 8x like Stable Diffusion's
LATENT = (4, 8, 8)
UNET = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIZE,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# SD1: conv projections, 4 heads, OpenAI CLIP (quick_gelu); SD2: linear projections, per-block heads,
# OpenCLIP (gelu).
FAMILIES = {
    "sd1": dict(unet=dict(attention_head_dim=4), text=dict(hidden_act="quick_gelu"), text_kind="clip"),
    "sd2": dict(unet=dict(attention_head_dim=(2, 4, 4), use_linear_projection=True), text=dict(hidden_act="gelu"),
                text_kind="openclip"),
}
CONTROLNET = dict(conditioning_embedding_out_channels=(4, 8, 8, 16))  # 6 hint blocks (conv_out at 14), 8x


def torch_config(model) -> dict:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def make_sd(root: Path, family: str = "sd1", in_channels: int = 9, prediction_type: str = "epsilon",
            seed: int = 0):
    """(folder, torch pipeline) of a tiny random SD pipeline of `family`, saved as a diffusers folder."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=in_channels, out_channels=4, **UNET, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **VAE)
    with torch.no_grad():  # a near-deterministic posterior, as in tiny_sd
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    tokenizer = tiny_sd.make_tokenizer(root / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tiny_sd.MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=1, **spec["text"]))
    if prediction_type == "epsilon":
        scheduler = PNDMScheduler(**tiny_sd.SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    else:
        scheduler = DDIMScheduler(**tiny_sd.SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                  prediction_type=prediction_type)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = root / f"{family}-{in_channels}-{prediction_type}"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def make_controlnet(seed: int = 1) -> ControlNetModel:
    """A tiny random ControlNet for make_sd's UNets (zero convolutions re-initialised, so they matter)."""
    torch.manual_seed(seed)
    encoder = {k: v for k, v in UNET.items() if k not in ("up_block_types", "sample_size")}
    net = ControlNetModel(in_channels=4, attention_head_dim=4, **encoder, **CONTROLNET)
    with torch.no_grad():
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
    return net.eval()


def diffusers_state(model) -> dict:
    """A torch model's state dict as numpy, CLIP keys with transformers' `text_model.` prefix."""
    out = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if isinstance(model, CLIPTextModel):
        out = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in out.items()}
    return out


def original_state(pipe, family: str = "sd1", controlnet=None, controlnet_prefix: str = sf.CONTROLNET_PREFIX,
                   extra_text_layer: bool = False) -> dict:
    """The pipeline's models (and a ControlNet) in the original single-file layout, plus the leftovers real
    files carry (EMA and schedule buffers, OpenCLIP's contrastive head)."""
    text_kind = FAMILIES[family]["text_kind"]
    text_prefix = sf.CLIP_PREFIX if text_kind == "clip" else sf.OPENCLIP_PREFIX
    layouts = [("unet", pipe.unet, sf.UNET_PREFIX, "unet"), ("vae", pipe.vae, sf.VAE_PREFIX, "vae"),
               ("text_encoder", pipe.text_encoder, text_prefix, text_kind)]
    if controlnet is not None:
        layouts.append(("controlnet", controlnet, controlnet_prefix, "controlnet"))
    state = {}
    for component, model, prefix, kind in layouts:
        state.update(sf.to_original(diffusers_state(model), sf.Layout(component, prefix, kind), torch_config(model)))
    rng = np.random.default_rng(0)
    state["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    state["model_ema.decay"] = np.float32(0.9999)
    if text_kind == "openclip":
        hidden = pipe.text_encoder.config.hidden_size
        state[text_prefix + "text_projection"] = rng.standard_normal((hidden, hidden), np.float32)
        state[text_prefix + "logit_scale"] = np.float32(4.6)
        if extra_text_layer:  # SD2 files keep the last OpenCLIP layer, which SD2 does not use
            n = pipe.text_encoder.config.num_hidden_layers
            state.update({k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): v + 1 for k, v in state.items()
                          if f"transformer.resblocks.{n - 1}." in k})
    return state


def write_file(state: dict, path: Path) -> Path:
    """Save an original-layout state dict as .safetensors, or as .ckpt ({"state_dict": ...}, torch.save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, "global_step": 10},
                   path)
    return path
