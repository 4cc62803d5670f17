"""The loaders as the CLI and sweep specs spell them: `--single-file FILE [--config FOLDER]`,
`--lora PATH[:WEIGHT]` (repeatable) and `--textual-inversion PATH[:TOKEN]` (repeatable)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

Lora = Tuple[str, float]
Embedding = Tuple[str, Optional[str]]


def _split(text: str) -> Tuple[str, Optional[str]]:
    """(path, suffix) of "PATH:SUFFIX", or (text, None) when `text` is itself an existing path (so paths with
    colons, e.g. Windows drives, stay whole)."""
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).exists() or not path:
        return text, None
    return path, tail


def parse_lora(text: str) -> Lora:
    """"PATH[:WEIGHT]" -> (path, weight); the weight defaults to 1."""
    path, tail = _split(str(text))
    if tail is None:
        return path, 1.0
    try:
        return path, float(tail)
    except ValueError:
        raise ValueError(f"LoRA {text!r}: the weight after ':' must be a number, e.g. style.safetensors:0.8.") from None


def parse_embedding(text: str) -> Embedding:
    """"PATH[:TOKEN]" -> (path, token or None: the file's own)."""
    path, tail = _split(str(text))
    return path, tail or None


def check_exists(kind: str, path: str) -> None:
    if not Path(path).exists():
        raise ValueError(f"{kind} {path!r} does not exist; pass the path of a .safetensors/.pt file (or a folder holding "
                         "one).")


def lora_names(loras: Sequence[Lora]) -> list:
    """The adapter names the loaded LoRAs get: lora_0, lora_1, ..."""
    return [f"lora_{k}" for k in range(len(loras))]


def apply(pipe, params, loras: Sequence[Lora] = (), embeddings: Sequence[Embedding] = ()) -> Any:
    """Params with the LoRAs (active at their weights) and the embeddings loaded; `pipe` gains the tokens."""
    for (path, _), name in zip(loras, lora_names(loras)):
        params = pipe.load_lora_weights(params, path, adapter_name=name)
    if loras:
        params = pipe.set_adapters(params, lora_names(loras), [w for _, w in loras])
    if embeddings:
        params = pipe.load_textual_inversion(params, [p for p, _ in embeddings], token=[t for _, t in embeddings])
    return params


def load(cls, model: Optional[str] = None, single_file: Optional[str] = None, config: Optional[str] = None,
         **kwargs):
    """`cls.from_pretrained(model)` or `cls.from_single_file(single_file, config=config)`."""
    if (model is None) == (single_file is None):
        raise ValueError("give exactly one of a model folder (or hub id) and a single file.")
    if single_file is not None:
        return cls.from_single_file(single_file, config=config, **kwargs)
    return cls.from_pretrained(model, **kwargs)


def describe(loras: Sequence[Lora], embeddings: Sequence[Embedding]) -> str:
    """A stable text of the loaders, for result ids and logs ("" without any)."""
    parts = [f"lora={os.fspath(p)}:{w}" for p, w in loras] + [f"ti={os.fspath(p)}:{t or ''}" for p, t in embeddings]
    return "|".join(parts)
