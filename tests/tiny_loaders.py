"""Tiny random models in the files users share: SD1/SD2-shaped pipelines (3-level UNet, 4-level VAE with
Stable Diffusion's factor 8) saved as diffusers folders, and single files in the original layout.

The single files are written with flax_inpaint's inverse table (`single_file.to_original`); the tests load
them with diffusers' own `from_single_file` too, so the table is checked against diffusers' mapping
instead of being trusted twice.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import tiny_sd
from flax_inpaint.loaders import lora
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


# ------------------------------------------------------------------ SDXL
TIME_DIM, POOLED = 8, 20  # addition_time_embed_dim (SDXL: 256), text_encoder_2's projection_dim (SDXL: 1280)
# CLIP ViT-L and OpenCLIP ViT-bigG at toy widths; the widths differ, as diffusers tells the encoders apart by them.
SDXL_TEXT = dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                   hidden_act="gelu", projection_dim=POOLED)
# SDXL base's layout (resnet-only first level, deeper transformers below, linear projections, six size
# values); the refiner's (a resnet-only last level too, OpenCLIP's width as context, five size values).
SDXL_UNET = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, sample_size=8,
                 cross_attention_dim=SDXL_TEXT["hidden_size"] + SDXL_TEXT_2["hidden_size"],
                 projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
REFINER_UNET = dict(SDXL_UNET, block_out_channels=(16, 32, 32, 32), attention_head_dim=(2, 4, 4, 8),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=2, cross_attention_dim=SDXL_TEXT_2["hidden_size"],
                    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)
SDXL_KINDS = {  # kind: (diffusers pipeline class, UNet config, in_channels)
    "base": (StableDiffusionXLPipeline, SDXL_UNET, 4),
    "refiner": (StableDiffusionXLImg2ImgPipeline, REFINER_UNET, 4),
    "inpaint": (StableDiffusionXLInpaintPipeline, SDXL_UNET, 9),
}


def make_sdxl(root: Path, kind: str = "base", seed: int = 0):
    """(folder, torch pipeline) of a tiny random SDXL pipeline (base, refiner or 9-channel inpainting),
    saved as a diffusers folder; the refiner has no text_encoder / tokenizer, as its release."""
    cls, unet_config, in_channels = SDXL_KINDS[kind]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=in_channels, out_channels=4, **unet_config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.13025, **VAE)
    tokenizer = tiny_sd.make_tokenizer(root / "_tok")
    tokenizer_2 = CLIPTokenizer(str(root / "_tok" / "vocab.json"), str(root / "_tok" / "merges.txt"), pad_token="!",
                                model_max_length=tiny_sd.MAX_LENGTH)
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=tiny_sd.MAX_LENGTH, pad_token_id=1,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT, **ids)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **ids)).eval()
    scheduler = EulerDiscreteScheduler(**tiny_sd.SD_SCHEDULE, timestep_spacing="leading")
    parts = dict(vae=vae.eval(), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet.eval(),
                 scheduler=scheduler)
    if kind == "refiner":
        pipe = cls(text_encoder=None, tokenizer=None, requires_aesthetics_score=True, **parts)
    else:
        pipe = cls(text_encoder=text_encoder, tokenizer=tokenizer, **parts)
    folder = root / f"sdxl-{kind}"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def sdxl_original_state(pipe) -> dict:
    """An SDXL pipeline's models in Stability's single-file layout (base / inpainting: CLIP-L at embedders.0,
    OpenCLIP at embedders.1; refiner: OpenCLIP at embedders.0), plus OpenCLIP's logit_scale and EMA/schedule
    leftovers that real files carry."""
    openclip = sf.SDXL_OPENCLIP_PREFIX if pipe.text_encoder is not None else sf.REFINER_OPENCLIP_PREFIX
    layouts = [("unet", pipe.unet, sf.UNET_PREFIX, "unet"), ("vae", pipe.vae, sf.VAE_PREFIX, "vae"),
               ("text_encoder_2", pipe.text_encoder_2, openclip, "openclip")]
    if pipe.text_encoder is not None:
        layouts.append(("text_encoder", pipe.text_encoder, sf.SDXL_CLIP_PREFIX, "clip"))
    state = {}
    for component, model, prefix, kind in layouts:
        state.update(sf.to_original(diffusers_state(model), sf.Layout(component, prefix, kind), torch_config(model)))
    state[openclip + "logit_scale"] = np.float32(4.6)
    state["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    state["model_ema.decay"] = np.float32(0.9999)
    return state


# ------------------------------------------------------------------ LoRA files
def lora_modules(model, kinds=(torch.nn.Linear,)) -> dict:
    """name -> module of the layers a LoRA can target (text encoder names with `text_model.`)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds) and name:
            if isinstance(model, CLIPTextModel) and not name.startswith("text_model."):
                name = f"text_model.{name}"
            out[name] = module
    return out


def lora_factors(module, rank: int, rng) -> tuple:
    """Random (down, up) factors for a Linear or Conv2d (LoCon: a conv down, a 1x1 conv up)."""
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size
        down = rng.standard_normal((rank, module.in_channels, *k)).astype(np.float32) * 0.3
        up = rng.standard_normal((module.out_channels, rank, 1, 1)).astype(np.float32) * 0.3
    else:
        down = rng.standard_normal((rank, module.in_features)).astype(np.float32) * 0.3
        up = rng.standard_normal((module.out_features, rank)).astype(np.float32) * 0.3
    return down, up


def write_lora(pipe, fmt: str, path: Path, seed: int = 0, rank: int = 4, alphas=None) -> Path:
    """A random LoRA for `pipe`'s UNet and text encoder(s) in one of the formats people share (an SDXL pipe's
    text_encoder_2 too: `text_encoder_2.` / `lora_te2_`, with `lora_te1_` and original UNet names for kohya,
    as SDXL LoRAs have them):

    "peft": diffusers' current files (`unet.<m>.lora_A.weight`, text encoder names without `text_model.`),
      with the adapter metadata diffusers writes (lora_alpha 8 and an alpha_pattern for the UNet, 2 for the
      text encoder);
    "kohya": `lora_unet_...` / `lora_te_...` with `.alpha` (one value per component unless `alphas` maps
      module -> alpha), LoCon on the resnets' convs, every linear of the text encoder;
    "old": diffusers' attention-processor format (`unet.<block>.attn1.processor.to_q_lora.down.weight`,
      the text encoder's `to_q_lora` and `mlp.fc1.lora_linear_layer`).
    """
    rng = np.random.default_rng(seed)
    unet_linear = {n: m for n, m in lora_modules(pipe.unet).items() if "transformer_blocks" in n or "proj_" in n}
    unet_conv = {n: m for n, m in lora_modules(pipe.unet, (torch.nn.Conv2d,)).items()
                 if ".resnets." in n and n.endswith(("conv1", "conv2")) or n.endswith("proj_in")}
    text = lora_modules(pipe.text_encoder)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    text2 = {n: m for n, m in lora_modules(pipe.text_encoder_2).items() if n != "text_projection"} if sdxl else {}
    state, metadata = {}, None
    if fmt == "peft":
        parts = (("unet.", {**unet_linear, **unet_conv}), ("text_encoder.", text), ("text_encoder_2.", text2))
        for prefix, mods in parts:
            for name, module in mods.items():
                down, up = lora_factors(module, rank, rng)
                name = name.removeprefix("text_model.") if prefix != "unet." else name
                state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = down, up
        metadata = {"unet.r": rank, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2},
                    "unet.target_modules": sorted({**unet_linear, **unet_conv}),
                    "text_encoder.r": rank, "text_encoder.lora_alpha": 2,
                    "text_encoder.target_modules": sorted(n.removeprefix("text_model.") for n in text)}
        if sdxl:
            metadata.update({"text_encoder_2.r": rank, "text_encoder_2.lora_alpha": 6,
                             "text_encoder_2.target_modules": sorted(n.removeprefix("text_model.") for n in text2)})
    elif fmt == "kohya":
        ldm = sf.Layout("unet", "", "unet").key_fn(torch_config(pipe.unet))
        parts = (("lora_unet_", {**unet_linear, **unet_conv}, 2.0), ("lora_te1_" if sdxl else "lora_te_", text, 8.0),
                 ("lora_te2_", text2, 4.0))
        for prefix, mods, alpha in parts:
            for name, module in mods.items():
                down, up = lora_factors(module, rank, rng)
                written = ldm(name + ".weight")[0].removesuffix(".weight") if sdxl and prefix == "lora_unet_" else name
                key = prefix + written.replace(".", "_")
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
                state[f"{key}.alpha"] = np.array((alphas or {}).get(name, alpha), np.float32)
    elif fmt == "old":
        processor = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
        for name, module in unet_linear.items():
            block, _, proj = name.rpartition(".attn")
            if proj[1:].split(".", 1)[-1] in processor:
                attn, leaf = proj.split(".", 1)
                down, up = lora_factors(module, rank, rng)
                key = f"unet.{block}.attn{attn}.processor.{processor[leaf]}"
                state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down, up
        te_old = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
        for name, module in text.items():
            down, up = lora_factors(module, rank, rng)
            base, _, leaf = name.rpartition(".")
            key = f"text_encoder.{base}.{te_old[leaf]}" if leaf in te_old else f"text_encoder.{name}.lora_linear_layer"
            state[f"{key}.down.weight"], state[f"{key}.up.weight"] = down, up
    else:
        raise ValueError(fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = None if metadata is None else {"format": "pt", lora.METADATA_KEY: json.dumps(metadata)}
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata=header)
    return path
