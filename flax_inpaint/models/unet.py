"""The conditional UNet of Stable Diffusion 1.x/2.x and SDXL (incl. 9-channel inpainting), NHWC inside.

Mirrors diffusers' `UNet2DConditionModel`: module names follow the PyTorch attribute names, so a
diffusers checkpoint converts mechanically (see `conversion.py`). The encoder half's config keys are
declared once (`UNetEncoderConfig`) for the UNet and the ControlNet; the blocks are module-level
classes with explicit fields, and `embed_time` / `build_down_block` / `build_mid_block` build the
shared parts from either model.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.diffusers_compat import BaseOutput
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.layers import (
    Attention,
    Downsample2D,
    IPAdapterTokens,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dense,
    get_activation,
    group_norm,
    layer_norm,
    traced_once,
)
from flax_inpaint.runtime import Runtime

IntOrTuple = Union[int, Tuple[int, ...]]

# --------------------------------------------------------------------------------- embeddings


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' `get_timestep_embedding`: [B] timesteps -> [B, dim] sinusoids, always float32.

    freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)); emb = [sin(t freq), cos(t freq)]
    ([cos, sin] with flip_sin_to_cos). Computed in float32 whatever the model dtype: timesteps up to
    1000 times a frequency near 1 would lose the phase entirely in bfloat16.
    """
    half = dim // 2
    # The frequencies are a constant: exponent rounded to float32 as torch does, exp taken in float64
    # and rounded once. That reproduces torch's float32 table (XLA's float32 exp is off by an ulp in
    # places, which at t ~ 1000 moves the sinusoids by ~3e-5).
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def broadcast_timesteps(timesteps: Union[jax.Array, int, float], batch: int) -> jax.Array:
    """Timesteps given as a scalar, [1] or [batch] (int or float) -> a [batch] array."""
    shape = jnp.shape(timesteps)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, batch)):
        raise ValueError(f"timesteps has shape {shape}; expected a scalar, [1] or [{batch}].")
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act), on the sinusoidal timestep embedding."""

    time_embed_dim: int
    runtime: Runtime
    act_fn: str = "silu"
    post_act_fn: Optional[str] = None

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = dense(self.time_embed_dim, self.runtime, name="linear_1")(t_emb)
        h = dense(self.time_embed_dim, self.runtime, name="linear_2")(get_activation(self.act_fn)(h))
        return get_activation(self.post_act_fn)(h) if self.post_act_fn else h


# --------------------------------------------------------------------------------- transformer


class GEGLU(nn.Module):
    """proj to 2*inner, then value * gelu(gate) (exact gelu, as torch's F.gelu). `gated=False` is
    diffusers' GELU module instead: proj to inner, then gelu."""

    inner_dim: int
    runtime: Runtime
    bias: bool = True
    gated: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gelu = get_activation("gelu")
        h = dense((2 if self.gated else 1) * self.inner_dim, self.runtime, self.bias, name="proj")(x)
        if not self.gated:
            return gelu(h)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * gelu(gate)


class FeedForward(nn.Module):
    """diffusers' FeedForward: `net.0` (GEGLU, or GELU with activation_fn="gelu"), `net.1` (dropout),
    `net.2` (Linear)."""

    runtime: Runtime
    mult: float = 4
    activation_fn: str = "geglu"
    bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gated = {"geglu": True, "gelu": False}[self.activation_fn]
        h = GEGLU(int(x.shape[-1] * self.mult), self.runtime, self.bias, gated, name="net_0")(x)
        return dense(x.shape[-1], self.runtime, self.bias, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

    With `only_cross_attention`, attn1 also attends to the context instead of to itself.
    """

    heads: int
    head_dim: int
    runtime: Runtime
    only_cross_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, ip: Optional[IPAdapterTokens] = None) -> jax.Array:
        rt = self.runtime
        h = layer_norm(1e-5, rt, name="norm1")(x)
        x = x + Attention(self.heads, self.head_dim, rt, name="attn1")(
            h, context if self.only_cross_attention else None
        )
        h = layer_norm(1e-5, rt, name="norm2")(x)
        x = x + Attention(self.heads, self.head_dim, rt, name="attn2")(h, context, ip)
        return x + FeedForward(rt, name="ff")(layer_norm(1e-5, rt, name="norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel on continuous NHWC input: GroupNorm, proj_in, blocks, proj_out, residual.

    proj_in/proj_out are 1x1 convs (SD1) or Dense layers (`use_linear_projection`, SD2); both act on
    channels alone, so they are the same map up to the checkpoint's kernel layout.
    """

    heads: int
    head_dim: int
    runtime: Runtime
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False

    @traced_once
    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, ip: Optional[IPAdapterTokens] = None) -> jax.Array:
        rt = self.runtime
        b, hgt, wid, channels = x.shape
        inner = self.heads * self.head_dim

        def proj(features, name):
            if self.use_linear_projection:
                return dense(features, rt, name=name)
            return conv(features, rt, kernel=1, name=name)

        h = group_norm(self.groups, 1e-6, rt, name="norm")(x)
        h = proj(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads, self.head_dim, rt, self.only_cross_attention, name=f"transformer_blocks_{i}"
            )(h, context, None if ip is None else ip.take(i, 1))
        h = proj(channels, "proj_out")(h.reshape(b, hgt, wid, inner))
        return h + x


# --------------------------------------------------------------------------------- UNet blocks


class DownBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D, then an optional stride-2 conv.

    Returns the hidden states and the skip connections (one per layer, plus the downsampled one).
    """

    out_channels: int
    runtime: Runtime
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 1

    def attend(self, i: int, x: jax.Array, context: Optional[jax.Array], ip: Optional[IPAdapterTokens]) -> jax.Array:
        return x

    @nn.compact
    def __call__(self, x, temb, context=None, ip=None) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
        rt, skips = self.runtime, ()
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, rt, self.groups, self.eps, self.act_fn, name=f"resnets_{i}")(
                x, temb
            )
            x = self.attend(i, x, context, ip)
            skips += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, rt, self.downsample_padding, name="downsamplers_0")(x)
            skips += (x,)
        return x, skips


class _CrossAttnBlock(nn.Module):
    """Mixin for a down or up block: a Transformer2DModel (`attentions_i`) after each resnet.

    `heads` is the block's number of heads (the head size is out_channels // heads);
    `transformer_layers` the depth of each resnet's transformer. Listed first among the bases, so
    its fields follow the block's and its `attend` wins.
    """

    transformer_layers: Tuple[int, ...] = (1,)
    heads: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False

    def attend(self, i, x, context, ip):
        return _transformer(self, self.out_channels, i)(x, context, _ip_rows(self, i, ip))


class CrossAttnDownBlock2D(_CrossAttnBlock, DownBlock2D):
    """DownBlock2D with a Transformer2DModel (`attentions_i`) after each resnet."""


class UpBlock2D(nn.Module):
    """`num_layers` x (concat the last skip, ResnetBlock2D), then optional upsampling.

    `upsample_size` forces the upsampled spatial size (diffusers does so when the input size is
    not a multiple of 2**num_upsamplers); otherwise it is plain 2x.
    """

    out_channels: int
    runtime: Runtime
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    add_upsample: bool = True

    def attend(self, i: int, x: jax.Array, context: Optional[jax.Array], ip: Optional[IPAdapterTokens]) -> jax.Array:
        return x

    @nn.compact
    def __call__(self, x, skips, temb, context=None, upsample_size=None, ip=None) -> jax.Array:
        rt = self.runtime
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, rt, self.groups, self.eps, self.act_fn, name=f"resnets_{i}")(
                x, temb
            )
            x = self.attend(i, x, context, ip)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, rt, name="upsamplers_0")(x, upsample_size)
        return x


class CrossAttnUpBlock2D(_CrossAttnBlock, UpBlock2D):
    """UpBlock2D with a Transformer2DModel (`attentions_i`) after each resnet."""


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnets_0, then `num_layers` x (Transformer2DModel, ResnetBlock2D).

    `num_layers=0` is diffusers' UNetMidBlock2D as the UNet builds it (one resnet, no attention).
    """

    channels: int
    runtime: Runtime
    num_layers: int = 1
    transformer_layers: Tuple[int, ...] = (1,)  # per attention layer
    heads: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    only_cross_attention = False  # not configurable for this block in diffusers

    @nn.compact
    def __call__(self, x, temb, context=None, ip=None) -> jax.Array:
        def resnet(i):
            return ResnetBlock2D(
                self.channels, self.runtime, self.groups, self.eps, self.act_fn, self.output_scale_factor,
                name=f"resnets_{i}",
            )

        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = resnet(i + 1)(_transformer(self, self.channels, i)(x, context, _ip_rows(self, i, ip)), temb)
        return x


def _transformer(block: nn.Module, channels: int, i: int) -> Transformer2DModel:
    """The `attentions_i` Transformer2DModel of a cross-attention block (diffusers floors the head size)."""
    return Transformer2DModel(
        block.heads, channels // block.heads, block.runtime, block.transformer_layers[i], block.groups,
        block.use_linear_projection, block.only_cross_attention, name=f"attentions_{i}",
    )


def _ip_rows(block: nn.Module, i: int, ip: Optional[IPAdapterTokens]) -> Optional[IPAdapterTokens]:
    """The IP-Adapter scale rows of a block's `attentions_i` (one per transformer block in it)."""
    depths = block.transformer_layers
    return None if ip is None else ip.take(sum(depths[:i]), depths[i])


DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
ADDITION_EMBED_TYPES = (None, "text_time")
# Per block: an int, or (transformer_layers_per_block only) one depth per resnet layer.
PerBlock = Union[int, Tuple[Union[int, Tuple[int, ...]], ...]]


class UNetEncoderConfig(nn.Module):
    """The config keys of a UNet's encoder half, declared once for `FlaxUNet2DConditionModel` and
    `FlaxControlNetModel` (which inherit them): time and SDXL add-embeddings, conv_in, down blocks,
    mid block. The builders below read them from either model. Names are diffusers' config keys.

    diffusers' naming quirk: `attention_head_dim` is the number of heads per block unless
    `num_attention_heads` is given; the head size is channels // heads. `transformer_layers_per_block`
    holds per block an int or one depth per resnet layer. `addition_embed_type="text_time"` (SDXL)
    adds an embedding of the pooled text embedding and the size conditioning (`time_ids`, each
    entry a sinusoid of `addition_time_embed_dim`) to the time embedding.
    """

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: PerBlock = 1
    attention_head_dim: IntOrTuple = 8  # the number of heads: diffusers' naming quirk
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: Optional[bool] = False  # accepted: attention() always takes the softmax in float32
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    runtime: Runtime = Runtime()

    @property
    def time_embed_dim(self) -> int:
        """Width of the embedding every resnet gets."""
        return getattr(self, "time_embedding_dim", None) or 4 * self.block_out_channels[0]


def embed_time(cfg: UNetEncoderConfig, timesteps, batch: int, added_cond: Mapping[str, jax.Array]) -> jax.Array:
    """The embedding every resnet gets, built in the calling module (`time_embedding`, and with
    `addition_embed_type="text_time"` SDXL's `add_embedding` of [text_embeds, sinusoids(time_ids)])."""
    rt = cfg.runtime
    t = broadcast_timesteps(timesteps, batch)
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = TimestepEmbedding(
        cfg.time_embed_dim, rt, cfg.act_fn, getattr(cfg, "timestep_post_act", None), name="time_embedding"
    )(t_emb)
    if cfg.addition_embed_type == "text_time":
        ids = added_cond["time_ids"]
        sizes = timestep_embedding(
            jnp.reshape(ids, (-1,)), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(batch, -1)
        text = added_cond["text_embeds"].astype(jnp.float32)
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, rt, name="add_embedding")(
            jnp.concatenate([text, sizes], axis=-1)
        )
    act = getattr(cfg, "time_embedding_act_fn", None)
    return get_activation(act)(emb) if act else emb


def added_cond_keys(cfg: UNetEncoderConfig) -> Tuple[str, ...]:
    """The `added_cond_kwargs` entries this configuration uses."""
    return ("text_embeds", "time_ids") if cfg.addition_embed_type == "text_time" else ()


def check_added_cond(cfg: UNetEncoderConfig, added_cond: Optional[Mapping[str, Any]], batch: int) -> dict:
    """`added_cond_kwargs` checked against the configuration: exactly the entries it uses, shaped to fit."""
    if added_cond is not None and not isinstance(added_cond, Mapping):
        raise TypeError(
            f"added_cond_kwargs must be a dict (SDXL's added conditioning) or None; got "
            f"{type(added_cond).__name__}. ControlNet residuals go in down_block_additional_residuals "
            "and mid_block_additional_residual, after it (diffusers' Flax argument order)."
        )
    added, keys = dict(added_cond or {}), added_cond_keys(cfg)
    if not keys and added:
        raise ValueError(
            f"added_cond_kwargs={sorted(added)} feeds an addition embedding (addition_embed_type='text_time', "
            "SDXL), which this model does not have; pass None."
        )
    if keys and sorted(added) != sorted(keys):
        raise ValueError(
            f"added_cond_kwargs has {sorted(added)}; addition_embed_type={cfg.addition_embed_type!r} takes "
            f"exactly {list(keys)} (SDXL: the pooled text embedding and the size conditioning)."
        )
    if keys:
        text, ids = jnp.shape(added["text_embeds"]), jnp.shape(added["time_ids"])
        width = cfg.projection_class_embeddings_input_dim
        if len(text) != 2 or len(ids) != 2 or text[0] != batch or ids[0] != batch or (
            text[1] + ids[1] * cfg.addition_time_embed_dim != width
        ):
            raise ValueError(
                f"added_cond_kwargs: text_embeds {text} and time_ids {ids} must be [{batch}, d] and "
                f"[{batch}, k] with d + k * addition_time_embed_dim ({cfg.addition_time_embed_dim}) = "
                f"projection_class_embeddings_input_dim ({width})."
            )
    return added


def per_block(value: Any, n: int, name: str) -> Tuple[Any, ...]:
    """A per-block config value: a scalar repeated n times, or a sequence of exactly n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}={value!r} has {len(value)} entries; expected one per block ({n}).")
        return tuple(value)
    return (value,) * n


def _at(cfg: Any, key: str, i: int) -> Any:
    """Entry i of the per-block config value `key` (up block i uses entry n - 1 - i)."""
    return per_block(getattr(cfg, key), len(cfg.block_out_channels), key)[i]


def _block_type(name: Optional[str]) -> Optional[str]:
    """diffusers accepts a `UNetRes` prefix on block type names and drops it."""
    return name[7:] if name and name.startswith("UNetRes") else name


def _depths(entry: Any, num_layers: int, key: str) -> Tuple[int, ...]:
    """A block's transformer depth entry as one depth per resnet layer: an int repeats; a list needs at
    least one entry per layer (diffusers reads the first num_layers)."""
    if isinstance(entry, int):
        return (entry,) * num_layers
    if len(entry) < num_layers or not all(isinstance(d, int) for d in entry):
        raise ValueError(
            f"{key}: the entry {list(entry)} must be an int or hold an int for each of the block's "
            f"{num_layers} layers."
        )
    return tuple(entry[:num_layers])


def _attention_fields(cfg: Any, i: int, depths: Any, num_layers: int, key: str) -> dict:
    """Transformer settings of block entry i with the transformer depth entry `depths`."""
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    return dict(
        transformer_layers=_depths(depths, num_layers, key),
        heads=per_block(heads, len(cfg.block_out_channels), "num_attention_heads")[i],
        use_linear_projection=cfg.use_linear_projection,
    )


def _maybe_remat(block: type, cfg: Any) -> type:
    """`block`, or with `cfg.runtime.remat` its gradient-checkpointed version: the backward pass
    recomputes the block's activations from its inputs. Up blocks take their upsample size (argument
    5, counting self) as a static Python tuple."""
    if not cfg.runtime.remat:
        return block
    return nn.remat(block, static_argnums=(5,) if issubclass(block, UpBlock2D) else ())


def _down_block(cfg: Any, i: int) -> Tuple[type, dict]:
    """(class, fields) of down block i of a UNet-family config."""
    n, layers = len(cfg.block_out_channels), _at(cfg, "layers_per_block", i)
    fields = dict(
        out_channels=cfg.block_out_channels[i], runtime=cfg.runtime, num_layers=layers,
        groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, add_downsample=i < n - 1,
        downsample_padding=cfg.downsample_padding,
    )
    if _block_type(cfg.down_block_types[i]) == "DownBlock2D":
        return DownBlock2D, fields
    key = "transformer_layers_per_block"
    fields.update(_attention_fields(cfg, i, _at(cfg, key, i), layers, key))
    return CrossAttnDownBlock2D, dict(fields, only_cross_attention=_at(cfg, "only_cross_attention", i))


def _mid_block(cfg: Any) -> dict:
    """Fields of the mid block of a UNet-family config (settings of the deepest block)."""
    key = "transformer_layers_per_block"
    return dict(
        channels=cfg.block_out_channels[-1], runtime=cfg.runtime,
        num_layers=1 if cfg.mid_block_type == "UNetMidBlock2DCrossAttn" else 0,
        groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
        output_scale_factor=cfg.mid_block_scale_factor, **_attention_fields(cfg, -1, _at(cfg, key, -1), 1, key),
    )


def _up_block(cfg: Any, i: int) -> Tuple[type, dict]:
    """(class, fields) of up block i of a UNet config: it mirrors down block n - 1 - i and has one more
    layer; its transformer depths come from reverse_transformer_layers_per_block[i] where given."""
    n = len(cfg.block_out_channels)
    j = n - 1 - i
    layers = _at(cfg, "layers_per_block", j) + 1
    fields = dict(
        out_channels=cfg.block_out_channels[j], runtime=cfg.runtime, num_layers=layers,
        groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, add_upsample=i < n - 1,
    )
    if _block_type(cfg.up_block_types[i]) == "UpBlock2D":
        return UpBlock2D, fields
    if cfg.reverse_transformer_layers_per_block is None:
        key, depths = "transformer_layers_per_block", _at(cfg, "transformer_layers_per_block", j)
    else:
        key, depths = "reverse_transformer_layers_per_block", _at(cfg, "reverse_transformer_layers_per_block", i)
    fields.update(_attention_fields(cfg, j, depths, layers, key))
    return CrossAttnUpBlock2D, dict(fields, only_cross_attention=_at(cfg, "only_cross_attention", j))


def build_down_block(cfg: Any, i: int, name: str) -> nn.Module:
    """Down block i of a UNet-family config `cfg` (a UNet or ControlNet module)."""
    block, fields = _down_block(cfg, i)
    return _maybe_remat(block, cfg)(**fields, name=name)


def build_mid_block(cfg: Any, name: str = "mid_block") -> Optional[nn.Module]:
    """The mid block of a UNet-family config, or None."""
    if cfg.mid_block_type is None:
        return None
    return _maybe_remat(UNetMidBlock2DCrossAttn, cfg)(**_mid_block(cfg), name=name)


def build_up_block(cfg: Any, i: int, name: str) -> nn.Module:
    """Up block i of a UNet config."""
    block, fields = _up_block(cfg, i)
    return _maybe_remat(block, cfg)(**fields, name=name)


def cross_attention_paths(cfg: Any) -> Tuple[Tuple[str, ...], ...]:
    """Param paths of a UNet config's cross-attention (attn2) layers in diffusers' attention-processor
    order, which IP-Adapter files and scales follow: down blocks, up blocks, then the mid block (the
    order in which the PyTorch UNet registers them)."""
    n = len(cfg.block_out_channels)
    blocks = [(f"down_blocks_{i}", _down_block(cfg, i)[1]) for i in range(n)]
    blocks += [(f"up_blocks_{i}", _up_block(cfg, i)[1]) for i in range(n)]
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        blocks.append(("mid_block", _mid_block(cfg)))
    return tuple(  # blocks without attention have no transformer_layers field
        (name, f"attentions_{a}", f"transformer_blocks_{t}", "attn2")
        for name, fields in blocks for a, depth in enumerate(fields.get("transformer_layers", ())) for t in range(depth)
    )


def validate_unet_config(cfg: Any, up_block_types: Optional[Sequence[str]] = None) -> None:
    """Clear ValueErrors for UNet-family configs this implementation cannot run."""
    n = len(cfg.block_out_channels)
    down = [_block_type(t) for t in cfg.down_block_types]
    if len(down) != n:
        raise ValueError(
            f"down_block_types has {len(down)} entries but block_out_channels has {n}; they must match."
        )
    kinds = [("down_block_types", down, DOWN_BLOCKS)]
    if up_block_types is not None:
        if len(up_block_types) != n:
            raise ValueError(f"up_block_types has {len(up_block_types)} entries; expected {n}.")
        kinds.append(("up_block_types", [_block_type(t) for t in up_block_types], UP_BLOCKS))
    for key, types, supported in kinds:
        bad = [t for t in types if t not in supported]
        if bad:
            raise ValueError(f"{key}: unsupported block types {bad}; supported: {sorted(supported)}.")
    if cfg.mid_block_type not in MID_BLOCKS:
        raise ValueError(f"mid_block_type={cfg.mid_block_type!r} is not supported; use one of {MID_BLOCKS}.")
    if not isinstance(cfg.norm_num_groups, int):
        raise ValueError(f"norm_num_groups={cfg.norm_num_groups!r} is not supported; give an int.")
    odd = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if odd:
        raise ValueError(
            f"block_out_channels {odd} are not divisible by norm_num_groups={cfg.norm_num_groups}."
        )
    for name in ("layers_per_block", "only_cross_attention", "transformer_layers_per_block"):
        per_block(getattr(cfg, name), n, name)
    heads_key = "num_attention_heads" if cfg.num_attention_heads else "attention_head_dim"
    heads = per_block(getattr(cfg, heads_key), n, heads_key)
    small = [(c, h) for c, h in zip(cfg.block_out_channels, heads) if c // h == 0]
    if small:
        raise ValueError(f"(channels, heads) {small}: fewer channels than attention heads ({heads_key}).")
    if len(set(per_block(cfg.cross_attention_dim, n, "cross_attention_dim"))) != 1:
        raise ValueError(
            f"cross_attention_dim={cfg.cross_attention_dim!r}: differing per-block values need an "
            "encoder_hid_proj, which is not supported; give one value."
        )
    if cfg.addition_embed_type not in ADDITION_EMBED_TYPES:
        raise ValueError(
            f"addition_embed_type={cfg.addition_embed_type!r} is not supported; use one of {ADDITION_EMBED_TYPES}."
        )
    if cfg.addition_embed_type == "text_time":
        dims = {k: getattr(cfg, k) for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")}
        if not all(isinstance(v, int) and v > 0 for v in dims.values()) or (
            dims["projection_class_embeddings_input_dim"] < dims["addition_time_embed_dim"]
        ):
            raise ValueError(
                f"addition_embed_type='text_time' needs positive ints {dims}, the second at least the first "
                "(text embedding width + number of time ids x addition_time_embed_dim)."
            )
    for i in range(n):  # every block's settings resolve (transformer depths per layer included)
        _down_block(cfg, i)
        if up_block_types is not None:
            _up_block(cfg, i)
    if cfg.mid_block_type is not None:
        _mid_block(cfg)


# --------------------------------------------------------------------------------- the UNet


@flax.struct.dataclass
class FlaxUNet2DConditionOutput(BaseOutput):
    """sample: [batch, channels, height, width] noise (or v) prediction."""

    sample: jax.Array


class FlaxUNet2DConditionModel(FlaxModelMixin, UNetEncoderConfig):
    """diffusers' UNet2DConditionModel (SD 1.x/2.x, SDXL base/refiner, 4- and 9-channel inpainting).

    Fields are the diffusers config keys (the encoder's from `UNetEncoderConfig`). `__call__` takes
    and returns NCHW like diffusers; `nhwc` is the same network on NHWC arrays, for pipelines and
    ControlNets that stay NHWC. SDXL configs (`addition_embed_type="text_time"`) take
    `added_cond_kwargs={"text_embeds": [B, d], "time_ids": [B, k]}`.
    """

    sample_size: Optional[Union[int, Tuple[int, int]]] = 32
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    reverse_transformer_layers_per_block: Optional[PerBlock] = None
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    torch_class = "UNet2DConditionModel"
    weight_stems = ("diffusion_pytorch_model",)
    # Keys that do not change this computation: dropout is inference-irrelevant; diffusers' Flax
    # attention-kernel switches (use_memory_efficient_attention, split_head_dim) are Runtime.attention's
    # job here; the others only configure block types or embeddings that the fixed keys rule out.
    ignored_config_keys = frozenset(
        {
            "dropout", "mid_block_only_cross_attention", "cross_attention_norm", "resnet_skip_time_act",
            "resnet_out_scale_factor", "addition_embed_type_num_heads", "use_memory_efficient_attention",
            "split_head_dim",
        }
    )
    fixed_config = {
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "dual_cross_attention": (False,),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
        "class_embeddings_concat": (False,),
        "resnet_time_scale_shift": ("default",),
        "time_embedding_type": ("positional",),
        "time_cond_proj_dim": (None,),
        "attention_type": ("default",),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.num_attention_heads is not None:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads!r}: diffusers' UNet2DConditionModel refuses it "
                "(its attention_head_dim holds the number of heads); give the heads as attention_head_dim."
            )
        depths = self.transformer_layers_per_block
        if self.reverse_transformer_layers_per_block is None and isinstance(depths, tuple) and not all(
            isinstance(d, int) for d in depths
        ):
            raise ValueError(
                f"transformer_layers_per_block={depths!r}: per-layer lists need "
                "reverse_transformer_layers_per_block (the up blocks' depths), as in diffusers."
            )
        validate_unet_config(self, self.up_block_types)

    def dummy_inputs(self):
        """The smallest valid inputs: one sample of 2**num_upsamplers pixels a side, one token, and
        SDXL's added conditioning where the config has it."""
        size, dt = 2 ** (len(self.block_out_channels) - 1), self.runtime.dtype
        return (
            jnp.zeros((1, self.in_channels, size, size), dt),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, _at(self, "cross_attention_dim", 0)), dt),
            dummy_added_cond(self),
        )

    def __call__(
        self,
        sample: jax.Array,
        timesteps: Union[jax.Array, int, float],
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
        down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
        mid_block_additional_residual: Optional[jax.Array] = None,
        return_dict: bool = True,
        train: bool = False,
        ip_hidden_states: Optional[Sequence[jax.Array]] = None,
        ip_adapter_scale: Union[jax.Array, float, None] = None,
    ):
        """NCHW in and out, like diffusers' Flax UNet (same arguments, same order). ControlNet residuals
        are NCHW too. IP-Adapter tokens and scales: see `nhwc`.

        The model is deterministic whatever `train` says (no dropout or other train-time behaviour, so
        True gives the same output). `added_cond_kwargs` feeds SDXL's addition embedding
        (`addition_embed_type="text_time"`: `text_embeds` [B, d], `time_ids` [B, k]); other
        configurations take None or an empty dict.
        """
        del train  # no train-time behaviour: see above
        added_cond_kwargs = check_added_cond(self, added_cond_kwargs, sample.shape[0])  # before transposing

        def to_nhwc(x):
            return None if x is None else jnp.transpose(x, (0, 2, 3, 1))

        down = down_block_additional_residuals
        sample, mid = to_nhwc(sample), to_nhwc(mid_block_additional_residual)
        down = None if down is None else [to_nhwc(r) for r in down]
        self._check_inputs(sample, encoder_hidden_states, down, mid, ip_hidden_states, ip_adapter_scale)
        out = self.nhwc(sample, timesteps, encoder_hidden_states, down, mid, added_cond_kwargs, ip_hidden_states,
                        ip_adapter_scale)
        out = jnp.transpose(out, (0, 3, 1, 2))
        return FlaxUNet2DConditionOutput(sample=out) if return_dict else (out,)

    @nn.compact
    def nhwc(
        self,
        sample: jax.Array,
        timesteps: Union[jax.Array, int, float],
        encoder_hidden_states: jax.Array,
        down_residuals: Optional[Sequence[jax.Array]] = None,
        mid_residual: Optional[jax.Array] = None,
        added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
        ip_hidden_states: Optional[Sequence[jax.Array]] = None,
        ip_adapter_scale: Union[jax.Array, float, None] = None,
    ) -> jax.Array:
        """The UNet on NHWC `sample` [B, H, W, in_channels]; returns [B, H, W, out_channels].

        timesteps: scalar, [1] or [B], int or float. encoder_hidden_states: [B, tokens, dim].
        down_residuals (one per skip connection, conv_in's first) and mid_residual are ControlNet
        outputs, NHWC, added like diffusers does; give both or neither. added_cond_kwargs: as in
        `__call__` (SDXL).
        ip_hidden_states: IP-Adapter image tokens, one [B, tokens, dim] (or [B, images, tokens, dim])
        array per loaded adapter, what diffusers appends to the text tokens; the params then need the
        adapters' `to_k_ip_j` / `to_v_ip_j` (loaders/ip_adapter.py). ip_adapter_scale: broadcastable to
        [cross-attention layers, adapters] (`cross_attention_paths` order), default 1; an argument, so
        new scales do not recompile.

        Its callers check their inputs (`__call__`, the pipelines' `inputs.build`): only shapes are asserted here.
        """
        rt, n = self.runtime, len(self.block_out_channels)
        batch = sample.shape[0]
        added = check_added_cond(self, added_cond_kwargs, batch)
        assert sample.shape[-1] == self.in_channels and encoder_hidden_states.shape[0] == batch, (
            sample.shape, encoder_hidden_states.shape)
        context = encoder_hidden_states.astype(rt.dtype)
        ip = self._ip_tokens(ip_hidden_states, ip_adapter_scale, batch)
        ip_blocks = [path[0] for path in cross_attention_paths(self)]  # the block of each scale row

        def ip_of(block):
            if ip is None or block not in ip_blocks:
                return None
            return ip.take(ip_blocks.index(block), ip_blocks.count(block))
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        emb = embed_time(self, timesteps, batch, added)

        k_in, k_out = self.conv_in_kernel, self.conv_out_kernel
        h = conv(self.block_out_channels[0], rt, k_in, padding=(k_in - 1) // 2, name="conv_in")(sample)
        skips = (h,)
        for i in range(n):
            h, res = build_down_block(self, i, f"down_blocks_{i}")(h, emb, context, ip_of(f"down_blocks_{i}"))
            skips += res
        if down_residuals is not None:
            # A residual may broadcast: global-pooled ControlNets give [B, 1, 1, C].
            if not all(
                r.ndim == 4 and all(a in (1, b) for a, b in zip(r.shape, s.shape))
                for r, s in zip(down_residuals, skips)
            ):
                raise ValueError(
                    f"down-block residuals have shapes {[r.shape for r in down_residuals]}; this UNet's "
                    f"skip connections have shapes {[s.shape for s in skips]} (NHWC), which each "
                    "residual must match or broadcast to."
                )
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_residuals))

        mid = build_mid_block(self)
        if mid is not None:
            h = mid(h, emb, context, ip_of("mid_block"))
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)

        # diffusers forwards the skip's size to the upsamplers when the input is not a multiple
        # of 2**num_upsamplers (nearest resize to that size instead of plain 2x).
        forward_size = any(d % 2 ** (n - 1) for d in sample.shape[1:3])
        for i in range(n):
            block = build_up_block(self, i, f"up_blocks_{i}")
            res, skips = skips[-block.num_layers:], skips[:-block.num_layers]
            size = skips[-1].shape[1:3] if forward_size and i < n - 1 else None
            h = block(h, res, emb, context, size, ip_of(f"up_blocks_{i}"))

        h = get_activation(self.act_fn)(
            group_norm(self.norm_num_groups, self.norm_eps, rt, name="conv_norm_out")(h)
        )
        return conv(self.out_channels, rt, k_out, padding=(k_out - 1) // 2, name="conv_out")(h)

    def _ip_tokens(self, hidden_states, scale, batch: int) -> Optional[IPAdapterTokens]:
        """The IP-Adapter inputs shaped: tokens [B, n, dim] each, scales [layers, adapters]."""
        if hidden_states is None:
            return None
        dim, layers = _at(self, "cross_attention_dim", 0), len(cross_attention_paths(self))
        tokens = tuple(t.reshape(batch, -1, dim) for t in hidden_states)
        scale = jnp.float32(1.0) if scale is None else jnp.asarray(scale, jnp.float32)
        return IPAdapterTokens(tokens, jnp.broadcast_to(scale, (layers, len(tokens))))

    def _check_inputs(self, sample, context, down_residuals, mid_residual, ip_hidden_states, ip_adapter_scale):
        """Fail before any compute on inputs of `__call__` (NHWC by now) that cannot fit this configuration."""
        n = len(self.block_out_channels)
        check_sample_and_context(self, sample, context)
        if (down_residuals is None) != (mid_residual is None):
            raise ValueError(
                "Give both down_block_additional_residuals and mid_block_additional_residual "
                "(ControlNet outputs), or neither."
            )
        skips = 1 + sum(_at(self, "layers_per_block", i) for i in range(n)) + n - 1
        if down_residuals is not None and len(down_residuals) != skips:
            raise ValueError(
                f"Got {len(down_residuals)} down-block residuals; this UNet has {skips} skip connections "
                "(conv_in's, one per down-block layer, one per downsampler)."
            )
        self._check_ip(ip_hidden_states, ip_adapter_scale, sample.shape[0])

    def _check_ip(self, hidden_states, scale, batch: int) -> None:
        """IP-Adapter tokens: one [B, tokens, dim] (or [B, images, tokens, dim]) array per adapter the params
        hold, and scales broadcastable to [cross-attention layers, adapters]."""
        if hidden_states is None:
            if scale is not None:
                raise ValueError("ip_adapter_scale was given without ip_hidden_states; pass both or neither.")
            return
        if isinstance(hidden_states, jax.Array) or not isinstance(hidden_states, Sequence) or not hidden_states:
            raise TypeError("ip_hidden_states must be a list with one token array per IP-Adapter, as diffusers' "
                            "image_embeds; wrap a single adapter's array in a list.")
        paths = cross_attention_paths(self)
        if not paths:
            raise ValueError("ip_hidden_states was given, but this UNet has no cross-attention layers to use it.")
        params = flax.traverse_util.flatten_dict(flax.core.unfreeze(self.variables.get("params", {})))
        last = paths[0] + (f"to_k_ip_{len(hidden_states) - 1}", "kernel")
        if not self.is_initializing() and last not in params:
            raise ValueError(f"ip_hidden_states has {len(hidden_states)} arrays, but the params hold fewer "
                             "IP-Adapters; add them with flax_inpaint.loaders.ip_adapter.load_ip_adapter.")
        dim = _at(self, "cross_attention_dim", 0)
        for j, t in enumerate(hidden_states):
            if t.ndim not in (3, 4) or t.shape[0] != batch or t.shape[-1] != dim:
                raise ValueError(f"ip_hidden_states[{j}] has shape {t.shape}; expected [{batch}, tokens, {dim}] "
                                 f"or [{batch}, images, tokens, {dim}].")
        shape = (len(paths), len(hidden_states))
        try:
            fits = scale is None or np.broadcast_shapes(np.shape(scale), shape) == shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"ip_adapter_scale has shape {np.shape(scale)}; expected one broadcastable to "
                             f"[cross-attention layers, adapters] = {list(shape)}.")


def check_sample_and_context(cfg: UNetEncoderConfig, sample: jax.Array, context: jax.Array) -> None:
    """The NHWC sample's channels and the text context's shape fit a UNet-family config."""
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise ValueError(
            f"sample has shape {sample.shape}; expected NHWC with {cfg.in_channels} channels "
            "(NCHW through __call__)."
        )
    dim, b = _at(cfg, "cross_attention_dim", 0), sample.shape[0]
    if context.ndim != 3 or context.shape[-1] != dim or context.shape[0] != b:
        raise ValueError(
            f"encoder_hidden_states has shape {context.shape}; expected [{b}, tokens, {dim}]."
        )


def dummy_added_cond(cfg: UNetEncoderConfig) -> Optional[dict]:
    """Smallest valid `added_cond_kwargs` for one sample (None without an addition embedding): one
    size value, the rest of projection_class_embeddings_input_dim as text (only the sum sets shapes)."""
    if cfg.addition_embed_type != "text_time":
        return None
    width, dt = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim, cfg.runtime.dtype
    return {"text_embeds": jnp.zeros((1, width), dt), "time_ids": jnp.zeros((1, 1), dt)}
