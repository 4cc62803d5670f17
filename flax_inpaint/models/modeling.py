"""The model mixins: loading, saving and configuring our linen models as diffusers/transformers ones.

`PretrainedMixin` holds `from_config` / `from_pretrained` / `init_weights` / `save_pretrained` over
`flax_inpaint.io` (files, folders, cache) and `conversion` (tensors onto params); `FlaxModelMixin` adds the
rest of diffusers' FlaxModelMixin and ConfigMixin surface. Every model here lists `FlaxModelMixin` as a
base before nn.Module.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.diffusers_compat import PUSH_TO_HUB, ConfigMixin, FrozenConfig, not_provided
from flax_inpaint.io import (
    CheckpointError,
    find_weight_files,
    params_cache_file,
    read_config,
    read_msgpack,
    read_state_dict,
    remove_weight_files,
    resolve_folder,
    write_bytes_atomic,
    write_safetensors_atomic,
)
from flax_inpaint.models.conversion import (
    Params,
    convert_flax_params,
    convert_state_dict,
    rename_flax_path,
    to_torch_state_dict,
)
from flax_inpaint.runtime import Runtime


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

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) or (isinstance(value, tuple) and any(isinstance(v, list) for v in value)):
                object.__setattr__(self, f.name, _frozen(value))  # before linen freezes the module
        super().__post_init__()

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
        """Randomly initialised params (on the default device), in runtime.param_dtype. The init program
        compiles once per model definition (config and runtime); see `_jitted_init`."""
        top_level, nested = _jitted_init(self)
        return (nested if isinstance(rng, jax.core.Tracer) else top_level)(rng)

    def param_shapes(self) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
        """{flat param path: shape and dtype} of this model (its config and runtime), traced once per model."""
        return dict(_param_shapes(self))

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
        cache = params_cache_file(files, cls.__name__, model.config, params_cache_dir) if use_cache else None
        if cache is not None and cache.is_file():
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


def _frozen(value: Any) -> Any:
    """Lists (also nested ones, as config.json holds them) as tuples, so a module stays hashable."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


# Linen modules are frozen dataclasses, equal and hashed by their fields (the config and the runtime), so
# these caches hold one entry per model definition: loading, converting, checking or initialising an
# equal model again neither traces nor compiles. The jitted inits, each holding its compiled program, are
# kept for a few models; the shapes, small, for more.
@functools.lru_cache(maxsize=8)
def _jitted_init(model: PretrainedMixin) -> Tuple[Callable, Callable]:
    """The model's init jitted for top-level calls, and for calls inside another trace (which JAX allows no
    compiler options). On a CPU the first compiles at XLA's backend optimisation level 1, which keeps the
    fused multiply-adds: the same params bit for bit as the default level (checked on the tiny test models in
    fp32 and bf16, and on SD1.5's VAE and text encoder) in 1.1-3.5x less compile time, running about as fast."""
    def init_params(rng):
        return model.init(rng, *model.dummy_inputs())["params"]

    options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    return jax.jit(init_params, compiler_options=options), jax.jit(init_params)


@functools.lru_cache(maxsize=128)
def _param_shapes(model: PretrainedMixin) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
    shapes = jax.eval_shape(_jitted_init(model)[0], jax.random.key(0))  # the trace init_weights reuses
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))


class FlaxModelMixin(PretrainedMixin, ConfigMixin):
    """diffusers' FlaxModelMixin: `model, params = Model.from_pretrained(...)`, `model.init_weights(rng)`,
    `model.to_bf16(params)`, `model.save_pretrained(folder, params)`, `model.config.<key>`.

    List it before nn.Module among a model's bases (its `__getattr__` must come first)."""

    config_name = "config.json"
    push_to_hub = not_provided(PUSH_TO_HUB)

    def __getattr__(self, name: str):
        # linen's Module.__getattr__ would replace a not_provided attribute's message with its own.
        for klass in type(self).__mro__:
            if isinstance(klass.__dict__.get(name), not_provided):
                klass.__dict__[name].__get__(self, type(self))  # raises, saying what to use instead
        return super().__getattr__(name)

    @property
    def _config_class_name(self) -> str:
        return self.torch_class

    @property
    def dtype(self) -> Any:
        """The activation dtype (`runtime.dtype`; diffusers' models take it as a field)."""
        return self.runtime.dtype

    def to_bf16(self, params: Params, mask: Any = None) -> Params:
        """The floating-point leaves of `params` cast to bfloat16 (a new tree). `mask`, a tree like
        `params` with bool leaves, limits the cast to the leaves marked True."""
        return _cast_floating(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Params, mask: Any = None) -> Params:
        """As `to_bf16`, to float16 (for GPUs; TPUs want bfloat16)."""
        return _cast_floating(params, jnp.float16, mask)

    def to_fp32(self, params: Params, mask: Any = None) -> Params:
        """As `to_bf16`, to float32."""
        return _cast_floating(params, jnp.float32, mask)


def _cast_floating(params: Params, dtype: Any, mask: Any) -> Params:
    def cast(leaf, selected=True):
        if selected and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            return jnp.asarray(leaf, dtype)
        return leaf

    if mask is None:
        return jax.tree_util.tree_map(cast, params)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_mask = flax.traverse_util.flatten_dict(flax.core.unfreeze(mask))
    if set(flat_mask) != set(flat):
        raise ValueError("mask must have the structure of params (one bool per parameter); "
                         f"{len(set(flat) ^ set(flat_mask))} paths differ.")
    return flax.traverse_util.unflatten_dict({k: cast(v, bool(flat_mask[k])) for k, v in flat.items()})
