"""Converting PyTorch state dicts and reference Flax params onto our Flax params, checked, and back.

Conversion is mechanical because Flax module names mirror the PyTorch attribute names:

  torch key                                   Flax path
  down_blocks.0.resnets.1.conv1.weight   ->   down_blocks_0/resnets_1/conv1/kernel   (OIHW -> HWIO)
  ...to_q.weight                         ->   .../to_q/kernel                        (out,in -> in,out)
  ...norm1.weight                        ->   .../norm1/scale

Each model may first canonicalise legacy key names (its `torch_rename`). Every source tensor must be
used, every target leaf filled and every shape must match, otherwise one error lists them all.

Flax msgpack files written by diffusers' and transformers' Flax `save_pretrained` hold Flax params named
almost like ours; the few path fragments that differ are an explicit table per model (its `flax_names`,
e.g. transformers' `layers/3` for our `layers_3`), and they are checked the same way.
Reading the files is `flax_inpaint.io`'s job.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import numpy as np

from flax_inpaint.io import CheckpointError

Params = Dict[str, Any]

# Names of list-valued submodules: torch `name.3` <-> Flax `name_3`.
LIST_MODULES = frozenset(
    {
        "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
        "upsamplers", "to_out", "net", "layers", "blocks", "controlnet_down_blocks",
    }
)


def _flax_path(torch_key: str) -> Tuple[str, ...]:
    parts = torch_key.split(".")
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)


def _torch_key(path: Tuple[str, ...]) -> str:
    parts = []
    for p in path:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        parts.append(f"{m[1]}.{m[2]}" if m and m[1] in LIST_MODULES else p)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts[:-1] + [leaf])


def _to_flax(value: np.ndarray, leaf: str, target_shape: Tuple[int, ...]) -> np.ndarray:
    """The named transform that maps a torch tensor onto a Flax leaf (only kernels change layout)."""
    if leaf != "kernel":
        return value
    if value.ndim == 4 and len(target_shape) == 4:  # conv: OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):  # 1x1 conv -> dense
        return value[:, :, 0, 0].T
    if value.ndim == 2 and len(target_shape) == 4:  # linear -> 1x1 conv
        return value.T[None, None]
    return value.T  # linear: (out, in) -> (in, out)


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    target: Mapping[Tuple[str, ...], Any],
    rename: Callable[[str], Optional[str]] = lambda k: k,
) -> Params:
    """Map a PyTorch state dict onto the Flax leaves in `target` (flat path -> ShapeDtypeStruct).

    `rename` canonicalises a torch key (return None to drop a known-unused buffer). Raises
    CheckpointError listing unused source keys, unfilled targets and shape mismatches.
    """
    filled: Dict[Tuple[str, ...], np.ndarray] = {}
    unused, mismatched = [], []
    for key, value in state.items():
        canon = rename(key)
        if canon is None:
            continue
        base = _flax_path(canon)
        if base[-1] == "weight":
            candidates = [base[:-1] + (leaf,) for leaf in ("kernel", "scale", "embedding")]
        else:
            candidates = [base]
        path = next((c for c in candidates if c in target), None)
        if path is None:
            unused.append(key)
            continue
        shape = tuple(target[path].shape)
        arr = _to_flax(np.asarray(value), path[-1], shape)
        if arr.shape != shape:
            mismatched.append(f"{key} {list(value.shape)} -> {'/'.join(path)} expects {list(shape)}")
            continue
        filled[path] = arr
    return _complete(filled, target, unused, mismatched)


def _complete(
    filled: Dict[Tuple[str, ...], np.ndarray],
    target: Mapping[Tuple[str, ...], Any],
    unused: Sequence[str],
    mismatched: Sequence[str],
) -> Params:
    """The params tree of `filled`, or one CheckpointError listing every problem of the conversion."""
    missing = sorted("/".join(p) for p in target if p not in filled)
    if unused or missing or mismatched:
        lines = ["The checkpoint does not match the model configuration:"]
        for title, items in (
            ("shape mismatches", mismatched),
            ("checkpoint tensors with no place in the model", sorted(unused)),
            ("model parameters missing from the checkpoint", missing),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown))
        lines.append("Check that config.json belongs to these weights.")
        raise CheckpointError("\n".join(lines))
    return flax.traverse_util.unflatten_dict(filled)


def _fragment(template: str) -> re.Pattern:
    """A path fragment such as "layers/{n}" as a regex matching whole "/"-separated names."""
    body = re.escape(template).replace(re.escape("{n}"), r"(\d+)")
    return re.compile(rf"(?<![^/]){body}(?![^/])")


def rename_flax_path(
    path: Tuple[str, ...], names: Sequence[Tuple[str, str]], to_reference: bool = False
) -> Tuple[str, ...]:
    """Map a Flax param path from the reference Flax libraries' names to ours (or back, `to_reference`).

    `names` pairs a reference path fragment with ours, e.g. ("layers/{n}", "layers_{n}") where `{n}`
    stands for a number. Paths with none of the fragments (ours, or names both sides share) are unchanged.
    """
    joined = "/".join(path)
    for reference, ours in names:
        source, dest = (ours, reference) if to_reference else (reference, ours)
        joined = _fragment(source).sub(dest.replace("{n}", r"\1"), joined)
    return tuple(joined.split("/"))


def convert_flax_params(
    flat: Mapping[Tuple[str, ...], np.ndarray],
    target: Mapping[Tuple[str, ...], Any],
    names: Sequence[Tuple[str, str]] = (),
) -> Params:
    """Map flat Flax params, named by diffusers'/transformers' Flax models or by us, onto `target`.

    Raises CheckpointError listing unused source arrays, unfilled targets and shape mismatches.
    """
    filled: Dict[Tuple[str, ...], np.ndarray] = {}
    unused, mismatched = [], []
    for source, value in flat.items():
        path = rename_flax_path(source, names)
        if path not in target:
            unused.append("/".join(source))
            continue
        shape = tuple(target[path].shape)
        if tuple(np.shape(value)) != shape:
            mismatched.append(f"{'/'.join(source)} {list(np.shape(value))} -> {'/'.join(path)} expects {list(shape)}")
            continue
        filled[path] = np.asarray(value)
    return _complete(filled, target, unused, mismatched)


def to_torch_state_dict(params: Params) -> Dict[str, np.ndarray]:
    """Inverse of `convert_state_dict`: Flax params -> PyTorch (diffusers-named) tensors."""
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[_torch_key(path)] = value
    return out

