"""SDXL's conditioning as pure functions for the SDXL pipelines: prompts through both text encoders, and
the size ("micro") conditioning `add_time_ids`, as diffusers' StableDiffusionXL*Pipeline compute them.

Host side: `prompt_ids` tokenizes prompt / prompt_2 and their negatives with each tokenizer;
`get_add_time_ids` builds the size values. Device side: `encode_prompt` is pure and jittable; the
negative prompt's zeroing (`force_zeros_for_empty_prompt`) is a traced flag, so changing prompts
never recompiles.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.loaders.textual_inversion import expand_prompt
from flax_inpaint.models.clip import FlaxCLIPTextModelWithProjectionOutput

Prompt = Union[str, Sequence[str]]
Size = Tuple[int, int]
# Which diffusers pipeline's rules `get_add_time_ids` follows (they differ for the negative ids):
# text2img: StableDiffusionXLPipeline / StableDiffusionXLControlNetPipeline; img2img:
# StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline; controlnet_inpaint:
# StableDiffusionXLControlNetInpaintPipeline.
TIME_ID_RULES = ("text2img", "img2img", "controlnet_inpaint")


class PromptIds(NamedTuple):
    """Token ids per tokenizer ([B, max_length] int32 each) of the prompts and of the negative prompts, and
    whether the negative embeddings are zeros instead (`force_zeros_for_empty_prompt` without a negative
    prompt): a bool array, so it is a traced value."""

    ids: Tuple[np.ndarray, ...]
    negative_ids: Tuple[np.ndarray, ...]
    zero_negative: np.ndarray


def _as_list(prompt: Prompt, name: str) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{name} must be a string or a list of strings; got {type(prompt).__name__}.")
    return list(prompt)


def _tokenize(tokenizer: Any, prompts: list) -> np.ndarray:
    """ids padded to the tokenizer's model_max_length and truncated, as diffusers tokenizes SDXL prompts, after
    expanding multi-vector textual-inversion tokens for this tokenizer (diffusers' maybe_convert_prompt)."""
    prompts = [expand_prompt(p, tokenizer) for p in prompts]
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="np").input_ids, np.int32)


def prompt_ids(
    tokenizers: Sequence[Any],
    prompt: Prompt,
    prompt_2: Optional[Prompt] = None,
    negative_prompt: Optional[Prompt] = None,
    negative_prompt_2: Optional[Prompt] = None,
    force_zeros_for_empty_prompt: bool = True,
) -> PromptIds:
    """Tokenize the prompts for `encode_prompt`. tokenizers: (tokenizer, tokenizer_2), or (tokenizer_2,)
    for the refiner (whose folder has no first text encoder; it reads prompt and negative_prompt, as in
    diffusers). prompt_2 defaults to prompt; the second tokenizer reads it. Negatives: negative_prompt
    defaults to "" (or zeros with force_zeros_for_empty_prompt), negative_prompt_2 to negative_prompt. A
    string given for any of these three repeats per prompt."""
    prompts = _as_list(prompt, "prompt")
    zero = negative_prompt is None and force_zeros_for_empty_prompt
    negative = negative_prompt or ""
    others = {"prompt_2": prompt_2 or prompt, "negative_prompt": negative,
              "negative_prompt_2": negative_prompt_2 or negative}
    for name, given in others.items():
        others[name] = _as_list(given, name) * (len(prompts) if isinstance(given, str) else 1)
        if len(others[name]) != len(prompts):
            raise ValueError(f"{name} has {len(others[name])} entries but prompt has {len(prompts)}; give one per "
                             "prompt.")
    # the refiner's tokenizer_2 alone reads prompt and negative_prompt, as in diffusers
    pairs = zip(tokenizers, (prompts, others["prompt_2"]))
    negative_pairs = zip(tokenizers, (others["negative_prompt"], others["negative_prompt_2"]))
    return PromptIds(tuple(_tokenize(t, p) for t, p in pairs), tuple(_tokenize(t, n) for t, n in negative_pairs),
                     np.asarray(zero))


def encode_hidden_states(text_encoders: Sequence[Any], params: Sequence[Any], ids: Sequence[jax.Array],
            layer: int) -> Tuple[jax.Array, jax.Array]:
    """(hidden states of `layer` of each encoder concatenated, the first projected pooled output)."""
    states, pooled = [], None
    for model, p, x in zip(text_encoders, params, ids):
        out = model.apply({"params": p}, x, output_hidden_states=True)
        if pooled is None and isinstance(out, FlaxCLIPTextModelWithProjectionOutput):
            pooled = out.text_embeds
        states.append(out.hidden_states[layer])
    if pooled is None:
        raise ValueError("SDXL's pooled prompt embedding comes from a text encoder with projection "
                         "(text_encoder_2, FlaxCLIPTextModelWithProjection); none was given.")
    return jnp.concatenate(states, axis=-1), pooled


def encode_prompt(
    text_encoders: Sequence[Any],
    params: Sequence[Any],
    ids: PromptIds,
    clip_skip: Optional[int] = None,
    num_images_per_prompt: int = 1,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), as
    diffusers' SDXL `encode_prompt` returns them with classifier-free guidance; pure and jittable
    (text_encoders, clip_skip and num_images_per_prompt static).

    Each encoder gives its penultimate hidden states (hidden_states[-(clip_skip + 2)], no final layer norm;
    the negatives always the penultimate, as diffusers does), concatenated along the features; the pooled
    embeddings are text_encoder_2's `text_embeds`. Rows repeat num_images_per_prompt times.
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    embeds, pooled = encode_hidden_states(text_encoders, params, ids.ids, layer)
    negative, negative_pooled = encode_hidden_states(text_encoders, params, ids.negative_ids, -2)
    zero = jnp.asarray(ids.zero_negative)
    negative, negative_pooled = (jnp.where(zero, jnp.zeros_like(x), x) for x in (negative, negative_pooled))
    return tuple(jnp.repeat(x, num_images_per_prompt, axis=0) for x in (embeds, negative, pooled, negative_pooled))


def get_add_time_ids(
    height: int,
    width: int,
    original_size: Optional[Size] = None,
    crops_coords_top_left: Size = (0, 0),
    target_size: Optional[Size] = None,
    negative_original_size: Optional[Size] = None,
    negative_crops_coords_top_left: Size = (0, 0),
    negative_target_size: Optional[Size] = None,
    requires_aesthetics_score: bool = False,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    rule: str = "text2img",
) -> Tuple[np.ndarray, np.ndarray]:
    """(add_time_ids, negative_add_time_ids), float32 [k] each: SDXL's size conditioning, values to pass
    to the program (new sizes do not recompile). original_size and target_size default to (height,
    width). The base model takes original_size + crops_coords_top_left + target_size (k = 6); the refiner
    (requires_aesthetics_score) original_size + crops_coords_top_left + (aesthetic_score,) (k = 5).

    The negatives follow `rule` (see TIME_ID_RULES), as each diffusers pipeline builds them: text2img
    uses the negative sizes only when both negative_original_size and negative_target_size are given;
    img2img defaults them to the positive ones and keeps the positive crop unless aesthetic; the
    ControlNet inpainting pipeline repeats the positive ids (aesthetic: with the negative score).
    """
    if rule not in TIME_ID_RULES:
        raise ValueError(f"rule={rule!r}; use one of {TIME_ID_RULES}.")
    original_size = tuple(original_size or (height, width))
    target_size = tuple(target_size or (height, width))
    crops, negative_crops = tuple(crops_coords_top_left), tuple(negative_crops_coords_top_left)
    for name, value in (("original_size", original_size), ("crops_coords_top_left", crops),
                        ("target_size", target_size), ("negative_crops_coords_top_left", negative_crops)):
        if len(value) != 2:
            raise ValueError(f"{name}={value!r}: give two numbers, (height, width) or (top, left).")
    if rule == "controlnet_inpaint":
        negative_original_size, negative_crops, negative_target_size = original_size, crops, target_size
    elif rule == "img2img":
        negative_original_size = tuple(negative_original_size or original_size)
        negative_target_size = tuple(negative_target_size or target_size)
        negative_crops = negative_crops if requires_aesthetics_score else crops
    if requires_aesthetics_score:
        if rule == "text2img":
            raise ValueError("requires_aesthetics_score (the refiner) is an img2img / inpainting config: use "
                             "rule='img2img' or 'controlnet_inpaint'.")
        ids = original_size + crops + (aesthetic_score,)
        negative = tuple(negative_original_size) + negative_crops + (negative_aesthetic_score,)
    else:
        ids = original_size + crops + target_size
        both = negative_original_size is not None and negative_target_size is not None
        negative = tuple(negative_original_size) + negative_crops + tuple(negative_target_size) if both else ids
    return np.asarray(ids, np.float32), np.asarray(negative, np.float32)


def check_add_time_ids(unet: Any, num_time_ids: int, text_encoder_projection_dim: int) -> None:
    """The UNet's add embedding takes text_encoder_projection_dim + num_time_ids x addition_time_embed_dim
    inputs: one clear error naming the fix where it does not (the refiner's 5 ids vs the base's 6)."""
    step, expected = unet.addition_time_embed_dim, unet.projection_class_embeddings_input_dim
    passed = text_encoder_projection_dim + num_time_ids * step
    if passed == expected:
        return
    fix = {expected - step: "disable requires_aesthetics_score (the model takes target_size)",
           expected + step: "enable requires_aesthetics_score (the model takes aesthetic_score)"}.get(
        passed, "check the UNet's addition_time_embed_dim and text_encoder_2's projection_dim")
    raise ValueError(f"The UNet's add embedding takes {expected} values but the conditioning gives {passed} "
                     f"({num_time_ids} time ids); {fix}.")
