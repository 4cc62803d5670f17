"""IP-Adapter weights as published -> params, and the per-layer scales.

A weight file holds two state dicts: `image_proj` (the image projection, models/ip_adapter.py) and
`ip_adapter` (`{n}.to_k_ip.weight`, `{n}.to_v_ip.weight`: the key/value projections of the image tokens
for each cross-attention layer). `.bin` files hold them as a nested dict, read only through
`torch.load(weights_only=True)`; `.safetensors` files flatten them with `image_proj.` / `ip_adapter.`
prefixes. The number n counts the PyTorch UNet's attention processors, in which each transformer block's
attn1 and attn2 follow each other: cross-attention layer k (in `cross_attention_paths` order: down blocks,
up blocks, mid block) has n = 2k + 1, as diffusers' `_convert_ip_adapter_attn_to_diffusers` reads them.

Like the LoRA loader, everything is pure (params in, new params out). After `load_ip_adapter`:
  params["unet"]: every attn2 also has `to_k_ip_{j}` / `to_v_ip_{j}` for adapter j (bias-free kernels).
  params["ip_adapter"] = {"image_proj": [projection params of adapter j, ...],
                          "scale": float32 [cross-attention layers, adapters]}
The sampling program reads both through `ip_adapter_inputs`, so `set_ip_adapter_scale` never recompiles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.io import CheckpointError, resolve_folder
from flax_inpaint.models.conversion import convert_state_dict
from flax_inpaint.models.ip_adapter import (
    ImageProjection,
    IPAdapterPlusImageProjection,
    RESAMPLER_HEAD_DIM,
    project_image_embeds,
)
from flax_inpaint.models.unet import cross_attention_paths
from flax_inpaint.runtime import Runtime

Source = Union[str, os.PathLike, Mapping[str, Any]]
Scale = Union[float, Mapping[str, Any]]
PARTS = ("image_proj", "ip_adapter")

# published "plus" Resampler key -> diffusers' IPAdapterPlusImageProjection key (to_kv is split below)
_RESAMPLER_NAMES = (
    (r"layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
    (r"layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
)
# image_proj keys of the variants we do not implement -> their names
_UNSUPPORTED = (
    ("proj.3.weight", "IP-Adapter Full Face (IPAdapterFullImageProjection)"),
    ("perceiver_resampler.proj_in.weight", "IP-Adapter FaceID Plus"),
    ("norm.weight", "IP-Adapter FaceID"),
)


# ----------------------------------------------------------------------------- reading

def read_ip_adapter(source: Source, subfolder: Optional[str] = None,
                    weight_name: Optional[str] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """{"image_proj": {key: array}, "ip_adapter": {key: array}} of an IP-Adapter file, a folder (or hub repo
    id) holding `weight_name` (in `subfolder`), or an in-memory dict in either layout."""
    from flax_inpaint.loaders.single_file import read_checkpoint

    if isinstance(source, Mapping):
        tensors, name = read_checkpoint(source)[0], "the state dict"
    else:
        path = Path(source)
        if not path.is_file():
            if not weight_name:
                raise ValueError(f"{str(source)!r} is not a file; pass weight_name= the IP-Adapter file in it "
                                 "(e.g. 'ip-adapter_sd15.safetensors').")
            path = resolve_folder(source, subfolder) / weight_name
            if not path.is_file():
                raise CheckpointError(f"{path} does not exist; check subfolder= and weight_name=.")
        tensors, name = read_checkpoint(path)[0], str(path)
    out: Dict[str, Dict[str, np.ndarray]] = {part: {} for part in PARTS}
    stray = []
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
        else:
            stray.append(key)
    if stray or not all(out.values()):
        found = f"; found {sorted(stray)[:5]}" if stray else ""
        raise CheckpointError(f"{name} is not an IP-Adapter in the published layout: expected keys under "
                              f"'image_proj.' and 'ip_adapter.'{found}.")
    return out


# ----------------------------------------------------------------------------- conversion

def _resampler_state(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The published Resampler keys renamed to diffusers' names, `to_kv` split into to_k and to_v."""
    out = {}
    for key, value in state.items():
        kv = re.fullmatch(r"layers\.(\d+)\.0\.to_kv\.weight", key)
        if kv:
            k, v = np.split(value, 2, axis=0)
            out[f"layers.{kv[1]}.attn.to_k.weight"], out[f"layers.{kv[1]}.attn.to_v.weight"] = k, v
            continue
        for pattern, repl in _RESAMPLER_NAMES:
            key = re.sub(rf"^{pattern}", repl, key)
        out[key] = value
    return out


def convert_image_proj(state: Mapping[str, np.ndarray]) -> Tuple[Any, Dict[str, Any]]:
    """(module, Flax params) of a published `image_proj` state dict: plain or "plus"."""
    if "proj.weight" in state:
        dim = state["norm.weight"].shape[0]
        module, dummy = ImageProjection(state["proj.weight"].shape[0] // dim, dim), (1, state["proj.weight"].shape[1])
        state = {re.sub(r"^proj\.", "image_embeds.", k): v for k, v in state.items()}
    elif "latents" in state and "proj_in.weight" in state:
        state = _resampler_state(state)
        _, queries, hidden = state["latents"].shape
        module = IPAdapterPlusImageProjection(
            output_dims=state["proj_out.weight"].shape[0], hidden_dims=hidden,
            depth=len({k.split(".")[1] for k in state if k.startswith("layers.")}),
            heads=state["layers.0.attn.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM, num_queries=queries,
            ffn_ratio=state["layers.0.ff.1.net.0.proj.weight"].shape[0] / hidden,
        )
        dummy = (1, 1, state["proj_in.weight"].shape[1])
    else:
        variant = next((name for key, name in _UNSUPPORTED if key in state), None)
        raise CheckpointError(
            (f"This is an {variant} adapter, which is not supported" if variant else
             f"Unknown IP-Adapter image projection (keys {sorted(state)[:6]})")
            + "; supported: the plain IP-Adapter (image_proj.proj.*) and IP-Adapter Plus (image_proj.latents, "
            "the Resampler)."
        )
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(dummy))["params"])
    return module, convert_state_dict(state, flax.traverse_util.flatten_dict(shapes))


def convert_ip_attention(state: Mapping[str, np.ndarray], unet: Any, unet_params: Mapping[str, Any],
                         adapter: int = 0) -> Dict[Tuple[str, ...], np.ndarray]:
    """Flat UNet params {path: kernel} of a published `ip_adapter` state dict: `to_k_ip_{adapter}` and
    `to_v_ip_{adapter}` in every cross-attention layer, shaped like that layer's to_k / to_v. Raises
    CheckpointError listing every missing, unused or misshapen tensor."""
    filled, missing, mismatched = {}, [], []
    used = set()
    for k, path in enumerate(cross_attention_paths(unet)):
        attn = unet_params
        for part in path:
            attn = attn[part]
        for proj in ("to_k", "to_v"):
            key = f"{2 * k + 1}.{proj}_ip.weight"
            if key not in state:
                missing.append(f"{key} (for {'/'.join(path)})")
                continue
            used.add(key)
            kernel, expected = np.asarray(state[key]).T, attn[proj]["kernel"].shape
            if kernel.shape != tuple(expected):
                mismatched.append(f"{key} {list(state[key].shape)} -> {'/'.join(path)}/{proj}_ip_{adapter} "
                                  f"expects {list(expected)} (transposed)")
                continue
            filled[path + (f"{proj}_ip_{adapter}", "kernel")] = kernel
    unused = sorted(set(state) - used)
    if missing or mismatched or unused:
        lora = any("lora" in key for key in unused)
        raise CheckpointError(
            "The IP-Adapter's attention weights do not fit this UNet "
            f"({len(cross_attention_paths(unet))} cross-attention layers):"
            + "".join(f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
                      for title, items in (("missing", missing), ("shape mismatches", mismatched), ("unused", unused))
                      if items)
            + ("\nIts LoRA tensors belong to an IP-Adapter FaceID, which is not supported." if lora else
               "\nIs it an adapter for another base model (SD 1.5 / SDXL)?")
        )
    return filled


# ----------------------------------------------------------------------------- the params API

def load_ip_adapter(params: Mapping[str, Any], source: Source, subfolder: Optional[str] = None,
                    weight_name: Optional[str] = None, *, unet: Any) -> Dict[str, Any]:
    """New pipeline params with the IP-Adapter of `source` added (after those already loaded), at scale 1
    in every cross-attention layer, as diffusers' `load_ip_adapter` leaves it; `params` is left as it is.
    `unet` is the pipeline's UNet module (its config gives the cross-attention layers). The adapter's
    weights take the dtype of the UNet's params (published files are often float16)."""
    paths = cross_attention_paths(unet)
    if not paths:
        raise ValueError("This UNet has no cross-attention layers, so an IP-Adapter has nothing to attach to.")
    state = read_ip_adapter(source, subfolder, weight_name)
    loaded = params.get("ip_adapter") or {"image_proj": [], "scale": np.zeros((len(paths), 0))}
    _, proj = convert_image_proj(state["image_proj"])
    kernels = convert_ip_attention(state["ip_adapter"], unet, params["unet"], len(loaded["image_proj"]))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params["unet"]))
    dtype = flat[paths[0] + ("to_k", "kernel")].dtype
    flat.update({path: jnp.asarray(kernel, dtype) for path, kernel in kernels.items()})
    scale = jnp.concatenate([jnp.asarray(loaded["scale"], jnp.float32), jnp.ones((len(paths), 1), jnp.float32)], axis=1)
    proj = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), proj)
    return {**params, "unet": flax.traverse_util.unflatten_dict(flat),
            "ip_adapter": {"image_proj": [*loaded["image_proj"], proj], "scale": scale}}


def unload_ip_adapter(params: Mapping[str, Any]) -> Dict[str, Any]:
    """New params without any IP-Adapter (its projections, scales and UNet kernels)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params["unet"]))
    kept = {p: v for p, v in flat.items() if not re.fullmatch(r"to_[kv]_ip_\d+", p[-2])}
    return {**{k: v for k, v in params.items() if k != "ip_adapter"}, "unet": flax.traverse_util.unflatten_dict(kept)}


def _layer_name(path: Tuple[str, ...]) -> Tuple[str, int, int]:
    """("down" / "mid" / "up", block index, attentions index) of a cross-attention layer's param path."""
    block, attentions = path[0], int(path[1].split("_")[1])
    if block == "mid_block":
        return "mid", 0, attentions
    kind, index = block.split("_blocks_")
    return kind, int(index), attentions


def _block_scales(scale: Any, blocks: Mapping[int, int], where: str) -> Dict[int, List[float]]:
    """{block index: a scale per attentions_i} from a number (every block) or {"block_i": number or list}."""
    if not isinstance(scale, Mapping):
        return {i: [float(scale)] * n for i, n in blocks.items()}
    out = {i: [0.0] * n for i, n in blocks.items()}
    for name, value in scale.items():
        m = re.fullmatch(r"block_(\d+)", name)
        if not m or int(m[1]) not in blocks:
            raise ValueError(f"set_ip_adapter_scale: {where}.{name} has no attention layers in this UNet; "
                             f"those that do: {[f'block_{i}' for i in blocks]}.")
        n = blocks[int(m[1])]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, n):
            raise ValueError(f"set_ip_adapter_scale: {where}.{name} takes 1 or {n} scales (one per attention "
                             f"layer); got {len(values)}.")
        out[int(m[1])] = [float(v) for v in values] * (n // len(values))
    return out


def ip_adapter_scale(unet: Any, scale: Union[Scale, Sequence[Scale]], adapters: int = 1) -> np.ndarray:
    """float32 [cross-attention layers, adapters] of a diffusers `set_ip_adapter_scale` value, on the host.

    `scale`: a number for every layer, or a dict per block as diffusers takes it, e.g.
    {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": {"block_0": [0.0, 1.0, 0.0]}} (a list gives each
    attentions layer of the block its scale; a number, every one); layers a dict leaves out get 0. A list
    of these gives one per adapter; a single one applies to every adapter.
    """
    configs = list(scale) if isinstance(scale, (list, tuple)) else [scale] * adapters
    if len(configs) != adapters:
        raise ValueError(f"set_ip_adapter_scale got {len(configs)} scale configs for {adapters} loaded IP-Adapters.")
    layers = [_layer_name(path) for path in cross_attention_paths(unet)]
    attentions: Dict[str, Dict[int, int]] = {"down": {}, "up": {}, "mid": {}}
    for kind, block, attn in layers:
        attentions[kind][block] = max(attentions[kind].get(block, 0), attn + 1)
    columns = []
    for config in configs:
        if isinstance(config, Mapping):
            unknown = set(config) - {"down", "mid", "up"}
            if unknown:
                raise ValueError(f"set_ip_adapter_scale: unknown keys {sorted(unknown)}; use 'down', 'mid', 'up'.")
            mid = config.get("mid", 0.0)
            if isinstance(mid, (list, tuple)):
                if len(mid) != 1:
                    raise ValueError(f"set_ip_adapter_scale: mid takes one scale; got {len(mid)}.")
                mid = mid[0]
            table = {kind: _block_scales(config.get(kind, 0.0), attentions[kind], kind) for kind in ("down", "up")}
            table["mid"] = {0: [float(mid)]}
        else:
            table = {kind: _block_scales(config, attentions[kind], kind) for kind in attentions}
        columns.append([table[kind][block][attn] for kind, block, attn in layers])
    return np.asarray(columns, np.float32).T.reshape(len(layers), adapters)


def set_ip_adapter_scale(params: Mapping[str, Any], scale: Union[Scale, Sequence[Scale]], *,
                         unet: Any) -> Dict[str, Any]:
    """New params with the IP-Adapter scales of `scale` (see `ip_adapter_scale`); values only, so the
    sampling program does not recompile."""
    loaded = params.get("ip_adapter")
    if not loaded:
        raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded; call load_ip_adapter first.")
    table = ip_adapter_scale(unet, scale, len(loaded["image_proj"]))
    return {**params, "ip_adapter": {**loaded, "scale": jax.device_put(table)}}


def ip_adapter_inputs(params: Mapping[str, Any], image_embeds: Sequence[jax.Array],
                      runtime: Runtime = Runtime()) -> Dict[str, Any]:
    """The UNet's IP-Adapter keyword arguments (`ip_hidden_states`, `ip_adapter_scale`) from the loaded
    adapters and one image-embedding array per adapter (diffusers' `added_cond_kwargs["image_embeds"]`:
    [B, images, D] for plain adapters, [B, images, seq, width] penultimate hidden states for "plus").
    Pure and jittable."""
    loaded = params["ip_adapter"]
    if len(image_embeds) != len(loaded["image_proj"]):
        raise ValueError(f"Got {len(image_embeds)} image_embeds arrays for {len(loaded['image_proj'])} loaded "
                         "IP-Adapters; pass one per adapter.")
    tokens = [project_image_embeds(p, e, runtime) for p, e in zip(loaded["image_proj"], image_embeds)]
    return {"ip_hidden_states": tokens, "ip_adapter_scale": loaded["scale"]}
