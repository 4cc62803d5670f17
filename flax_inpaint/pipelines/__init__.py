"""Pipelines: text-to-image, image-to-image and inpainting (also ControlNet-guided) on one compiled
sampling program."""
from flax_inpaint.pipelines.auto import (
    FlaxAutoPipelineForImage2Image,
    FlaxAutoPipelineForInpainting,
    FlaxAutoPipelineForText2Image,
)
from flax_inpaint.pipelines.controlnet import (
    FlaxStableDiffusionControlNetImg2ImgPipeline,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionControlNetPipeline,
    make_inpaint_condition,
)
from flax_inpaint.diffusers_compat import missing_names
from flax_inpaint.pipelines.stable_diffusion import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
    FlaxStableDiffusionPipelineOutput,
)

__all__ = [
    "FlaxAutoPipelineForImage2Image",
    "FlaxAutoPipelineForInpainting",
    "FlaxAutoPipelineForText2Image",
    "FlaxDiffusionPipeline",
    "FlaxStableDiffusionControlNetImg2ImgPipeline",
    "FlaxStableDiffusionControlNetInpaintPipeline",
    "FlaxStableDiffusionControlNetPipeline",
    "FlaxStableDiffusionImg2ImgPipeline",
    "FlaxStableDiffusionInpaintPipeline",
    "FlaxStableDiffusionPipeline",
    "FlaxStableDiffusionPipelineOutput",
    "make_inpaint_condition",
]

# diffusers' Flax names we do not provide, with what to use instead.
NOT_PROVIDED = {
    "FlaxStableDiffusionXLPipeline": "SDXL (two text encoders, micro-conditioning) is not implemented; use "
                                     "diffusers' PyTorch StableDiffusionXLPipeline, or FlaxStableDiffusionPipeline "
                                     "for SD 1.x/2.x checkpoints.",
    "FlaxImagePipelineOutput": "it is the output of diffusers' unconditional image pipelines, which are not "
                               "here; the Stable Diffusion pipelines return FlaxStableDiffusionPipelineOutput.",
}
__getattr__ = missing_names(__name__, NOT_PROVIDED)
