"""Loading a diffusers pipeline folder (`model_index.json`) into Flax components and params."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from flax_inpaint.io import (
    CheckpointError,
    read_config,
    resolve_folder,
    write_bytes_atomic,
)

OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder", "controlnet")


def _model_classes() -> Dict[str, Any]:
    """PyTorch class name in model_index.json -> our Flax class (a folder that diffusers' Flax pipelines
    saved names the Flax classes, e.g. "FlaxUNet2DConditionModel": the "Flax" prefix is dropped first)."""
    from flax_inpaint.models.clip import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
    from flax_inpaint.models.clip_vision import FlaxCLIPVisionModelWithProjection
    from flax_inpaint.models.controlnet import FlaxControlNetModel
    from flax_inpaint.models.safety import FlaxStableDiffusionSafetyChecker
    from flax_inpaint.models.unet import FlaxUNet2DConditionModel
    from flax_inpaint.models.vae import FlaxAutoencoderKL

    return {
        "UNet2DConditionModel": FlaxUNet2DConditionModel,
        "AutoencoderKL": FlaxAutoencoderKL,
        "CLIPTextModel": FlaxCLIPTextModel,
        "CLIPTextModelWithProjection": FlaxCLIPTextModelWithProjection,
        "CLIPVisionModelWithProjection": FlaxCLIPVisionModelWithProjection,
        "ControlNetModel": FlaxControlNetModel,
        "StableDiffusionSafetyChecker": FlaxStableDiffusionSafetyChecker,
    }


# The feature extractor is kept as its preprocessor_config.json dict; the pipeline's constructor
# configures the safety checker's in-program CLIP preprocessing with it.
IMAGE_PROCESSORS = (
    "CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast", "CLIPFeatureExtractor",
)


# The library diffusers imports a saved component's class from (model_index.json), where not diffusers.
_LIBRARY = {"CLIPTextModel": "transformers", "CLIPTextModelWithProjection": "transformers",
            "CLIPVisionModelWithProjection": "transformers",
            "StableDiffusionSafetyChecker": "stable_diffusion"}
# Tokenizers load and save with transformers: SD's `tokenizer`, SDXL's `tokenizer_2` too.
TOKENIZERS = ("tokenizer", "tokenizer_2")

# diffusers' MultiControlNetModel saves its nets in `<name>`, `<name>_1`, `<name>_2`, ...
MULTI_CONTROLNET = "MultiControlNetModel"


def multi_folders(folder: Path, name: str) -> list[Path]:
    """The folders of a MultiControlNetModel component `name`: `name`, then `name_1`, ... while they exist."""
    found = [folder / name]
    while (folder / f"{name}_{len(found)}").is_dir():
        found.append(folder / f"{name}_{len(found)}")
    return found


def scheduler_class(name: str):
    """Our Flax scheduler for a diffusers scheduler class name (e.g. "PNDMScheduler")."""
    from flax_inpaint import schedulers

    cls = getattr(schedulers, "Flax" + name.removeprefix("Flax"), None)
    if cls is None:
        supported = sorted(n.removeprefix("Flax") for n in schedulers.__all__ if n.endswith("Scheduler"))
        raise ValueError(f"Scheduler {name!r} is not supported; supported: {supported}.")
    return cls


def with_scheduler(pipe, params, name: Optional[str]):
    """(pipeline, params) with the diffusers scheduler class `name` (e.g. "DDIMScheduler") built from
    the pipeline's scheduler config, as diffusers' `from_config` swap does; None keeps the pipeline's."""
    if name is None:
        return pipe, params
    scheduler = scheduler_class(name).from_config(pipe.scheduler.config)
    pipe = type(pipe).from_pipe(pipe)
    pipe.scheduler = scheduler
    return pipe, {**params, "scheduler": scheduler.create_state()}


def model_error(option: str, model: str, error: BaseException) -> str:
    """What to tell a user whose `model` (given as `option`, e.g. "--model") failed to load, and the fix."""
    return (f"{option} {model!r} could not be loaded: {error}\nFix {option}: name a local diffusers inpainting "
            "folder (the one holding model_index.json) or a hub repo id 'org/name' that is in the local hub "
            "cache or reachable online.")


def load_components(
    path: os.PathLike | str,
    dtype: Any = jnp.float32,
    param_dtype: Optional[Any] = None,
    attention: str = "auto",
    variant: Optional[str] = None,
    local_files_only: bool = False,
    revision: Optional[str] = None,
    skip: Tuple[str, ...] = (),
    from_pt: bool = False,
    **hub,
) -> Tuple[Dict[str, Any], Dict[str, Any], Path]:
    """Read every component listed in `model_index.json`; returns (components, params, folder).

    Models and schedulers map by class name to our Flax classes; the tokenizer loads with
    transformers; a MultiControlNetModel loads as a tuple of ControlNets with a tuple of params.
    Optional components (safety checker, feature extractor, ...) that are absent or null are set
    to None; a required one we cannot load raises. On a terminal a progress bar counts the components
    (converting a real checkpoint's weights takes a while). A component without `variant` files loads its
    default weights, with a warning (diffusers does the same). `from_pt=True` converts PyTorch weights even
    where Flax ones exist; `hub` holds huggingface_hub download options (cache_dir, token, ...).
    """
    from tqdm import tqdm

    folder = resolve_folder(path, None, local_files_only, revision, **hub)
    index = read_config(folder, "model_index.json")
    models = _model_classes()
    components: Dict[str, Any] = {}
    params: Dict[str, Any] = {}
    without_variant: list = []
    listed = {name: spec for name, spec in index.items()
              if not name.startswith("_") and isinstance(spec, (list, tuple)) and len(spec) == 2}
    for name, (library, cls_name) in tqdm(listed.items(), desc="Loading pipeline components", unit="component",
                                          disable=None, leave=False):
        if cls_name is None or name in skip:
            components[name] = None
            continue
        sub = folder / name
        cls_name = cls_name.removeprefix("Flax")
        if name == "scheduler":
            components[name], params[name] = scheduler_class(cls_name).from_pretrained(sub)
        elif name in TOKENIZERS:
            import transformers

            components[name] = getattr(transformers, cls_name).from_pretrained(sub)
        elif cls_name in IMAGE_PROCESSORS:
            components[name] = read_config(sub, "preprocessor_config.json")
        elif cls_name in models or cls_name == MULTI_CONTROLNET:
            has_variant = variant is None or any(folder.glob(f"{name}*/*.{variant}.*"))
            if not has_variant:
                without_variant.append(name)
            load = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention=attention,
                        variant=variant if has_variant else None, from_pt=from_pt)
            if cls_name == MULTI_CONTROLNET:  # a tuple of nets, and a tuple of their params
                loaded = [models["ControlNetModel"].from_pretrained(f, **load) for f in multi_folders(folder, name)]
                components[name], params[name] = (tuple(x) for x in zip(*loaded))
            else:
                components[name], params[name] = models[cls_name].from_pretrained(sub, **load)
        elif name in OPTIONAL:
            warnings.warn(f"{name} ({library}.{cls_name}) is not supported yet and is not loaded.")
            components[name] = None
        else:
            raise CheckpointError(f"{folder}/model_index.json: component {name}={cls_name} is not supported.")
    if without_variant:
        warnings.warn(f"{folder}: no variant={variant!r} weight files for {without_variant}; loading their default "
                      "weights instead, as diffusers does.")
    # SDXL's refiner has text_encoder_2 and tokenizer_2 alone; other folders need the first pair.
    text = ("text_encoder_2", "tokenizer_2") if components.get("text_encoder") is None and components.get(
        "text_encoder_2") is not None else ("text_encoder", "tokenizer")
    for required in ("unet", "vae", *text, "scheduler"):
        if components.get(required) is None and required not in skip:
            raise CheckpointError(f"{folder}/model_index.json lacks the required component {required!r}.")
    return components, params, folder


def _save_bpe_vocabulary(tokenizer, folder: Path) -> None:
    """Add vocab.json and merges.txt where transformers 5 saved tokenizer.json alone: transformers 4's
    CLIPTokenizer (what diffusers 0.39's Flax pipelines load) reads only those two files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE" and not (folder / "vocab.json").is_file():
        backend.model.save(str(folder))


def model_index(pipeline_class: str, components: Dict[str, Any]) -> Dict[str, Any]:
    """model_index.json's content for these components: each one's (library, class) as diffusers names it."""
    index: Dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for name, comp in components.items():
        if comp is None:
            index[name] = [None, None]
        elif name == "scheduler":
            index[name] = ["diffusers", comp.diffusers_class]
        elif name in TOKENIZERS:
            index[name] = ["transformers", type(comp).__name__]
        elif isinstance(comp, dict):  # the feature extractor's preprocessor config
            index[name] = ["transformers", "CLIPImageProcessor"]
        elif isinstance(comp, (tuple, list)):  # several ControlNets: diffusers' MultiControlNetModel
            index[name] = ["diffusers", MULTI_CONTROLNET]
        else:
            index[name] = [_LIBRARY.get(comp.torch_class, "diffusers"), comp.torch_class]
    return index


def save_components(folder: os.PathLike, pipeline_class: str, components: Dict[str, Any], params,
                    settings: Optional[Dict[str, Any]] = None) -> None:
    """Write a diffusers-format pipeline folder: per model, PyTorch safetensors and the Flax msgpack of
    diffusers'/transformers' Flax save_pretrained, so diffusers (PyTorch, and 0.39's Flax) loads it too.
    `settings`: the pipeline's own config values (e.g. SDXL's force_zeros_for_empty_prompt)."""
    folder = Path(folder)
    for name, comp in components.items():
        if comp is None:
            continue
        if name in ("scheduler", *TOKENIZERS):
            comp.save_pretrained(folder / name)
            if name in TOKENIZERS:
                _save_bpe_vocabulary(comp, folder / name)
        elif isinstance(comp, dict):
            write_bytes_atomic(folder / name / "preprocessor_config.json", json.dumps(comp, indent=2).encode())
        elif isinstance(comp, (tuple, list)):
            for k, (model, p) in enumerate(zip(comp, params[name])):
                model.save_pretrained(folder / (f"{name}_{k}" if k else name), p, pytorch_format=True)
        else:
            comp.save_pretrained(folder / name, params[name], pytorch_format=True)
    index = {**model_index(pipeline_class, components), **(settings or {})}
    write_bytes_atomic(folder / "model_index.json", json.dumps(index, indent=2).encode())
