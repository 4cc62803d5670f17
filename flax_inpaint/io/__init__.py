"""Checkpoint I/O, apart from the models: files, folders (local or on the hub), the converted-params cache.

  files    safetensors / Flax msgpack / safe pickle reading; atomic writes (outputs are never half-written)
  folders  a folder or hub repo id -> local folder; config files; weight files (formats, variants, shards)
  cache    where params converted from PyTorch weights are kept as msgpack

Converting the tensors read here onto a model's Flax params is model code: `flax_inpaint.models.conversion`.
"""
from flax_inpaint.io.cache import default_cache_dir, params_cache_file
from flax_inpaint.io.files import (
    CheckpointError,
    read_msgpack,
    read_safetensors,
    read_state_dict,
    write_bytes_atomic,
    write_safetensors_atomic,
)
from flax_inpaint.io.folders import (
    WEIGHT_FORMATS,
    find_weight_files,
    looks_like_repo_id,
    named_file,
    read_config,
    remove_weight_files,
    resolve_file,
    resolve_folder,
)

__all__ = [
    "WEIGHT_FORMATS",
    "CheckpointError",
    "default_cache_dir",
    "find_weight_files",
    "looks_like_repo_id",
    "named_file",
    "params_cache_file",
    "read_config",
    "read_msgpack",
    "read_safetensors",
    "read_state_dict",
    "remove_weight_files",
    "resolve_file",
    "resolve_folder",
    "write_bytes_atomic",
    "write_safetensors_atomic",
]
