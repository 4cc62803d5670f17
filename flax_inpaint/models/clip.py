"""CLIP transformer encoders in Flax: the text tower used as Stable Diffusion's text encoder (with
SDXL's projection as `FlaxCLIPTextModelWithProjection`), and the vision tower inside the safety
checker (`CLIPVisionModel`, see models/safety.py).

Mirrors transformers' PyTorch `CLIPTextModel` (transformers v5 ships no Flax) so its checkpoints
convert mechanically: the Flax path `text_model/encoder/layers_3/self_attn/q_proj/kernel` is the torch
key `text_model.encoder.layers.3.self_attn.q_proj.weight` (transposed). transformers v5 saves the same
keys without the `text_model.` prefix; both load, and we save with the prefix, which every
transformers version reads.

The encoder blocks (`CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer`, `CLIPEncoder`) are shared by the
text and vision towers; they take one `CLIPEncoderConfig` instead of a keyword per setting.

SD1 uses the OpenAI ViT-L/14 text tower (`hidden_act="quick_gelu"`), SD2 the OpenCLIP ViT-H one
(`"gelu"`). Pipelines with `clip_skip` take `hidden_states[-(clip_skip + 1)]` and apply the final
layer norm to it:

    out = te.apply({"params": p}, ids, output_hidden_states=True)
    h = te.apply({"params": p}, out.hidden_states[-(clip_skip + 1)], method=te.final_layer_norm)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_inpaint.diffusers_compat import BaseOutput
from flax_inpaint.models.layers import dense, get_activation, layer_norm, traced_once
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.runtime import Runtime, attention

# Keys that transformers' `PretrainedConfig` has written into config.json over the versions (older
# releases dumped every generic attribute, e.g. generation defaults and label maps). None of them
# changes what the encoder computes.
TRANSFORMERS_GENERIC_CONFIG_KEYS = frozenset(
    {
        "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
        "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
        "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
        "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
        "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
        "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
        "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type",
        "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
        "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
        "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
        "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16",
        "_attn_implementation_autoset", "use_cache",
    }
)
# Training-time settings of CLIP configs: dropout is off at inference, initialisers are unused.
CLIP_TRAINING_KEYS = frozenset({"attention_dropout", "dropout", "initializer_range", "initializer_factor"})
# transformers' Flax CLIP models (4.x) save `flax_model.msgpack` and name encoder layer 3 `layers/3`.
TRANSFORMERS_FLAX_STEMS = ("flax_model", "diffusion_flax_model")
TRANSFORMERS_FLAX_NAMES = (("layers/{n}", "layers_{n}"),)


class TransformersCLIPFiles:
    """The `PretrainedMixin` class attributes of a transformers CLIP model folder: its weight files and
    the config keys that change nothing here. List it before FlaxModelMixin among a model's bases."""

    weight_stems = ("model", "pytorch_model")
    flax_weight_stems = TRANSFORMERS_FLAX_STEMS
    flax_names = TRANSFORMERS_FLAX_NAMES
    ignored_config_keys = CLIP_TRAINING_KEYS | TRANSFORMERS_GENERIC_CONFIG_KEYS


@dataclasses.dataclass(frozen=True)
class CLIPEncoderConfig:
    """The architecture of a CLIP transformer encoder, shared by the text and vision towers."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_act: str
    layer_norm_eps: float

    def __post_init__(self):
        get_activation(self.hidden_act)  # raises on an unsupported name
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_model(cls, model) -> "CLIPEncoderConfig":
        """The encoder settings of a text or vision model, whose config fields include all of these."""
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias), scale head_dim**-0.5."""

    config: CLIPEncoderConfig
    runtime: Runtime
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """x: [batch, length, hidden]; mask: bool, broadcastable to [batch, heads, length, length]."""
        cfg, rt = self.config, self.runtime
        b, n, d = x.shape
        heads = cfg.num_attention_heads

        def split(name):
            return dense(d, rt, name=name)(x).reshape(b, n, heads, d // heads)

        q, k, v = split("q_proj"), split("k_proj"), split("v_proj")
        out = attention(q, k, v, rt, is_causal=self.causal, mask=mask).reshape(b, n, d)
        return dense(d, rt, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPEncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, rt = self.config, self.runtime
        h = get_activation(cfg.hidden_act)(dense(cfg.intermediate_size, rt, name="fc1")(x))
        return dense(cfg.hidden_size, rt, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPEncoderConfig
    runtime: Runtime
    causal: bool = False

    @traced_once
    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        cfg, rt = self.config, self.runtime
        h = layer_norm(cfg.layer_norm_eps, rt, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg, rt, self.causal, name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, rt, name="layer_norm2")(x)
        return x + CLIPMLP(cfg, rt, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` encoder layers, named `layers_N` like torch's `layers.N`."""

    config: CLIPEncoderConfig
    runtime: Runtime
    causal: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: Optional[jax.Array] = None
    ) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
        """Returns the last layer's output and all hidden states: the input, then each layer's output."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.runtime, self.causal, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    runtime: Runtime

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        rt = self.runtime
        length = input_ids.shape[-1]
        if length > self.max_position_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens; this text encoder takes at most "
                f"max_position_embeddings={self.max_position_embeddings}."
            )

        def embed(num, name):
            return nn.Embed(num, self.hidden_size, dtype=rt.dtype, param_dtype=rt.param_dtype, name=name)

        tokens = embed(self.vocab_size, "token_embedding")(input_ids)
        positions = embed(self.max_position_embeddings, "position_embedding")(jnp.arange(length))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextTransformer: embeddings, causal encoder, final layer norm."""

    config: CLIPEncoderConfig
    vocab_size: int
    max_position_embeddings: int
    runtime: Runtime

    def setup(self):
        cfg, rt = self.config, self.runtime
        self.embeddings = CLIPTextEmbeddings(
            self.vocab_size, self.max_position_embeddings, cfg.hidden_size, rt
        )
        self.encoder = CLIPEncoder(cfg, rt, causal=True)
        self.final_layer_norm = layer_norm(cfg.layer_norm_eps, rt)

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None):
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {attention_mask.shape}; expected input_ids' shape "
                    f"{input_ids.shape}."
                )
            mask = attention_mask.astype(bool)[:, None, None, :]  # padded keys are never attended
        last, states = self.encoder(self.embeddings(input_ids), mask)
        return self.final_layer_norm(last), states


class CLIPVisionEmbeddings(nn.Module):
    """Patch embeddings (a stride-`patch_size` conv without bias) after a learned class token,
    plus learned position embeddings."""

    hidden_size: int
    image_size: int
    patch_size: int
    runtime: Runtime

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: NHWC [batch, image_size, image_size, channels] -> [batch, 1 + patches, hidden]."""
        rt, d, p = self.runtime, self.hidden_size, self.patch_size
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel values are {pixels.shape[1]}x{pixels.shape[2]}; this vision model takes "
                f"image_size={self.image_size} square images."
            )
        patches = nn.Conv(
            d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=rt.dtype,
            param_dtype=rt.param_dtype, name="patch_embedding",
        )(pixels.astype(rt.dtype))
        b = pixels.shape[0]
        patches = patches.reshape(b, -1, d)  # row-major over the patch grid, like torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (d,), rt.param_dtype)
        cls = jnp.broadcast_to(cls.astype(rt.dtype), (b, 1, d))
        n = patches.shape[1] + 1
        positions = nn.Embed(n, d, dtype=rt.dtype, param_dtype=rt.param_dtype, name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + positions(jnp.arange(n))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionTransformer: embeddings, pre-norm, encoder, class-token pooling."""

    config: CLIPEncoderConfig
    image_size: int
    patch_size: int
    runtime: Runtime

    def setup(self):
        cfg, rt = self.config, self.runtime
        self.embeddings = CLIPVisionEmbeddings(cfg.hidden_size, self.image_size, self.patch_size, rt)
        self.pre_layrnorm = layer_norm(cfg.layer_norm_eps, rt)  # sic: the torch attribute name
        self.encoder = CLIPEncoder(cfg, rt)
        self.post_layernorm = layer_norm(cfg.layer_norm_eps, rt)

    def __call__(self, pixels: jax.Array) -> Tuple[jax.Array, jax.Array, Tuple[jax.Array, ...]]:
        """NHWC pixels -> (last_hidden_state [batch, 1 + patches, hidden], pooler_output [batch,
        hidden] = post_layernorm(class token), hidden_states: the pre-normed embeddings, then
        each layer's output)."""
        last, states = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return last, self.post_layernorm(last[:, 0]), states


class CLIPVisionFields(nn.Module):
    """The `CLIPVisionConfig` keys of the models built on the vision tower, with transformers' defaults
    (ViT-B/32), checked on construction. List it last among a model's bases (then PretrainedMixin's
    `dummy_inputs` comes first: set `dummy_inputs = CLIPVisionFields.dummy_inputs`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(
                    f"{key}={getattr(self, key)!r}: only square images (one integer) are supported."
                )
        CLIPEncoderConfig.from_model(self)  # validates hidden_act and the head split now, not at first apply
        super().__post_init__()

    def to_nhwc(self, pixels: jax.Array, name: str) -> jax.Array:
        """NCHW CLIP pixel values [B, num_channels, image_size, image_size] (argument `name`) -> NHWC."""
        if pixels.ndim != 4 or pixels.shape[1] != self.num_channels:
            c, s = self.num_channels, self.image_size
            raise ValueError(f"{name} must be NCHW [batch, {c}, {s}, {s}]; got shape {pixels.shape}.")
        return jnp.transpose(pixels, (0, 2, 3, 1))

    def dummy_inputs(self) -> Tuple[Any, ...]:
        return (jnp.zeros((1, self.num_channels, self.image_size, self.image_size), jnp.float32),)


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModel as a submodule: the tower lives under `vision_model`, so its
    params are `<name>/vision_model/...` like the torch keys `<name>.vision_model.*`."""

    config: CLIPEncoderConfig
    image_size: int
    patch_size: int
    runtime: Runtime

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.config, self.image_size, self.patch_size, self.runtime)

    def __call__(self, pixels: jax.Array) -> Tuple[jax.Array, jax.Array, Tuple[jax.Array, ...]]:
        return self.vision_model(pixels)


@flax.struct.dataclass
class FlaxCLIPTextModelOutput(BaseOutput):
    """last_hidden_state: [batch, length, hidden], after the final layer norm.
    pooler_output: [batch, hidden], last_hidden_state at each sequence's end-of-text token.
    hidden_states: with `output_hidden_states=True`, num_hidden_layers + 1 arrays [batch, length,
      hidden]: the embeddings, then each layer's output (the last one before the final layer norm).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


class FlaxCLIPTextModel(FlaxModelMixin, nn.Module):
    """transformers' `CLIPTextModel` in Flax; fields are the `CLIPTextConfig` keys.

    `te.apply({"params": p}, input_ids, attention_mask=None, output_hidden_states=False,
    return_dict=True)` -> FlaxCLIPTextModelOutput (or a tuple with `return_dict=False`).
    `attention_mask` ([batch, length], 1 = token, 0 = padding) is combined with the causal mask.
    With left padding, the padded positions before the first token can attend to nothing; their
    outputs are meaningless (and differ from transformers'); every real token matches.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: Optional[int] = 512  # used only by FlaxCLIPTextModelWithProjection
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: int = 49407
    runtime: Runtime = Runtime()

    torch_class = "CLIPTextModel"
    weight_stems = ("model", "pytorch_model")
    flax_weight_stems = TRANSFORMERS_FLAX_STEMS
    flax_names = TRANSFORMERS_FLAX_NAMES
    ignored_config_keys = CLIP_TRAINING_KEYS | TRANSFORMERS_GENERIC_CONFIG_KEYS
    fixed_config = {"model_type": ("clip_text_model",)}

    def __post_init__(self):
        if not isinstance(self.eos_token_id, int):
            raise ValueError(
                f"eos_token_id={self.eos_token_id!r}: pooling needs a single integer token id."
            )
        CLIPEncoderConfig.from_model(self)  # validates hidden_act and the head split now, not at first apply
        super().__post_init__()

    def setup(self):
        self.text_model = CLIPTextTransformer(
            CLIPEncoderConfig.from_model(self), self.vocab_size, self.max_position_embeddings, self.runtime
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}.")
        last, states = self.text_model(input_ids, attention_mask)
        if self.eos_token_id == 2:
            # Configs written before transformers PR #24773 carry eos_token_id=2; for them the
            # end-of-text token is the largest id in the sequence (what transformers keeps doing).
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # the first end-of-text token (padding may reuse the same id)
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return self._output(last, pooled, states if output_hidden_states else None, return_dict)

    def _output(self, last, pooled, hidden_states, return_dict: bool):
        """The model's output from the tower's (hidden_states None unless asked for)."""
        if not return_dict:
            return (last, pooled) + (() if hidden_states is None else (hidden_states,))
        return FlaxCLIPTextModelOutput(last, pooled, hidden_states)

    def final_layer_norm(self, hidden_states: jax.Array) -> jax.Array:
        """The final layer norm alone, for `clip_skip`: `te.apply(v, h, method=te.final_layer_norm)`."""
        return self.text_model.final_layer_norm(hidden_states)

    def dummy_inputs(self) -> Tuple[Any, ...]:
        return (jnp.zeros((1, min(8, self.max_position_embeddings)), jnp.int32),)

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        """transformers v5 keys lack the `text_model.` prefix; `position_ids` is a constant buffer."""
        if key.endswith("embeddings.position_ids"):
            return None
        return key if key.startswith("text_model.") else f"text_model.{key}"


@flax.struct.dataclass
class FlaxCLIPTextModelWithProjectionOutput(BaseOutput):
    """text_embeds: [batch, projection_dim], the pooled output projected (SDXL's pooled prompt embedding).
    last_hidden_state, hidden_states: as in FlaxCLIPTextModelOutput (SDXL conditions on hidden_states[-2]).
    """

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


class FlaxCLIPTextModelWithProjection(FlaxCLIPTextModel):
    """transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`, OpenCLIP ViT-bigG): the text
    tower plus `text_projection`, a bias-free linear map of the pooled output to `projection_dim`.

    `te.apply({"params": p}, input_ids, attention_mask=None, output_hidden_states=False,
    return_dict=True)` -> FlaxCLIPTextModelWithProjectionOutput (text_embeds, last_hidden_state,
    hidden_states), or that tuple with `return_dict=False`, as transformers orders it.
    """

    torch_class = "CLIPTextModelWithProjection"

    def __post_init__(self):
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim!r}: the text projection needs a positive int.")
        super().__post_init__()

    def setup(self):
        super().setup()
        self.text_projection = dense(self.projection_dim, self.runtime, use_bias=False)

    def _output(self, last, pooled, hidden_states, return_dict: bool):
        text_embeds = self.text_projection(pooled)
        if not return_dict:
            return (text_embeds, last) + (() if hidden_states is None else (hidden_states,))
        return FlaxCLIPTextModelWithProjectionOutput(text_embeds, last, hidden_states)

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        """`text_projection.weight` as is; the tower's keys as FlaxCLIPTextModel reads them."""
        return key if key.startswith("text_projection.") else super().torch_rename(key)
