"""flax-inpaint: JAX/Flax Stable Diffusion inpainting, the maintained home of diffusers' Flax pipelines."""
from flax_inpaint.models.clip import FlaxCLIPTextModel
from flax_inpaint.models.unet import FlaxUNet2DConditionModel
from flax_inpaint.models.vae import FlaxAutoencoderKL
from flax_inpaint.runtime import Runtime

__version__ = "0.1.0"
__all__ = ["FlaxAutoencoderKL", "FlaxCLIPTextModel", "FlaxUNet2DConditionModel", "Runtime"]
