"""Single-file checkpoints in the original Stable Diffusion layout (CompVis/Stability, A1111, ComfyUI).

One `.safetensors` / `.ckpt` holds every model of a pipeline under fixed prefixes:

  model.diffusion_model.          the UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.              the VAE (encoder.down.i.block.j, mid.attn_1, ...)
  cond_stage_model.transformer.   SD1's CLIP text encoder (transformers' names)
  cond_stage_model.model.         SD2's OpenCLIP text encoder (resblocks, fused q/k/v `in_proj`)
  control_model.                  a ControlNet (no prefix in standalone ControlNet files)

SDXL's files (Stability's SGM layout) keep the UNet (with its size-conditioning `label_emb`) and VAE there and
put the text encoders under `conditioner.embedders.<i>.`: SDXL base and inpainting have CLIP ViT-L as
`0.transformer.` (text_encoder) and OpenCLIP ViT-bigG as `1.model.` (text_encoder_2, with `text_projection`);
the refiner has only the OpenCLIP one, as `0.model.`.

Conversion goes through diffusers' names. For every parameter of the target model (its diffusers key,
read off the Flax model's param tree) a table names the original key and a transform: none, a 1x1 conv
stored for a linear (the VAE's attention), one third of OpenCLIP's fused q/k/v, or the transpose
(OpenCLIP's `text_projection` is applied as x @ P). The same table maps
back (`to_original`), which is how tests write single files. Every tensor under a component's prefix must
be used; tensors elsewhere must be known leftovers (`IGNORED`); otherwise one error lists the unused
and the missing tensors, like the diffusers-folder conversion in models/conversion.py.

The architecture comes from the tensors (channels, layers, block types, cross-attention size, linear
or conv projections) or from `config=`, a local diffusers folder, which also supplies what tensors
cannot tell (attention heads, norm groups, tokenizer, scheduler). Without `config=` only the known
families (loaders/families.py: SD 1.x, SD 2.x, SDXL, SDXL refiner) have defaults; anything else asks for a
config folder instead of guessing. Other families (SD3, Flux, ...) are refused with their name.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

from flax_inpaint.io import CheckpointError, read_safetensors
from flax_inpaint.loaders.families import (
    FAMILIES,
    SD_CONTROLNET_EMBEDDING,
    SD_VAE,
    SD_VAE_CHANNELS,
    Family,
    clip_tokenizer,
)
from flax_inpaint.models.conversion import to_torch_state_dict
from flax_inpaint.runtime import Runtime

StateDict = Dict[str, np.ndarray]
# A transform between an original tensor and a diffusers one: None (same tensor), "conv1x1" (the
# original is a [out, in, 1, 1] conv, diffusers a [out, in] linear), ("third", i) (slice i of three
# along axis 0: OpenCLIP's fused q/k/v) or "transpose" (OpenCLIP's [in, out] text_projection).
Transform = Union[None, str, Tuple[str, int]]

UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2, CONTROLNET = "unet", "vae", "text_encoder", "text_encoder_2", "controlnet"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
CONTROLNET_PREFIX = "control_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# Tensors of full training checkpoints that inference does not use, with why.
IGNORED: Tuple[Tuple[str, str], ...] = (
    (r"model_ema\.", "EMA copies of the UNet (the trained weights are used, as diffusers does by default)"),
    (r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
     r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
     r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$",
     "the training noise schedule (the scheduler config holds it)"),
    (r"first_stage_model\.loss\.", "the VAE's training loss (LPIPS and discriminator)"),
    (r"(cond_stage_model|conditioner\.embedders\.\d+)\..*position_ids$", "a constant buffer"),
    (r"cond_stage_model\.model\.(text_projection|logit_scale)$", "OpenCLIP's contrastive head"),
    (r"conditioner\.embedders\.\d+\.model\.logit_scale$", "OpenCLIP's contrastive temperature"),
)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ----------------------------------------------------------------------------- key tables

@dataclasses.dataclass(frozen=True)
class _Module:
    """An original module standing for one diffusers module: its path, its sub-modules' renames, and the
    sub-modules stored as 1x1 convs where diffusers has linears."""

    path: str
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    conv1x1: frozenset = frozenset()


def _per_block(value: Any, n: int) -> Tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _unet_modules(cfg: Mapping[str, Any], controlnet: bool = False) -> Dict[str, _Module]:
    """diffusers module -> original module of a UNet (or, with `controlnet`, a ControlNet) config."""
    n = len(cfg["block_out_channels"])
    layers = _per_block(cfg["layers_per_block"], n)
    m = {"time_embedding.linear_1": _Module("time_embed.0"), "time_embedding.linear_2": _Module("time_embed.2"),
         "conv_in": _Module("input_blocks.0.0")}
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's size conditioning
        m.update({"add_embedding.linear_1": _Module("label_emb.0.0"),
                  "add_embedding.linear_2": _Module("label_emb.0.2")})
    k = 1  # input_blocks.0 is conv_in; then each level's layers, then its downsampler
    for i, block_type in enumerate(cfg["down_block_types"]):
        for j in range(layers[i]):
            m[f"down_blocks.{i}.resnets.{j}"] = _Module(f"input_blocks.{k}.0", _RESNET)
            if _has_attention(block_type):
                m[f"down_blocks.{i}.attentions.{j}"] = _Module(f"input_blocks.{k}.1")
            k += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = _Module(f"input_blocks.{k}.0.op")
            k += 1
    m["mid_block.resnets.0"] = _Module("middle_block.0", _RESNET)
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        m["mid_block.attentions.0"] = _Module("middle_block.1")
        m["mid_block.resnets.1"] = _Module("middle_block.2", _RESNET)
    if controlnet:
        for idx in range(k):
            m[f"controlnet_down_blocks.{idx}"] = _Module(f"zero_convs.{idx}.0")
        m["controlnet_mid_block"] = _Module("middle_block_out.0")
        blocks = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)
        m["controlnet_cond_embedding.conv_in"] = _Module("input_hint_block.0")
        for b in range(blocks):  # convs at even indices, SiLUs between them
            m[f"controlnet_cond_embedding.blocks.{b}"] = _Module(f"input_hint_block.{2 * (b + 1)}")
        m["controlnet_cond_embedding.conv_out"] = _Module(f"input_hint_block.{2 * (blocks + 1)}")
        return m
    k = 0
    for i, block_type in enumerate(cfg["up_block_types"]):
        level_layers = layers[n - 1 - i] + 1
        for j in range(level_layers):
            m[f"up_blocks.{i}.resnets.{j}"] = _Module(f"output_blocks.{k}.0", _RESNET)
            if _has_attention(block_type):
                m[f"up_blocks.{i}.attentions.{j}"] = _Module(f"output_blocks.{k}.1")
            if j == level_layers - 1 and i < n - 1:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = _Module(
                    f"output_blocks.{k}.{2 if _has_attention(block_type) else 1}.conv")
            k += 1
    m["conv_norm_out"] = _Module("out.0")
    m["conv_out"] = _Module("out.2")
    return m


def _vae_modules(cfg: Mapping[str, Any]) -> Dict[str, _Module]:
    """diffusers module -> original module of an AutoencoderKL config (the decoder's levels run reversed)."""
    n = len(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 1)
    m = {"quant_conv": _Module("quant_conv"), "post_quant_conv": _Module("post_quant_conv")}
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in": _Module(f"{part}.conv_in"), f"{part}.conv_out": _Module(f"{part}.conv_out"),
                  f"{part}.conv_norm_out": _Module(f"{part}.norm_out"),
                  f"{part}.mid_block.resnets.0": _Module(f"{part}.mid.block_1", _VAE_RESNET),
                  f"{part}.mid_block.resnets.1": _Module(f"{part}.mid.block_2", _VAE_RESNET),
                  f"{part}.mid_block.attentions.0": _Module(f"{part}.mid.attn_1", _VAE_ATTENTION,
                                                            frozenset({"to_q", "to_k", "to_v", "to_out.0"}))})
    for i in range(n):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = _Module(f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = _Module(f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = _Module(f"encoder.down.{i}.downsample.conv")
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = _Module(f"decoder.up.{n - 1 - i}.upsample.conv")
    return m


def _module_key(modules: Mapping[str, _Module]) -> Callable[[str], Optional[Tuple[str, Transform]]]:
    """A diffusers key -> (original key, transform) function over a module table."""
    def key(name: str):
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = modules.get(".".join(parts[:cut]))
            if module is None:
                continue
            sub, leaf = ".".join(parts[cut:-1]), parts[-1]
            path = ".".join(p for p in (module.path, module.renames.get(sub, sub), leaf) if p)
            return path, ("conv1x1" if sub in module.conv1x1 and leaf == "weight" else None)
        return None
    return key


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_TRANSPOSED = {"text_projection.weight": "text_projection"}


def _openclip_key(name: str) -> Optional[Tuple[str, Transform]]:
    """A diffusers CLIPTextModel(WithProjection) key -> OpenCLIP's (SD2, SDXL) key and transform."""
    if name in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[name], None
    if name in _OPENCLIP_TRANSPOSED:
        return _OPENCLIP_TRANSPOSED[name], "transpose"
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return None
    layer, sub, leaf = m.groups()
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if sub in qkv:
        return f"transformer.resblocks.{layer}.attn.in_proj_{leaf}", ("third", qkv[sub])
    if sub in _OPENCLIP_LAYER:
        return f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[sub]}.{leaf}", None
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one component sits in a file: its key prefix and how its keys map to diffusers'."""

    component: str
    prefix: str
    kind: str  # "unet", "vae", "clip" (transformers names), "clip-no-text-model", "openclip", "controlnet"

    def key_fn(self, config: Mapping[str, Any]) -> Callable[[str], Optional[Tuple[str, Transform]]]:
        if self.kind == "unet":
            return _module_key(_unet_modules(config))
        if self.kind == "controlnet":
            return _module_key(_unet_modules(config, controlnet=True))
        if self.kind == "vae":
            return _module_key(_vae_modules(config))
        if self.kind == "openclip":
            return _openclip_key
        if self.kind == "clip-no-text-model":  # saved by transformers versions without the text_model wrapper
            return lambda name: (name.removeprefix("text_model."), None)
        return lambda name: (name, None)


# ----------------------------------------------------------------------------- reading and families

def read_checkpoint(source: Union[str, os.PathLike, Mapping[str, Any]]) -> Tuple[StateDict, Dict[str, Any]]:
    """(tensors, extras) of a single file or an in-memory state dict.

    `.safetensors` is read directly; anything else only through `torch.load(weights_only=True)`.
    Nested "state_dict" wrappers are unwrapped; other nested dicts (A1111 embeddings) flatten to dotted
    keys. `extras` holds the non-tensor values (e.g. "global_step").
    """
    if isinstance(source, Mapping):
        raw, name = source, "the state dict"
    else:
        path = _checked_file(source)
        if path.suffix == ".safetensors":
            return read_safetensors(path), {}
        raw, name = _torch_load(path), str(path)
    tensors, extras = _flatten(raw, name)
    return {k: _to_numpy(v) for k, v in tensors.items()}, {k: _to_python(v) for k, v in extras.items()}


def checkpoint_names(source: Union[str, os.PathLike]) -> set:
    """The tensor names of a single file without reading their data where the format allows it: a
    .safetensors header, a (zip-format) pickle memory-mapped; an old-format pickle is read whole."""
    path = _checked_file(source)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            return set(f.keys())
    return set(_flatten(_torch_load(path, mmap=True), str(path))[0])


def _checked_file(source: Union[str, os.PathLike]) -> Path:
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{str(source)!r} is not a file; pass the path of a .safetensors or .ckpt file.")
    return path


def _torch_load(path: Path, mmap: bool = False):
    """A pickle through `torch.load(weights_only=True)`; `mmap`: tensors mapped, not read (zip-format files; an
    old-format file, which cannot be mapped, is read)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path.name} is a pickled PyTorch file; install torch to read it, or convert "
                              "it to .safetensors.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read safely with torch.load(weights_only=True) ({e}). "
                              "Re-save it as .safetensors.") from e


def _flatten(raw, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(tensors, other values) of a loaded state dict, unwrapped from "state_dict" wrappers, nested dicts
    flattened to dotted keys."""
    extras: Dict[str, Any] = {}
    while isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        extras.update((k, v) for k, v in raw.items() if k != "state_dict")
        raw = raw["state_dict"]
    tensors: Dict[str, Any] = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif hasattr(value, "shape") and hasattr(value, "dtype"):
                tensors[f"{prefix}{key}"] = value
            else:
                extras[f"{prefix}{key}"] = value

    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name} holds a {type(raw).__name__}, not a state dict of named tensors.")
    walk(raw)
    if not tensors:
        raise CheckpointError(f"{name} holds no tensors.")
    return tensors, extras


def _to_numpy(value) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import torch

        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _to_python(value):
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _first(state: Mapping[str, np.ndarray], pattern: str) -> Optional[np.ndarray]:
    regex = re.compile(pattern)
    return next((v for k, v in state.items() if regex.fullmatch(k)), None)


# Families recognised but not supported: (test, what to tell the user).
_OTHER_FAMILIES: Tuple[Tuple[Callable[[StateDict], bool], str], ...] = (
    (lambda s: _has(s, "model.diffusion_model.joint_blocks.") or _has(s, "joint_blocks."),
     "a Stable Diffusion 3 checkpoint"),
    (lambda s: _has(s, "model.diffusion_model.double_blocks.") or _has(s, "double_blocks."), "a Flux checkpoint"),
    (lambda s: "model.diffusion_model.label_emb.weight" in s, "a Stable Diffusion x4 upscaler checkpoint"),
    (lambda s: any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or ".lora." in k for k in s),
     "a LoRA adapter (load it with pipeline.load_lora_weights)"),
    (lambda s: _has(s, "string_to_param.") or (len(s) == 1 and next(iter(s.values())).ndim <= 2),
     "a textual-inversion embedding (load it with pipeline.load_textual_inversion)"),
    (lambda s: any(k in s for k in ("conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight",
                                    "text_model.embeddings.token_embedding.weight")),
     "a diffusers-format weights file (load the folder holding it with from_pretrained)"),
)


def find_layouts(state: StateDict) -> Dict[str, Layout]:
    """The components present in a file, by what their tensors look like."""
    found: Dict[str, Layout] = {}
    if f"{UNET_PREFIX}input_blocks.0.0.weight" in state:
        found[UNET] = Layout(UNET, UNET_PREFIX, "unet")
    for prefix in (VAE_PREFIX, ""):
        if f"{prefix}encoder.conv_in.weight" in state and f"{prefix}decoder.conv_out.weight" in state:
            found[VAE] = Layout(VAE, prefix, "vae")
            break
    texts = [(TEXT_ENCODER, p, kind, p + key) for p in (CLIP_PREFIX, SDXL_CLIP_PREFIX) for kind, key in
             (("clip", "text_model.embeddings.token_embedding.weight"),
              ("clip-no-text-model", "embeddings.token_embedding.weight"))]
    texts += [(TEXT_ENCODER, OPENCLIP_PREFIX, "openclip", OPENCLIP_PREFIX + "token_embedding.weight")]
    texts += [(TEXT_ENCODER_2, p, "openclip", p + "token_embedding.weight")
              for p in (SDXL_OPENCLIP_PREFIX, REFINER_OPENCLIP_PREFIX)]
    for component, prefix, kind, key in texts:
        if key in state and component not in found:
            found[component] = Layout(component, prefix, kind)
    for prefix in (CONTROLNET_PREFIX, ""):
        if f"{prefix}input_hint_block.0.weight" in state:
            found[CONTROLNET] = Layout(CONTROLNET, prefix, "controlnet")
            break
    return found


def describe(state: StateDict) -> str:
    """What a file holds, for error messages: its family, or its components."""
    for test, what in _OTHER_FAMILIES:
        if test(state):
            return what
    layouts = find_layouts(state)
    if not layouts:
        return f"no Stable Diffusion component (first keys: {sorted(state)[:5]})"
    return "a file with " + ", ".join(sorted(layouts))


def check_family(state: StateDict, source: str) -> None:
    """Refuse, naming the family, files of another model family than Stable Diffusion 1.x/2.x or SDXL."""
    for test, what in _OTHER_FAMILIES:
        if test(state):
            raise CheckpointError(f"{source} is {what}; this loader reads Stable Diffusion 1.x/2.x and SDXL single "
                                  "files (UNets, inpainting UNets, VAEs, text encoders and ControlNets).")


# ----------------------------------------------------------------------------- architectures

def context_dim(state: StateDict, prefix: str) -> Optional[int]:
    """The cross-attention (text) width of a UNet or ControlNet: 768 for SD1, 1024 for SD2, 2048 for SDXL."""
    w = _first(state, re.escape(prefix) + r".*attn2\.to_k\.weight")
    return None if w is None else int(w.shape[1])


def unet_shape_config(state: StateDict, prefix: str, controlnet: bool = False) -> Dict[str, Any]:
    """The config fields a UNet's (or ControlNet's) tensors determine."""
    def get(key):
        return state.get(prefix + key)

    conv_in = get("input_blocks.0.0.weight")
    blocks = sorted({int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(prefix + "input_blocks.")})
    levels: List[List[int]] = [[]]
    for b in blocks[1:]:
        if get(f"input_blocks.{b}.0.op.weight") is not None:
            levels.append([])
        else:
            levels[-1].append(b)
    if not all(levels):
        raise CheckpointError(f"{prefix}input_blocks: a level without resnets ({levels}); not a UNet layout.")
    attn = [get(f"input_blocks.{lv[0]}.1.proj_in.weight") is not None for lv in levels]
    proj = next((get(f"input_blocks.{lv[0]}.1.proj_in.weight") for lv, a in zip(levels, attn) if a), None)
    layers = [len(lv) for lv in levels]
    depth = [len({k.split(".transformer_blocks.")[1].split(".")[0] for k in state
                  if k.startswith(f"{prefix}input_blocks.{lv[0]}.1.transformer_blocks.")}) if a else None
             for lv, a in zip(levels, attn)]
    # Levels without attention: the attention levels' depth when they share one (SDXL refiner: 4), else 1.
    fill = depth[attn.index(True)] if len({d for d in depth if d is not None}) == 1 else 1
    depth = [fill if d is None else d for d in depth]
    cfg = {
        "in_channels": int(conv_in.shape[1]),
        "block_out_channels": tuple(int(get(f"input_blocks.{lv[0]}.0.out_layers.3.weight").shape[0]) for lv in levels),
        "layers_per_block": layers[0] if len(set(layers)) == 1 else tuple(layers),
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else tuple(depth),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if get("middle_block.1.proj_in.weight") is not None
        else "UNetMidBlock2D",
        "cross_attention_dim": context_dim(state, prefix),
        "use_linear_projection": proj is not None and proj.ndim == 2,
    }
    added = get("label_emb.0.0.weight")
    if added is not None:  # SDXL: the pooled text embedding and the size sinusoids, concatenated
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=int(added.shape[1]))
    if controlnet:
        hint = sorted(int(k[len(prefix):].split(".")[1]) for k in state
                      if k.startswith(prefix + "input_hint_block.") and k.endswith(".weight"))
        cfg["conditioning_channels"] = int(get("input_hint_block.0.weight").shape[1])
        cfg["conditioning_embedding_out_channels"] = tuple(
            int(get(f"input_hint_block.{i}.weight").shape[0]) for i in hint[:-1:2])
        return cfg
    n = len(levels)
    up, k = [], 0
    for i in range(n):
        up.append("CrossAttnUpBlock2D" if get(f"output_blocks.{k}.1.proj_in.weight") is not None else "UpBlock2D")
        k += layers[n - 1 - i] + 1
    cfg["up_block_types"] = tuple(up)
    cfg["conv_in_kernel"] = int(conv_in.shape[2])
    cfg["out_channels"] = int(get("out.2.weight").shape[0])
    cfg["conv_out_kernel"] = int(get("out.2.weight").shape[2])
    return cfg


def vae_shape_config(state: StateDict, prefix: str) -> Dict[str, Any]:
    """The config fields a VAE's tensors determine."""
    levels = sorted({int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "encoder.down.")})
    layers = {int(k[len(prefix):].split(".")[4]) for k in state if k.startswith(prefix + "encoder.down.0.block.")}
    return {
        "in_channels": int(state[prefix + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state[prefix + "decoder.conv_out.weight"].shape[0]),
        "block_out_channels": tuple(int(state[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0])
                                    for i in levels),
        "layers_per_block": len(layers),
        "latent_channels": int(state[prefix + "decoder.conv_in.weight"].shape[1]),
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "up_block_types": ("UpDecoderBlock2D",) * len(levels),
    }


def text_encoder_shape_config(state: StateDict, layout: Layout) -> Dict[str, Any]:
    """The config fields a CLIP text encoder's tensors determine (OpenCLIP: every resblock counted; with
    SDXL's `text_projection`, its width)."""
    p, extra = layout.prefix, {}
    if layout.kind == "openclip":
        tokens, positions = state[p + "token_embedding.weight"], state[p + "positional_embedding"]
        layers = {int(k[len(p):].split(".")[2]) for k in state if k.startswith(p + "transformer.resblocks.")}
        fc1 = state[p + "transformer.resblocks.0.mlp.c_fc.weight"]
        projection = state.get(p + "text_projection")
        if layout.component == TEXT_ENCODER_2 and projection is not None:
            extra = {"projection_dim": int(projection.shape[1])}
    else:
        t = p + ("text_model." if layout.kind == "clip" else "")
        tokens = state[t + "embeddings.token_embedding.weight"]
        positions = state[t + "embeddings.position_embedding.weight"]
        layers = {int(k[len(t):].split(".")[2]) for k in state if k.startswith(t + "encoder.layers.")}
        fc1 = state[t + "encoder.layers.0.mlp.fc1.weight"]
    return {"vocab_size": int(tokens.shape[0]), "hidden_size": int(tokens.shape[1]),
            "max_position_embeddings": int(positions.shape[0]), "num_hidden_layers": len(layers),
            "intermediate_size": int(fc1.shape[0]), **extra}


# ----------------------------------------------------------------------------- known families

def family_of(state: StateDict, layouts: Mapping[str, Layout]) -> Optional[Family]:
    """The known family whose sizes the file has, or None (then a config folder is needed)."""
    layout = layouts.get(UNET) or layouts.get(CONTROLNET)
    if layout is None:
        return None
    width = context_dim(state, layout.prefix)
    shape = unet_shape_config(state, layout.prefix, controlnet=layout.kind == "controlnet")
    if shape["layers_per_block"] != 2:
        return None
    return next((f for f in FAMILIES if f.text_width == width and shape["block_out_channels"] == f.unet_channels),
                None)


# ----------------------------------------------------------------------------- configs

SUBFOLDERS = {c: c for c in (UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2, CONTROLNET)}


def folder_config(config: Union[str, os.PathLike], component: str) -> Optional[Dict[str, Any]]:
    """A component's config.json from `config`: a pipeline folder (its `<component>/`) or a model folder.

    Only local folders are read: a single file never makes this loader reach the network.
    """
    folder = Path(config)
    if not folder.is_dir():
        raise CheckpointError(f"config={str(config)!r} is not a local folder; pass a diffusers pipeline or model "
                              "folder of the same architecture (single files never fetch configs from the hub).")
    for candidate in (folder / SUBFOLDERS[component] / "config.json", folder / "config.json"):
        if not candidate.is_file():
            continue
        try:
            config = json.loads(candidate.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{candidate} is not valid JSON: {e}") from None
        names = {config.get("_class_name"), *config.get("architectures", [])}
        if candidate.parent != folder or _model_class(component).torch_class in names:
            return config  # a pipeline's subfolder, or a model folder of this component's class
    return None


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


def component_config(state: StateDict, layout: Layout, config: Optional[Union[str, os.PathLike]],
                     family: Optional[Family], source: str) -> Dict[str, Any]:
    """The diffusers config of one component: the tensors' shape fields over `config=`'s folder, or over
    the known family's defaults. A config folder whose shapes disagree with the tensors is refused,
    except for the UNet's in_channels, which the file decides (an inpainting file over a base folder)."""
    if layout.kind in ("unet", "controlnet"):
        shape = unet_shape_config(state, layout.prefix, controlnet=layout.kind == "controlnet")
    elif layout.kind == "vae":
        shape = vae_shape_config(state, layout.prefix)
    else:
        shape = text_encoder_shape_config(state, layout)
    base = folder_config(config, layout.component) if config is not None else None
    if base is not None:
        out = dict(base)
        if layout.component == TEXT_ENCODER and layout.kind == "openclip" and \
                out.get("num_hidden_layers") == shape["num_hidden_layers"] - 1:
            shape["num_hidden_layers"] -= 1  # SD2 uses the penultimate layer; the file keeps the last one
        wrong = [f"{k}: file {v!r}, config {out[k]!r}" for k, v in shape.items()
                 if k in out and k != "in_channels" and not _same(v, out[k])]
        if wrong:
            raise CheckpointError(f"{source}: the {layout.component} of config={str(config)!r} does not describe this "
                                  "file's tensors (" + "; ".join(wrong) + "); pass a config folder of the same "
                                  "architecture.")
        out.update({k: v for k, v in shape.items() if k not in out or k == "in_channels"})
        return out
    sd_vae = layout.kind == "vae" and shape["block_out_channels"] == SD_VAE_CHANNELS
    if family is None and not sd_vae:
        raise CheckpointError(
            f"{source}: its {layout.component} ({_summary(shape)}) is not one of the known families "
            f"({', '.join(f.name for f in FAMILIES)} at their released sizes), so its attention heads and norm groups "
            "cannot be read from the tensors; pass config= a local diffusers folder of the same architecture.")
    if layout.kind in ("unet", "controlnet"):
        out = {**family.unet, **shape}
        if layout.kind == "controlnet":
            out.setdefault("conditioning_embedding_out_channels", SD_CONTROLNET_EMBEDDING)
        return out
    if layout.kind == "vae":
        if shape["block_out_channels"] != SD_VAE_CHANNELS:
            raise CheckpointError(f"{source}: its VAE ({_summary(shape)}) is not Stable Diffusion's; pass config= a "
                                  "local diffusers folder of the same architecture.")
        return {**(family.vae if family is not None else SD_VAE), **shape}
    if layout.component == TEXT_ENCODER and layout.kind == "openclip":
        shape["num_hidden_layers"] -= 1  # SD2 conditions on the penultimate layer; SDXL keeps every layer
    defaults = family.text_encoder_2 if layout.component == TEXT_ENCODER_2 else family.text_encoder
    if defaults is None:
        raise CheckpointError(f"{source}: the {family.name} family has no {layout.component}; pass config= a local "
                              "diffusers folder of the same architecture.")
    # the token ids of the released text encoders' configs (SD1/2, SDXL): with eos_token_id=2 CLIP pools at the
    # highest token id (transformers' rule for configs from before its fix), as diffusers' pipelines then do
    return {**defaults, **shape, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


def _summary(shape: Mapping[str, Any]) -> str:
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "hidden_size", "num_hidden_layers")
    return ", ".join(f"{k}={shape[k]!r}" for k in keys if k in shape)


# ----------------------------------------------------------------------------- conversion

def expected_keys(model) -> Dict[str, Tuple[int, ...]]:
    """diffusers key -> torch shape of every parameter of one of our Flax models (no memory allocated)."""
    import flax

    shapes = model.param_shapes()
    zeros = {path: np.broadcast_to(np.zeros((), np.float32), s.shape) for path, s in shapes.items()}
    return {k: v.shape for k, v in to_torch_state_dict(flax.traverse_util.unflatten_dict(zeros)).items()}


def _apply(value: np.ndarray, transform: Transform) -> np.ndarray:
    if transform == "conv1x1":
        return value.reshape(value.shape[:2]) if value.ndim == 4 and value.shape[2:] == (1, 1) else value
    if transform == "transpose":
        return value.T if value.ndim == 2 else value
    if isinstance(transform, tuple):
        return np.split(value, 3, axis=0)[transform[1]] if value.shape[0] % 3 == 0 else value
    return value


@dataclasses.dataclass
class Problems:
    """What a conversion found wrong, reported together."""

    missing: List[str] = dataclasses.field(default_factory=list)
    mismatched: List[str] = dataclasses.field(default_factory=list)
    unused: List[str] = dataclasses.field(default_factory=list)

    def raise_if_any(self, source: str) -> None:
        if not (self.missing or self.mismatched or self.unused):
            return
        lines = [f"{source} does not match the model it is loaded into:"]
        for title, items in (("shape mismatches", self.mismatched),
                             ("tensors in the file that no parameter uses", self.unused),
                             ("parameters whose tensor is missing from the file", self.missing)):
            if items:
                items = sorted(items)
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown))
        lines.append("Check that the file is a Stable Diffusion 1.x/2.x or SDXL checkpoint and that config= (if "
                     "given) belongs to it.")
        raise CheckpointError("\n".join(lines))


def to_diffusers(state: StateDict, layout: Layout, config: Mapping[str, Any],
                 expected: Mapping[str, Tuple[int, ...]], problems: Problems, used: set) -> StateDict:
    """The diffusers-named tensors of one component, for the parameters in `expected`.

    Records the original keys it consumed in `used` and what is missing or misshapen in `problems`.
    """
    key_fn = layout.key_fn(config)
    out: StateDict = {}
    for name, shape in expected.items():
        entry = key_fn(name)
        if entry is None:
            problems.missing.append(f"{name} (no original name for this parameter)")
            continue
        key, transform = layout.prefix + entry[0], entry[1]
        if key not in state:
            problems.missing.append(f"{key} (for {layout.component} {name})")
            continue
        value = _apply(state[key], transform)
        if tuple(value.shape) != tuple(shape):
            problems.mismatched.append(f"{key} {list(state[key].shape)} -> {name} expects {list(shape)}")
            continue
        used.add(key)
        out[name] = value
    return out


def to_original(tensors: Mapping[str, np.ndarray], layout: Layout, config: Mapping[str, Any]) -> StateDict:
    """The inverse of `to_diffusers`: diffusers-named tensors of one component -> original keys."""
    key_fn = layout.key_fn(config)
    out: StateDict = {}
    thirds: Dict[str, list] = {}
    for name, value in tensors.items():
        entry = key_fn(name)
        if entry is None:
            raise CheckpointError(f"{name}: no original name for this {layout.component} parameter.")
        key, transform = layout.prefix + entry[0], entry[1]
        value = np.asarray(value)
        if transform == "conv1x1":
            out[key] = value[:, :, None, None]
        elif transform == "transpose":
            out[key] = value.T
        elif isinstance(transform, tuple):
            thirds.setdefault(key, [None] * 3)[transform[1]] = value
        else:
            out[key] = value
    for key, parts in thirds.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"{key}: q, k and v are needed to write OpenCLIP's fused projection.")
        out[key] = np.concatenate(parts, axis=0)
    return out


def _ignored(key: str) -> bool:
    return any(re.match(pattern, key) for pattern, _ in IGNORED)


def unused_keys(state: StateDict, used: set, prefixes: Sequence[str], layouts: Mapping[str, Layout],
                configs: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Tensors under `prefixes` that no parameter used and that are not known leftovers (IGNORED, or
    the OpenCLIP layers past the ones SD2 conditions on)."""
    skipped = set()
    te = layouts.get(TEXT_ENCODER)
    if te is not None and te.kind == "openclip" and TEXT_ENCODER in configs:
        n = configs[TEXT_ENCODER]["num_hidden_layers"]
        skipped = {k for k in state if re.match(re.escape(te.prefix) + rf"transformer\.resblocks\.{n}\.", k)}
    return [k for k in state if k.startswith(tuple(prefixes)) and k not in used and k not in skipped
            and not _ignored(k)]


# ----------------------------------------------------------------------------- loading

def _model_class(component: str):
    from flax_inpaint.models.clip import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
    from flax_inpaint.models.controlnet import FlaxControlNetModel
    from flax_inpaint.models.unet import FlaxUNet2DConditionModel
    from flax_inpaint.models.vae import FlaxAutoencoderKL

    return {UNET: FlaxUNet2DConditionModel, VAE: FlaxAutoencoderKL, TEXT_ENCODER: FlaxCLIPTextModel,
            TEXT_ENCODER_2: FlaxCLIPTextModelWithProjection, CONTROLNET: FlaxControlNetModel}[component]


def component_of(model_class) -> str:
    """The component a model class loads from a single file (CLIPTextModelWithProjection: SDXL's
    text_encoder_2, checked before its base class CLIPTextModel)."""
    for component in (UNET, VAE, TEXT_ENCODER_2, TEXT_ENCODER, CONTROLNET):
        if issubclass(model_class, _model_class(component)):
            return component
    raise TypeError(f"{model_class.__name__} has no single-file layout.")


@dataclasses.dataclass
class Loaded:
    """Models and params read from one single file (plus what the pipeline needs to finish)."""

    models: Dict[str, Any]
    params: Dict[str, Any]
    configs: Dict[str, Dict[str, Any]]
    family: Optional[Family]
    global_step: Optional[int]
    source: str


def load(source: Union[str, os.PathLike, Mapping[str, Any]], components: Sequence[str],
         config: Optional[Union[str, os.PathLike]] = None, *, image_size: Optional[int] = None,
         num_in_channels: Optional[int] = None, runtime=None, whole_file: bool = True,
         optional: Sequence[str] = (), sdxl: Optional[bool] = None) -> Loaded:
    """Read `components` (e.g. ("unet", "vae", "text_encoder")) of a single file into our Flax models.

    A component the file lacks comes from `config=`'s folder weights, else it is an error (components in
    `optional`, e.g. the text_encoder the SDXL refiner lacks, are then left out). `sdxl` (pipelines: True
    or False) must say whether the file is an SDXL one, else the error names the pipeline to use. With
    `whole_file` every tensor of the file must be used or be a known leftover; otherwise only those
    under the loaded components' prefixes. `image_size` sets the UNet's sample_size (image_size / the
    VAE factor) and the VAE's; `num_in_channels` must agree with the file's UNet.
    """
    runtime = runtime or Runtime()
    name = "the state dict" if isinstance(source, Mapping) else str(source)
    state, extras = read_checkpoint(source)
    check_family(state, name)
    layouts = find_layouts(state)
    if not any(c in layouts for c in components):
        raise CheckpointError(f"{name} holds none of {list(components)}: it is {describe(state)}.")
    family = family_of(state, layouts)
    if sdxl is not None:
        check_pipeline_kind(state, layouts, family, sdxl, name)
    step = extras.get("global_step")
    models, params, configs, problems, used = {}, {}, {}, Problems(), set()
    for component in components:
        cls = _model_class(component)
        layout = layouts.get(component)
        if layout is None:
            if component in optional and (config is None or not (Path(config) / SUBFOLDERS[component]).is_dir()):
                continue
            models[component], params[component] = _from_config_folder(cls, component, config, name, state)
            configs[component] = models[component].config
            continue
        cfg = component_config(state, layout, config, family, name)
        if component == UNET and num_in_channels is not None and num_in_channels != cfg["in_channels"]:
            raise CheckpointError(f"num_in_channels={num_in_channels}, but the UNet of {name} takes "
                                  f"{cfg['in_channels']} input channels; drop num_in_channels or fix it.")
        configs[component] = cfg
        model = cls.from_config(cfg, runtime=runtime)
        tensors = to_diffusers(state, layout, cfg, expected_keys(model), problems, used)
        models[component], params[component] = model, tensors
    prefixes = [""] if whole_file else [layouts[c].prefix for c in components if c in layouts]
    problems.unused += unused_keys(state, used, prefixes, layouts, configs)
    problems.raise_if_any(name)
    if image_size is not None or family is not None:
        size = image_size or family.image_size(configs.get(UNET, {}).get("in_channels", 4), step)
        models, configs = _with_sample_size(models, configs, size, image_size is not None)
    for component, model in models.items():
        if component in layouts:  # diffusers-named tensors still: convert them (checked again) to Flax params
            params[component] = model._cast(model.convert_torch_state_dict(params[component]))
    return Loaded(models, params, configs, family, step, name)


def _with_sample_size(models, configs, size: int, explicit: bool):
    """Models whose sample_size reflects `size` pixels (a family default only fills unset sizes)."""
    factor = models[VAE].downscale if VAE in models else 8
    wanted = {UNET: size // factor, VAE: size}
    for component, sample in wanted.items():
        if component in models and (explicit or "sample_size" not in configs[component]):
            configs[component] = {**configs[component], "sample_size": sample}
            models[component] = models[component].clone(sample_size=sample)
    return models, configs


def _from_config_folder(cls, component: str, config, name: str, state: StateDict):
    """A component the single file lacks, from `config=`'s folder weights."""
    sub = Path(config) / SUBFOLDERS[component] if config is not None else None
    if sub is None or not sub.is_dir():
        raise CheckpointError(f"{name} has no {component} (it is {describe(state)}) and config= supplies none; pass "
                              f"config= a local diffusers folder with {SUBFOLDERS[component]}/ weights.")
    return cls.from_pretrained(sub)


def load_tokenizer(loaded: Loaded, config: Optional[Union[str, os.PathLike]], name: str = "tokenizer"):
    """`config=`'s tokenizer (`name`: "tokenizer", or SDXL's "tokenizer_2"), else the known family's built-in
    CLIP tokenizer (padding as the family's reference tokenizer does)."""
    folder = Path(config) / name if config is not None else None
    if folder is not None and folder.is_dir():
        import transformers

        cls_name = "CLIPTokenizer"
        index = Path(config) / "model_index.json"
        if index.is_file():
            cls_name = (json.loads(index.read_text()).get(name) or [None, cls_name])[1] or cls_name
        return getattr(transformers, cls_name).from_pretrained(folder)
    family = loaded.family
    pad = None if family is None else family.tokenizer_2_pad if name == "tokenizer_2" else family.tokenizer_pad
    if pad is None:
        raise CheckpointError(f"{loaded.source}: no {name}: the file is not of a known family with one and config= "
                              f"has no {name}/ folder; pass config= (a diffusers folder) or {name}=.")
    return clip_tokenizer(pad)


def load_scheduler(loaded: Loaded, config: Optional[Union[str, os.PathLike]], prediction_type: Optional[str]):
    """`config=`'s scheduler, else the known family's reference scheduler; `prediction_type` overrides."""
    from flax_inpaint.pipelines.loading import scheduler_class

    folder = Path(config) / "scheduler" if config is not None else None
    if folder is not None and (folder / "scheduler_config.json").is_file():
        settings = json.loads((folder / "scheduler_config.json").read_text())
    elif loaded.family is not None:
        settings = loaded.family.scheduler(loaded.configs[UNET]["in_channels"], loaded.global_step)
    else:
        raise CheckpointError(f"{loaded.source}: no scheduler config: the file is not of a known family and config= "
                              "has no scheduler/ folder; pass config= (a diffusers folder) or scheduler=.")
    if prediction_type is not None:
        settings = {**settings, "prediction_type": prediction_type}
    return scheduler_class(settings["_class_name"]).from_config(settings)


def load_model(model_class, source, config=None, **kwargs) -> Tuple[Any, Any]:
    """(model, params) of one model class (UNet, VAE, CLIP text encoder, SDXL's CLIPTextModelWithProjection or
    ControlNet) from a single file: a full pipeline file (only that component's tensors are read) or a
    standalone one."""
    component = component_of(model_class)
    loaded = load(source, (component,), config, whole_file=False, **kwargs)
    return loaded.models[component], loaded.params[component]


def is_sdxl(state: StateDict, layouts: Mapping[str, Layout]) -> bool:
    """Whether a file is SDXL's: a second (OpenCLIP) text encoder, or a UNet with size conditioning."""
    return TEXT_ENCODER_2 in layouts or f"{UNET_PREFIX}label_emb.0.0.weight" in state


def file_is_sdxl(source: Union[str, os.PathLike]) -> bool:
    """Whether a single file holds an SDXL model (which pipeline family loads it), from its tensor names."""
    names = checkpoint_names(source)
    return is_sdxl(names, find_layouts(names))


def check_pipeline_kind(state: StateDict, layouts: Mapping[str, Layout], family: Optional[Family], sdxl: bool,
                        source: str) -> None:
    """Refuse an SDXL file for an SD 1.x/2.x pipeline and the reverse, naming what the file is."""
    if is_sdxl(state, layouts) == sdxl:
        return
    what = family.name if family is not None else "Stable Diffusion 1.x/2.x" if sdxl else "SDXL"
    if sdxl:
        raise CheckpointError(f"{source} is a {what} checkpoint (one text encoder, no size conditioning), not an SDXL "
                              "one; load it with an SD 1.x/2.x pipeline such as FlaxStableDiffusionInpaintPipeline.")
    raise CheckpointError(f"{source} is an {what} checkpoint (two text encoders, size conditioning); load it with an "
                          "SDXL pipeline (FlaxStableDiffusionXL*Pipeline.from_single_file).")


def load_pipeline(source, config=None, *, prediction_type: Optional[str] = None, image_size: Optional[int] = None,
                  num_in_channels: Optional[int] = None, tokenizer=None, scheduler=None, runtime=None,
                  with_controlnet: bool = False, sdxl: bool = False,
                  tokenizer_2=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(pipeline constructor arguments, params) from a single file: UNet, VAE and text encoder from the
    file (or `config=`'s folder weights where the file lacks one), and with `with_controlnet` the file's
    ControlNet too; tokenizer and scheduler as given, else from `config=`, else the family's defaults.

    With `sdxl` (the SDXL pipelines) the file must be SDXL's: the arguments add text_encoder_2 and
    tokenizer_2; the refiner's file has no text_encoder, so text_encoder and tokenizer are then None (unless
    `config=` has them). The models' configs are on the models (`kwargs["unet"].config`, ...)."""
    texts = (TEXT_ENCODER, TEXT_ENCODER_2) if sdxl else (TEXT_ENCODER,)
    components = (UNET, VAE) + texts + ((CONTROLNET,) if with_controlnet else ())
    loaded = load(source, components, config, image_size=image_size, num_in_channels=num_in_channels,
                  runtime=runtime, optional=(TEXT_ENCODER,) if sdxl else (), sdxl=sdxl)
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2} if sdxl else {"tokenizer": tokenizer}
    for name, component in zip(tokenizers, texts):
        if tokenizers[name] is None and component in loaded.models:
            tokenizers[name] = load_tokenizer(loaded, config, name)
    if scheduler is None:
        scheduler = load_scheduler(loaded, config, prediction_type)
    elif prediction_type is not None:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    kwargs = {**{c: loaded.models.get(c) for c in texts}, **loaded.models, **tokenizers, "scheduler": scheduler}
    return kwargs, {**loaded.params, "scheduler": scheduler.create_state()}


class FromSingleFileMixin:
    """`from_single_file` on a pipeline class."""

    @classmethod
    def from_single_file(cls, path: Union[str, os.PathLike], config: Optional[Union[str, os.PathLike]] = None, *,
                         prediction_type: Optional[str] = None, image_size: Optional[int] = None,
                         num_in_channels: Optional[int] = None, tokenizer=None, scheduler=None,
                         dtype: Any = jnp.float32, param_dtype: Optional[Any] = None, attention: str = "auto",
                         **components):
        """Load `(pipeline, params)` from one `.safetensors`/`.ckpt` file in the original Stable Diffusion layout
        (SD 1.x, SD 2.x, their inpainting models; SDXL base, refiner and inpainting for pipeline classes that
        take `text_encoder_2`, which may also be given `tokenizer_2=`); see `flax_inpaint.loaders.single_file`.

        The architecture is read from the tensors, or from `config` (a local diffusers folder), which also
        supplies the tokenizer and scheduler; without it the known families' defaults are used (nothing is
        fetched from the network). `prediction_type` overrides the scheduler's, `image_size` the default
        size; no safety checker is loaded. `save_pretrained` then writes a diffusers folder, so the file is
        converted once. Other keyword arguments are passed to the constructor (e.g. `controlnet=`).
        """
        sdxl = "text_encoder_2" in inspect.signature(cls.__init__).parameters
        if not sdxl and "tokenizer_2" in components:
            raise TypeError(f"tokenizer_2= is SDXL's second tokenizer; {cls.__name__} has one text encoder.")
        kwargs, params = load_pipeline(
            path, config, prediction_type=prediction_type, image_size=image_size, num_in_channels=num_in_channels,
            tokenizer=tokenizer, scheduler=scheduler, runtime=Runtime(dtype, param_dtype or dtype, attention),
            with_controlnet=cls._controlnet_in_file(path, components), sdxl=sdxl,
            tokenizer_2=components.pop("tokenizer_2", None))
        return cls(**kwargs, **components, dtype=dtype), params

    @classmethod
    def _controlnet_in_file(cls, path, components: dict) -> bool:
        """Whether `from_single_file` reads a ControlNet from the file itself (ControlNet pipelines only)."""
        return False
