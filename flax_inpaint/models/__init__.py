"""Flax model families: UNet, VAE, CLIP text and image encoders, ControlNet, the safety checker and the
IP-Adapter image projections."""
from flax_inpaint.io import CheckpointError
from flax_inpaint.models.clip import (
    FlaxCLIPTextModel,
    FlaxCLIPTextModelOutput,
    FlaxCLIPTextModelWithProjection,
    FlaxCLIPTextModelWithProjectionOutput,
)
from flax_inpaint.models.clip_vision import FlaxCLIPVisionModelOutput, FlaxCLIPVisionModelWithProjection
from flax_inpaint.models.controlnet import FlaxControlNetModel, FlaxControlNetOutput
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.safety import CLIPImagePreprocessing, FlaxStableDiffusionSafetyChecker
from flax_inpaint.models.unet import FlaxUNet2DConditionModel, FlaxUNet2DConditionOutput
from flax_inpaint.models.vae import (
    FlaxAutoencoderKL,
    FlaxAutoencoderKLOutput,
    FlaxDecoderOutput,
    FlaxDiagonalGaussianDistribution,
)

__all__ = [
    "CLIPImagePreprocessing",
    "CheckpointError",
    "FlaxAutoencoderKL",
    "FlaxAutoencoderKLOutput",
    "FlaxCLIPTextModel",
    "FlaxCLIPTextModelOutput",
    "FlaxCLIPTextModelWithProjection",
    "FlaxCLIPTextModelWithProjectionOutput",
    "FlaxCLIPVisionModelOutput",
    "FlaxCLIPVisionModelWithProjection",
    "FlaxControlNetModel",
    "FlaxControlNetOutput",
    "FlaxDecoderOutput",
    "FlaxDiagonalGaussianDistribution",
    "FlaxModelMixin",
    "FlaxStableDiffusionSafetyChecker",
    "FlaxUNet2DConditionModel",
    "FlaxUNet2DConditionOutput",
]
