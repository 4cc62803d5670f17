"""SDXL single files (Stability's SGM layout) against diffusers' `from_single_file`: base, refiner and
9-channel inpainting.

Each tiny random SDXL pipeline is written as one file with flax_inpaint's inverse table; diffusers'
StableDiffusionXL*Pipeline.from_single_file(..., config=<the tiny folder>) loads it back to exactly the
original weights (so the table is checked against diffusers' own mapping). Ours must load every tensor
equal to diffusers' and give the same UNet and text-encoder outputs: fp32, max abs diff <= 1e-4 (the same
math in another framework; the outputs are O(1)).
"""
import jax
import numpy as np
import pytest
import torch

import tiny_loaders as tl
from flax_inpaint import FlaxCLIPTextModelWithProjection, FlaxStableDiffusionInpaintPipeline, FlaxUNet2DConditionModel
from flax_inpaint.io import CheckpointError
from flax_inpaint.loaders import single_file as sf
from flax_inpaint.models.conversion import to_torch_state_dict

TOL = 1e-4


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """kind -> (diffusers folder, torch pipeline, single file), written once."""
    root = tmp_path_factory.mktemp("sdxl-single")
    out = {}
    for kind in tl.SDXL_KINDS:
        folder, pipe = tl.make_sdxl(root, kind)
        out[kind] = folder, pipe, tl.write_file(tl.sdxl_original_state(pipe), root / f"sdxl-{kind}.safetensors")
    return out


def assert_same_tensors(ours: dict, ref: dict, what: str):
    assert set(ours) == set(ref), f"{what}: keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{what}: {k}")


def components(pipe):
    return [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c) is not None]


def unet_inputs(unet_config, n_ids: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, unet_config.in_channels, 8, 8), np.float32)
    ctx = rng.standard_normal((2, 7, unet_config.cross_attention_dim), np.float32)
    added = {"text_embeds": rng.standard_normal((2, tl.POOLED), np.float32),
             "time_ids": rng.uniform(0, 128, (2, n_ids)).astype(np.float32)}
    return x, np.array([3, 951]), ctx, added


@pytest.mark.parametrize("kind", list(tl.SDXL_KINDS))
def test_sdxl_file_matches_diffusers(sdxl_files, kind):
    folder, pipe, path = sdxl_files[kind]
    ref = tl.SDXL_KINDS[kind][0].from_single_file(str(path), config=str(folder))
    names = components(pipe)
    assert names == components(ref)
    for name in names:  # our writer put every tensor where diffusers' reader expects it
        assert_same_tensors(tl.diffusers_state(getattr(ref, name)), tl.diffusers_state(getattr(pipe, name)), name)

    kwargs, params = sf.load_pipeline(path, folder, sdxl=True)
    for name in names:
        assert_same_tensors(to_torch_state_dict(params[name]), tl.diffusers_state(getattr(ref, name)), name)
    assert (kwargs["text_encoder"] is None) == (kind == "refiner") == (kwargs["tokenizer"] is None)
    assert kwargs["tokenizer_2"].pad_token == "!" and type(kwargs["scheduler"]).__name__ == "FlaxEulerDiscreteScheduler"
    assert kwargs["vae"].scaling_factor == 0.13025

    unet = kwargs["unet"]
    assert (unet.in_channels, unet.addition_embed_type) == (tl.SDXL_KINDS[kind][2], "text_time")
    x, t, ctx, added = unet_inputs(ref.unet.config, 5 if kind == "refiner" else 6)
    with torch.no_grad():
        expected = ref.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                            added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()}).sample.numpy()
    got = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx, added).sample)(params["unet"])
    assert expected.std() > 0.05
    np.testing.assert_allclose(np.asarray(got), expected, atol=TOL, rtol=0)

    ids = np.asarray(pipe.tokenizer_2(["a red cat", "cat"], padding="max_length").input_ids)
    for name in names[2:]:
        te = kwargs[name]
        with torch.no_grad():
            want = getattr(ref, name)(torch.tensor(ids), output_hidden_states=True)
        out = te.apply({"params": params[name]}, ids, output_hidden_states=True)
        np.testing.assert_allclose(out.hidden_states[-2], want.hidden_states[-2].numpy(), atol=TOL, rtol=0)
        if name == "text_encoder_2":  # the pooled, projected embedding SDXL's add_embedding takes
            np.testing.assert_allclose(out.text_embeds, want.text_embeds.numpy(), atol=TOL, rtol=0)


def test_sdxl_model_classes_read_their_component(sdxl_files):
    """The SDXL UNet and text_encoder_2 classes read their part of a pipeline file (as diffusers' model
    classes do with config=<folder>, subfolder=...)."""
    from diffusers import UNet2DConditionModel

    folder, pipe, path = sdxl_files["inpaint"]
    ref = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet")
    unet, params = FlaxUNet2DConditionModel.from_single_file(path, config=folder)
    assert unet.in_channels == 9 and unet.projection_class_embeddings_input_dim == tl.POOLED + 6 * tl.TIME_DIM
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(ref), "unet")
    te, te_params = FlaxCLIPTextModelWithProjection.from_single_file(path, config=folder)
    assert te.projection_dim == tl.POOLED
    assert_same_tensors(to_torch_state_dict(te_params), tl.diffusers_state(pipe.text_encoder_2), "text_encoder_2")


def test_sdxl_and_sd_pipelines_refuse_each_others_files(sdxl_files, tmp_path):
    _, pipe, path = sdxl_files["base"]
    with pytest.raises(CheckpointError, match="is an SDXL checkpoint .* load it with an SDXL pipeline"):
        FlaxStableDiffusionInpaintPipeline.from_single_file(path)
    sd_folder, sd_pipe = tl.make_sd(tmp_path, "sd1", 9)
    sd_path = tl.write_file(tl.original_state(sd_pipe, "sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(CheckpointError, match="not an SDXL one; load it with an SD 1.x/2.x pipeline"):
        sf.load_pipeline(sd_path, sd_folder, sdxl=True)


def test_sdxl_unused_and_missing_tensors_are_listed(sdxl_files, tmp_path):
    folder, pipe, _ = sdxl_files["base"]
    state = tl.sdxl_original_state(pipe)
    del state[sf.UNET_PREFIX + "label_emb.0.2.bias"]
    state[sf.SDXL_OPENCLIP_PREFIX + "stray"] = np.zeros(3, np.float32)
    path = tl.write_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        sf.load_pipeline(path, folder, sdxl=True)
    assert "model.diffusion_model.label_emb.0.2.bias (for unet add_embedding.linear_2.bias)" in str(err.value)
    assert sf.SDXL_OPENCLIP_PREFIX + "stray" in str(err.value)
