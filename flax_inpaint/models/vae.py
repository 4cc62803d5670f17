"""The KL autoencoder (diffusers `AutoencoderKL`) in Flax: images <-> latents.

NCHW at the boundary (what diffusers pipelines pass around), NHWC inside. Submodules carry the PyTorch
attribute names, so `encoder.down_blocks.0.resnets.1.conv1.weight` lands on
`encoder/down_blocks_0/resnets_1/conv1/kernel` through the shared checked converter.

    vae, params = FlaxAutoencoderKL.from_pretrained("path/to/vae")
    posterior = vae.apply({"params": params}, images, method=vae.encode).latent_dist  # NHWC
    latents = posterior.sample(key).transpose((0, 3, 1, 2)) * vae.scaling_factor   # NCHW
    images = vae.apply({"params": params}, latents / vae.scaling_factor, method=vae.decode).sample
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_inpaint.diffusers_compat import BaseOutput
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    get_activation,
    group_norm,
)
from flax_inpaint.runtime import Runtime

_EPS = 1e-6  # every GroupNorm of diffusers' VAE uses this epsilon

# Attention names of checkpoints saved before diffusers 0.14 (`_from_deprecated_attn_block`).
_LEGACY_ATTENTION = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ----------------------------------------------------------------------------- outputs


@jax.tree_util.register_pytree_node_class
class FlaxDiagonalGaussianDistribution:
    """The posterior q(z|x) = N(mean, exp(logvar)), every array NHWC, as in diffusers' Flax VAE (whose
    users transpose samples to NCHW: `latent_dist.sample(key).transpose((0, 3, 1, 2))`).

    Built like diffusers' from the encoder's moments [B, h, w, 2 * latent_channels]. `logvar` is
    clipped to [-30, 20] as in diffusers, so `std` and `var` neither underflow to 0 nor overflow.
    With `deterministic=True` the distribution collapses onto its mean (std = var = 0). A pytree, so
    jitted functions can return it.
    """

    def __init__(self, parameters: jax.Array, deterministic: bool = False):
        mean, logvar = jnp.split(parameters, 2, axis=-1)
        self._set(mean, jnp.clip(logvar, -30.0, 20.0), deterministic)

    def _set(self, mean: jax.Array, logvar: jax.Array, deterministic: bool) -> None:
        self.mean = mean  # [B, h, w, latent_channels]
        self.logvar = logvar  # [B, h, w, latent_channels], clipped
        self.deterministic = deterministic

    def tree_flatten(self):
        return (self.mean, self.logvar), self.deterministic

    @classmethod
    def tree_unflatten(cls, deterministic: bool, children) -> "FlaxDiagonalGaussianDistribution":
        dist = object.__new__(cls)
        dist._set(*children, deterministic)
        return dist

    @property
    def std(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps. eps is drawn in float32 then cast, so bf16 and fp32 models given the
        same key add the same noise."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["FlaxDiagonalGaussianDistribution"] = None) -> jax.Array:
        """KL(self || other) per sample, [B]; `other` defaults to the standard normal."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], self.mean.dtype)
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample: jax.Array, axis: Tuple[int, ...] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of `sample`, summed over `axis`."""
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], self.mean.dtype)
        log_two_pi = jnp.log(2.0 * jnp.pi)
        return 0.5 * jnp.sum(
            log_two_pi + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axis
        )


@flax.struct.dataclass
class FlaxAutoencoderKLOutput(BaseOutput):
    latent_dist: FlaxDiagonalGaussianDistribution  # NHWC, as in diffusers' Flax VAE


@flax.struct.dataclass
class FlaxDecoderOutput(BaseOutput):
    sample: jax.Array  # [B, out_channels, H, W]


# ----------------------------------------------------------------------------- blocks (NHWC)


def _resnet(out_channels: int, groups: int, act_fn: str, runtime: Runtime, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(
        out_channels, runtime, groups=groups, eps=_EPS, act_fn=act_fn, use_time_emb=False, name=name
    )


class ResnetStack2D(nn.Module):
    """diffusers' DownEncoderBlock2D (resample="down") and UpDecoderBlock2D (resample="up"):
    `num_layers` resnets, then, unless resample is None, a 2x down- or upsampler."""

    out_channels: int
    num_layers: int
    resample: Optional[str]
    groups: int
    act_fn: str
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.out_channels, self.groups, self.act_fn, self.runtime, f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, self.runtime, padding=0, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, self.runtime, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, [single-head spatial self-attention], resnet, at constant width."""

    channels: int
    add_attention: bool
    groups: int
    act_fn: str
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _resnet(self.channels, self.groups, self.act_fn, self.runtime, "resnets_0")(x)
        if self.add_attention:
            # diffusers: heads = channels // attention_head_dim with attention_head_dim = channels.
            x = Attention(
                heads=1, dim_head=self.channels, runtime=self.runtime, qkv_bias=True,
                norm_groups=self.groups, norm_eps=_EPS, name="attentions_0",
            )(x)
        return _resnet(self.channels, self.groups, self.act_fn, self.runtime, "resnets_1")(x)


class _EncoderDecoder(nn.Module):
    """The settings the encoder and the decoder share, named as in AutoencoderKL's config."""

    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    out_channels: int  # the encoder's: 2 * latent_channels (mean and log-variance)
    mid_block_add_attention: bool
    groups: int
    act_fn: str
    runtime: Runtime


class Encoder(_EncoderDecoder):
    """conv_in, a DownEncoderBlock2D per width (all but the last halve H and W), mid block, out."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rt, chans = self.runtime, self.block_out_channels
        shared = dict(groups=self.groups, act_fn=self.act_fn, runtime=rt)
        x = conv(chans[0], rt, name="conv_in")(x)
        for i, c in enumerate(chans):
            resample = "down" if i < len(chans) - 1 else None
            x = ResnetStack2D(c, self.layers_per_block, resample, **shared, name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(chans[-1], self.mid_block_add_attention, **shared, name="mid_block")(x)
        # diffusers' conv_act is nn.SiLU() whatever act_fn says.
        x = nn.silu(group_norm(self.groups, _EPS, rt, name="conv_norm_out")(x))
        return conv(self.out_channels, rt, name="conv_out")(x)


class Decoder(_EncoderDecoder):
    """conv_in, mid block, UpDecoderBlock2D per width in reverse (all but the last double H and W),
    out; each UpDecoderBlock2D has one resnet more than the encoder's blocks."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        rt, chans = self.runtime, tuple(reversed(self.block_out_channels))
        shared = dict(groups=self.groups, act_fn=self.act_fn, runtime=rt)
        x = conv(chans[0], rt, name="conv_in")(z)
        x = UNetMidBlock2D(chans[0], self.mid_block_add_attention, **shared, name="mid_block")(x)
        for i, c in enumerate(chans):
            resample = "up" if i < len(chans) - 1 else None
            x = ResnetStack2D(c, self.layers_per_block + 1, resample, **shared, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, _EPS, rt, name="conv_norm_out")(x))
        return conv(self.out_channels, rt, name="conv_out")(x)


# ----------------------------------------------------------------------------- the model


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _check_nchw(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        hint = " (it looks NHWC; transpose it to NCHW)" if x.ndim == 4 and x.shape[-1] == channels else ""
        raise ValueError(
            f"{what} must be NCHW [batch, {channels}, height, width]; got shape {tuple(x.shape)}{hint}."
        )


class FlaxAutoencoderKL(FlaxModelMixin, nn.Module):
    """diffusers' `AutoencoderKL`; fields are its config.json keys.

    `scaling_factor` is not applied here (as in diffusers): pipelines multiply latents by it after
    encoding and divide before decoding (0.18215 for SD1/2, 0.13025 for SDXL). `force_upcast` says the
    VAE must run in float32 when the rest runs in half precision (SDXL's VAE overflows in float16):
    pipelines run `vae.upcasted()`, which is this model or its float32 twin (see `needs_upcasting`).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, int]] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    runtime: Runtime = Runtime()

    torch_class = "AutoencoderKL"
    weight_stems = ("diffusion_pytorch_model",)
    # diffusers' Flax VAE keeps the old names of the mid-block attention projections.
    flax_names = (
        ("attentions_{n}/query", "attentions_{n}/to_q"), ("attentions_{n}/key", "attentions_{n}/to_k"),
        ("attentions_{n}/value", "attentions_{n}/to_v"), ("attentions_{n}/proj_attn", "attentions_{n}/to_out_0"),
    )
    fixed_config = {"shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,)}

    def __post_init__(self):
        n = len(self.block_out_channels)
        problems = []
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(getattr(self, key))
            if len(types) != n:
                problems.append(f"{key} has {len(types)} entries but block_out_channels has {n}")
            if any(t != allowed for t in types):
                problems.append(f"{key}={types} (only {allowed!r} is implemented)")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            problems.append(
                f"block_out_channels {uneven} are not divisible by norm_num_groups={self.norm_num_groups}"
            )
        if problems:
            raise ValueError(f"{type(self).__name__}: unsupported config: " + "; ".join(problems) + ".")
        get_activation(self.act_fn)  # raises, naming the supported ones
        super().__post_init__()

    @property
    def downscale(self) -> int:
        """How many times smaller than the image a latent is a side (8 for SD's VAEs): diffusers' vae_scale_factor."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        rt = self.runtime
        shared = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            mid_block_add_attention=self.mid_block_add_attention,
            groups=self.norm_num_groups,
            act_fn=self.act_fn,
            runtime=rt,
        )
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        self.quant_conv = conv(2 * self.latent_channels, rt, kernel=1) if self.use_quant_conv else None
        self.post_quant_conv = conv(self.latent_channels, rt, kernel=1) if self.use_post_quant_conv else None

    def encode(self, sample: jax.Array, deterministic: bool = True, return_dict: bool = True):
        """Images [B, in_channels, H, W] -> the posterior over [B, H/f, W/f, latent_channels] latents
        (NHWC, like diffusers' Flax VAE).

        `deterministic` is accepted for drop-in use with diffusers' Flax VAE, where it switched
        dropout off; this VAE has no dropout, so it changes nothing.
        """
        del deterministic
        _check_nchw(sample, self.in_channels, "sample")
        dist = self.encode_nhwc(_nchw_to_nhwc(sample))
        return FlaxAutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def encode_nhwc(self, sample: jax.Array) -> FlaxDiagonalGaussianDistribution:
        """`encode` for NHWC images [B, H, W, in_channels] (the layout inside the pipelines' program)."""
        moments = self.encoder(sample)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return FlaxDiagonalGaussianDistribution(moments)

    def decode(self, latents: jax.Array, deterministic: bool = True, return_dict: bool = True):
        """Latents (already divided by scaling_factor) -> images NCHW. Like diffusers' Flax VAE, latents
        whose last axis has latent_channels entries are read as NHWC (posterior samples), others as NCHW:
        an NCHW array only latent_channels wide (a 32-pixel image at factor 8) reads as NHWC, so pass
        such small latents NHWC."""
        del deterministic
        c = self.latent_channels
        if latents.ndim != 4 or c not in (latents.shape[1], latents.shape[-1]):
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected NCHW [B, {c}, h, w] or NHWC "
                             f"[B, h, w, {c}].")
        images = _nhwc_to_nchw(self.decode_nhwc(latents if latents.shape[-1] == c else _nchw_to_nhwc(latents)))
        return FlaxDecoderOutput(sample=images) if return_dict else (images,)

    def decode_nhwc(self, latents: jax.Array) -> jax.Array:
        """`decode` for NHWC latents [B, h, w, latent_channels], giving NHWC images."""
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, deterministic: bool = True,
                 return_dict: bool = True, *, key: Optional[jax.Array] = None):
        """Encode then decode, through the posterior's mode, or a sample of it with `key` (or the
        "gaussian" rng stream, as diffusers' Flax VAE took it). `deterministic` changes nothing."""
        posterior = self.encode(sample).latent_dist
        if sample_posterior:
            if key is None:
                if not self.has_rng("gaussian"):
                    raise ValueError(
                        "sample_posterior=True needs randomness: pass key=, or rngs={'gaussian': key} to apply."
                    )
                key = self.make_rng("gaussian")
            latents = posterior.sample(key)
        else:
            latents = posterior.mode()
        return self.decode(latents, return_dict=return_dict)

    @property
    def needs_upcasting(self) -> bool:
        """True when `force_upcast` is set and activations are float16 or bfloat16 (diffusers' SDXL
        pipelines upcast float16; bfloat16 is included, as both lose the VAE's precision)."""
        return bool(self.force_upcast) and jnp.dtype(self.runtime.dtype) in (jnp.float16, jnp.bfloat16)

    def upcasted(self) -> "FlaxAutoencoderKL":
        """The VAE to encode and decode with: this one, or where `needs_upcasting` the same model with
        float32 activations. Neither params nor inputs need a cast: each layer widens both (exactly) to
        its float32 compute dtype; outputs come out float32."""
        if not self.needs_upcasting:
            return self
        return self.clone(runtime=dataclasses.replace(self.runtime, dtype=jnp.float32))

    # -- FlaxModelMixin ---------------------------------------------------------------------------
    def dummy_inputs(self):
        size = 2 ** len(self.block_out_channels)  # a 2x2 latent
        return (jnp.zeros((1, self.in_channels, size, size), self.runtime.dtype),)

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        """Old checkpoints name the mid-block attention query/key/value/proj_attn."""
        m = _LEGACY_ATTENTION.match(key)
        return f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key
