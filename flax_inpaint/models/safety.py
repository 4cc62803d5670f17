"""The Stable Diffusion safety checker in Flax, with CLIP image preprocessing inside the program.

`FlaxStableDiffusionSafetyChecker` mirrors diffusers' PyTorch `StableDiffusionSafetyChecker`: a CLIP
vision tower (models/clip.py) and a bias-free `visual_projection` embed each image; its cosine
similarity to 17 concept embeddings and 3 "special care" embeddings, minus per-embedding thresholds,
gives scores. An image with any special-care score above 0 gets 0.01 added to its concept scores
(a stricter filter), and an image with any concept score above 0 is flagged and replaced by black.
Like the reference, every score is rounded to 3 decimals before the comparison.

The reference preprocesses through PIL: diffusers converts the decoded images to uint8
(`round(x * 255)`), and `CLIPImageProcessor` resizes the shortest side with Pillow's resampling,
center-crops, rescales and normalises. `CLIPImagePreprocessing` does the same in JAX with static
shapes: Pillow's separable fixed-point filter (coefficients computed on the host, horizontal pass
then vertical, each rounded to uint8) and a 256-entry lookup table for rescale + normalise, so the
pixel values equal transformers' PIL backend exactly.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.diffusers_compat import FrozenConfig, not_provided
from flax_inpaint.models.conversion import Params
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.models.clip import (
    CLIP_TRAINING_KEYS,
    TRANSFORMERS_FLAX_NAMES,
    TRANSFORMERS_FLAX_STEMS,
    TRANSFORMERS_GENERIC_CONFIG_KEYS,
    CLIPEncoderConfig,
    CLIPVisionFields,
    CLIPVisionModel,
)
from flax_inpaint.runtime import Runtime

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------- Pillow resampling

_PIL_PRECISION_BITS = 22  # Pillow's fixed-point coefficient precision for 8-bit images (32 - 8 - 2)


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's BICUBIC)."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# PIL.Image.Resampling value -> (filter support, kernel).
_PIL_FILTERS = {2: (1.0, _triangle), 3: (2.0, _keys_cubic)}
_PIL_NAMES = {2: "BILINEAR", 3: "BICUBIC"}


def pil_resample_taps(in_size: int, out_size: int, resample: int) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights ([out_size, taps] int32 each) of Pillow's 1-D resize.

    Pillow widens the filter by the downscale factor (antialiasing), normalises each output's
    weights to sum 1 and rounds them to `_PIL_PRECISION_BITS` fractional bits; computed here in
    float64 in Pillow's order so the integer weights agree exactly.
    """
    support, kernel = _PIL_FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward 0
    stop = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    index = first[:, None] + np.arange(taps)
    w = np.where(index < stop[:, None], kernel((index - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed left to right, as Pillow does
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    fixed = np.trunc(w * (1 << _PIL_PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    return np.minimum(index, in_size - 1).astype(np.int32), fixed.astype(np.int32)


def _pil_resize_axis(u: jax.Array, axis: int, out_size: int, resample: int) -> jax.Array:
    """One Pillow pass along `axis` of an int32 uint8-valued image: integer MACs, round, clip."""
    index, weights = pil_resample_taps(u.shape[axis], out_size, resample)
    gathered = jnp.take(u, jnp.asarray(index), axis=axis, mode="clip")  # axis -> (out_size, taps)
    w = jnp.asarray(weights).reshape(weights.shape + (1,) * (u.ndim - axis - 1))
    acc = jnp.sum(gathered * w, axis=axis + 1) + (1 << (_PIL_PRECISION_BITS - 1))
    return jnp.clip(acc >> _PIL_PRECISION_BITS, 0, 255)


def pil_resize(u: jax.Array, size: Tuple[int, int], resample: int) -> jax.Array:
    """`PIL.Image.resize((w, h), resample)` of an NHWC int32 batch with values in [0, 255].

    Each pass rounds to uint8, so the pass order matters. Pillow 13 resamples horizontally first
    unless the image shrinks vertically by more than twice the columns it loses (older Pillow:
    always horizontally first); we measured this rule against Pillow 13.0 on 3,500 random sizes.
    """
    h, w = size
    in_h, in_w = u.shape[1:3]
    passes = [(2, w), (1, h)]
    if h < in_h and 2 * (in_w - w) < in_h - h:
        passes.reverse()
    for axis, out_size in passes:
        if u.shape[axis] != out_size:
            u = _pil_resize_axis(u, axis, out_size, resample)
    return u


# ----------------------------------------------------------------------------- CLIP preprocessing

# preprocessor_config.json keys that do not change the pixels we produce (our images are RGB).
_PREPROCESSOR_IGNORED_KEYS = frozenset(
    {"do_convert_rgb", "feature_extractor_type", "image_processor_type", "processor_class"}
)


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessing:
    """transformers' `CLIPImageProcessor` settings (`feature_extractor/preprocessor_config.json`).

    Fields are the config keys; `size` is the `shortest_edge`, `crop_size` is (height, width).
    Static and hashable, so they can be fields of a jitted module.
    """

    do_resize: bool = True
    size: int = 224
    resample: int = 3
    do_center_crop: bool = True
    crop_size: Tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.resample not in _PIL_FILTERS:
            raise ValueError(
                f"resample={self.resample!r} is not supported; use one of {_PIL_NAMES} (PIL values)."
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean={self.image_mean} and image_std={self.image_std} need one value per RGB channel."
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CLIPImagePreprocessing":
        """Read a preprocessor_config.json dict (the old feature-extractor form with integer `size`
        and `crop_size` included); raises on settings we do not implement."""
        kwargs: Dict[str, Any] = {}
        unknown = []
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in config.items():
            if key == "size":
                if not isinstance(value, int):
                    if set(value) != {"shortest_edge"}:
                        raise ValueError(
                            f"size={value!r}: only CLIP's shortest-edge resize is supported, "
                            "e.g. {'shortest_edge': 224}."
                        )
                    value = value["shortest_edge"]
            elif key == "crop_size":
                value = (value, value) if isinstance(value, int) else (value["height"], value["width"])
            elif key in ("image_mean", "image_std"):
                value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
            elif key in ("do_pad", "use_square_size"):
                if value:
                    raise ValueError(f"{key}={value!r} is not supported by the safety checker preprocessing.")
                continue
            elif key not in fields:
                if key not in _PREPROCESSOR_IGNORED_KEYS and not key.startswith("_"):
                    unknown.append(key)
                continue
            kwargs[key] = value
        if unknown:
            warnings.warn(f"CLIPImagePreprocessing: ignoring unknown preprocessor keys {sorted(unknown)}.")
        return cls(**kwargs)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) after the shortest-side resize (the long side truncated, like transformers)."""
        if not self.do_resize:
            return height, width
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def pixel_table(self) -> np.ndarray:
        """[3, 256] float32: rescale + normalise of every uint8 value, in transformers' arithmetic."""
        values = np.arange(256, dtype=np.float64)
        values = (values * self.rescale_factor if self.do_rescale else values).astype(np.float32)
        table = np.broadcast_to(values, (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None]
            std = np.asarray(self.image_std, np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, np.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """NHWC RGB images in [0, 1] -> NCHW float32 pixel values, as `CLIPImageProcessor` gives
        for the uint8 images diffusers would hand it."""
        return jnp.transpose(self.nhwc(images), (0, 3, 1, 2))

    def nhwc(self, images: jax.Array) -> jax.Array:
        """`__call__` giving NHWC pixel values (the layout inside the pipelines' program)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC RGB [batch, height, width, 3]; got shape {images.shape}.")
        u = jnp.clip(jnp.round(images.astype(jnp.float32) * 255.0), 0, 255).astype(jnp.int32)
        u = pil_resize(u, self.output_size(*images.shape[1:3]), self.resample)
        if self.do_center_crop:
            (h, w), (ch, cw) = u.shape[1:3], self.crop_size
            if ch > h or cw > w:
                raise ValueError(
                    f"crop_size={self.crop_size} is larger than the {h}x{w} resized image; use a "
                    "crop_size no larger than the shortest-edge size."
                )
            top, left = (h - ch) // 2, (w - cw) // 2
            u = u[:, top : top + ch, left : left + cw]
        return jnp.asarray(self.pixel_table())[jnp.arange(3), u]  # [B, H, W, 3]


# ----------------------------------------------------------------------------- the checker

_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps",
)
# The concept heads stay float32 whatever the param dtype: bf16 would move a threshold by up to
# 4e-3, close to the 0.01 special-care adjustment and far above the 1e-3 score rounding.
_HEAD_PARAMS = (
    "concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights",
)


def _cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """[n, d] x [m, d] -> [n, m] cosine similarities in float32 (torch's F.normalize, then mm)."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)  # no TF32: flags hinge on 1e-3


class _NotAPreTrainedModel:
    """transformers' FlaxPreTrainedModel attributes of diffusers' checker, named as not provided (outside
    the linen class, whose descriptors linen wraps)."""

    _LINEN = ("it is a linen module here, not a transformers FlaxPreTrainedModel: checker, params = "
              "FlaxStableDiffusionSafetyChecker.from_pretrained(folder); checker.apply({'params': params}, clip_input).")
    config_class = not_provided(_LINEN)
    main_input_name = not_provided(_LINEN)
    module_class = not_provided(_LINEN)


class FlaxStableDiffusionSafetyChecker(FlaxModelMixin, _NotAPreTrainedModel, CLIPVisionFields):
    """diffusers' `StableDiffusionSafetyChecker` in Flax.

    Fields: the `vision_config` keys of its `CLIPConfig` config.json, the top-level
    `projection_dim`, and `preprocessing` (from the pipeline's feature_extractor folder, not part of
    config.json; CLIP defaults otherwise). Methods, all pure and jittable:
      `checker.apply(v, images, method=checker.check_images)` -> (images with flagged ones black,
        nsfw bool [B]) for NHWC images in [0, 1]; what the pipelines call.
      `checker.apply(v, clip_input)` -> nsfw bool [B] for NCHW CLIP pixel values, which
        `checker.preprocessing(images)` gives (no params needed).
      `checker.apply(v, clip_input, method=checker.image_embeds)` -> projected embeddings.

    diffusers' Flax checker was a transformers FlaxPreTrainedModel (`checker(clip_input, params)`,
    `config_class`, `module_class`); this one is a linen module like every model here:
    `checker, params = FlaxStableDiffusionSafetyChecker.from_pretrained(folder)`, then
    `checker.apply({'params': params}, clip_input)`.
    """

    projection_dim: int = 512
    preprocessing: CLIPImagePreprocessing = CLIPImagePreprocessing()
    runtime: Runtime = Runtime()

    torch_class = "StableDiffusionSafetyChecker"
    weight_stems = ("model", "pytorch_model")
    flax_weight_stems = TRANSFORMERS_FLAX_STEMS
    flax_names = TRANSFORMERS_FLAX_NAMES
    ignored_config_keys = (
        CLIP_TRAINING_KEYS | TRANSFORMERS_GENERIC_CONFIG_KEYS
        | {"text_config", "text_config_dict", "logit_scale_init_value"}
    )
    fixed_config = {"model_type": ("clip",)}
    dummy_inputs = CLIPVisionFields.dummy_inputs

    # -- config: CLIPConfig {"projection_dim", "vision_config": {...}} <-> flat fields ----------
    @classmethod
    def config_fields(cls) -> Tuple[str, ...]:
        return tuple(f for f in super().config_fields() if f != "preprocessing")

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, return_unused_kwargs: bool = False, *,
                    runtime: Optional[Runtime] = None, **kwargs):
        """Build from a `CLIPConfig` dict. Like transformers, a legacy `vision_config_dict` wins over
        `vision_config` (completed with CLIPVisionConfig defaults); the text config is unused."""
        if not isinstance(config, Mapping):
            return super().from_config(config, return_unused_kwargs, runtime=runtime, **kwargs)  # raises
        top = dict(config)
        vision = dict(top.pop("vision_config", None) or {})
        legacy = top.pop("vision_config_dict", None)
        if legacy is not None:
            defaults = {f: getattr(cls, f) for f in _VISION_FIELDS}
            vision.update({**defaults, **legacy})
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"vision_config model_type={vision['model_type']!r}; expected 'clip_vision_model'."
            )
        # The vision config's own projection_dim belongs to CLIPVisionModelWithProjection; the
        # checker's visual_projection uses the top-level one. Other shared keys are generic.
        unused = {"model_type", "projection_dim", *top}
        vision = {k: v for k, v in vision.items() if k not in unused}
        return super().from_config({**vision, **top}, return_unused_kwargs, runtime=runtime, **kwargs)

    @property
    def config(self) -> FrozenConfig:
        vision = {k: getattr(self, k) for k in _VISION_FIELDS}
        vision["model_type"] = "clip_vision_model"
        return FrozenConfig({"projection_dim": self.projection_dim, "vision_config": vision})

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        """transformers v5 saves `vision_model.<tower keys>`; v4 and the hub checkpoints
        `vision_model.vision_model.<tower keys>` (our layout, read by both). `position_ids` is a
        constant buffer."""
        if key.endswith("embeddings.position_ids"):
            return None
        if key.startswith("vision_model.") and not key.startswith("vision_model.vision_model."):
            return "vision_model." + key
        return key

    def _cast(self, params: Params) -> Params:
        heads = {k: jnp.asarray(params[k], jnp.float32) for k in _HEAD_PARAMS}
        return {**super()._cast(params), **heads}

    # -- model ---------------------------------------------------------------------------------
    def setup(self):
        rt = self.runtime
        encoder = CLIPEncoderConfig.from_model(self)
        self.vision_model = CLIPVisionModel(encoder, self.image_size, self.patch_size, rt)
        self.visual_projection = nn.Dense(
            self.projection_dim, use_bias=False, dtype=rt.dtype, param_dtype=rt.param_dtype
        )
        # diffusers fixes 17 concepts and 3 special-care concepts; the weights are their thresholds.
        ones = nn.initializers.ones
        self.concept_embeds = self.param("concept_embeds", ones, (17, self.projection_dim), jnp.float32)
        self.special_care_embeds = self.param(
            "special_care_embeds", ones, (3, self.projection_dim), jnp.float32
        )
        self.concept_embeds_weights = self.param("concept_embeds_weights", ones, (17,), jnp.float32)
        self.special_care_embeds_weights = self.param(
            "special_care_embeds_weights", ones, (3,), jnp.float32
        )

    def image_embeds(self, clip_input: jax.Array) -> jax.Array:
        """NCHW CLIP pixel values [B, C, image_size, image_size] -> embeddings [B, projection_dim]."""
        return self._embeds_nhwc(self.to_nhwc(clip_input, "clip_input"))

    def _embeds_nhwc(self, pixels: jax.Array) -> jax.Array:
        _, pooled, _ = self.vision_model(pixels)
        return self.visual_projection(pooled)

    def __call__(self, clip_input: jax.Array) -> jax.Array:
        """nsfw flags (bool [B]) for NCHW CLIP pixel values."""
        return self._flags(self.image_embeds(clip_input))

    def _flags(self, embeds: jax.Array) -> jax.Array:
        embeds = embeds.astype(jnp.float32)
        special = _cosine_similarity(embeds, self.special_care_embeds) - self.special_care_embeds_weights
        special_care = jnp.any(jnp.round(special, 3) > 0, axis=1, keepdims=True)
        concept = _cosine_similarity(embeds, self.concept_embeds) - self.concept_embeds_weights
        concept = jnp.round(concept + 0.01 * special_care, 3)
        return jnp.any(concept > 0, axis=1)

    def with_preprocessor_config(self, config: Mapping[str, Any]) -> "FlaxStableDiffusionSafetyChecker":
        """This checker with the preprocessing a `preprocessor_config.json` dict sets (the pipeline's
        feature_extractor); the params are unchanged."""
        return self.clone(preprocessing=CLIPImagePreprocessing.from_config(config))

    def check_images(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """NHWC images in [0, 1] [B, H, W, 3] -> (the images, flagged ones black; nsfw bool [B])."""
        nsfw = self._flags(self._embeds_nhwc(self.preprocessing.nhwc(images)))  # NHWC throughout
        return jnp.where(nsfw[:, None, None, None], jnp.zeros_like(images), images), nsfw
