"""The shared pieces of diffusers' Flax API surface: config dicts read by attribute, output classes that
index like diffusers' `BaseOutput`, and named errors for the parts of that API we do not provide.

tests/test_diffusers_api.py walks diffusers 0.39's Flax API entry by entry; whatever is not here on
purpose raises `NotProvidedError` / AttributeError saying why and what to use instead, never a bare
"has no attribute".
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Union

from flax_inpaint.io import read_config, resolve_file, write_bytes_atomic


class FrozenConfig(dict):
    """A config dict that also reads keys as attributes (`unet.config.sample_size`), like diffusers'
    FrozenDict. It is a snapshot: changing it does not change the object it describes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; it has {sorted(self)}.") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"config is read-only; build a new object with from_config(config, {name}=...).")


class BaseOutput:
    """Indexing of diffusers' output classes for our dataclass outputs: `out[0]`, `out["images"]`,
    `out.to_tuple()`. As in diffusers, fields that are None are skipped (out[0] is the first set one)."""

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, k):
        if isinstance(k, str):
            if k not in [f.name for f in dataclasses.fields(self)] or getattr(self, k) is None:
                raise KeyError(k)
            return getattr(self, k)
        return self.to_tuple()[k]


class NotProvidedError(ImportError):
    """A diffusers Flax name flax-inpaint does not provide; the message says why and what to use instead.

    An ImportError, so that `from flax_inpaint import X` shows the message (Python replaces an
    AttributeError from a module's `__getattr__` with a generic "cannot import name")."""


def missing_names(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that raises NotProvidedError for the diffusers names in `names` (name ->
    why and what to use instead) and the usual AttributeError for anything else."""

    def __getattr__(name: str):
        if name in names:
            raise NotProvidedError(f"{name} is not provided by flax-inpaint: {names[name]}", name=name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


class not_provided:
    """A class attribute standing for a diffusers method or attribute we do not provide: reading it
    (from the class or an instance) raises AttributeError with `message`, which says why and what to
    use instead, so `hasattr` stays False."""

    def __init__(self, message: str):
        self.message = message
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: Optional[type] = None):
        who = owner.__name__ if owner is not None else type(instance).__name__
        raise AttributeError(f"{who}.{self.name} is not provided by flax-inpaint: {self.message}")


# Shared wording for the hub upload methods of every saveable class.
PUSH_TO_HUB = ("save_pretrained writes a local folder; upload it with huggingface_hub.HfApi().upload_folder("
               "folder_path=..., repo_id=...).")


def config_json(class_name: str, config: Mapping[str, Any]) -> str:
    """A config as diffusers writes it: `_class_name` first, tuples as lists, sorted, indented."""
    payload: Dict[str, Any] = {"_class_name": class_name}
    payload.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


# diffusers' hub-client options that we do not take (download with huggingface_hub, then pass the folder).
_DOWNLOAD_OPTIONS_NOT_TAKEN = ("local_dir", "local_dir_use_symlinks", "mirror", "user_agent", "dduf_entries")


class ConfigMixin:
    """diffusers' ConfigMixin API over a class's `config` (a FrozenConfig) and `config_name` file."""

    config_name: ClassVar[str] = "config.json"
    ignore_for_config: ClassVar[Tuple[str, ...]] = ()  # constructor arguments that are not config keys
    has_compatibles: ClassVar[bool] = False

    register_to_config = not_provided(
        "a config is fixed when the object is built; build a new one with from_config(obj.config, key=value).")
    register_for_auto_class = not_provided("there are no Auto classes here; import the class itself.")
    extract_init_dict = not_provided("from_config(config) takes a config dict and checks its keys itself.")
    get_config_dict = not_provided("deprecated in diffusers too; use load_config.")

    @property
    def _config_class_name(self) -> str:
        raise NotImplementedError

    def to_json_string(self) -> str:
        """The config as the JSON diffusers writes (`_class_name` first)."""
        return config_json(self._config_class_name, self.config)

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        write_bytes_atomic(json_file_path, self.to_json_string().encode())

    def save_config(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> None:
        """Write `config_name` (e.g. config.json) into `save_directory`."""
        if push_to_hub or kwargs:
            raise ValueError(f"save_config(push_to_hub=True, {', '.join(kwargs)}) is not provided: {PUSH_TO_HUB}")
        self.to_json_file(Path(save_directory) / self.config_name)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: Union[str, os.PathLike], return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, *, subfolder: Optional[str] = None, cache_dir=None,
                    force_download: bool = False, proxies: Optional[dict] = None, token=None,
                    local_files_only: bool = False, revision: Optional[str] = None, **kwargs):
        """The `config_name` JSON of a folder (or its `subfolder`) or hub repo, as a dict.

        As in diffusers, `return_unused_kwargs=True` also returns the other keyword arguments (config
        overrides for `from_config`) and `return_commit_hash=True` the hub commit (None for a local folder).
        """
        taken = sorted(set(kwargs) & set(_DOWNLOAD_OPTIONS_NOT_TAKEN))
        if taken:
            raise TypeError(f"load_config does not take {taken}: download with huggingface_hub.snapshot_download("
                            "...) and pass the folder.")
        if kwargs and not return_unused_kwargs:
            raise TypeError(f"load_config got unexpected keyword arguments {sorted(kwargs)}.")
        file = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder,
                            local_files_only=local_files_only, revision=revision, cache_dir=cache_dir,
                            force_download=force_download or None, proxies=proxies, token=token)
        out: tuple = (read_config(file.parent, file.name),)
        if return_unused_kwargs:
            out += (kwargs,)
        if return_commit_hash:
            match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(file))
            out += (match[1] if match else None,)
        return out if len(out) > 1 else out[0]
