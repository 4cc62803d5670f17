"""Textual inversion against diffusers' `load_textual_inversion`: same token ids, same images (1e-3 max abs,
fp32, values in [0, 1]), for diffusers' learned_embeds, A1111's .pt (a 3-vector embedding) and .safetensors
files loaded together, into an SD1-shaped and an SD2-shaped (OpenCLIP-style, gelu) tiny pipeline."""
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline
from flax_inpaint.io import CheckpointError

ATOL = 1e-3
PROMPT = "a <cat-toy> cat in charturner style"
NEGATIVE = "negemb, blurry"


def write_embeddings(root, dim: int, seed: int = 0):
    """diffusers' learned_embeds (one vector), an A1111 .pt (three) and an A1111 .safetensors (two)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    diffusers_file = root / "learned_embeds.safetensors"
    save_file({"<cat-toy>": rng.standard_normal(dim).astype(np.float32)}, str(diffusers_file))
    a1111_pt = root / "charturner.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "name": "charturner", "step": 1500,
                "string_to_param": {"*": torch.from_numpy(rng.standard_normal((3, dim)).astype(np.float32))},
                "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v1-5"}, a1111_pt)
    a1111_st = root / "negemb.safetensors"
    save_file({"emb_params": rng.standard_normal((2, dim)).astype(np.float32)}, str(a1111_st))
    return [diffusers_file, a1111_pt, a1111_st], [None, None, "negemb"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ti-{request.param}")
    if request.param == "sd1":
        folder, ref = tiny_sd.make_pipeline(root, in_channels=9)
    else:
        folder, ref = tl.make_sd(root, "sd2", in_channels=9)
    files, tokens = write_embeddings(root / "emb", ref.text_encoder.config.hidden_size)
    # diffusers multiplies a token list that starts with None (a quirk), so it gets every token by name;
    # ours reads the first two from the files.
    ref.load_textual_inversion([str(f) for f in files], token=["<cat-toy>", "charturner", "negemb"])
    ours, base = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)
    tokenizer_before = ours.tokenizer
    params = ours.load_textual_inversion(base, files, token=tokens)
    size = ref.vae.config.sample_size
    return ref, ours, base, params, tokenizer_before, size


def test_token_ids_match_diffusers(loaded):
    ref, ours, *_ = loaded
    for prompt in (PROMPT, NEGATIVE):
        expected = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length",
                                 max_length=ref.tokenizer.model_max_length, truncation=True).input_ids
        assert ours.tokenize(prompt)[0].tolist() == expected
    assert ours.maybe_convert_prompt(PROMPT) == "a <cat-toy> cat in charturner charturner_1 charturner_2 style"
    assert len(ours.tokenizer) == len(ref.tokenizer) == ours.text_encoder.vocab_size


def test_images_match_diffusers(loaded):
    ref, ours, _, params, _, size = loaded
    image, mask = tiny_sd.sample_image_and_mask(size)
    with torch.no_grad():
        expected = ref(PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, height=size, width=size,
                       num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        without = ref("a cat in style", image=image, mask_image=mask, negative_prompt="blurry", height=size,
                      width=size, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    latent = size // ours.vae_scale_factor
    noise = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(0)).numpy()
    got = ours.inpaint(PROMPT, image, mask, params, jax.random.key(0), negative_prompt=NEGATIVE, height=size,
                       width=size, num_inference_steps=3, latents=noise, output_type="np").images
    assert np.abs(expected - without).max() > 0.05  # the embeddings matter
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_inputs_are_left_alone(loaded):
    _, ours, base, params, tokenizer_before, _ = loaded
    table = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    old = base["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert table.shape[0] == old.shape[0] + 6  # <cat-toy>, charturner x 3, negemb x 2
    np.testing.assert_array_equal(table[: old.shape[0]], old)
    assert "<cat-toy>" not in tokenizer_before.get_vocab()  # the pipeline extended a copy


def test_errors(loaded, tmp_path):
    _, ours, _, params, *_ = loaded
    dim = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[1]
    with pytest.raises(ValueError, match=r"tokens \['<cat-toy>'\] are already"):
        ours.load_textual_inversion(params, {"<cat-toy>": np.zeros(dim, np.float32)})
    with pytest.raises(ValueError, match=f"vectors of size {dim + 1}, but this text encoder's are {dim}"):
        ours.load_textual_inversion(params, {"<wide>": np.zeros(dim + 1, np.float32)})
    with pytest.raises(CheckpointError, match="SDXL embedding"):
        ours.load_textual_inversion(params, {"clip_l": np.zeros((1, 768)), "clip_g": np.zeros((1, 1280))})
    with pytest.raises(ValueError, match="bare tensor; pass token="):
        ours.load_textual_inversion(params, np.zeros((1, dim), np.float32))
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        ours.load_textual_inversion(params, [{"<a>": np.zeros(dim)}, {"<a>": np.zeros(dim)}])
