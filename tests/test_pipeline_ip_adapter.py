"""IP-Adapter image prompts in the pipelines against diffusers' `load_ip_adapter` + `ip_adapter_image`.

A tiny random SD pipeline (4-channel UNet: text-to-image, img2img, inpainting by latent blending, and these
with a tiny random ControlNet) is saved with
a tiny random `image_encoder` (transformers' CLIPVisionModelWithProjection) and random plain / "plus"
adapters in the published layout (test_ip_adapter.py). Both sides run the same prompt, noise and
reference image with CFG, so the zero-image negative embeddings take part; our image encoder and its CLIP
preprocessing run inside the compiled program. Images agree within 1e-3 max abs (fp32, values in [0, 1]:
the same float32 math in another order through three denoising steps).
"""
import copy
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from flax.training.common_utils import shard
from jax.sharding import Mesh
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import tiny_sd
from flax_inpaint import (FlaxControlNetModel, FlaxStableDiffusionControlNetInpaintPipeline,
                          FlaxStableDiffusionControlNetPipeline, FlaxStableDiffusionImg2ImgPipeline,
                          FlaxStableDiffusionInpaintPipeline, FlaxStableDiffusionPipeline, cli, make_inpaint_condition)
from flax_inpaint.pipelines.inputs import seed_keys
from test_ip_adapter import ENCODER, ip_attention, plain_image_proj, plus_image_proj, save_published

ATOL = 1e-3
CROSS = tiny_sd.ENCODER["cross_attention_dim"]
STEPS = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32)
SCALE = 0.7


def reference_image(seed: int) -> Image.Image:
    """A random, non-square reference image: the CLIP preprocessing resizes and center-crops it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    no_encoder, torch_pipe = tiny_sd.make_pipeline(root, in_channels=4, scheduler="ddim")
    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    encoder.save_pretrained(root / "image_encoder")
    torch_pipe = StableDiffusionInpaintPipeline(**{**torch_pipe.components, "image_encoder": encoder},
                                                requires_safety_checker=False)
    folder = root / "with-encoder"  # the CLI test loads the folder's own image_encoder
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(no_encoder, image_encoder=root / "image_encoder")
    rng = np.random.default_rng(0)
    variants = {}
    for variant in ("plain", "plus"):
        proj = plain_image_proj(rng, cross=CROSS) if variant == "plain" else plus_image_proj(rng, cross=CROSS)
        path = save_published({"image_proj": proj, "ip_adapter": ip_attention(rng, torch_pipe.unet)},
                              root / f"ip-adapter-{variant}.safetensors")
        theirs = copy.deepcopy(torch_pipe)
        theirs.load_ip_adapter(str(root), subfolder="", weight_name=path.name)
        theirs.set_ip_adapter_scale(SCALE)
        ours = pipe.set_ip_adapter_scale(pipe.load_ip_adapter(params, root, weight_name=path.name), SCALE)
        variants[variant] = (theirs, ours)
    image, mask = tiny_sd.sample_image_and_mask()
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(pipe=pipe, variants=variants, image=image, mask=mask, noise=noise, root=root, folder=folder)


def inpaint(sd, params, ip_image, **kwargs):
    return sd.pipe.inpaint("a red cat", sd.image, sd.mask, params, jax.random.key(0), latents=sd.noise.numpy(),
                           ip_adapter_image=ip_image, output_type="np", **STEPS, **kwargs).images


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_inpaint_matches_diffusers(sd, variant):
    theirs, params = sd.variants[variant]
    with torch.no_grad():
        ref = theirs("a red cat", image=sd.image, mask_image=sd.mask, ip_adapter_image=reference_image(1),
                     latents=sd.noise, generator=torch.Generator().manual_seed(0), output_type="np", **STEPS).images
    ours = inpaint(sd, params, reference_image(1))
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    without = inpaint(sd, sd.pipe.set_ip_adapter_scale(params, 0.0), reference_image(1))
    assert np.abs(ours - without).max() > 0.02, "the image prompt barely changes the image; the test would prove little"


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_text_to_image_matches_diffusers(sd, variant):
    """plain: the reference image; plus: diffusers' own precomputed `ip_adapter_image_embeds` (negatives first)."""
    theirs, params = sd.variants[variant]
    theirs = StableDiffusionPipeline(**theirs.components, requires_safety_checker=False)
    pipe = FlaxStableDiffusionPipeline.from_pipe(sd.pipe)
    with torch.no_grad():
        if variant == "plain":
            ip = dict(ip_adapter_image=reference_image(2))
        else:
            embeds = theirs.prepare_ip_adapter_image_embeds(reference_image(2), None, "cpu", 1, True)
            ip = dict(ip_adapter_image_embeds=embeds)
        ref = theirs("a red cat", latents=sd.noise, output_type="np", **ip, **STEPS).images
    ours = pipe(pipe.prepare_inputs(["a red cat"]), params, jax.random.key(0), latents=sd.noise.numpy(),
                **{k: v if k == "ip_adapter_image" else [e.numpy() for e in v] for k, v in ip.items()},
                **STEPS).images
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_img2img_matches_diffusers(sd):
    theirs, params = sd.variants["plus"]
    theirs = StableDiffusionImg2ImgPipeline(**theirs.components, requires_safety_checker=False)
    steps = {**STEPS, "strength": 0.7}
    del steps["height"], steps["width"]
    with torch.no_grad():
        ref = theirs("a red cat", image=sd.image, ip_adapter_image=reference_image(2), output_type="np",
                     generator=torch.Generator().manual_seed(0), **steps).images
    g = torch.Generator().manual_seed(0)
    torch.randn((1, 4, 8, 8), generator=g)  # diffusers samples the image's posterior first
    noise = torch.randn((1, 4, 8, 8), generator=g).numpy()
    pipe = FlaxStableDiffusionImg2ImgPipeline.from_pipe(sd.pipe)
    ids, image = pipe.prepare_inputs(["a red cat"], sd.image)
    ours = pipe(ids, image, params, jax.random.key(0), noise=noise, ip_adapter_image=reference_image(2),
                **steps).images
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_new_scale_and_reference_image_do_not_recompile(sd):
    _, params = sd.variants["plus"]
    first = inpaint(sd, params, reference_image(1))  # compiled by the parity test unless run alone
    with tiny_sd.count_compiles() as compiles:
        other_image = inpaint(sd, params, reference_image(3))
        other_scale = inpaint(sd, sd.pipe.set_ip_adapter_scale(params, {"down": 1.2, "up": 0.1}), reference_image(1))
    assert compiles == []
    assert np.abs(other_image - first).max() > 1e-2 and np.abs(other_scale - first).max() > 1e-2


def test_pmap_matches_single_device_calls(sd):
    """jit=True (8 fake devices): each device's images are those of a one-device call on its rows."""
    _, params = sd.variants["plain"]
    n = jax.local_device_count()
    ids, masked, masks, images = sd.pipe.prepare_inputs(["a red cat", "a cat"] * (n // 2), sd.image, sd.mask,
                                                        return_image=True)
    keys = jax.random.split(jax.random.key(0), n)
    noise = np.random.default_rng(0).standard_normal((n, 4, 8, 8), np.float32)
    opts = dict(ip_adapter_image=reference_image(1), num_inference_steps=3, guidance_scale=7.5)
    out = sd.pipe(shard(ids), shard(masks), shard(masked), tiny_sd.replicated(params), keys, jit=True, image=shard(images),
                  latents=shard(noise), **opts).images
    for d in (0, n - 1):  # the program of the inpaint parity test
        rows = slice(d, d + 1)
        one = sd.pipe(ids[rows], masks[rows], masked[rows], params, keys[d], image=images[rows], latents=noise[rows],
                      **opts).images
        np.testing.assert_allclose(out[d], one, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def cn(sd):
    """A tiny random ControlNet: the torch model, ours loaded from its saved folder, and our ControlNet
    inpaint pipeline over the IP-Adapter pipeline's components."""
    net = tiny_sd.make_controlnet(1)
    net.save_pretrained(sd.root / "controlnet", safe_serialization=True)
    ours, net_params = FlaxControlNetModel.from_pretrained(sd.root / "controlnet")
    inpaint_pipe = FlaxStableDiffusionControlNetInpaintPipeline.from_pipe(sd.pipe, controlnet=ours)
    return SimpleNamespace(torch=net, ours=ours, params=net_params, inpaint=inpaint_pipe,
                           control=make_inpaint_condition(sd.image, sd.mask))


def cn_inpaint(sd, cn, params, ip_image):
    return cn.inpaint.inpaint("a red cat", sd.image, sd.mask, cn.control, {**params, "controlnet": cn.params},
                              jax.random.key(0), latents=sd.noise.numpy(), ip_adapter_image=ip_image, output_type="np",
                              **STEPS).images


def test_controlnet_inpaint_matches_diffusers(sd, cn):
    theirs, params = sd.variants["plain"]
    theirs = StableDiffusionControlNetInpaintPipeline(**theirs.components, controlnet=cn.torch,
                                                      requires_safety_checker=False)
    with torch.no_grad():
        ref = theirs("a red cat", image=sd.image, mask_image=sd.mask, control_image=torch.from_numpy(cn.control),
                     ip_adapter_image=reference_image(1), latents=sd.noise, generator=torch.Generator().manual_seed(0),
                     output_type="np", **STEPS).images
    ours = cn_inpaint(sd, cn, params, reference_image(1))
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    without = cn_inpaint(sd, cn, sd.pipe.set_ip_adapter_scale(params, 0.0), reference_image(1))
    assert np.abs(ours - without).max() > 0.02, "the image prompt barely changes the image; the test would prove little"


def test_controlnet_text_to_image_matches_diffusers(sd, cn):
    theirs, params = sd.variants["plus"]
    theirs = StableDiffusionControlNetPipeline(**theirs.components, controlnet=cn.torch, requires_safety_checker=False)
    with torch.no_grad():
        ref = theirs("a red cat", image=sd.image, ip_adapter_image=reference_image(2), latents=sd.noise,
                     output_type="np", **STEPS).images
    pipe = FlaxStableDiffusionControlNetPipeline.from_pipe(sd.pipe, controlnet=cn.ours)
    ids, control = pipe.prepare_text_inputs("a red cat"), pipe.prepare_image_inputs(sd.image)
    ours = pipe(ids, control, {**params, "controlnet": cn.params}, jax.random.key(0), 3, latents=sd.noise.numpy(),
                ip_adapter_image=reference_image(2)).images
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_controlnet_inpaint_on_a_mesh_matches_single_device_calls(sd, cn):
    """mesh= over 8 fake devices, 8 prompts with their own noise: each row's images are those of a one-device
    call on it alone (the latents are given; tiny_sd's VAE posterior has negligible variance, so the keys
    play no part)."""
    _, params = sd.variants["plain"]
    params = {**params, "controlnet": cn.params}
    n = jax.device_count()
    ids, masked, masks, images, control = cn.inpaint.prepare_inputs(["a red cat", "a cat"] * (n // 2), sd.image,
                                                                     sd.mask, cn.control)
    noise = np.random.default_rng(0).standard_normal((n, 4, 8, 8), np.float32)
    opts = dict(ip_adapter_image=reference_image(1), num_inference_steps=3, guidance_scale=7.5)
    out = cn.inpaint(ids, masks, masked, params, jax.random.key(0), mesh=Mesh(np.array(jax.devices()), ("data",)),
                     image=images, latents=noise, control_image=control, **opts).images
    for d in (0, n - 1):  # the program of the ControlNet inpaint parity test
        rows = slice(d, d + 1)
        one = cn.inpaint(ids[rows], masks[rows], masked[rows], params, jax.random.key(d), image=images[rows],
                         latents=noise[rows], control_image=control[rows], **opts).images
        np.testing.assert_allclose(out[rows], one, atol=1e-5, rtol=0)
    assert np.abs(out[0] - out[1]).max() > 1e-2  # other prompts and noise


def test_bad_image_prompts_are_named(sd):
    _, params = sd.variants["plain"]
    with pytest.raises(ValueError, match="2 IP-Adapter image prompts .* for 1 loaded"):
        inpaint(sd, params, [reference_image(1), reference_image(2)])
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\] has shape \(3, 1, 20\)"):
        sd.pipe.inpaint("a cat", sd.image, sd.mask, params, jax.random.key(0),
                        ip_adapter_image_embeds=[np.zeros((3, 1, 20), np.float32)], **STEPS)


def test_cli_inpaint_with_ip_adapter(sd, tmp_path, capsys):
    """`inpaint --ip-adapter FILE --ip-image IMG --ip-scale S` gives the pipeline's image (PNG: within one
    8-bit level); wrong combinations fail in one line naming the options."""
    sd.image.save(tmp_path / "image.png")
    sd.mask.save(tmp_path / "mask.png")
    reference_image(1).save(tmp_path / "ref.png")
    common = ["inpaint", "--model", sd.folder, "--image", tmp_path / "image.png", "--mask", tmp_path / "mask.png",
              "--prompt", "a red cat", "--steps", "3", "--out", tmp_path / "out", "--no-progress"]
    ip = ["--ip-adapter", sd.root / "ip-adapter-plain.safetensors", "--ip-image", tmp_path / "ref.png"]
    cli.main([str(a) for a in common + ip + ["--ip-scale", str(SCALE)]])
    capsys.readouterr()
    written = np.asarray(Image.open(tmp_path / "out" / "prompt0_seed0.png"), np.float32) / 255
    _, params = sd.variants["plain"]
    ours = sd.pipe.inpaint("a red cat", sd.image, sd.mask, params, seed_keys([0]), num_inference_steps=3,
                           height=32, width=32, ip_adapter_image=reference_image(1), output_type="np").images[0]
    np.testing.assert_allclose(written, ours, atol=1 / 255 + 1e-6, rtol=0)
    for argv, message in ((ip[:2], "--ip-adapter FILE and --ip-image IMG go together"),
                          (["--ip-adapter", tmp_path, "--ip-image", tmp_path / "ref.png"], "is not a file")):
        with pytest.raises(SystemExit):
            cli.main([str(a) for a in common + argv])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
