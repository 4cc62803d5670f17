"""Classifier-free guidance rescaling (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
are Flawed", section 3.4): with zero-terminal-SNR / v-prediction models plain CFG over-exposes."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rescale_noise_cfg(guided: jax.Array, text: jax.Array, guidance_rescale: jax.Array) -> jax.Array:
    """Scale the guided prediction to the per-example std of the text prediction, then mix:
    phi * guided * std(text) / std(guided) + (1 - phi) * guided, std over all non-batch axes with
    Bessel's correction (torch.std's default, as diffusers' `rescale_noise_cfg`)."""
    axes = tuple(range(1, guided.ndim))
    std_text = jnp.std(text, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_text / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
