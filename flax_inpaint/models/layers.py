"""Building blocks shared by the UNet, VAE and ControlNet (NHWC inside).

Submodule names mirror diffusers' PyTorch attribute names (`conv1`, `time_emb_proj`, `to_q`,
`to_out_0`, ...), so checkpoint conversion is a mechanical rename: a torch key
`resnets.0.conv1.weight` becomes the Flax path `resnets_0/conv1/kernel`.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_inpaint.image_processor import nearest_indices
from flax_inpaint.runtime import Runtime, attention

ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def get_activation(name: str):
    """The activation called `name` in diffusers/transformers configs."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}."
        ) from None


def _shape_cached(init):
    """A flax initializer jitted with static shape and dtype: the same values, but flax checks every
    parameter's shape at each `apply` by tracing its initializer, and jit's trace cache turns the
    repeats (one per layer, each sampling program traced) into lookups."""
    jitted = jax.jit(init, static_argnums=(1, 2))
    return lambda key, shape, dtype=jnp.float32: jitted(key, tuple(shape), dtype)


_KERNEL_INIT = _shape_cached(nn.initializers.lecun_normal())  # nn.Dense's and nn.Conv's default
_ZEROS, _ONES = _shape_cached(nn.initializers.zeros_init()), _shape_cached(nn.initializers.ones_init())


def conv(features: int, runtime: Runtime, kernel: int = 3, stride: int = 1, padding=None, name=None):
    """A 2D convolution (HWIO kernel) with PyTorch's symmetric padding default of kernel // 2."""
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=runtime.dtype,
        param_dtype=runtime.param_dtype,
        kernel_init=_KERNEL_INIT,
        bias_init=_ZEROS,
        name=name,
    )


def dense(features: int, runtime: Runtime, use_bias: bool = True, name=None):
    return nn.Dense(
        features, use_bias=use_bias, dtype=runtime.dtype, param_dtype=runtime.param_dtype,
        kernel_init=_KERNEL_INIT, bias_init=_ZEROS, name=name,
    )


def group_norm(groups: int, eps: float, runtime: Runtime, name=None):
    """GroupNorm over the channel (last) axis; statistics are reduced in float32."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=runtime.dtype,
        param_dtype=runtime.param_dtype,
        scale_init=_ONES,
        bias_init=_ZEROS,
        name=name,
    )


def layer_norm(eps: float, runtime: Runtime, name=None):
    """torch.nn.LayerNorm over the last axis; statistics are reduced in float32."""
    return nn.LayerNorm(
        epsilon=eps, dtype=runtime.dtype, param_dtype=runtime.param_dtype, scale_init=_ONES, bias_init=_ZEROS,
        name=name,
    )


def traced_once(method):
    """A module method traced once per distinct module configuration and input shapes (`nn.jit`).

    Stable Diffusion repeats identical blocks (the UNet's and VAE's resnets and transformers at each
    level, CLIP's layers), so the sampling program traces and lowers one sub-program per kind instead
    of one per block. XLA inlines the calls: the compiled program and its numerics are those of the
    unrolled model. Initialisation stays unjitted, so random weights come from the same keys as
    without it (nn.jit derives its blocks' keys differently).
    """
    jitted = nn.jit(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return (method if self.is_initializing() else jitted)(self, *args, **kwargs)

    return call


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (default time-embedding norm): GN-act-conv, + time, GN-act-conv, skip."""

    out_channels: int
    runtime: Runtime
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_time_emb: bool = True

    @traced_once
    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        rt, act = self.runtime, get_activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, rt, name="norm1")(x))
        h = conv(self.out_channels, rt, name="conv1")(h)
        if self.use_time_emb:
            t = dense(self.out_channels, rt, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        h = act(group_norm(self.groups, self.eps, rt, name="norm2")(h))
        h = conv(self.out_channels, rt, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, rt, kernel=1, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE encoder's variant: pad right/bottom by one first."""

    out_channels: int
    runtime: Runtime
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, self.runtime, stride=2, padding=self.padding, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `output_size` like diffusers) followed by a 3x3 conv."""

    out_channels: int
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[Tuple[int, int]] = None) -> jax.Array:
        if output_size is None or tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = x[:, nearest_indices(x.shape[1], output_size[0])]
            x = x[:, :, nearest_indices(x.shape[2], output_size[1])]
        return conv(self.out_channels, self.runtime, name="conv")(x)


@flax.struct.dataclass
class IPAdapterTokens:
    """Image-prompt tokens for the decoupled cross-attention of IP-Adapters (see models/ip_adapter.py).

    tokens: one [batch, tokens, cross_attention_dim] array per adapter (its image projection's output).
    scale: float32 [layers, adapters], the scale of each adapter in each cross-attention layer still
      ahead, in diffusers' attention-processor order; each block takes its own rows (`take`).
    """

    tokens: Tuple[jax.Array, ...]
    scale: jax.Array

    def take(self, start: int, count: int) -> "IPAdapterTokens":
        """The same tokens with the scales of layers start .. start + count - 1."""
        return self.replace(scale=self.scale[start : start + count])


class Attention(nn.Module):
    """diffusers' `Attention` processor: q/k/v projections, multi-head attention, output projection.

    Works on [batch, tokens, channels]. With `norm_groups` set, it is the VAE's spatial self-attention
    (GroupNorm first, residual added, output divided by `rescale_output_factor`), which also accepts
    NHWC input.

    With `ip` (IP-Adapter tokens, scale rows [1, adapters]) it is diffusers' `IPAdapterAttnProcessor2_0`:
    the queries also attend to each adapter's tokens through its own bias-free `to_k_ip_j` /
    `to_v_ip_j`, and scale_j times that attention is added to the text attention before `to_out_0`.
    """

    heads: int
    dim_head: int
    runtime: Runtime
    qkv_bias: bool = False
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6
    rescale_output_factor: float = 1.0
    out_bias: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, context: Optional[jax.Array] = None, ip: Optional[IPAdapterTokens] = None
    ) -> jax.Array:
        rt = self.runtime
        shape = x.shape
        residual = x
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, rt, name="group_norm")(x)
        if x.ndim == 4:
            x = x.reshape(shape[0], -1, shape[-1])
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def heads(y):
            return y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)

        q = heads(dense(inner, rt, self.qkv_bias, name="to_q")(x))
        k = heads(dense(inner, rt, self.qkv_bias, name="to_k")(context))
        v = heads(dense(inner, rt, self.qkv_bias, name="to_v")(context))
        out = attention(q, k, v, rt)
        for j, tokens in enumerate(() if ip is None else ip.tokens):
            k_ip = heads(dense(inner, rt, False, name=f"to_k_ip_{j}")(tokens.astype(rt.dtype)))
            v_ip = heads(dense(inner, rt, False, name=f"to_v_ip_{j}")(tokens.astype(rt.dtype)))
            out = out + ip.scale[0, j].astype(out.dtype) * attention(q, k_ip, v_ip, rt)
        out = out.reshape(x.shape[0], x.shape[1], inner)
        out = dense(shape[-1], rt, self.out_bias, name="to_out_0")(out).reshape(shape)
        if self.norm_groups is not None:
            out = (out + residual) / self.rescale_output_factor
        return out
