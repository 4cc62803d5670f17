"""SDXL textual inversion against diffusers: an embedding file with `clip_l` and `clip_g` vectors, loaded as
diffusers' docs show (each part with `text_encoder=` / `tokenizer=`: text_encoder + tokenizer for clip_l,
text_encoder_2 + tokenizer_2 for clip_g), and as a whole file into a pipeline with text_encoder_2 (both at
once). Same token ids for prompts using the (two-vector) token; both encoders' outputs within 1e-4 max abs
(fp32, the same math in another framework; outputs are O(1)). The methods run on a bare
TextualInversionLoaderMixin holding SDXL's components (the SDXL pipeline classes inherit them).
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file
from transformers import CLIPTokenizer

import tiny_loaders as tl
from flax_inpaint import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from flax_inpaint.io import CheckpointError
from flax_inpaint.loaders.textual_inversion import TextualInversionLoaderMixin

TOL = 1e-4
PROMPT = "a unaesthetic red cat"


class Components(TextualInversionLoaderMixin):
    """The text side of an SDXL pipeline: what the loader methods read and extend."""

    def __init__(self, folder, refiner: bool = False):
        self.text_encoder, self.tokenizer = None, None
        if not refiner:
            self.text_encoder, params = FlaxCLIPTextModel.from_pretrained(folder / "text_encoder")
            self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder_2, params_2 = FlaxCLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        self.params = {"text_encoder_2": params_2, **({} if refiner else {"text_encoder": params})}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti-sdxl")
    folder, _ = tl.make_sdxl(root, "base")
    rng = np.random.default_rng(0)
    path = root / "unaesthetic.safetensors"  # two vectors per encoder, as SDXL negative embeddings have
    save_file({"clip_l": rng.standard_normal((2, tl.SDXL_TEXT["hidden_size"])).astype(np.float32),
               "clip_g": rng.standard_normal((2, tl.SDXL_TEXT_2["hidden_size"])).astype(np.float32)}, str(path))
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    tensors = load_torch_file(str(path))  # diffusers' docs: safetensors.torch.load_file
    ref.load_textual_inversion(tensors["clip_g"], token="unaesthetic", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(tensors["clip_l"], token="unaesthetic", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    return folder, path, load_file(str(path)), ref


def ids(tokenizer, prompt):
    return np.asarray(tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True).input_ids)[None]


def test_sdxl_embeddings_match_diffusers(loaded):
    folder, path, state, ref = loaded
    diffusers_way = Components(folder)  # each part into its encoder, as diffusers' docs show
    params = diffusers_way.load_textual_inversion(diffusers_way.params, state["clip_g"], token="unaesthetic",
                                                  text_encoder=diffusers_way.text_encoder_2,
                                                  tokenizer=diffusers_way.tokenizer_2)
    params = diffusers_way.load_textual_inversion(params, state["clip_l"], token="unaesthetic",
                                                  text_encoder=diffusers_way.text_encoder)
    whole = Components(folder)  # the whole file: both parts, token from the file's name
    whole_params = whole.load_textual_inversion(whole.params, path)
    for name in ("text_encoder", "text_encoder_2"):
        np.testing.assert_array_equal(whole_params[name]["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                      params[name]["text_model"]["embeddings"]["token_embedding"]["embedding"])

    for ours, our_params in ((diffusers_way, params), (whole, whole_params)):
        for te_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            ref_tok, tok = getattr(ref, tok_name), getattr(ours, tok_name)
            expected_ids = ids(ref_tok, ref.maybe_convert_prompt(PROMPT, ref_tok))
            got_ids = ids(tok, ours.maybe_convert_prompt(PROMPT, tok))
            np.testing.assert_array_equal(got_ids, expected_ids)
            assert len(tok) == len(ref_tok) == getattr(ours, te_name).vocab_size
            with torch.no_grad():
                want = getattr(ref, te_name)(torch.tensor(expected_ids), output_hidden_states=True)
            te = getattr(ours, te_name)
            out = te.apply({"params": our_params[te_name]}, got_ids, output_hidden_states=True)
            np.testing.assert_allclose(out.hidden_states[-2], want.hidden_states[-2].numpy(), atol=TOL, rtol=0)
            if te_name == "text_encoder_2":
                np.testing.assert_allclose(out.text_embeds, want.text_embeds.numpy(), atol=TOL, rtol=0)
    assert ours.maybe_convert_prompt(PROMPT, ours.tokenizer_2) == "a unaesthetic unaesthetic_1 red cat"
    with torch.no_grad():  # the embedding matters
        plain = ref.text_encoder_2(torch.tensor(ids(ref.tokenizer_2, "a red cat"))).text_embeds.numpy()
    assert np.abs(plain - out.text_embeds).max() > 1e-2


def test_refiner_takes_clip_g_and_errors(loaded):
    folder, path, state, _ = loaded
    refiner = Components(folder, refiner=True)
    params = refiner.load_textual_inversion(refiner.params, path, token="<neg>")
    assert set(params) == {"text_encoder_2"} and "<neg>_1" in refiner.tokenizer_2.get_vocab()
    with pytest.raises(ValueError, match="text_encoder= must be this pipeline's own"):
        refiner.load_textual_inversion(params, state["clip_l"], token="x", text_encoder=object())
    with pytest.raises(ValueError, match="pass token="):
        refiner.load_textual_inversion(params, dict(state))
    with pytest.raises(CheckpointError, match="is an SDXL embedding"):  # explicit encoder: one part, not the file
        refiner.load_textual_inversion(params, path, text_encoder=refiner.text_encoder_2)
