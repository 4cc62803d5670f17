"""Flax model families: UNet, VAE, CLIP text encoder (and later ControlNet, safety checker)."""
from flax_inpaint.models.checkpoint import CheckpointError
from flax_inpaint.models.clip import FlaxCLIPTextModel, FlaxCLIPTextModelOutput

__all__ = ["CheckpointError", "FlaxCLIPTextModel", "FlaxCLIPTextModelOutput"]
