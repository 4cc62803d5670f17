"""Pipelines: text-to-image, image-to-image and inpainting (also ControlNet-guided) on one compiled
sampling program."""
from flax_inpaint.pipelines.controlnet import (
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionControlNetPipeline,
    make_inpaint_condition,
)
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
    FlaxStableDiffusionPipelineOutput,
)

__all__ = [
    "FlaxStableDiffusionControlNetInpaintPipeline",
    "FlaxStableDiffusionControlNetPipeline",
    "FlaxStableDiffusionImg2ImgPipeline",
    "FlaxStableDiffusionInpaintPipeline",
    "FlaxStableDiffusionPipeline",
    "FlaxStableDiffusionPipelineOutput",
    "make_inpaint_condition",
]
