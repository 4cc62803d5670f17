"""LoRA adapters for the UNet and the text encoder(s), in the formats people share.

Formats (detected per key, several may mix in one file):
  * diffusers / PEFT: `unet.<module>.lora_A.weight`, `lora_B.weight` (`text_encoder.` for the text encoder,
    `text_encoder_2.` for SDXL's second one); rank and alpha from the safetensors metadata diffusers writes
    (`lora_adapter_metadata`), else scale 1.
  * kohya / A1111: `lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`, `.alpha` (scale
    alpha / rank), `lora_te_...` (SDXL: `lora_te1_...`, `lora_te2_...`) for the text encoders; LoCon: the
    same on conv layers (`lora_down` a [rank, in, kh, kw] conv, `lora_up` 1x1). Module names may be
    diffusers' or the original UNet's (`input_blocks_4_1_...`, as SDXL LoRAs have them), which the
    single-file table translates.
  * diffusers' older attention-processor format: `<module>.processor.to_q_lora.down.weight`, `.lora.down`,
    the text encoder's `.lora_linear_layer.down` / `to_q_lora`, with or without the `unet.` prefix.

The adapters live in the params, so every function here is pure (params in, new params out):

  params["lora"] = {
    "adapters":  {name: {component: {module: {"down": [..., in, r], "up": [r, out], "scale": ()}}}},
    "state":     {name: {component: {"weight": (), "active": ()}}},   # fp32 scalars
    "fused":     {name: {component: {module: ...}}},   # after fuse_lora: the factors written into the kernels
    "originals": {component: {module: kernel}},        # after fuse_lora: the kernels before fusing
  }

`module` is the target kernel's Flax path joined with "/"; `down`/`up` are the factors in the kernel's own
layout (dense [in, r] / conv [kh, kw, in, r], then [r, out]), so the update is one einsum. The sampling
program calls `merge_adapters` first: kernel + sum over the unfused adapters of weight * active * scale *
down @ up, all traced, so `set_adapters` never recompiles. `fuse_lora` writes that update into the kernels
and moves the factors aside, so the program no longer computes them; it keeps the original kernels, which
`unfuse_lora` puts back bit for bit. Loading, deleting, fusing and unfusing change the params' structure,
and so compile again; weights and the active set do not.

Why merge in the program rather than fuse on the host for every weight change: the merge is one rank-r
product per targeted kernel per call, next to every UNet weight being read twice per step, while a host
fuse moves every targeted kernel through host memory and back to the device on each change
(benchmarks/bench_lora.py measures both; the README has the numbers).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.io import CheckpointError, named_file, read_safetensors, resolve_folder
from flax_inpaint.models.conversion import to_torch_state_dict

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"
Source = Union[str, os.PathLike, Mapping[str, Any]]

_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# key suffix -> role; the longest match wins
_ROLES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up", ".alpha": "alpha",
}
# attention-processor names -> module names, per component
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PROCESSOR = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text_encoder": _TEXT_PROCESSOR, "text_encoder_2": _TEXT_PROCESSOR}
_UNSUPPORTED = (  # (key pattern, what it is)
    (r"(dora_scale|lora_magnitude_vector)", "DoRA magnitudes (DoRA adapters are not supported)"),
    (r"\.(hada_|lokr_|lora_mid)", "LyCORIS LoHa/LoKr/Tucker factors (only plain LoRA and LoCon are supported)"),
    (r"lora_[AB]\.bias$", "LoRA biases (lora_bias adapters are not supported)"),
)
_SDXL_KEYS = r"(^|\.)(text_encoder_2\.|lora_te2_)|add_embedding|label_emb"  # keys only SDXL LoRAs have


# ----------------------------------------------------------------------------- reading

def read_lora(source: Source, weight_name: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(tensors, adapter metadata) of a LoRA file, a folder holding one (`weight_name`, else diffusers'
    default names), a hub repo id, or an in-memory state dict (numpy arrays or torch tensors)."""
    if isinstance(source, Mapping):
        return {k: _numpy(v) for k, v in source.items()}, {}
    path = Path(source)
    if not path.exists() and not path.suffix:
        path = resolve_folder(source)
    path = named_file(path, [weight_name] if weight_name else WEIGHT_NAMES, "LoRA",
                      "a .safetensors file, a folder holding one, or a state dict")
    if path.suffix == ".safetensors":
        return read_safetensors(path), _metadata(path)
    from flax_inpaint.loaders.single_file import read_checkpoint

    tensors, _ = read_checkpoint(path)
    return tensors, {}


def _metadata(path: Path) -> Dict[str, Any]:
    """diffusers' LoRA config (rank, alpha, patterns per component) from a safetensors header, if any."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _numpy(value) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- targets

def targets(params: Mapping[str, Any]) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
    """diffusers module name -> (Flax path of its kernel, kernel shape) for every dense and conv layer."""
    out = {}
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
        if path[-1] != "kernel":
            continue
        stub = flax.traverse_util.unflatten_dict({path: np.broadcast_to(np.float32(0), np.shape(leaf))})
        (name,) = to_torch_state_dict(stub)
        out[name.removesuffix(".weight")] = path, tuple(np.shape(leaf))
    return out


def _flat_names(modules: Mapping[str, Any], component: str) -> Dict[str, str]:
    """kohya's flattened module names (dots as underscores) -> module name; for the UNet also the names of
    the original layout (`input_blocks_4_1_...`) that kohya uses for some files."""
    names = {m.replace(".", "_"): m for m in modules}
    if component == "unet":
        from flax_inpaint.loaders import single_file as sf

        try:
            ldm = sf.Layout("unet", "", "unet").key_fn(_unet_structure(modules))
        except ValueError:  # not an SD-shaped UNet: diffusers names only
            return names
        for m in modules:
            entry = ldm(m + ".weight")
            if entry is not None:
                names.setdefault(entry[0].removesuffix(".weight").replace(".", "_"), m)
    return names


def _unet_structure(modules: Mapping[str, Any]) -> Dict[str, Any]:
    """The UNet config fields the original-layout table needs, read off the module names."""
    def count(pattern):
        return len({m.group(1) for m in map(re.compile(pattern).match, modules) if m})

    n = count(r"down_blocks\.(\d+)\.")
    layers = count(r"down_blocks\.0\.resnets\.(\d+)\.")
    if not n or not layers:
        raise ValueError("no down blocks")
    has = lambda prefix: any(m.startswith(prefix) for m in modules)  # noqa: E731
    return {"block_out_channels": [0] * n, "layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if has(f"down_blocks.{i}.attentions.") else "DownBlock2D"
                                 for i in range(n)],
            "up_block_types": ["CrossAttnUpBlock2D" if has(f"up_blocks.{i}.attentions.") else "UpBlock2D"
                               for i in range(n)],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if has("mid_block.attentions.") else "UNetMidBlock2D",
            "addition_embed_type": "text_time" if has("add_embedding.") else None}


# ----------------------------------------------------------------------------- parsing

_SUFFIXES = sorted(_ROLES, key=len, reverse=True)


def _split(key: str) -> Tuple[Optional[str], str, Optional[str]]:
    """(component or None, module name as written, role) of one LoRA key."""
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None, key, None
    role, name = _ROLES[suffix], key[: -len(suffix)]
    for prefix, component in _KOHYA.items():
        if name.startswith(prefix):
            return component, name[len(prefix):], role
    for component in COMPONENTS:
        if name.startswith(component + "."):
            return component, name[len(component) + 1:], role
    return None, name, role


def _module(component: str, written: str, flat: Mapping[str, str], modules: Mapping[str, Any]) -> Optional[str]:
    """The module a LoRA key's name stands for, or None."""
    name = written.replace(".processor.", ".")
    for old, new in _PROCESSOR[component].items():
        if name.endswith(f".{old}") or name.endswith(f".{old}_lora"):
            name = name[: name.rindex(f".{old}")] + f".{new}"
    if component in TEXT_ENCODERS and not name.startswith("text_model.") and "." in name:
        name = f"text_model.{name}"
    if name in modules:
        return name
    return flat.get(written)


def parse(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any],
          modules: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """component -> module -> {"down", "up", "scale"} of one LoRA file, checked against the model's modules
    (`modules[component]` from `targets`). One error lists every key that matches no layer and every
    unsupported or inconsistent factor."""
    problems, unmatched = [], []
    for pattern, what in _UNSUPPORTED:
        hits = sorted(k for k in tensors if re.search(pattern, k))
        if hits:
            problems.append(f"{what}: {hits[:3]}{' ...' if len(hits) > 3 else ''}")
    if problems:
        raise CheckpointError("This LoRA cannot be loaded: " + "; ".join(problems) + ".")
    _check_architecture(tensors, modules)
    flats = {c: _flat_names(modules[c], c) for c in modules}
    found: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for key, value in tensors.items():
        component, written, role = _split(key)
        candidates = [component] if component else [c for c in COMPONENTS if c in modules]
        module = None
        for c in candidates:
            if c in modules and (module := _module(c, written, flats[c], modules[c])) is not None:
                component = c
                break
        if role is None or module is None:
            unmatched.append(key)
            continue
        found.setdefault(component, {}).setdefault(module, {})[role] = value
    if unmatched:
        shown = sorted(unmatched)[:20] + ([f"... and {len(unmatched) - 20} more"] if len(unmatched) > 20 else [])
        raise CheckpointError(
            f"{len(unmatched)} LoRA key(s) match no layer of this pipeline's " + " or ".join(modules) + ":\n    "
            + "\n    ".join(shown) + "\nIs the LoRA made for this architecture (Stable Diffusion 1.x/2.x or SDXL, "
            "with these block sizes)?")
    parsed = {c: {m: _factors(c, m, f, metadata, modules[c][m][1], problems) for m, f in mods.items()}
              for c, mods in found.items()}
    if problems:
        raise CheckpointError("This LoRA does not fit the model:\n    " + "\n    ".join(sorted(problems)))
    return parsed


_TEXT_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


def _is_sdxl(modules: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a pipeline's models are SDXL's: a second text encoder, or a UNet with size conditioning."""
    return "text_encoder_2" in modules or any(m.startswith("add_embedding.") for m in modules.get("unet", {}))


def _check_architecture(tensors: Mapping[str, np.ndarray], modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Name the family a LoRA was made for and this pipeline's when they differ: an SDXL LoRA (second text
    encoder or add-embedding keys) on a Stable Diffusion 1.x/2.x pipeline, or cross-attention keys of
    another text width than this UNet's (an SD 1.5 LoRA on SDXL, an SD 2.x LoRA on SD 1.5, ...)."""
    ours_sdxl, theirs_sdxl = _is_sdxl(modules), any(re.search(_SDXL_KEYS, k) for k in tensors)
    ours = next((shape[-2] for m, (_, shape) in modules.get("unet", {}).items() if m.endswith("attn2.to_k")), None)
    theirs = next((int(v.shape[1]) for k, v in tensors.items() if re.search(r"attn2[._]to_k", k)
                   and _split(k)[2] == "down" and v.ndim == 2), None)
    our_name = _TEXT_WIDTHS.get(ours) or ("SDXL" if ours_sdxl else "Stable Diffusion 1.x/2.x")
    if theirs_sdxl and not ours_sdxl:
        hits = sorted(k for k in tensors if re.search(_SDXL_KEYS, k))
        raise CheckpointError(
            f"This is an SDXL LoRA (keys for SDXL's second text encoder or size embedding, e.g. {hits[0]}); this "
            f"pipeline is {our_name} (one text encoder). Use a LoRA made for this model, or an SDXL pipeline.")
    if ours is not None and theirs is not None and theirs != ours:
        their_name = _TEXT_WIDTHS.get(theirs) or ("SDXL" if theirs_sdxl else "another model")
        raise CheckpointError(
            f"This LoRA was made for a UNet with {theirs}-wide text embeddings ({their_name}); this pipeline's "
            f"takes {ours} ({our_name}). Use a LoRA made for this model.")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _factors(component: str, module: str, f: Mapping[str, np.ndarray], metadata: Mapping[str, Any],
             kernel_shape: Tuple[int, ...], problems: List[str]) -> Dict[str, Any]:
    """One layer's factors in the kernel's layout and its scale (alpha / rank), or a problem recorded."""
    name = f"{component}.{module}"
    if "down" not in f or "up" not in f:
        problems.append(f"{name}: has {sorted(f)} but needs both the down (A) and up (B) factors")
        return {}
    down, up = np.asarray(f["down"], np.float32), np.asarray(f["up"], np.float32)
    rank = down.shape[0]
    if up.ndim not in (2, 4) or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        problems.append(f"{name}: up factor {list(up.shape)} does not fit the down factor's rank {rank} "
                        "(expected [out, rank] or [out, rank, 1, 1])")
        return {}
    down_k = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.T  # [..., in, rank]
    want = tuple(kernel_shape[:-1]) + (rank,)
    if down_k.shape != want and down_k.size == int(np.prod(want)) and down_k.shape[-2:] == want[-2:]:
        down_k = down_k.reshape(want)  # a 1x1 conv LoRA on a dense layer, or the reverse
    up_k = up.reshape(up.shape[0], rank).T  # [rank, out]
    if down_k.shape != want or up_k.shape[1] != kernel_shape[-1]:
        problems.append(f"{name}: LoRA factors down {list(down.shape)} / up {list(up.shape)} do not fit the layer's "
                        f"weight (Flax kernel {list(kernel_shape)})")
        return {}
    config = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(component + ".")}
    if "alpha" in f:
        alpha, r = float(np.asarray(f["alpha"]).reshape(())), rank
    elif config:
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
        if r != rank:
            problems.append(f"{name}: the metadata gives rank {r} but the factors have rank {rank}")
            return {}
    else:
        alpha = r = rank  # diffusers / PEFT without a config: W + B @ A
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {"down": down_k, "up": up_k, "scale": np.float32(scale)}


# ----------------------------------------------------------------------------- the params API

def _lora(params) -> Dict[str, Any]:
    return params.get("lora") or {"adapters": {}, "state": {}}


def _with(params, lora: Mapping[str, Any]):
    return {**params, "lora": dict(lora)}


def load_lora(params: Mapping[str, Any], source: Source, adapter_name: Optional[str] = None,
              weight_name: Optional[str] = None) -> Dict[str, Any]:
    """New params with the LoRA of `source` as adapter `adapter_name` (default "default_<n>"), active with
    weight 1 next to the adapters already active; `params` is left as it is."""
    lora = _lora(params)
    name = adapter_name or f"default_{len(lora['state'])}"
    if name in lora["state"]:
        raise ValueError(f"adapter_name={name!r} is already loaded; pick another name or delete_adapters it first.")
    tensors, metadata = read_lora(source, weight_name)
    modules = {c: targets(params[c]) for c in COMPONENTS if c in params}
    parsed = parse(tensors, metadata, modules)
    adapters = {c: {"/".join(modules[c][m][0][:-1]): jax.tree_util.tree_map(jnp.asarray, f) for m, f in mods.items()}
                for c, mods in parsed.items()}
    state = {c: _scalars(weight=1.0, active=1.0) for c in adapters}
    return _with(params, {**lora, "adapters": {**lora["adapters"], name: adapters},
                          "state": {**lora["state"], name: state}})


def _scalars(**values) -> Dict[str, jax.Array]:
    return {k: jnp.float32(v) for k, v in values.items()}


def list_adapters(params) -> Dict[str, List[str]]:
    """component -> names of the adapters loaded into it, fused or not (diffusers' get_list_adapters)."""
    out: Dict[str, List[str]] = {}
    for name, comps in _lora(params)["state"].items():
        for component in comps:
            out.setdefault(component, []).append(name)
    return out


def active_adapters(params) -> List[str]:
    """The names of the active adapters, in loading order (fused ones included, as in diffusers)."""
    return [n for n, comps in _lora(params)["state"].items() if any(float(s["active"]) for s in comps.values())]


def set_adapters(params, adapter_names: Union[str, Sequence[str]],
                 adapter_weights: Union[None, float, Mapping[str, float], Sequence[Any]] = None) -> Dict[str, Any]:
    """Activate exactly `adapter_names` with `adapter_weights`: one number (or None: 1.0) for all, one per adapter,
    or per adapter a dict {"unet": w, "text_encoder": w, "text_encoder_2": w} (a missing component gets 1.0). The
    weights are traced values of the sampling program: changing them does not recompile."""
    lora = _lora(params)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter_names but {len(weights)} adapter_weights; give one weight per adapter "
                         "or a single one for all.")
    missing = [n for n in names if n not in lora["state"]]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded: {list(lora['state'])}.")
    chosen = dict(zip(names, weights))
    for name, given in chosen.items():
        if isinstance(given, Mapping) and set(given) - set(COMPONENTS):
            raise ValueError(f"adapter_weights for {name!r} names {sorted(set(given) - set(COMPONENTS))}; the "
                             f"components are {list(COMPONENTS)}.")
    state = {}
    for name, comps in lora["state"].items():
        given = chosen.get(name)
        state[name] = {}
        for component, s in comps.items():
            w = given.get(component) if isinstance(given, Mapping) else given
            state[name][component] = {**s, "weight": jnp.float32(1.0 if w is None else w),
                                      "active": jnp.float32(name in chosen)}
    return _with(params, {**lora, "state": state})


def delete_adapters(params, adapter_names: Union[str, Sequence[str]]) -> Dict[str, Any]:
    """Params without these adapters (unfuse first if they are fused)."""
    lora = _lora(params)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in lora["state"]]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded: {list(lora['state'])}.")
    fused = [n for n in names if lora.get("fused", {}).get(n)]
    if fused:
        raise ValueError(f"adapters {fused} are fused into the weights; unfuse_lora first, then delete them.")
    keep = lambda d: {k: v for k, v in d.items() if k not in names}  # noqa: E731
    out = {**lora, "adapters": keep(lora["adapters"]), "state": keep(lora["state"])}
    if not out["state"]:
        return {k: v for k, v in params.items() if k != "lora"}
    return _with(params, out)


def _deltas(lora, component: str, coefficient) -> Dict[str, jax.Array]:
    """module -> sum over adapters of coefficient(adapter state) * scale * down @ up, in fp32."""
    out: Dict[str, jax.Array] = {}
    for name, adapters in lora["adapters"].items():
        for module, f in adapters.get(component, {}).items():
            c = coefficient(lora["state"][name][component]) * f["scale"]
            delta = c * jnp.einsum("...r,ro->...o", f["down"].astype(jnp.float32), f["up"].astype(jnp.float32))
            out[module] = delta if module not in out else out[module] + delta
    return out


def _add(tree, deltas: Mapping[str, jax.Array]):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for module, delta in deltas.items():
        path = tuple(module.split("/")) + ("kernel",)
        kernel = flat[path]
        flat[path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def merge_adapters(params, scale: Optional[jax.Array] = None) -> Dict[str, Any]:
    """The params the models run with: every unfused adapter added to its kernels at weight * active (traceable;
    the sampling program calls it first), times `scale` if given (cross_attention_kwargs={"scale": s}: diffusers'
    LoRA scale, for the UNet's and the text encoders' adapters alike). Params without adapters pass through."""
    if "lora" not in params:
        return params
    lora, out = params["lora"], {k: v for k, v in params.items() if k != "lora"}
    def coefficient(s):
        return s["weight"] * s["active"] if scale is None else s["weight"] * s["active"] * scale

    for component in COMPONENTS:
        deltas = _deltas(lora, component, coefficient)
        if deltas:
            out[component] = _add(out[component], deltas)
    return out


def _move(tree: Mapping[str, Mapping[str, Any]], names: Sequence[str], components: Sequence[str]):
    """(tree without the (name, component) parts listed, those parts)."""
    kept, moved = {}, {}
    for name, comps in tree.items():
        for component, part in comps.items():
            target = moved if name in names and component in components else kept
            target.setdefault(name, {})[component] = part
    return {n: kept.get(n, {}) for n in tree if n in kept or n not in names}, moved


def _merge_trees(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]]):
    out = {n: dict(c) for n, c in a.items()}
    for name, comps in b.items():
        out.setdefault(name, {}).update(comps)
    return out


def fuse_lora(params, lora_scale: float = 1.0, components: Sequence[str] = COMPONENTS,
              adapter_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write the active (or the named) adapters, at their weights times `lora_scale`, into the kernels of
    `components`; the kernels before the first fuse are kept for `unfuse_lora`."""
    if "lora" not in params:
        raise ValueError("No LoRA adapters are loaded: load_lora_weights first.")
    lora = params["lora"]
    names = list(adapter_names) if adapter_names is not None else active_adapters(params)
    missing = [n for n in names if n not in lora["state"]]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded: {list(lora['state'])}.")
    live, chosen = _move(lora["adapters"], names, components)
    out = dict(params)
    originals = {c: dict(m) for c, m in lora.get("originals", {}).items()}
    for component in components:
        deltas = _deltas({"adapters": chosen, "state": lora["state"]}, component,
                         lambda s: lora_scale * s["weight"])
        if not deltas:
            continue
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params[component]))
        saved = originals.setdefault(component, {})
        for module in deltas:
            saved.setdefault(module, flat[tuple(module.split("/")) + ("kernel",)])
        out[component] = jax.jit(_add)(params[component], deltas)
    fused = _merge_trees(lora.get("fused", {}), chosen)
    return _with(out, {**lora, "adapters": live, "fused": fused, "originals": originals})


def unfuse_lora(params, components: Sequence[str] = COMPONENTS) -> Dict[str, Any]:
    """Put back the kernels `fuse_lora` replaced in `components` (exactly) and make their adapters live again."""
    if "lora" not in params:
        return params
    lora = params["lora"]
    out = dict(params)
    for component in components:
        saved = lora.get("originals", {}).get(component)
        if saved:
            flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params[component]))
            flat.update({tuple(m.split("/")) + ("kernel",): k for m, k in saved.items()})
            out[component] = flax.traverse_util.unflatten_dict(flat)
    still, back = _move(lora.get("fused", {}), list(lora["state"]), components)
    new = {**lora, "adapters": _merge_trees(lora["adapters"], back),
           "fused": {n: c for n, c in still.items() if c},
           "originals": {c: m for c, m in lora.get("originals", {}).items() if c not in components}}
    return _with(out, {k: v for k, v in new.items() if k in ("adapters", "state") or v})


class LoraLoaderMixin:
    """`load_lora_weights`, `set_adapters`, `fuse_lora`, ... on a pipeline: diffusers' API, with params passed
    in and returned (the pipeline object does not change)."""

    def load_lora_weights(self, params, path_or_state_dict: Source, adapter_name: Optional[str] = None,
                          weight_name: Optional[str] = None):
        """New params with a LoRA for the UNet and/or text encoder(s) (see `flax_inpaint.loaders.lora` for the
        formats; SDXL pipelines, whose params have "text_encoder_2", take SDXL LoRAs). Several adapters may be
        loaded; each starts active with weight 1."""
        return load_lora(params, path_or_state_dict, adapter_name, weight_name)

    def set_adapters(self, params, adapter_names, adapter_weights=None):
        """New params where exactly `adapter_names` are active with `adapter_weights` (no recompilation)."""
        return set_adapters(params, adapter_names, adapter_weights)

    def fuse_lora(self, params, lora_scale: float = 1.0, components: Sequence[str] = COMPONENTS,
                  adapter_names: Optional[Sequence[str]] = None):
        """New params with the active adapters written into the weights (times `lora_scale`)."""
        return fuse_lora(params, lora_scale, components, adapter_names)

    def unfuse_lora(self, params, components: Sequence[str] = COMPONENTS):
        """New params with the weights as before `fuse_lora`, bit for bit."""
        return unfuse_lora(params, components)

    def get_active_adapters(self, params) -> List[str]:
        return active_adapters(params)

    def get_list_adapters(self, params) -> Dict[str, List[str]]:
        return list_adapters(params)

    def delete_adapters(self, params, adapter_names):
        """New params without these adapters."""
        return delete_adapters(params, adapter_names)
