"""Weight and output files: safetensors, Flax msgpack and (safely) pickled PyTorch reading, atomic writes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import flax
import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not fit the model."""


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
    """Write `tensors` as a .safetensors file atomically (bfloat16 as float32: numpy's writer lacks it)."""
    from safetensors.numpy import save

    arrays = {
        k: np.ascontiguousarray(v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v)
        for k, v in tensors.items()
    }
    write_bytes_atomic(path, save(arrays))


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
    """The PyTorch state dict of safetensors files, or of pickles read only with torch.load(weights_only=True)."""
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
