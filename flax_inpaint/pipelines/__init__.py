"""Pipelines: text-to-image, image-to-image and inpainting on one compiled sampling program."""
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
    FlaxStableDiffusionPipelineOutput,
)

__all__ = [
    "FlaxStableDiffusionImg2ImgPipeline",
    "FlaxStableDiffusionInpaintPipeline",
    "FlaxStableDiffusionPipeline",
    "FlaxStableDiffusionPipelineOutput",
]
