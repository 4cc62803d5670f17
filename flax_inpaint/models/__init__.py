"""Flax model families: UNet, VAE, CLIP text encoder (and later ControlNet, safety checker)."""
from flax_inpaint.models.checkpoint import CheckpointError

__all__ = ["CheckpointError"]
