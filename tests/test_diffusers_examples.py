"""diffusers' documented Flax examples run here to their last line.

The examples are the `EXAMPLE_DOC_STRING`s of diffusers 0.39.0's Flax pipeline modules, extracted from
the wheel by tools/diffusers_flax_reference.py into tests/data/diffusers_flax_examples/. Each runs as a
code block changed only by `adapt`: `from diffusers import X` and `from diffusers.utils import X` ->
`from flax_inpaint import X`, hub ids -> tiny local model folders (built by the fixtures below, in the
format the hub repo holds), URLs -> the same file names served from a temporary folder over local HTTP
(so `requests.get` and `load_image` run unchanged). Everything else (image sizes, 50 steps, bf16,
`jit=True` over jax.device_count() = the 8 fake CPU devices of conftest) is the example's own.

The tiny models keep 512x768 images cheap: a VAE with 5 blocks (latents 16x smaller per side), a UNet
whose only attention is at half the latent resolution, a 2-layer CLIP text encoder.
"""
from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

import tiny_sd

EXAMPLES = Path(__file__).parent / "data" / "diffusers_flax_examples"
N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8
VAE_FACTOR = 16

UNET = dict(sample_size=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,) * 5, layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5, norm_num_groups=2,
           sample_size=64)

# Each example's hub ids -> the local folder fixture standing in for them; its URLs -> served file names.
HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd_folder",
    "CompVis/stable-diffusion-v1-4": "sd_folder",
    "xvjiarui/stable-diffusion-2-inpainting": "sd_inpaint_folder",
    "lllyasviel/sd-controlnet-canny": "controlnet_folder",
}


def tiny_components(folder: Path, in_channels: int, seed: int) -> dict:
    """The components of a tiny random SD pipeline (tokenizer files go to `folder`)."""
    torch.manual_seed(seed)
    tokenizer = tiny_sd.make_tokenizer(folder)
    unet = UNet2DConditionModel(in_channels=in_channels, out_channels=4, up_block_types=("CrossAttnUpBlock2D",
                                "UpBlock2D"), **UNET)
    vae = AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tiny_sd.MAX_LENGTH, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=1))
    scheduler = PNDMScheduler(**tiny_sd.SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A text-to-image folder with float32 weights and no bf16 variant files, like the hub repos the
    examples name (diffusers 0.39's Flax loader ignored `variant`; ours falls back with a warning)."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = StableDiffusionPipeline(**tiny_components(tmp / "_tok", 4, seed=0))
    pipe.save_pretrained(tmp / "sd", safe_serialization=True)
    return tmp / "sd"


@pytest.fixture(scope="module")
def sd_inpaint_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd_inpaint")
    pipe = StableDiffusionInpaintPipeline(**tiny_components(tmp / "_tok", 9, seed=1))
    pipe.save_pretrained(tmp / "sd-inpaint", safe_serialization=True)
    return tmp / "sd-inpaint"


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory) -> Path:
    """A PyTorch ControlNet for sd_folder's UNet (control images 16x its latents, like the VAE)."""
    torch.manual_seed(2)
    encoder = {k: v for k, v in UNET.items() if k != "sample_size"}
    net = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(4, 4, 4, 4, 8), **encoder)
    with torch.no_grad():  # zero convolutions get a random init, so the net's residuals matter
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
    folder = tmp_path_factory.mktemp("controlnet") / "controlnet"
    net.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def picture(size: tuple, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]] / max(size)
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.integers(0, 55, (size[1], size[0], 3))
    return PIL.Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The examples' image files on a local HTTP server: file name -> its http://127.0.0.1 URL."""
    root = tmp_path_factory.mktemp("www")
    picture((300, 200), 0).save(root / "sketch-mountains-input.jpg")
    picture((128, 128), 1).save(root / "overture-creations-5sI6fQgYIuo.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[40:100, 30:90] = 255
    PIL.Image.fromarray(mask).save(root / "overture-creations-5sI6fQgYIuo_mask.png")
    edges = np.zeros((64, 64), np.uint8)  # a canny-like edge map: one circle outline
    yy, xx = np.mgrid[:64, :64]
    edges[np.abs(np.hypot(yy - 32, xx - 32) - 20) < 1] = 255
    PIL.Image.fromarray(edges).convert("RGB").save(root / "blog_post_cell_10_output_0.jpeg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {p.name: f"http://127.0.0.1:{server.server_address[1]}/{p.name}" for p in root.iterdir()}
    server.shutdown()


def adapt(code: str, folders: dict, served: dict) -> str:
    """The example with only the documented changes: imports, hub ids -> folders, URLs -> served files."""
    code = re.sub(r"^from diffusers(\.utils)? import ", "from flax_inpaint import ", code, flags=re.M)
    for hub_id, folder in folders.items():
        code = code.replace(f'"{hub_id}"', repr(str(folder)))
    for url in re.findall(r'"(https?://[^"]+)"', code):
        code = code.replace(f'"{url}"', repr(served[url.rsplit("/", 1)[1]]))
    leftover = re.findall(r"diffusers|https://|\"\w[\w.-]*/[\w.-]+\"", re.sub(r"#.*", "", code))
    assert not leftover, f"not adapted: {leftover}"
    return code


def run_example(name: str, request, served, tmp_path, monkeypatch) -> dict:
    code = (EXAMPLES / f"{name}.py").read_text()
    folders = {hub: request.getfixturevalue(fixture) for hub, fixture in HUB_IDS.items() if f'"{hub}"' in code}
    monkeypatch.chdir(tmp_path)  # where the ControlNet example saves generated_image.png
    for name in ("NO_PROXY", "no_proxy"):  # the served files are local even where a proxy is configured
        monkeypatch.setenv(name, "127.0.0.1")
    namespace: dict = {"__name__": "__example__"}
    exec(compile(adapt(code, folders, served), name, "exec"), namespace)  # noqa: S102 (diffusers' documented code)
    return namespace


def check_images(images, size: tuple):
    """N_DEV PIL images of `size`, not constant (the tiny random models produce noise-like pictures)."""
    assert len(images) == N_DEV and all(isinstance(im, PIL.Image.Image) for im in images)
    assert {im.size for im in images} == {size}
    pixels = np.stack([np.asarray(im) for im in images])
    assert pixels.std() > 1, "the example produced constant images"


@pytest.fixture(autouse=True)
def eight_devices():
    assert jax.device_count() == N_DEV


def test_text_to_image_example(request, served, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match=r"no variant='bf16' weight files for \['text_encoder', 'unet', 'vae'\]"):
        ns = run_example("pipeline_flax_stable_diffusion", request, served, tmp_path, monkeypatch)
    assert ns["pipeline"].dtype == jax.numpy.bfloat16
    check_images(ns["images"], (UNET["sample_size"] * VAE_FACTOR,) * 2)


def test_img2img_example(request, served, tmp_path, monkeypatch):
    ns = run_example("pipeline_flax_stable_diffusion_img2img", request, served, tmp_path, monkeypatch)
    check_images(ns["output_images"], (768, 512))


def test_inpaint_example(request, served, tmp_path, monkeypatch):
    ns = run_example("pipeline_flax_stable_diffusion_inpaint", request, served, tmp_path, monkeypatch)
    check_images(ns["images"], (512, 512))


def test_controlnet_example(request, served, tmp_path, monkeypatch):
    ns = run_example("pipeline_flax_controlnet", request, served, tmp_path, monkeypatch)
    assert ns["params"]["controlnet"] is ns["controlnet_params"]  # the PyTorch ControlNet, converted (from_pt)
    grid = PIL.Image.open(tmp_path / "generated_image.png")
    assert grid.size == (4 * 64, N_DEV // 4 * 64)
    assert np.asarray(grid).std() > 1
