"""Single-file checkpoints (original Stable Diffusion layout) against diffusers' `from_single_file`.

Each tiny random model is written as one file with flax_inpaint's inverse table; diffusers loads it
(`from_single_file(..., config=<the tiny diffusers folder>)`) back to exactly the original weights, which
checks that table against diffusers' own mapping. Ours must then load every tensor equal to diffusers'
and produce the same images (fp32, 1e-3 max abs on values in [0, 1]).
"""
import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline, StableDiffusionInpaintPipeline

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import (
    FlaxControlNetModel,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxUNet2DConditionModel,
)
from flax_inpaint.loaders import single_file as sf
from flax_inpaint.models.checkpoint import CheckpointError, to_torch_state_dict

ATOL = 1e-3
STEPS = 3
COMPONENTS = ("unet", "vae", "text_encoder")
CASES = {  # id: (family, in_channels, prediction_type, file suffix)
    "sd1-inpaint-safetensors": ("sd1", 9, "epsilon", ".safetensors"),
    "sd1-ckpt": ("sd1", 4, "epsilon", ".ckpt"),
    "sd2-inpaint": ("sd2", 9, "epsilon", ".safetensors"),
    "sd2-v": ("sd2", 4, "v_prediction", ".safetensors"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """id -> (diffusers folder, torch pipeline, single file) for every case, written once."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, (family, channels, prediction, suffix) in CASES.items():
        folder, pipe = tl.make_sd(root, family, channels, prediction)
        path = tl.write_file(tl.original_state(pipe, family), root / f"{name}{suffix}")
        out[name] = folder, pipe, path
    return out


def assert_same_tensors(ours: dict, ref: dict, what: str):
    assert set(ours) == set(ref), f"{what}: keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{what}: {k}")


def diffusers_images(pipe, in_channels, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    with torch.no_grad():
        return pipe("a red cat", image=image, mask_image=mask, height=tl.SIZE, width=tl.SIZE,
                    num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images


def diffusers_noise(in_channels: int) -> np.ndarray:
    """diffusers' initial noise from Generator().manual_seed(0): a 4-channel UNet encodes the image first."""
    g = torch.Generator().manual_seed(0)
    if in_channels == 4:
        torch.randn((1, *tl.LATENT), generator=g)
    return torch.randn((1, *tl.LATENT), generator=g).numpy()


def our_images(pipe, params, in_channels, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    return pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), height=tl.SIZE, width=tl.SIZE,
                        num_inference_steps=STEPS, latents=diffusers_noise(in_channels), output_type="np",
                        **kwargs).images


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_file_matches_diffusers(files, case):
    family, channels, prediction, _ = CASES[case]
    folder, pipe, path = files[case]
    ref = StableDiffusionInpaintPipeline.from_single_file(str(path), config=str(folder), safety_checker=None)
    if prediction != "epsilon":
        ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config, prediction_type=prediction)
    for name in COMPONENTS:  # our writer put every tensor where diffusers' reader expects it
        assert_same_tensors(tl.diffusers_state(getattr(ref, name)), tl.diffusers_state(getattr(pipe, name)), name)

    # The v model's folder says epsilon: the override must win, as it does for diffusers above.
    ours, params = FlaxStableDiffusionInpaintPipeline.from_single_file(
        path, config=folder, prediction_type=None if prediction == "epsilon" else prediction)
    assert ours.scheduler.prediction_type == prediction and ours.unet.in_channels == channels
    for name in COMPONENTS:
        assert_same_tensors(to_torch_state_dict(params[name]), tl.diffusers_state(getattr(ref, name)), name)

    expected = diffusers_images(ref, channels)
    got = our_images(ours, params, channels)
    assert expected.shape == got.shape == (1, tl.SIZE, tl.SIZE, 3)
    assert expected.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def controlnet_files(files, tmp_path_factory):
    """A ControlNet as a standalone original-layout file, and inside a whole-pipeline file (the layout of
    the original ControlNet releases); its diffusers folder sits in the pipeline folder as `controlnet/`."""
    root = tmp_path_factory.mktemp("cn")
    folder, pipe, _ = files["sd1-inpaint-safetensors"]
    net = tl.make_controlnet()
    net.save_pretrained(folder / "controlnet", safe_serialization=True)
    layout = sf.Layout("controlnet", sf.CONTROLNET_PREFIX, "controlnet")
    alone = tl.write_file(sf.to_original(tl.diffusers_state(net), layout, tl.torch_config(net)),
                          root / "control_sd15_tiny.safetensors")
    whole = tl.write_file(tl.original_state(pipe, "sd1", controlnet=net), root / "sd_with_control.safetensors")
    return folder, pipe, net, alone, whole


def test_controlnet_file_matches_diffusers(controlnet_files):
    folder, pipe, net, alone, whole = controlnet_files
    ref_net = ControlNetModel.from_single_file(str(alone), config=str(folder / "controlnet"))
    assert_same_tensors(tl.diffusers_state(ref_net), tl.diffusers_state(net), "controlnet")
    model, params = FlaxControlNetModel.from_single_file(alone, config=folder / "controlnet")
    assert_same_tensors(to_torch_state_dict(params), tl.diffusers_state(ref_net), "controlnet")

    # The ControlNet pipeline: the SD file and the ControlNet file, or one file holding both.
    sd_file = tl.write_file(tl.original_state(pipe, "sd1"), alone.parent / "sd.safetensors")
    ours, ours_params = FlaxStableDiffusionControlNetInpaintPipeline.from_single_file(sd_file, config=folder,
                                                                                      controlnet=alone)
    both, both_params = FlaxStableDiffusionControlNetInpaintPipeline.from_single_file(whole, config=folder)
    for name in (*COMPONENTS, "controlnet"):
        assert_same_tensors(to_torch_state_dict(both_params[name]), to_torch_state_dict(ours_params[name]), name)

    ref = StableDiffusionControlNetInpaintPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=ref_net,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    image, mask = tiny_sd.sample_image_and_mask(tl.SIZE)
    control, _ = tiny_sd.sample_image_and_mask(tl.SIZE, seed=1)
    expected = diffusers_images(ref, 9, control_image=control)
    ids, masked, mask_in, image_in, control_in = ours.prepare_inputs("a red cat", image, mask, control)
    got = ours(ids, mask_in, masked, ours_params, jax.random.key(0), num_inference_steps=STEPS,
               control_image=control_in, image=image_in, latents=diffusers_noise(9)).images
    assert expected.std() > 0.02
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=0)
