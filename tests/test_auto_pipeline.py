"""FlaxAutoPipelineFor{Text2Image,Image2Image,Inpainting}: the class they pick is the one diffusers'
AutoPipelineFor* picks (by the folder's or pipeline's class and `controlnet=`), from_pipe reuses the
components without reloading, and a pipeline reached that way gives diffusers' images (DDIM, 3 steps,
32x32: within 1e-3 max abs, fp32 images in [0, 1])."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)

import tiny_sd
from flax_inpaint import (
    FlaxAutoPipelineForImage2Image,
    FlaxAutoPipelineForInpainting,
    FlaxAutoPipelineForText2Image,
    FlaxControlNetModel,
    FlaxStableDiffusionControlNetPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
)
from flax_inpaint.io import CheckpointError
from flax_inpaint.loaders import single_file as sf

AUTOS = {"text2image": (FlaxAutoPipelineForText2Image, AutoPipelineForText2Image),
         "image2image": (FlaxAutoPipelineForImage2Image, AutoPipelineForImage2Image),
         "inpainting": (FlaxAutoPipelineForInpainting, AutoPipelineForInpainting)}
STEPS = 3


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    """Tiny SD folders (model_index: StableDiffusionInpaintPipeline and StableDiffusionPipeline, one 4-channel
    UNet), a ControlNet folder, and
    the torch pipelines diffusers' from_pipe starts from: plain and ControlNet text-to-image."""
    root = tmp_path_factory.mktemp("auto")
    folder, torch_pipe = tiny_sd.make_pipeline(root, in_channels=4, scheduler="ddim")
    net = tiny_sd.make_controlnet(1)
    net.save_pretrained(root / "net", safe_serialization=True)
    plain = StableDiffusionPipeline.from_pipe(torch_pipe)
    plain.save_pretrained(root / "t2i", safe_serialization=True)
    return SimpleNamespace(folder=folder, torch=torch_pipe, net=net, net_folder=root / "net", t2i_folder=root / "t2i",
                           sources={"plain": plain, "controlnet": StableDiffusionControlNetPipeline.from_pipe(
                               plain, controlnet=net)})


@pytest.fixture(scope="module")
def loaded(auto):
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(auto.folder)
    net, net_params = FlaxControlNetModel.from_pretrained(auto.net_folder)
    return SimpleNamespace(pipe=pipe, params=params, net=net, net_params=net_params)


@pytest.mark.parametrize("task", list(AUTOS))
@pytest.mark.parametrize("source", ["plain", "controlnet"])
@pytest.mark.parametrize("controlnet", ["absent", "given", "none"])
def test_from_pipe_picks_diffusers_class(auto, loaded, task, source, controlnet):
    ours_auto, torch_auto = AUTOS[task]
    torch_kw = {"absent": {}, "given": {"controlnet": auto.net}, "none": {"controlnet": None}}[controlnet]
    ours_kw = {"absent": {}, "given": {"controlnet": loaded.net}, "none": {"controlnet": None}}[controlnet]
    start = (FlaxStableDiffusionPipeline.from_pipe(loaded.pipe) if source == "plain" else
             FlaxStableDiffusionControlNetPipeline.from_pipe(loaded.pipe, controlnet=loaded.net))
    assert type(start).__name__ == "Flax" + type(auto.sources[source]).__name__
    ref = torch_auto.from_pipe(auto.sources[source], **torch_kw)
    ours = ours_auto.from_pipe(start, **ours_kw)
    assert type(ours).__name__ == "Flax" + type(ref).__name__
    assert ours.unet is loaded.pipe.unet and ours.vae is loaded.pipe.vae  # no reloading: the same modules
    assert hasattr(ours, "controlnet") == (source == "controlnet" and controlnet != "none" or controlnet == "given")


@pytest.mark.parametrize("task", list(AUTOS))
def test_from_pretrained_picks_diffusers_class(auto, task):
    """Folders whose model_index names the inpainting or the text-to-image pipeline give each task's class, as
    in diffusers; with `controlnet=` (a folder here) the ControlNet one, whose params hold the ControlNet's.
    (diffusers finds no text-to-image or image-to-image ControlNet class for an inpainting folder, so that
    case is left out.)"""
    ours_auto, torch_auto = AUTOS[task]
    for folder, kwargs in ((auto.folder, {}), (auto.t2i_folder, {}), (auto.t2i_folder, {"controlnet": auto.net_folder})):
        torch_kwargs = {"controlnet": auto.net} if kwargs else {}
        ref = type(torch_auto.from_pretrained(folder, **torch_kwargs)).__name__
        pipe, params = ours_auto.from_pretrained(folder, **kwargs)
        assert type(pipe).__name__ == "Flax" + ref
        assert ("controlnet" in params) == bool(kwargs)


def test_from_pipe_image_matches_diffusers(auto, loaded):
    """Text-to-image reached by from_pipe from the loaded inpainting pipeline, with its params: diffusers'
    images from the same latents."""
    lat = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoPipelineForText2Image.from_pipe(auto.torch)(
            "a red cat", latents=lat, num_inference_steps=STEPS, output_type="np").images
    pipe = FlaxAutoPipelineForText2Image.from_pipe(loaded.pipe)
    assert type(pipe) is FlaxStableDiffusionPipeline
    ours = pipe(pipe.prepare_inputs("a red cat"), loaded.params, jax.random.key(0), latents=lat.numpy(),
                num_inference_steps=STEPS, output_type="np").images
    assert np.asarray(ref).std() > 0.02
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-3, rtol=0)


def test_errors(loaded):
    with pytest.raises(EnvironmentError, match=r"FlaxAutoPipelineForInpainting.from_pretrained\(folder\)"):
        FlaxAutoPipelineForInpainting()
    with pytest.raises(CheckpointError, match=r"FlaxAutoPipelineForText2Image: no task pipeline is linked to "
                                              r"'StableDiffusionDiffEditPipeline'"):
        FlaxAutoPipelineForText2Image.pipeline_class_for("StableDiffusionDiffEditPipeline")


def test_sdxl_family_and_single_files(tmp_path_factory, monkeypatch):
    """An SDXL pipeline moves between tasks as diffusers' from_pipe moves its torch twin; from_single_file picks
    the family from the file's tensors (SDXL or SD 1.x), reading a pickle's tensors once."""
    import tiny_loaders as tl

    root = tmp_path_factory.mktemp("auto-sdxl")
    folder, torch_base = tl.make_sdxl(root, "base")
    base, _ = FlaxAutoPipelineForText2Image.from_pretrained(folder)
    for ours_auto, torch_auto in AUTOS.values():
        ours = ours_auto.from_pipe(base)
        assert type(ours).__name__ == "Flax" + type(torch_auto.from_pipe(torch_base)).__name__
        assert ours.unet is base.unet and ours.text_encoder_2 is base.text_encoder_2
    sdxl_file = tl.write_file(tl.sdxl_original_state(torch_base), root / "sdxl.safetensors")
    sd_folder, torch_sd = tl.make_sd(root, "sd1", in_channels=9)
    sd_state = tl.original_state(torch_sd, "sd1")
    sd_file = tl.write_file(sd_state, root / "sd1.safetensors")
    ckpt = tl.write_file(sd_state, root / "sd1.ckpt")
    converted = []
    monkeypatch.setattr(sf, "_to_numpy", lambda v, f=sf._to_numpy: converted.append(1) or f(v))
    for path, config, name in ((sdxl_file, folder, "StableDiffusionXLInpaintPipeline"),
                               (sd_file, sd_folder, "StableDiffusionInpaintPipeline"),
                               (ckpt, sd_folder, "StableDiffusionInpaintPipeline")):
        converted.clear()
        pipe, _ = FlaxAutoPipelineForInpainting.from_single_file(path, config=config)
        assert type(pipe).__name__ == "Flax" + name
    assert len(converted) == len(sd_state)  # the pickle's family told from its names: each tensor read once
