"""SDXL's conditioning against diffusers: prompt embeddings from both text encoders (StableDiffusionXLPipeline's
and the refiner's encode_prompt) and the size conditioning (add_time_ids as each pipeline's __call__ builds
them), on tiny random SDXL pipelines saved as diffusers folders and loaded through load_components.
Embeddings: fp32, max abs diff <= 1e-4 (the same float32 math in another order); time ids: exact (they
are copied integers and scores, no arithmetic).
"""
import types

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flax_inpaint.models import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from flax_inpaint.pipelines.loading import load_components, save_components
from flax_inpaint.pipelines.sdxl_conditioning import (
    check_add_time_ids,
    encode_prompt,
    get_add_time_ids,
    prompt_ids,
)
from test_sdxl_models import POOLED, SDXL, TIME_DIM
from tiny_sd import MAX_LENGTH, SD_SCHEDULE, count_compiles, make_tokenizer

TOL = 1e-4
WIDTHS = (32, 24)  # the two text encoders' hidden sizes: the UNet's context is their sum


def _text_config(tokenizer, width, **kw):
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, pad_token_id=1,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def text_and_vae(tmp):
    """(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae): tiny random SDXL components (torch)."""
    tokenizer = make_tokenizer(tmp / "_tok")
    # SDXL's tokenizer_2 pads with "!"
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "_tok", pad_token="!", model_max_length=MAX_LENGTH)
    te1 = CLIPTextModel(_text_config(tokenizer, WIDTHS[0], hidden_act="quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, WIDTHS[1], hidden_act="gelu",
                                                   projection_dim=POOLED)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        scaling_factor=0.13025, force_upcast=True).eval()
    return tokenizer, tokenizer_2, te1, te2, vae


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(base folder, base torch pipeline, refiner folder, refiner torch pipeline)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    tokenizer, tokenizer_2, te1, te2, vae = text_and_vae(tmp)
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**dict(SDXL, cross_attention_dim=sum(WIDTHS))).eval(), scheduler=scheduler,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**dict(SDXL, cross_attention_dim=WIDTHS[1],
                                          projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)).eval(),
        scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    base.save_pretrained(tmp / "base", safe_serialization=True)
    refiner.save_pretrained(tmp / "refiner", safe_serialization=True)
    return tmp / "base", base, tmp / "refiner", refiner


def ours(folder):
    """(tokenizers, text encoders, their params) of a folder, first encoder first where it has one."""
    components, params, _ = load_components(folder)
    names = [n for n in ("text_encoder", "text_encoder_2") if components[n] is not None]
    return (tuple(components[n.replace("text_encoder", "tokenizer")] for n in names),
            tuple(components[n] for n in names), tuple(params[n] for n in names))


def test_load_components_reads_sdxl_folders(pipes, tmp_path):
    base, _, refiner, _ = pipes
    components, params, _ = load_components(base)
    assert type(components["text_encoder"]) is FlaxCLIPTextModel
    assert type(components["text_encoder_2"]) is FlaxCLIPTextModelWithProjection
    assert components["tokenizer_2"].pad_token == "!" and components["tokenizer"].pad_token == "<|endoftext|>"
    components, params, _ = load_components(refiner)  # no first text encoder: not an error
    assert components["text_encoder"] is None and components["tokenizer"] is None
    save_components(tmp_path, "StableDiffusionXLImg2ImgPipeline", components, params)  # diffusers loads it back
    again = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path)
    assert again.tokenizer_2.pad_token == "!" and again.text_encoder_2.config.projection_dim == POOLED


PROMPTS = ["a red cat", "cat " * 20]  # the second is truncated to the tokenizers' 16 tokens
CASES = {
    "zeros_for_empty_negative": dict(prompt=PROMPTS, num_images_per_prompt=2),
    "prompt_2_negatives_clip_skip": dict(prompt=PROMPTS, prompt_2=["red red", "a cat cat"], negative_prompt="ca",
                                         negative_prompt_2=["red", "cat red"], clip_skip=1),
    "empty_negative_encoded": dict(prompt="a red cat", negative_prompt=""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_prompt_matches_diffusers(pipes, case):
    folder, pipe, _, _ = pipes
    kw = CASES[case]
    with torch.no_grad():
        ref = pipe.encode_prompt(device="cpu", do_classifier_free_guidance=True, **kw)
    tokenizers, encoders, params = ours(folder)
    ids = prompt_ids(tokenizers, kw["prompt"], kw.get("prompt_2"), kw.get("negative_prompt"),
                     kw.get("negative_prompt_2"), pipe.config.force_zeros_for_empty_prompt)
    out = encode_prompt(encoders, params, ids, kw.get("clip_skip"), kw.get("num_images_per_prompt", 1))
    assert out[0].shape == (len(np.atleast_1d(kw["prompt"])) * kw.get("num_images_per_prompt", 1), MAX_LENGTH,
                            sum(WIDTHS))
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=TOL)
    negative = np.abs(ref[1].numpy()).max()
    assert negative == 0 if case == "zeros_for_empty_negative" else negative > 0.1


def test_refiner_encode_prompt_matches_diffusers(pipes):
    """The refiner has text_encoder_2 alone: it reads prompt (not prompt_2) and its context is that
    encoder's hidden states; its folder keeps force_zeros_for_empty_prompt=False, so "" is encoded."""
    _, _, folder, pipe = pipes
    kw = dict(prompt=["a red cat", "cat"], prompt_2="ignored", negative_prompt_2="red", num_images_per_prompt=2)
    with torch.no_grad():
        ref = pipe.encode_prompt(device="cpu", do_classifier_free_guidance=True, **kw)
    tokenizers, encoders, params = ours(folder)
    ids = prompt_ids(tokenizers, kw["prompt"], kw["prompt_2"], None, kw["negative_prompt_2"],
                     pipe.config.force_zeros_for_empty_prompt)
    out = encode_prompt(encoders, params, ids, num_images_per_prompt=2)
    assert out[0].shape == (4, MAX_LENGTH, WIDTHS[1])
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=TOL)


def test_new_prompts_do_not_recompile(pipes):
    folder, _, _, _ = pipes
    tokenizers, encoders, params = ours(folder)
    run = jax.jit(lambda p, ids: encode_prompt(encoders, p, ids))
    first = run(params, prompt_ids(tokenizers, PROMPTS))
    with count_compiles() as compiles:
        again = run(params, prompt_ids(tokenizers, ["red", "a cat"], negative_prompt=["cat", "red"]))
        run(params, prompt_ids(tokenizers, PROMPTS, force_zeros_for_empty_prompt=False))
    assert compiles == []
    assert np.abs(np.asarray(first[1])).max() == 0 and np.abs(np.asarray(again[1])).max() > 0.1


def test_prompt_ids_refuse_mismatched_batches(pipes):
    tokenizers = ours(pipes[0])[0]
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but prompt has 2"):
        prompt_ids(tokenizers, PROMPTS, negative_prompt=["a", "b", "c"])
    with pytest.raises(TypeError, match="prompt_2 must be a string or a list of strings"):
        prompt_ids(tokenizers, PROMPTS, prompt_2=3)


def _diffusers_time_ids(pipe, image=None, **kw):
    """(add_time_ids, negative) that a one-step diffusers __call__ feeds its UNet (CFG: negatives first)."""
    seen = {}

    def keep(_pipe, _i, _t, tensors):
        seen.update(tensors)
        return tensors

    args = dict(prompt="a red cat", num_inference_steps=2 if image is not None else 1, output_type="latent",
                callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["add_time_ids"], **kw)
    if image is None:
        pipe(height=32, width=32, **args)
    else:
        pipe(image=image, strength=0.5, **args)
    negative, positive = seen["add_time_ids"].numpy()
    return positive, negative


SIZES = dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(40, 48))
NEGATIVE_SIZES = dict(negative_original_size=(24, 20), negative_crops_coords_top_left=(2, 6),
                      negative_target_size=(28, 36))
TIME_ID_CASES = {  # pipeline, rule, __call__ keywords
    "text2img_defaults": ("base", "text2img", {}),
    "text2img_negatives": ("base", "text2img", {**SIZES, **NEGATIVE_SIZES}),
    "text2img_one_negative_size_is_ignored": ("base", "text2img", {**SIZES, "negative_original_size": (24, 20)}),
    "img2img_keeps_the_positive_crop": ("img2img", "img2img", {**SIZES, **NEGATIVE_SIZES}),
    "img2img_default_negatives": ("img2img", "img2img", SIZES),
    "refiner_aesthetic": ("refiner", "img2img", {**SIZES, **NEGATIVE_SIZES, "aesthetic_score": 7.0,
                                                  "negative_aesthetic_score": 1.5}),
    "refiner_defaults": ("refiner", "img2img", {}),
}


@pytest.mark.parametrize("case", list(TIME_ID_CASES))
def test_add_time_ids_match_diffusers(pipes, case):
    kind, rule, kw = TIME_ID_CASES[case]
    _, base, _, refiner = pipes
    pipe = {"base": base, "refiner": refiner, "img2img": StableDiffusionXLImg2ImgPipeline(**base.components)}[kind]
    image = None if kind == "base" else torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_time_ids(pipe, image, **kw)
    aesthetic = pipe.config.get("requires_aesthetics_score", False)
    out = get_add_time_ids(32, 32, **kw, requires_aesthetics_score=aesthetic, rule=rule)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)
    check_add_time_ids(pipe.unet.config, len(out[0]), POOLED)


@pytest.mark.parametrize("aesthetic", [False, True])
def test_controlnet_inpaint_time_ids_match_diffusers(pipes, aesthetic):
    """StableDiffusionXLControlNetInpaintPipeline repeats the positive ids for the negatives (no negative
    sizes), with the negative aesthetic score for the refiner."""
    _, base, _, refiner = pipes
    unet = (refiner if aesthetic else base).unet
    fake = types.SimpleNamespace(config=types.SimpleNamespace(requires_aesthetics_score=aesthetic), unet=unet)
    ref = StableDiffusionXLControlNetInpaintPipeline._get_add_time_ids(
        fake, (96, 64), (8, 4), (40, 48), 7.0, 1.5, torch.float32, text_encoder_projection_dim=POOLED)
    out = get_add_time_ids(32, 32, **SIZES, **NEGATIVE_SIZES, requires_aesthetics_score=aesthetic,
                           aesthetic_score=7.0, negative_aesthetic_score=1.5, rule="controlnet_inpaint")
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b[0].numpy())


def test_time_id_errors_name_the_fix(pipes):
    _, base, _, refiner = pipes
    with pytest.raises(ValueError, match="disable requires_aesthetics_score"):
        check_add_time_ids(base.unet.config, 5, POOLED)
    with pytest.raises(ValueError, match="enable requires_aesthetics_score"):
        check_add_time_ids(refiner.unet.config, 6, POOLED)
    with pytest.raises(ValueError, match="projection_dim"):
        check_add_time_ids(base.unet.config, 6, POOLED + 1)
    with pytest.raises(ValueError, match="rule='img2img'"):
        get_add_time_ids(32, 32, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="original_size=\\(1, 2, 3\\)"):
        get_add_time_ids(32, 32, original_size=(1, 2, 3))
