"""flax-inpaint: JAX/Flax Stable Diffusion inpainting, the maintained home of diffusers' Flax pipelines."""
import logging as _logging


class _NoTorchNoticeFilter(_logging.Filter):
    """Drops the notice `import transformers` logs without PyTorch: we use transformers only for its
    tokenizers, which need no PyTorch. Every other transformers message still shows."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_NoTorchNoticeFilter())  # transformers' top-level logger
from flax_inpaint.diffusers_compat import missing_names
from flax_inpaint.image_processor import VaeImageProcessor, load_image, make_image_grid
from flax_inpaint.models.clip import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.safety import FlaxStableDiffusionSafetyChecker
from flax_inpaint.models.unet import FlaxUNet2DConditionModel
from flax_inpaint.models.vae import FlaxAutoencoderKL
from flax_inpaint.pipelines import NOT_PROVIDED as _PIPELINES_NOT_PROVIDED
from flax_inpaint.pipelines import (
    FlaxAutoPipelineForImage2Image,
    FlaxAutoPipelineForInpainting,
    FlaxAutoPipelineForText2Image,
    FlaxDiffusionPipeline,
    FlaxStableDiffusionControlNetImg2ImgPipeline,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionControlNetPipeline,
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
    make_inpaint_condition,
)
from flax_inpaint.runtime import Runtime
from flax_inpaint.schedulers import *  # noqa: F401,F403  (the Flax*Scheduler classes)
from flax_inpaint.schedulers import NOT_PROVIDED as _SCHEDULERS_NOT_PROVIDED
from flax_inpaint.schedulers import __all__ as _schedulers

__version__ = "0.1.0"
__all__ = [
    "FlaxAutoPipelineForImage2Image",
    "FlaxAutoPipelineForInpainting",
    "FlaxAutoPipelineForText2Image",
    "FlaxAutoencoderKL",
    "FlaxCLIPTextModel",
    "FlaxCLIPTextModelWithProjection",
    "FlaxControlNetModel",
    "FlaxDiffusionPipeline",
    "FlaxModelMixin",
    "FlaxStableDiffusionControlNetImg2ImgPipeline",
    "FlaxStableDiffusionControlNetInpaintPipeline",
    "FlaxStableDiffusionControlNetPipeline",
    "FlaxStableDiffusionImg2ImgPipeline",
    "FlaxStableDiffusionInpaintPipeline",
    "FlaxStableDiffusionPipeline",
    "FlaxStableDiffusionSafetyChecker",
    "FlaxUNet2DConditionModel",
    "Runtime",
    "VaeImageProcessor",
    "load_image",
    "make_image_grid",
    "make_inpaint_condition",
    *_schedulers,
]

__getattr__ = missing_names(__name__, {**_PIPELINES_NOT_PROVIDED, **_SCHEDULERS_NOT_PROVIDED})
