"""Model folders: a local folder or a hub repo id, its config files, and its weight files.

A folder's weights are read from the first of these that exists (see `find_weight_files`): the Flax
msgpack (as diffusers' Flax `from_pretrained` reads it; `from_pt=True` skips it), then safetensors, then
pickled PyTorch files (.bin, .pt, .ckpt), each as one file or as shards named by an index; a variant
("fp16") goes before the extension.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from flax_inpaint.io.files import CheckpointError

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_repo_id(name: str) -> bool:
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
        if not looks_like_repo_id(name):
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


def resolve_file(path: os.PathLike | str, filename: str, subfolder: Optional[str] = None, *,
                 local_files_only: bool = False, revision: Optional[str] = None, **hub) -> Path:
    """`filename` in a local folder (its `subfolder` if that exists), or that one file from a hub repo.

    `hub` holds huggingface_hub download options (cache_dir, token, proxies, force_download).
    """
    folder = Path(path)
    if folder.exists():
        if subfolder and (folder / subfolder).is_dir():
            folder = folder / subfolder
        if not (folder / filename).is_file():
            where = f"{folder} (nor {folder / subfolder})" if subfolder and folder.name != subfolder else str(folder)
            raise CheckpointError(f"{where} has no {filename}.")
        return folder / filename
    if not looks_like_repo_id(str(path)):
        raise CheckpointError(f"{str(path)!r} is neither a local folder nor a hub repo id ('org/name').")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path), filename, subfolder=subfolder or None, revision=revision,
                                    local_files_only=local_files_only,
                                    **{k: v for k, v in hub.items() if v is not None}))
    except Exception as e:  # network, auth, unknown repo, or not in the local hub cache
        raise CheckpointError(f"{str(path)!r} is not a local folder and its {subfolder or '.'}/{filename} could not "
                              f"be fetched from the hub (local_files_only={local_files_only}): {e}") from e


def named_file(source: os.PathLike | str, names: Sequence[str], what: str, accepted: str) -> Path:
    """The file `source` names: itself, or in a folder the first of `names` there (an adapter's
    `weight_name`, else its library's default file names). `what` and `accepted` word the errors."""
    path = Path(source)
    if path.is_dir():
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path} holds no {' or '.join(names)}; pass weight_name= the {what} file's name.")
        return found
    if not path.is_file():
        raise CheckpointError(f"{what} {str(source)!r} does not exist; pass {accepted}.")
    return path


def read_config(folder: Path, name: str = "config.json") -> Dict[str, Any]:
    """The JSON config file `name` of `folder`, as a dict."""
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
