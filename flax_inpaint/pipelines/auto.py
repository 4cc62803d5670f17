"""Task-first loading, as diffusers' AutoPipelineFor*: the folder's model_index.json (or an existing
pipeline) says the model family, the class says the task, `controlnet=` adds or drops ControlNet.

`FlaxAutoPipelineForInpainting.from_pretrained(folder)` on an SD text-to-image folder gives
FlaxStableDiffusionInpaintPipeline; `from_pipe(pipe)` moves between tasks over the same components, so
the same params serve (set params["controlnet"] when adding one).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple, Union

from flax_inpaint.io import CheckpointError, read_config, resolve_folder
from flax_inpaint.pipelines.stable_diffusion import FlaxDiffusionPipeline, pipeline_class

# family -> (text-to-image, image-to-image, inpainting) class, diffusers' names without "Flax".
_FAMILIES: Dict[str, Tuple[str, str, str]] = {
    "stable-diffusion": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                         "StableDiffusionInpaintPipeline"),
    "stable-diffusion-controlnet": ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                                    "StableDiffusionControlNetInpaintPipeline"),
    "stable-diffusion-xl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                            "StableDiffusionXLInpaintPipeline"),
    "stable-diffusion-xl-controlnet": ("StableDiffusionXLControlNetPipeline",
                                       "StableDiffusionXLControlNetImg2ImgPipeline",
                                       "StableDiffusionXLControlNetInpaintPipeline"),
}
_TASKS = ("text-to-image", "image-to-image", "inpainting")


def _family(class_name: str, who: str) -> str:
    name = class_name.removeprefix("Flax")
    for family, names in _FAMILIES.items():
        if name in names:
            return family
    raise CheckpointError(f"{who}: no task pipeline is linked to {class_name!r}; the families here are "
                          f"{', '.join(sorted({n for names in _FAMILIES.values() for n in names}))}.")


def _with_controlnet(family: str, controlnet: bool) -> str:
    plain = family.removesuffix("-controlnet")
    return plain + "-controlnet" if controlnet else plain


def _task_class(task: str, family: str, who: str) -> type:
    name = _FAMILIES[family][_TASKS.index(task)]
    try:
        return pipeline_class(name)
    except CheckpointError:
        raise CheckpointError(f"{who}: the {task} pipeline of this {family} model would be Flax{name}, which "
                              "flax-inpaint does not provide.") from None


class _AutoPipeline:
    """The task's class for a folder or a pipeline; never instantiated itself."""

    task: str

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(folder) "
                               f"or {type(self).__name__}.from_pipe(pipeline).")

    @classmethod
    def pipeline_class_for(cls, class_name: str, **kwargs) -> type:
        """The class `from_pretrained`/`from_pipe` use for a pipeline named `class_name` (diffusers' name, with
        or without "Flax") given their keyword arguments: `controlnet=` a model picks the ControlNet pipeline,
        `controlnet=None` the plain one."""
        family = _family(class_name, cls.__name__)
        if "controlnet" in kwargs:
            family = _with_controlnet(family, kwargs["controlnet"] is not None)
        return _task_class(cls.task, family, cls.__name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> Tuple[Any, dict]:
        """`(pipeline, params)` of this task for a diffusers folder or hub repo id; keyword arguments go to the
        class's `from_pretrained` (dtype, variant, components such as `controlnet=`, ...)."""
        hub = {k: kwargs[k] for k in ("local_files_only", "revision", "cache_dir", "proxies", "token",
                                      "force_download") if k in kwargs}
        folder = resolve_folder(pretrained_model_name_or_path, **hub)
        class_name = read_config(folder, FlaxDiffusionPipeline.config_name).get("_class_name", "")
        target = cls.pipeline_class_for(class_name, **kwargs)
        if kwargs.get("controlnet", 0) is None and "controlnet" not in target.component_names():
            kwargs.pop("controlnet")  # the folder's ControlNet dropped: the plain class has no such component
        return target.from_pretrained(folder, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: FlaxDiffusionPipeline, **components) -> FlaxDiffusionPipeline:
        """This task's pipeline over `pipeline`'s components (no reloading: its params serve the new one);
        `components` add or replace some, `controlnet=None` drops the ControlNet."""
        target = cls.pipeline_class_for(type(pipeline).__name__, **components)
        if "controlnet" not in target.component_names():
            components.pop("controlnet", None)
        return target.from_pipe(pipeline, **components)


class FlaxAutoPipelineForText2Image(_AutoPipeline):
    """Text-to-image pipelines by model family (diffusers' AutoPipelineForText2Image)."""

    task = "text-to-image"


class FlaxAutoPipelineForImage2Image(_AutoPipeline):
    """Image-to-image pipelines by model family (diffusers' AutoPipelineForImage2Image)."""

    task = "image-to-image"


class FlaxAutoPipelineForInpainting(_AutoPipeline):
    """Inpainting pipelines by model family (diffusers' AutoPipelineForInpainting)."""

    task = "inpainting"
