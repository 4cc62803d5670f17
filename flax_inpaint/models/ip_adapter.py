"""IP-Adapter image projections: CLIP image embeddings -> image-prompt tokens for the UNet.

An IP-Adapter (Ye et al., 2023) prompts the UNet with an image. A CLIP image encoder embeds it, an image
projection turns the embedding into a few tokens of the text encoder's width, and every cross-attention
layer attends to them through its own key/value projections, adding the result times a scale to its text
attention (`layers.Attention` with `ip`; the UNet takes the tokens as `ip_hidden_states`).

The two published projections, named as in diffusers:
  ImageProjection: the projected, pooled image embedding [B, D] -> Linear to num_tokens x dim, LayerNorm.
  IPAdapterPlusImageProjection ("plus"): the Resampler; learned queries attend (perceiver attention: keys
    and values are the image features and the queries together) to the image encoder's penultimate
    hidden states [B, patches + 1, width] through `depth` blocks.

Their params come from loaders/ip_adapter.py; `image_projection(params)` rebuilds the module from the
param shapes, so the params alone describe an adapter.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_inpaint.models.layers import Attention, dense, layer_norm
from flax_inpaint.models.unet import FeedForward
from flax_inpaint.runtime import Runtime

RESAMPLER_HEAD_DIM = 64  # fixed by the published "plus" weights (diffusers infers heads = width // 64)


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: [B, image_embed_dim] -> [B, num_image_text_embeds, cross_attention_dim]."""

    num_image_text_embeds: int
    cross_attention_dim: int
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        rt, n, d = self.runtime, self.num_image_text_embeds, self.cross_attention_dim
        h = dense(n * d, rt, name="image_embeds")(image_embeds.astype(rt.dtype))
        return layer_norm(1e-5, rt, name="norm")(h.reshape(image_embeds.shape[0], n, d))


class IPAdapterPlusImageProjectionBlock(nn.Module):
    """One Resampler block: perceiver attention of the latents over [features; latents], then a
    LayerNorm + GELU feed-forward (`ff.0`, `ff.1`), each residual."""

    heads: int
    ffn_ratio: float
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        rt = self.runtime
        queries = layer_norm(1e-5, rt, name="ln1")(latents)
        context = jnp.concatenate([layer_norm(1e-5, rt, name="ln0")(x), queries], axis=1)
        attn = Attention(self.heads, RESAMPLER_HEAD_DIM, rt, out_bias=False, name="attn")
        latents = latents + attn(queries, context)
        ff = FeedForward(rt, self.ffn_ratio, activation_fn="gelu", bias=False, name="ff_1")
        return latents + ff(layer_norm(1e-5, rt, name="ff_0")(latents))


class IPAdapterPlusImageProjection(nn.Module):
    """diffusers' IPAdapterPlusImageProjection: [B, seq, embed_dims] -> [B, num_queries, output_dims]."""

    output_dims: int
    hidden_dims: int
    depth: int
    heads: int
    num_queries: int
    ffn_ratio: float = 4.0
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rt = self.runtime
        shape = (1, self.num_queries, self.hidden_dims)
        latents = self.param("latents", nn.initializers.normal(self.hidden_dims**-0.5), shape, rt.param_dtype)
        latents = jnp.broadcast_to(latents.astype(rt.dtype), (x.shape[0],) + shape[1:])
        x = dense(self.hidden_dims, rt, name="proj_in")(x.astype(rt.dtype))
        for i in range(self.depth):
            latents = IPAdapterPlusImageProjectionBlock(self.heads, self.ffn_ratio, rt, name=f"layers_{i}")(x, latents)
        return layer_norm(1e-5, rt, name="norm_out")(dense(self.output_dims, rt, name="proj_out")(latents))


def image_projection(params: Mapping[str, Any], runtime: Runtime = Runtime()) -> nn.Module:
    """The image projection module whose params these are (plain or "plus", told apart by their keys)."""
    if "image_embeds" in params:
        dim = params["norm"]["scale"].shape[0]
        return ImageProjection(params["image_embeds"]["kernel"].shape[1] // dim, dim, runtime)
    if "latents" in params:
        _, queries, hidden = params["latents"].shape
        first = params["layers_0"]
        return IPAdapterPlusImageProjection(
            output_dims=params["proj_out"]["kernel"].shape[1], hidden_dims=hidden,
            depth=sum(k.startswith("layers_") for k in params),
            heads=first["attn"]["to_q"]["kernel"].shape[1] // RESAMPLER_HEAD_DIM, num_queries=queries,
            ffn_ratio=first["ff_1"]["net_0"]["proj"]["kernel"].shape[1] / hidden, runtime=runtime,
        )
    raise ValueError(f"These are not IP-Adapter image projection params (keys {sorted(params)[:6]}); expected "
                     "ImageProjection's (image_embeds, norm) or the Resampler's (latents, proj_in, layers_*, ...).")


def project_image_embeds(params: Mapping[str, Any], image_embeds: jax.Array, runtime: Runtime = Runtime()) -> jax.Array:
    """Image-prompt tokens [B, images * tokens, dim] from image embeddings, as diffusers' UNet computes them
    (`MultiIPAdapterImageProjection`, for one adapter): `image_embeds` is [B, images, D] (pooled, plain
    adapters) or [B, images, seq, width] (hidden states, "plus"); a plain [B, D] counts as one image."""
    proj = image_projection(params, runtime)
    if isinstance(proj, ImageProjection) and image_embeds.ndim == 2:
        image_embeds = image_embeds[:, None]
    expected = 3 if isinstance(proj, ImageProjection) else 4
    if image_embeds.ndim != expected:
        raise ValueError(f"image_embeds has shape {image_embeds.shape}; this {type(proj).__name__} takes "
                         + ("[batch, images, embed_dim]." if expected == 3 else "[batch, images, seq, width]."))
    b, n = image_embeds.shape[:2]
    tokens = proj.apply({"params": params}, image_embeds.reshape((b * n,) + image_embeds.shape[2:]))
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])
