"""The msgpack cache of params converted from PyTorch weights, so a second load skips the conversion."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

_CACHE_ENV = "FLAX_INPAINT_CACHE"


def default_cache_dir() -> Path:
    """$FLAX_INPAINT_CACHE, else ~/.cache/flax_inpaint."""
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "flax_inpaint"))


def params_cache_file(files: Sequence[Path], model: str, config: Mapping[str, Any],
                      cache_dir: Optional[os.PathLike] = None) -> Path:
    """Where the params of `model` with `config` converted from the weight `files` are cached: the name
    hashes the files' resolved paths, sizes and modification times, so changed weights miss the cache."""
    h = hashlib.sha256(f"{model}|{json.dumps(config, default=str)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return Path(cache_dir or default_cache_dir()) / f"{model}-{h.hexdigest()[:32]}.msgpack"
