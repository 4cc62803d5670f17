"""Reading diffusers/transformers checkpoint folders and converting them to Flax params, checked.

Conversion is mechanical because Flax module names mirror the PyTorch attribute names:

  torch key                                   Flax path
  down_blocks.0.resnets.1.conv1.weight   ->   down_blocks_0/resnets_1/conv1/kernel   (OIHW -> HWIO)
  ...to_q.weight                         ->   .../to_q/kernel                        (out,in -> in,out)
  ...norm1.weight                        ->   .../norm1/scale

Each model may first canonicalise legacy key names (`torch_rename`). Every source tensor must be
used, every target leaf filled and every shape must match, otherwise one error lists them all.

Flax msgpack files written by diffusers' and transformers' Flax `save_pretrained` hold Flax params named
almost like ours; the few path fragments that differ are an explicit table per model (`flax_names`, e.g.
transformers' `layers/3` for our `layers_3`), and they are checked the same way.

A folder's weights are read from the first of these that exists (see `find_weight_files`): the Flax
msgpack (as diffusers' Flax `from_pretrained` reads it; `from_pt=True` skips it), then safetensors, then
pickled PyTorch files (.bin, .pt, .ckpt).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flax_inpaint.diffusers_compat import FrozenConfig
from flax_inpaint.runtime import Runtime

Params = Dict[str, Any]
_CACHE_ENV = "FLAX_INPAINT_CACHE"

# Names of list-valued submodules: torch `name.3` <-> Flax `name_3`.
LIST_MODULES = frozenset(
    {
        "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
        "upsamplers", "to_out", "net", "layers", "blocks", "controlnet_down_blocks",
    }
)


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not fit the model."""


# ----------------------------------------------------------------------------- safetensors I/O

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors(path: os.PathLike) -> Dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays (bf16 included), validating its layout."""
    path = Path(path)
    size = path.stat().st_size
    fix = f"The file is corrupt or truncated; download or save {path.name} again."
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file. {fix}")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds file size {size}. {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable header ({e}). {fix}") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed entry for tensor {name!r}. {fix}") from None
        if end > data.size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({info['dtype']}{list(shape)}) lies outside the data "
                f"section ({data.size} bytes). {fix}"
            )
        out[name] = np.array(data[begin:end].view(dtype).reshape(shape))
    return out


def write_bytes_atomic(path: os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_safetensors_atomic(path: os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    arrays = {
        k: np.ascontiguousarray(v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v)
        for k, v in tensors.items()
    }
    write_bytes_atomic(path, save(arrays))


# ----------------------------------------------------------------------------- folder resolution

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _looks_like_repo_id(name: str) -> bool:
    """True for the hub's "org/name" form; paths (absolute, ./, several slashes) and single words are not."""
    return _REPO_ID.fullmatch(name) is not None and not name.startswith(".")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300].rstrip('.') if lines else '(no message)'}"


def resolve_folder(
    path: os.PathLike | str,
    subfolder: Optional[str] = None,
    local_files_only: bool = False,
    revision: Optional[str] = None,
    **hub,
) -> Path:
    """A local folder as is; otherwise a hub repo id ("org/name") through `huggingface_hub.snapshot_download`
    (`hub`: its download options cache_dir, token, proxies, force_download; None means its default).

    A name that is not an existing folder and not of the org/name form (a single word, an absolute
    or ./ path, several slashes) never reaches the hub: the error names both readings.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        if not _looks_like_repo_id(name):
            raise CheckpointError(
                f"{name!r} does not exist as a local folder ({p.absolute()}), and it is not a hub repo id "
                "either (those have the form 'org/name')."
            )
        from huggingface_hub import snapshot_download

        try:
            p = Path(snapshot_download(name, revision=revision, local_files_only=local_files_only,
                                       **{k: v for k, v in hub.items() if v not in (None, False)}))
        except Exception as e:  # network, auth, unknown repo, or not in the local hub cache
            raise CheckpointError(
                f"{name!r} is not a local folder, and as a hub repo id it could not be fetched "
                f"(local_files_only={local_files_only}" + (f", revision={revision!r}" if revision else "")
                + f"): {_first_line(e)}."
            ) from e
    if not p.is_dir():
        raise CheckpointError(f"{name!r} is a file; pass the folder that holds the model, not a file in it.")
    if subfolder:
        if not (p / subfolder).is_dir():
            raise CheckpointError(f"{name!r} ({p}) has no subfolder {subfolder!r}.")
        p = p / subfolder
    return p


def read_config(folder: Path, name: str = "config.json") -> Dict[str, Any]:
    f = folder / name
    if not f.is_file():
        raise CheckpointError(f"{folder} has no {name}; is this a diffusers/transformers model folder?")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def _variant(filename: str, variant: Optional[str]) -> str:
    if not variant:
        return filename
    parts = filename.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


# Weight files in order of preference: the Flax msgpack (safe; what diffusers'/transformers' Flax
# save_pretrained and ours write, and what their Flax from_pretrained reads unless from_pt=True, so a
# Flax fine-tune saved beside the original PyTorch weights is the one loaded), then safetensors (safe,
# what diffusers and transformers write by default), then pickled PyTorch files, read only through
# torch.load(weights_only=True). The flag marks the Flax file stems.
WEIGHT_FORMATS = (("msgpack", True), ("safetensors", False), ("bin", False), ("pt", False), ("ckpt", False))


def _weight_names(stems: Sequence[str], flax_stems: Sequence[str], variant: Optional[str]):
    """(single file, shard index) names in order of preference."""
    for ext, flax_file in WEIGHT_FORMATS:
        for stem in flax_stems if flax_file else stems:
            yield _variant(f"{stem}.{ext}", variant), _variant(f"{stem}.{ext}.index.json", variant)


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
    return [index.parent / s for s in sorted(set(weight_map.values()))]


def find_weight_files(
    folder: Path, stems: Sequence[str], flax_stems: Sequence[str] = (), variant: Optional[str] = None
) -> list[Path]:
    """The weight files of `folder` in the first format of `WEIGHT_FORMATS` it has, shards included.

    `stems` name the PyTorch files (e.g. "diffusion_pytorch_model"), `flax_stems` the Flax msgpack
    files (e.g. "diffusion_flax_model"); a `variant` ("fp16") goes before the extension.
    """
    for single, index in _weight_names(stems, flax_stems, variant):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = _shards(folder / index)
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} names missing shard files: {missing}")
            return shards
    wanted = [_variant(f"{s}.safetensors", variant) for s in stems]
    wanted += [_variant(f"{s}.msgpack", variant) for s in flax_stems]
    raise CheckpointError(
        f"No weights in {folder}: expected one of {wanted} (or .bin/.pt, or a sharded index)"
        + (f" for variant={variant!r}" if variant else "")
        + "."
    )


def remove_weight_files(folder: Path, stems: Sequence[str], flax_stems: Sequence[str], keep: Sequence[Path]) -> None:
    """Delete the (non-variant) weight files `find_weight_files` could read in `folder`, except `keep`:
    what an earlier save left there must not be loaded instead of, or before, a new save."""
    for single, index in _weight_names(stems, flax_stems, None):
        stale = [folder / single]
        if (folder / index).is_file():
            try:
                stale += _shards(folder / index)
            except CheckpointError:
                pass  # an unreadable index: remove it alone
            stale.append(folder / index)
        for f in stale:
            if f.is_file() and f not in keep:
                f.unlink()


def read_msgpack(files: Sequence[Path]) -> Dict[Tuple[str, ...], np.ndarray]:
    """The flat params (path -> array) of Flax msgpack files; shards of one checkpoint merge."""
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    for f in files:
        try:
            tree = flax.serialization.msgpack_restore(f.read_bytes())
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt msgpack params ({e}); download or save it again.") from e
        if not isinstance(tree, dict):
            raise CheckpointError(f"{f}: holds a {type(tree).__name__}, not a tree of Flax params.")
        flat.update(flax.traverse_util.flatten_dict(tree))
    return flat


def read_state_dict(files: Sequence[Path]) -> Dict[str, np.ndarray]:
    state: Dict[str, np.ndarray] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(read_safetensors(f))
            continue
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{f.name} is a pickled PyTorch file; install torch to read it, or convert the "
                "checkpoint to safetensors."
            ) from None
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{f}: cannot be read safely with torch.load(weights_only=True) ({e}). "
                "Re-save it as safetensors."
            ) from e
        sd = sd.get("state_dict", sd)
        state.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()})
    return state


# ----------------------------------------------------------------------------- conversion

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


# ----------------------------------------------------------------------------- model mixin

def _fingerprint(files: Sequence[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "flax_inpaint"))


class PretrainedMixin:
    """`from_config` / `from_pretrained` / `init_weights` / `save_pretrained` for our linen models.

    A model class declares:
      torch_class: the diffusers/transformers class name written to config.json.
      weight_stems: file stems of its PyTorch weights (e.g. "diffusion_pytorch_model").
      flax_weight_stems: file stems of its Flax msgpack weights; the first is what diffusers' (or
        transformers') Flax save_pretrained writes, and what we write.
      flax_names: (reference Flax name, ours) pairs of the param path fragments that diffusers'
        or transformers' Flax model of this family names differently from us (see rename_flax_path).
      ignored_config_keys: config keys that do not change the computation.
      fixed_config: architecture keys we do not implement, with the values we accept.
      dummy_inputs(): example inputs for `init`.
      torch_rename(key): canonical torch key, or None for a buffer to skip.
    """

    torch_class: ClassVar[str] = ""
    weight_stems: ClassVar[Tuple[str, ...]] = ("diffusion_pytorch_model",)
    flax_weight_stems: ClassVar[Tuple[str, ...]] = ("diffusion_flax_model", "flax_model")
    flax_names: ClassVar[Tuple[Tuple[str, str], ...]] = ()
    ignored_config_keys: ClassVar[frozenset] = frozenset()
    fixed_config: ClassVar[Mapping[str, Tuple[Any, ...]]] = {}
    _always_ignored = frozenset(
        {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
         "transformers_version", "architectures", "torch_dtype", "dtype"}
    )

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def config_fields(cls) -> Tuple[str, ...]:
        return tuple(
            f.name for f in dataclasses.fields(cls) if f.name not in ("runtime", "parent", "name")
        )

    @property
    def config(self) -> FrozenConfig:
        return FrozenConfig({k: getattr(self, k) for k in self.config_fields()})

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, return_unused_kwargs: bool = False, *,
                    runtime: Optional[Runtime] = None, **kwargs):
        """Build the module from a diffusers/transformers config dict, validating its keys.

        Like diffusers: keyword arguments that are config keys override `config`; `dtype` (and our
        `param_dtype`, `attention`) set the Runtime unless `runtime` is given; `return_unused_kwargs=True`
        returns (model, the other keyword arguments), which otherwise raise.
        """
        if config is None or not isinstance(config, Mapping):
            why = " (load_config(path) reads one)" if "pretrained_model_name_or_path" in kwargs else ""
            raise TypeError(f"{cls.__name__}.from_config takes a config dict{why}; got {type(config).__name__}.")
        if not isinstance(return_unused_kwargs, bool):
            raise TypeError(f"{cls.__name__}.from_config's second argument is return_unused_kwargs (a bool, as in "
                            f"diffusers); got {type(return_unused_kwargs).__name__}. Pass runtime=... by keyword.")
        fields = set(cls.config_fields())
        runtime_keys = {f.name for f in dataclasses.fields(Runtime)}
        runtime_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in runtime_keys}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields or k in cls.fixed_config}
        if kwargs and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.from_config got unexpected keyword arguments {sorted(kwargs)}; it "
                            f"takes config keys and {sorted(runtime_keys)}.")
        kwargs_out, unknown, unsupported = {}, [], []
        for key, value in {**config, **overrides}.items():
            if key in fields:
                kwargs_out[key] = tuple(value) if isinstance(value, list) else value
            elif key in cls.fixed_config:
                if value not in cls.fixed_config[key]:
                    unsupported.append(f"{key}={value!r} (supported: {cls.fixed_config[key]})")
            elif key not in cls.ignored_config_keys and key not in cls._always_ignored:
                unknown.append(key)
        if unsupported:
            raise ValueError(
                f"{cls.__name__} does not implement these config values, which change the "
                f"architecture: {', '.join(unsupported)}."
            )
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)}.")
        model = cls(**kwargs_out, runtime=runtime or Runtime(**runtime_kwargs))
        return (model, kwargs) if return_unused_kwargs else model

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        return key

    def dummy_inputs(self) -> Tuple[Any, ...]:
        raise NotImplementedError

    # -- params ---------------------------------------------------------------------------------
    def init_weights(self, rng: jax.Array) -> Params:
        """Randomly initialised params (on the default device), in runtime.param_dtype."""
        return jax.jit(lambda r: self.init(r, *self.dummy_inputs())["params"])(rng)

    def param_shapes(self) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
        shapes = jax.eval_shape(lambda r: self.init(r, *self.dummy_inputs())["params"], jax.random.key(0))
        return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))

    def convert_torch_state_dict(self, state: Mapping[str, np.ndarray]) -> Params:
        return convert_state_dict(state, self.param_shapes(), self.torch_rename)

    def convert_flax_params(self, flat: Mapping[Tuple[str, ...], np.ndarray]) -> Params:
        """Flat Flax params named by diffusers'/transformers' Flax models (or by us) -> our params, checked."""
        return convert_flax_params(flat, self.param_shapes(), self.flax_names)

    def _check_tree(self, params: Params, source: str) -> Params:
        shapes = self.param_shapes()
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        bad = sorted(
            "/".join(p) for p in set(shapes) ^ set(flat)
        ) + sorted(
            f"{'/'.join(p)} {list(flat[p].shape)} != {list(shapes[p].shape)}"
            for p in set(shapes) & set(flat)
            if tuple(flat[p].shape) != tuple(shapes[p].shape)
        )
        if bad:
            raise CheckpointError(
                f"{source} does not fit {type(self).__name__} with this config: "
                + ", ".join(bad[:20])
            )
        return params

    def _cast(self, params: Params) -> Params:
        dt = self.runtime.param_dtype
        return jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, dt) if jnp.issubdtype(np.asarray(x).dtype, np.floating) else jnp.asarray(x),
            params,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: os.PathLike | str,
        dtype: Any = jnp.float32,
        *,
        subfolder: Optional[str] = None,
        param_dtype: Any = jnp.float32,
        attention: str = "auto",
        variant: Optional[str] = None,
        from_pt: bool = False,
        config: Optional[Mapping[str, Any]] = None,
        params_cache_dir: Optional[os.PathLike] = None,
        use_cache: bool = True,
        local_files_only: bool = False,
        revision: Optional[str] = None,
        cache_dir: Optional[os.PathLike] = None,
        force_download: bool = False,
        proxies: Optional[dict] = None,
        token: Any = None,
    ):
        """Load `(model, params)` from a local diffusers/transformers folder (or a hub repo id).

        The weights come from the first format the folder has (`WEIGHT_FORMATS`): the Flax msgpack that
        diffusers'/transformers' Flax `save_pretrained` (and ours) write, then safetensors, then pickled
        PyTorch files (only through `torch.load(weights_only=True)`); `from_pt=True` skips the Flax
        msgpack, as in diffusers. A hub `revision` (e.g. "flax", the branch where hub repos keep Flax weights) selects the
        snapshot. Flax params load directly; PyTorch weights are converted, and the converted params are
        cached as msgpack under `params_cache_dir` ($FLAX_INPAINT_CACHE, default ~/.cache/flax_inpaint)
        so the next load skips conversion. `config` replaces the folder's config.json; `cache_dir`,
        `force_download`, `proxies` and `token` are huggingface_hub's download options, as in diffusers.
        """
        hub = dict(cache_dir=cache_dir, force_download=force_download, proxies=proxies, token=token)
        folder = resolve_folder(pretrained_model_name_or_path, subfolder, local_files_only, revision, **hub)
        model = cls.from_config(
            read_config(folder) if config is None else config,
            runtime=Runtime(dtype=dtype, param_dtype=param_dtype, attention=attention),
        )
        files = find_weight_files(folder, cls.weight_stems, () if from_pt else cls.flax_weight_stems, variant)
        if files[0].suffix == ".msgpack":
            return model, model._cast(model.convert_flax_params(read_msgpack(files)))
        cache = None
        if use_cache:
            key = _fingerprint(files, f"{cls.__name__}|{json.dumps(model.config, default=str)}")
            cache = Path(params_cache_dir or default_cache_dir()) / f"{cls.__name__}-{key}.msgpack"
            if cache.is_file():
                try:
                    return model, model._cast(model.convert_flax_params(read_msgpack([cache])))
                except CheckpointError:
                    cache.unlink(missing_ok=True)  # stale or damaged cache entry: rebuild it
        params = model.convert_torch_state_dict(read_state_dict(files))
        if cache is not None:
            write_bytes_atomic(cache, flax.serialization.msgpack_serialize(params))
        return model, model._cast(params)

    @classmethod
    def from_single_file(
        cls,
        path: os.PathLike | str,
        config: Optional[os.PathLike | str] = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attention: str = "auto",
        **overrides,
    ):
        """Load `(model, params)` from a single file in the original Stable Diffusion layout (a whole
        pipeline's file, or a standalone UNet/VAE/ControlNet file); see `flax_inpaint.loaders.single_file`.
        `config`: a local diffusers folder of the same architecture; `overrides`: image_size, num_in_channels."""
        from flax_inpaint.loaders.single_file import load_model

        return load_model(cls, path, config, runtime=Runtime(dtype, param_dtype, attention), **overrides)

    def save_pretrained(self, save_directory: os.PathLike, params: Params, is_main_process: bool = True,
                        push_to_hub: bool = False, *, pytorch_format: bool = False, **kwargs) -> None:
        """Write config.json and the params as a Flax msgpack (and, optionally, PyTorch safetensors).

        The msgpack is what diffusers' (UNet, VAE, ControlNet: `diffusion_flax_model.msgpack`) or
        transformers' (CLIP, safety checker: `flax_model.msgpack`) Flax `save_pretrained(params=...)`
        writes, with their param names, so their Flax `from_pretrained` loads it too.
        `pytorch_format=True` also writes `<stem>.safetensors` with diffusers/transformers names,
        loadable by PyTorch (our loader reads it with `from_pt=True`). Every file is written atomically; weight files
        of an earlier save that this one does not rewrite are removed, so the folder loads what was saved.
        Only the main process writes (`is_main_process=False` on the others of a multi-host job).
        """
        if push_to_hub or kwargs:
            from flax_inpaint.diffusers_compat import PUSH_TO_HUB

            raise ValueError(f"save_pretrained(push_to_hub=True, {', '.join(kwargs)}) is not provided: {PUSH_TO_HUB}")
        if not is_main_process:
            return
        folder = Path(save_directory)
        params = self._check_tree(jax.device_get(params), "params")
        config = {"_class_name": self.torch_class, **self.config}
        if self.weight_stems[0] == "model":  # transformers-style folder
            config = {"architectures": [self.torch_class], **self.config}
            if "model_type" in self.fixed_config:  # transformers' Auto* classes dispatch on it
                config["model_type"] = self.fixed_config["model_type"][0]
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        reference = {rename_flax_path(p, self.flax_names, to_reference=True): v for p, v in flat.items()}
        written = {folder / f"{self.flax_weight_stems[0]}.msgpack": flax.traverse_util.unflatten_dict(reference)}
        if pytorch_format:
            written[folder / f"{self.weight_stems[0]}.safetensors"] = to_torch_state_dict(params)
        if folder.is_dir():
            remove_weight_files(folder, self.weight_stems, self.flax_weight_stems, keep=list(written))
        write_bytes_atomic(folder / "config.json", json.dumps(config, indent=2, default=list).encode())
        for file, tree in written.items():
            if file.suffix == ".msgpack":
                write_bytes_atomic(file, flax.serialization.msgpack_serialize(tree))
            else:
                write_safetensors_atomic(file, tree)
