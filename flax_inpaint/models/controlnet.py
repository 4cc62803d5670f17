"""ControlNet for Stable Diffusion 1.x/2.x and SDXL, NHWC inside.

Mirrors diffusers' `ControlNetModel`: a copy of the UNet's encoder half (time embedding, conv_in,
down blocks, mid block, all built by `unet.py`) whose input is the noisy latent plus an embedding
of the control image, and whose outputs are the skip connections and mid-block activation passed
through 1x1 "zero convolutions". Those residuals are added to a UNet's own (see
`FlaxUNet2DConditionModel.nhwc`). Module names follow the PyTorch attribute names, so a diffusers
ControlNet folder converts mechanically (see `conversion.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.models.conversion import Params
from flax_inpaint.diffusers_compat import BaseOutput
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.layers import conv
from flax_inpaint.models.unet import (
    FlaxUNet2DConditionModel,
    UNetEncoderConfig,
    _at,
    build_down_block,
    build_mid_block,
    check_added_cond,
    check_sample_and_context,
    dummy_added_cond,
    embed_time,
    validate_unet_config,
)
from flax_inpaint.runtime import Runtime

# Convolutions torch initialises to zero so that a fresh ControlNet leaves the UNet unchanged.
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding/conv_out")


class ControlNetConditioningEmbedding(nn.Module):
    """Control image [B, H, W, C] -> [B, H/2**k, W/2**k, out_channels] (k = len(block_out_channels) - 1).

    conv_in, then per level a 3x3 conv and a stride-2 3x3 conv (`blocks_2i`, `blocks_2i+1`), each
    followed by SiLU, then conv_out.
    """

    out_channels: int
    block_out_channels: Tuple[int, ...]
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rt, ch = self.runtime, self.block_out_channels
        x = nn.silu(conv(ch[0], rt, name="conv_in")(x))
        for i in range(len(ch) - 1):
            x = nn.silu(conv(ch[i], rt, name=f"blocks_{2 * i}")(x))
            x = nn.silu(conv(ch[i + 1], rt, stride=2, name=f"blocks_{2 * i + 1}")(x))
        return conv(self.out_channels, rt, name="conv_out")(x)


def _zero_convs(params: Params) -> Params:
    """`params` with the ZERO_INIT convolutions set to zero."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    flat = {k: jnp.zeros_like(v) if k.startswith(ZERO_INIT) else v for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


@flax.struct.dataclass
class FlaxControlNetOutput(BaseOutput):
    """NCHW residuals for a UNet: one per skip connection (conv_in's first) and the mid block's."""

    down_block_res_samples: Tuple[jax.Array, ...]
    mid_block_res_sample: jax.Array


class FlaxControlNetModel(FlaxModelMixin, UNetEncoderConfig):
    """diffusers' ControlNetModel (SD 1.x/2.x, and SDXL's with `addition_embed_type="text_time"`).

    Fields are the diffusers config keys (the encoder's from `UNetEncoderConfig`, shared with the
    UNet). `__call__` takes and returns NCHW like diffusers; `nhwc` is the same network on NHWC
    arrays, returning what `FlaxUNet2DConditionModel.nhwc` takes.
    """

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    torch_class = "ControlNetModel"
    weight_stems = ("diffusion_pytorch_model",)
    # Keys that only configure the embeddings the fixed keys below rule out, and the keys of diffusers'
    # Flax ControlNet that change nothing here: dropout (inference), its attention-kernel switches
    # (Runtime.attention's job) and sample_size (the control image sets the size).
    ignored_config_keys = frozenset(
        {"addition_embed_type_num_heads", "dropout", "use_memory_efficient_attention", "split_head_dim",
         "sample_size"}
    )
    fixed_config = {
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default",),
    }

    def __post_init__(self):
        super().__post_init__()
        validate_unet_config(self)
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise ValueError(
                f"mid_block_type={self.mid_block_type!r}: a ControlNet needs a mid block; use "
                "'UNetMidBlock2DCrossAttn' or 'UNetMidBlock2D'."
            )
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                f"controlnet_conditioning_channel_order={self.controlnet_conditioning_channel_order!r}; "
                "use 'rgb' or 'bgr'."
            )
        if not self.conditioning_embedding_out_channels:
            raise ValueError(
                f"conditioning_embedding_out_channels={self.conditioning_embedding_out_channels!r}; "
                "give at least one channel count, e.g. (16, 32, 96, 256)."
            )

    @property
    def cond_downscale(self) -> int:
        """How many times larger than the latent the control image is (8 for SD's ControlNets)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def dummy_inputs(self):
        """The smallest valid inputs: one latent of 2**num_downsamplers pixels a side, one token, and
        SDXL's added conditioning where the config has it."""
        size, dt = 2 ** (len(self.block_out_channels) - 1), self.runtime.dtype
        cond_size = size * self.cond_downscale
        return (
            jnp.zeros((1, self.in_channels, size, size), dt),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, _at(self, "cross_attention_dim", 0)), dt),
            jnp.zeros((1, self.conditioning_channels, cond_size, cond_size), dt),
            1.0, True, False, dummy_added_cond(self),
        )

    def init_weights(self, rng: jax.Array) -> Params:
        """Random params with the zero convolutions zeroed, as diffusers initialises them."""
        return _zero_convs(super().init_weights(rng))

    @classmethod
    def from_unet(
        cls,
        unet_model: FlaxUNet2DConditionModel,
        unet_params: Params,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
        rng: Optional[jax.Array] = None,
    ) -> Tuple["FlaxControlNetModel", Params]:
        """A ControlNet with the UNet's config whose encoder starts from the UNet's weights.

        Like diffusers' `ControlNetModel.from_unet`: conv_in, time_embedding, down blocks and mid
        block are copied (if `load_weights_from_unet`); the zero convolutions are zero and the
        conditioning embedding is random from `rng` (default `jax.random.key(0)`). Returns
        `(model, params)`, params in the UNet's runtime.param_dtype.
        """
        u = unet_model
        unmirrored = {
            "time_embedding_dim": (u.time_embedding_dim, (None, 4 * u.block_out_channels[0])),
            "time_embedding_act_fn": (u.time_embedding_act_fn, (None,)),
            "timestep_post_act": (u.timestep_post_act, (None,)),
            "conv_in_kernel": (u.conv_in_kernel, (3,)),
        }
        bad = [f"{k}={v!r} (allowed: {ok})" for k, (v, ok) in unmirrored.items() if v not in ok]
        if bad:
            raise ValueError(
                f"The UNet's {', '.join(bad)} cannot be mirrored by a ControlNet, whose time "
                "embedding and conv_in are fixed; use a UNet without these options."
            )
        model = cls(
            **{f.name: getattr(u, f.name) for f in dataclasses.fields(UNetEncoderConfig)
               if f.name not in ("parent", "name")},
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        )
        rng = jax.random.key(0) if rng is None else rng
        if not load_weights_from_unet:
            return model, model.init_weights(rng)
        # Only the conditioning embedding needs random weights: initialising the whole network to
        # overwrite most of it would compile and materialise a full random copy of the encoder.
        f, rt = model.cond_downscale, model.runtime
        embedding = ControlNetConditioningEmbedding(
            model.block_out_channels[0], model.conditioning_embedding_out_channels, rt
        )
        flatten = flax.traverse_util.flatten_dict
        embedded = jax.jit(embedding.init)(rng, jnp.zeros((1, f, f, conditioning_channels), rt.dtype))
        fresh = {("controlnet_cond_embedding", *k): v for k, v in flatten(embedded["params"]).items()}
        unet_flat = flatten(flax.core.unfreeze(unet_params))
        params = {}
        for path, spec in model.param_shapes().items():
            if path[0].startswith("controlnet_"):  # the embedding, or a zero convolution
                params[path] = fresh.get(path, jnp.zeros(spec.shape, spec.dtype))
            elif path in unet_flat:  # a missing one is reported by _check_tree
                params[path] = unet_flat[path]
        params = _zero_convs(flax.traverse_util.unflatten_dict(params))
        return model, model._cast(model._check_tree(params, "the UNet's params"))

    def __call__(
        self,
        sample: jax.Array,
        timesteps: Union[jax.Array, int, float],
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: Union[float, jax.Array] = 1.0,
        return_dict: bool = True,
        train: bool = False,
        added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
        *,
        guess_mode: bool = False,
    ):
        """NCHW in and out, like diffusers' Flax ControlNet (same arguments, same order; `train` changes
        nothing: no dropout). controlnet_cond: [B, C, H*f, W*f] image in [0, 1]. `added_cond_kwargs`:
        SDXL's `text_embeds` and `time_ids`, as the UNet takes them. `guess_mode` (a keyword, as in
        diffusers' PyTorch ControlNet) scales the residuals for CFG-free guidance."""
        del train

        def to_nhwc(x):
            return jnp.transpose(x, (0, 2, 3, 1))

        def to_nchw(x):
            return jnp.transpose(x, (0, 3, 1, 2))

        sample, controlnet_cond = to_nhwc(sample), to_nhwc(controlnet_cond)
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond)
        down, mid = self.nhwc(sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale,
                              guess_mode, added_cond_kwargs)
        down, mid = tuple(to_nchw(r) for r in down), to_nchw(mid)
        return FlaxControlNetOutput(down, mid) if return_dict else (down, mid)

    @nn.compact
    def nhwc(
        self,
        sample: jax.Array,
        timesteps: Union[jax.Array, int, float],
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: Union[float, jax.Array] = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
    ) -> Tuple[Tuple[jax.Array, ...], jax.Array]:
        """The ControlNet on NHWC arrays; returns (down residuals, mid residual), NHWC.

        sample: [B, H, W, in_channels]; timesteps: scalar, [1] or [B]; encoder_hidden_states:
        [B, tokens, dim]; controlnet_cond: [B, H*f, W*f, conditioning_channels] (f = cond_downscale).
        conditioning_scale may be traced (a per-step gate); guess_mode is static: it scales the
        residuals from 0.1 (conv_in's) up to 1 (the mid block's) on a log scale. With
        global_pool_conditions the residuals are averaged over space ([B, 1, 1, C]). added_cond_kwargs:
        as in `__call__` (SDXL). Its callers check their inputs (`__call__`, the pipelines' `inputs.build`):
        only shapes are asserted here.
        """
        rt, n = self.runtime, len(self.block_out_channels)
        added = check_added_cond(self, added_cond_kwargs, sample.shape[0])
        assert sample.shape[-1] == self.in_channels and controlnet_cond.shape[-1] == self.conditioning_channels, (
            sample.shape, controlnet_cond.shape)
        context = encoder_hidden_states.astype(rt.dtype)
        cond = controlnet_cond.astype(rt.dtype)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]

        emb = embed_time(self, timesteps, sample.shape[0], added)

        h = conv(self.block_out_channels[0], rt, name="conv_in")(sample)
        h = h + ControlNetConditioningEmbedding(
            self.block_out_channels[0], self.conditioning_embedding_out_channels, rt,
            name="controlnet_cond_embedding",
        )(cond)
        skips = (h,)
        for i in range(n):
            h, res = build_down_block(self, i, f"down_blocks_{i}")(h, emb, context)
            skips += res
        h = build_mid_block(self)(h, emb, context)

        down = [conv(s.shape[-1], rt, 1, name=f"controlnet_down_blocks_{i}")(s) for i, s in enumerate(skips)]
        mid = conv(h.shape[-1], rt, 1, name="controlnet_mid_block")(h)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        weights = np.ones(len(down) + 1, np.float32)
        if guess_mode and not self.global_pool_conditions:  # 0.1 for conv_in's ... 1 for the mid block's
            weights = np.logspace(-1.0, 0.0, len(down) + 1, dtype=np.float32)
        out = [(r * (w * scale)).astype(r.dtype) for r, w in zip([*down, mid], weights)]
        if self.global_pool_conditions:
            out = [jnp.mean(r, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(r.dtype) for r in out]
        return tuple(out[:-1]), out[-1]

    def _check_inputs(self, sample, context, cond) -> None:
        """Fail before any compute on inputs of `__call__` (NHWC by now) that cannot fit this configuration."""
        check_sample_and_context(self, sample, context)
        b, f, (hgt, wid) = sample.shape[0], self.cond_downscale, sample.shape[1:3]
        embedded = cond.shape[1:3]
        for _ in range(len(self.conditioning_embedding_out_channels) - 1):
            embedded = tuple(-(-d // 2) for d in embedded)  # each stride-2 conv rounds up
        if cond.ndim != 4 or cond.shape[0] != b or cond.shape[-1] != self.conditioning_channels or (
            embedded != (hgt, wid)
        ):
            raise ValueError(
                f"controlnet_cond has shape {cond.shape}; expected NHWC [{b}, {hgt * f}, {wid * f}, "
                f"{self.conditioning_channels}] ({f} times the latent size; NCHW through __call__)."
            )
