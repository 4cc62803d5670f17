"""End-to-end parity of the SDXL ControlNet pipelines with diffusers' StableDiffusionXLControlNetPipeline,
StableDiffusionXLControlNetImg2ImgPipeline and StableDiffusionXLControlNetInpaintPipeline, on tiny random
SDXL-shaped models and SDXL ControlNets saved with save_pretrained (an SDXL base folder with ControlNet folders, a
one-net inpainting pipeline folder) and loaded through our from_pretrained. Same prompts, images, masks, control
images and noise (passed to both, or drawn from a torch generator in diffusers' order and shared as
tests/test_pipeline_sdxl.py does); images agree within 1e-3 max abs (fp32, values in [0, 1]: the same float32
math in another order through a few UNet and ControlNet steps). Multi-device runs equal single-device ones within
1e-5. Euler with 2 steps: the guidance windows below switch a net off for one of the two.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from flax.training.common_utils import shard
from jax.sharding import Mesh
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flax_inpaint import (
    FlaxAutoPipelineForImage2Image,
    FlaxAutoPipelineForInpainting,
    FlaxDiffusionPipeline,
    FlaxStableDiffusionXLControlNetImg2ImgPipeline,
    FlaxStableDiffusionXLControlNetInpaintPipeline,
    FlaxStableDiffusionXLControlNetPipeline,
    make_inpaint_condition,
)
from test_pipeline_sdxl import SIZE, check, noise
from test_sdxl_conditioning import WIDTHS, _text_config
from test_sdxl_models import CONTROLNETS, POOLED, SDXL, perturb_norms
from tiny_sd import MAX_LENGTH, SD_SCHEDULE, count_compiles, make_tokenizer, replicated, sample_image_and_mask

DEVICE_ATOL = 1e-5
STEPS = 2
N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8
CONTEXT = sum(WIDTHS)
# SDXL's UNet and ControlNet layout (resnet-only first level, linear projections, per-level heads, text_time
# size conditioning) on two levels of one layer each, to keep the compiled programs small; the models' deeper
# layouts have their parity in tests/test_sdxl_models.py.
SMALL = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             attention_head_dim=(2, 4), layers_per_block=1, transformer_layers_per_block=1, cross_attention_dim=CONTEXT)
UNET = dict(SDXL, **SMALL, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def controlnet(seed: int) -> ControlNetModel:
    """A tiny SDXL ControlNet (controlnet-*-sdxl-1.0 layout) whose zero convolutions get torch's default init,
    so its residuals matter."""
    torch.manual_seed(seed)
    net = ControlNetModel(**dict(CONTROLNETS["sdxl"], **SMALL)).eval()
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            m.reset_parameters()
    return perturb_norms(net, seed)


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """Torch pipelines: text-to-image with one and two ControlNets, inpainting with a 9-channel UNet and one
    net and with the 4-channel UNet and two, image-to-image with one. Ours: text-to-image from an SDXL base
    folder and two ControlNet folders, inpainting from diffusers' 9-channel SDXL ControlNet inpainting folder
    (the class its model_index.json names); the others over their components with from_pipe."""
    tmp = tmp_path_factory.mktemp("sdxl_cn")
    torch.manual_seed(0)
    tokenizer = make_tokenizer(tmp / "_tok")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "_tok", pad_token="!", model_max_length=MAX_LENGTH)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        scaling_factor=0.13025, force_upcast=True).eval()
    with torch.no_grad():  # a near-deterministic posterior: logvar = -30, as tests/test_pipeline_sdxl.py
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    common = dict(
        vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(**SD_SCHEDULE),
        text_encoder=CLIPTextModel(_text_config(tokenizer, WIDTHS[0], hidden_act="quick_gelu")).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, WIDTHS[1], hidden_act="gelu",
                                                                projection_dim=POOLED)).eval())
    unet4 = UNet2DConditionModel(**UNET).eval()
    unet9 = UNet2DConditionModel(**UNET, in_channels=9).eval()
    nets = [controlnet(1), controlnet(2)]
    torch_pipes = {
        "t2i1": StableDiffusionXLControlNetPipeline(**common, unet=unet4, controlnet=nets[0]),
        "t2i2": StableDiffusionXLControlNetPipeline(**common, unet=unet4, controlnet=nets),
        "9ch": StableDiffusionXLControlNetInpaintPipeline(**common, unet=unet9, controlnet=nets[0]),
        "4ch": StableDiffusionXLControlNetInpaintPipeline(**common, unet=unet4, controlnet=nets),
        "img2img": StableDiffusionXLControlNetImg2ImgPipeline(**common, unet=unet4, controlnet=nets[0]),
    }
    for pipe in torch_pipes.values():
        pipe.set_progress_bar_config(disable=True)
    StableDiffusionXLPipeline(**common, unet=unet4).save_pretrained(tmp / "base", safe_serialization=True)
    for k, net in enumerate(nets):
        net.save_pretrained(tmp / f"net{k}", safe_serialization=True)
    torch_pipes["9ch"].save_pretrained(tmp / "9ch", safe_serialization=True)
    t2i2, params2 = FlaxStableDiffusionXLControlNetPipeline.from_pretrained(
        tmp / "base", controlnet=[tmp / "net0", tmp / "net1"])
    params1 = {**params2, "controlnet": params2["controlnet"][0]}
    ours = {
        "t2i2": (t2i2, params2),
        "t2i1": (FlaxStableDiffusionXLControlNetPipeline.from_pipe(t2i2, controlnet=t2i2.controlnets[0]), params1),
        "img2img": (FlaxStableDiffusionXLControlNetImg2ImgPipeline.from_pipe(t2i2, controlnet=t2i2.controlnets[0]),
                    params1),
        "9ch": FlaxDiffusionPipeline.from_pretrained(tmp / "9ch"),
        "4ch": (FlaxStableDiffusionXLControlNetInpaintPipeline.from_pipe(t2i2), params2),
    }
    image, mask = sample_image_and_mask(SIZE)
    edges, _ = sample_image_and_mask(SIZE, seed=1)  # any RGB image serves as a control image
    return SimpleNamespace(torch=torch_pipes, ours=ours, nets=nets, image=image, mask=mask, edges=edges)


def test_loads_and_saves_diffusers_folders(cn, tmp_path):
    """The 9-channel folder loads as the class its model_index.json names, the auto pipelines move between the
    SDXL ControlNet tasks; ours saves diffusers' multi-ControlNet layout, which diffusers loads with the original
    weights."""
    inpaint, _ = cn.ours["9ch"]
    assert type(inpaint) is FlaxStableDiffusionXLControlNetInpaintPipeline and inpaint.unet.in_channels == 9
    assert inpaint.force_zeros_for_empty_prompt and not inpaint.requires_aesthetics_score
    pipe, params = cn.ours["t2i2"]
    assert type(FlaxAutoPipelineForInpainting.from_pipe(pipe)) is FlaxStableDiffusionXLControlNetInpaintPipeline
    assert type(FlaxAutoPipelineForImage2Image.from_pipe(inpaint)) is FlaxStableDiffusionXLControlNetImg2ImgPipeline
    pipe.save_pretrained(tmp_path, params)
    reloaded = StableDiffusionXLControlNetPipeline.from_pretrained(tmp_path)
    for theirs, original in zip(reloaded.controlnet.nets, cn.nets, strict=True):
        for (name, a), b in zip(theirs.state_dict().items(), original.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# One net in guess mode, off for the last step; two with their own scales and guidance windows (the first off
# at the first step, the second at the last); size conditioning unlike the output size, prompt_2 /
# negative_prompt_2.
T2I_CASES = {
    "1-net-guess-mode-window": (1, dict(guess_mode=True, controlnet_conditioning_scale=0.7, control_guidance_end=0.5,
                                        negative_prompt="red", original_size=(48, 40), crops_coords_top_left=(4, 2))),
    "2-nets-windows": (2, dict(controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.5, 0.0],
                               control_guidance_end=[1.0, 0.5], prompt_2="cat cat", negative_prompt="red",
                               negative_prompt_2="blurry", guidance_scale=6.0, target_size=(24, 40))),
}


def t2i_control(cn, nets: int):
    return cn.edges if nets == 1 else [cn.edges, cn.image]


@pytest.mark.parametrize("case", list(T2I_CASES))
def test_text2img_matches_diffusers(cn, case):
    nets, kw = T2I_CASES[case]
    latents = noise(1, seed=3)
    with torch.no_grad():
        ref = cn.torch[f"t2i{nets}"]("a red cat", image=t2i_control(cn, nets), num_inference_steps=STEPS,
                                     latents=latents, output_type="np", **kw).images
    pipe, params = cn.ours[f"t2i{nets}"]
    out = pipe.text2img("a red cat", t2i_control(cn, nets), params, jax.random.key(0), num_inference_steps=STEPS,
                        latents=latents.numpy(), output_type="np", **kw).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_flax_api_matches_convenience(cn):
    """diffusers' Flax calling convention (prepare_inputs / prepare_image_inputs, positional arguments) gives the
    convenience call's images."""
    pipe, params = cn.ours["t2i2"]
    latents = noise(1, seed=3).numpy()
    kw = dict(controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.5, 0.0], target_size=(24, 40))
    ids, control = pipe.prepare_inputs("a red cat"), pipe.prepare_image_inputs(t2i_control(cn, 2))
    assert ids.shape == (1, 2, MAX_LENGTH) and [c.shape for c in control] == [(1, 3, SIZE, SIZE)] * 2
    out = pipe(ids, control, params, jax.random.key(0), STEPS, 6.0, latents, pipe.prepare_inputs("red"), **kw).images
    same = pipe.text2img("a red cat", t2i_control(cn, 2), params, jax.random.key(0), num_inference_steps=STEPS,
                         guidance_scale=6.0, latents=latents, negative_prompt="red", output_type="np", **kw).images
    np.testing.assert_array_equal(out, same)
    unguided = pipe(ids, control, params, jax.random.key(0), STEPS, 6.0, latents, pipe.prepare_inputs("red"),
                    **dict(kw, controlnet_conditioning_scale=[0.0, 0.0])).images
    assert np.abs(unguided - out).max() > 1e-2  # the ControlNets' residuals matter


INPAINT_CASES = {  # pipeline, keywords
    "9ch": ("9ch", dict()),  # defaults: strength 0.9999, conditioning scale 1, the whole schedule
    "9ch-strength-window": ("9ch", dict(strength=0.6, controlnet_conditioning_scale=0.8, control_guidance_start=0.5,
                                        negative_prompt="blurry", original_size=(48, 40), target_size=(24, 40))),
    "4ch-2-nets-strength": ("4ch", dict(strength=0.6, controlnet_conditioning_scale=[1.2, 0.5],
                                        control_guidance_end=[0.5, 1.0], prompt_2="cat cat", negative_prompt="red",
                                        crops_coords_top_left=(4, 2))),
}


def inpaint_control(cn, kind: str):
    """One net (9-channel): the inpaint condition; two (4-channel): an RGB image and the inpaint condition."""
    condition = make_inpaint_condition(cn.image, cn.mask)
    return condition if kind == "9ch" else [cn.edges, condition]


@pytest.mark.parametrize("case", list(INPAINT_CASES))
def test_inpaint_matches_diffusers(cn, case):
    kind, kw = INPAINT_CASES[case]
    control = inpaint_control(cn, kind)
    ref_control = [torch.from_numpy(c) if isinstance(c, np.ndarray) else c for c in
                   (control if isinstance(control, list) else [control])]
    with torch.no_grad():
        ref = cn.torch[kind]("a red cat", image=cn.image, mask_image=cn.mask,
                             control_image=ref_control if kind == "4ch" else ref_control[0], height=SIZE, width=SIZE,
                             num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                             **kw).images
    pipe, params = cn.ours[kind]
    shared = noise(encoded=kw.get("strength", 0.9999) < 1 or kind == "4ch").numpy()
    out = pipe.inpaint("a red cat", cn.image, cn.mask, control, params, jax.random.key(0), num_inference_steps=STEPS,
                       latents=shared, output_type="np", **kw).images
    check(out, ref, (1, SIZE, SIZE, 3))


def test_img2img_matches_diffusers(cn):
    """Image-to-image at strength < 1 (the noise shared), a guidance window, negative sizes (the img2img rule:
    the positive crop)."""
    kw = dict(strength=0.6, controlnet_conditioning_scale=0.9, control_guidance_start=0.5, negative_prompt="red",
              original_size=(48, 40), negative_original_size=(24, 20), negative_crops_coords_top_left=(2, 6),
              negative_target_size=(28, 36), num_inference_steps=STEPS, output_type="np")
    with torch.no_grad():
        ref = cn.torch["img2img"]("a red cat", image=cn.image, control_image=cn.edges,
                                  generator=torch.Generator().manual_seed(0), **kw).images
    pipe, params = cn.ours["img2img"]
    out = pipe.img2img("a red cat", cn.image, cn.edges, params, jax.random.key(0), noise=noise(encoded=True).numpy(),
                       **kw).images
    check(out, ref, (1, SIZE, SIZE, 3))


# ------------------------------------------------------------------------------ devices, compiles

PROMPTS = ["a red cat", "a cat"] * (N_DEV // 2)


@pytest.fixture(scope="module")
def per_example(cn):
    """The 9-channel inpaint pipeline on eight prompts with their own control images, latents and guidance;
    `call(inputs, key=..., **kwargs)` and each example's one-device call with key d."""
    pipe, params = cn.ours["9ch"]
    ids, masked, mask, image, _ = pipe.prepare_inputs(PROMPTS, cn.image, cn.mask, cn.edges)
    rng = np.random.default_rng(0)
    inputs = dict(ids=ids, mask=mask, masked=masked, image=image,
                  control=rng.uniform(0, 1, (N_DEV, 3, SIZE, SIZE)).astype(np.float32),
                  latents=rng.standard_normal((N_DEV, 4, SIZE // 2, SIZE // 2)).astype(np.float32),
                  guidance=np.linspace(2.0, 9.0, N_DEV).astype(np.float32))

    def call(x, key, params=params, **kwargs):
        opts = dict(num_inference_steps=STEPS, controlnet_conditioning_scale=0.8, control_guidance_start=0.5,
                    original_size=(48, 40))
        return pipe(x["ids"], x["mask"], x["masked"], params, key, control_image=x["control"], image=x["image"],
                    latents=x["latents"], guidance_scale=x["guidance"], **{**opts, **kwargs}).images

    singles = {d: call(jax.tree_util.tree_map(lambda v: v[d:d + 1], inputs), jax.random.key(d)) for d in (0, 2)}
    return SimpleNamespace(inputs=inputs, call=call, singles=singles, params=params)


def test_pmap_and_mesh_give_one_devices_images(per_example):
    """jit=True (diffusers' pmap convention over 8 fake devices) gives each device the images of a one-device
    call on its rows with its key; a mesh call (latents given) those of the one-device calls."""
    ex = per_example
    pmapped = ex.call(shard(ex.inputs), jax.random.split(jax.random.key(0), N_DEV), params=replicated(ex.params),
                      jit=True)
    assert pmapped.shape == (N_DEV, 1, SIZE, SIZE, 3)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = ex.call(ex.inputs, jax.random.key(0), mesh=mesh)
    for d, single in ex.singles.items():
        np.testing.assert_allclose(pmapped[d], single, atol=DEVICE_ATOL, rtol=0)
        np.testing.assert_allclose(meshed[d:d + 1], single, atol=DEVICE_ATOL, rtol=0)
    assert np.abs(ex.singles[0] - ex.singles[2]).max() > 1e-2  # other prompts, control images, guidance


def test_new_values_do_not_recompile(cn, per_example):
    """New prompts, seeds, control images, conditioning scales, guidance windows, sizes and strength reuse the
    compiled programs: one device, the pmap convention and a mesh."""
    ex = per_example
    x = ex.inputs
    other = dict(x, ids=cn.ours["9ch"][0].tokenize(PROMPTS[::-1]), control=x["control"][::-1].copy(),
                 guidance=x["guidance"][::-1].copy())
    one = jax.tree_util.tree_map(lambda v: v[1:2], other)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    stacked = replicated(ex.params)
    first = ex.call(x, jax.random.key(0), mesh=mesh)
    ex.call(shard(x), jax.random.split(jax.random.key(0), N_DEV), params=stacked, jit=True)
    t2i, t2i_params = cn.ours["t2i2"]
    latents = noise(1, seed=3).numpy()  # as the parity test, whose program this reuses
    t2i_first = t2i.text2img("a red cat", [cn.edges, cn.image], t2i_params, jax.random.key(0),
                             num_inference_steps=STEPS, latents=latents, output_type="np")
    new = dict(controlnet_conditioning_scale=0.3, control_guidance_start=0.0, control_guidance_end=0.5, strength=0.7,
               original_size=(64, 24))
    with count_compiles() as compiles:
        changed = ex.call(other, jax.random.key(1), mesh=mesh, **new)
        ex.call(shard(other), jax.random.split(jax.random.key(1), N_DEV), params=stacked, jit=True, **new)
        ex.call(one, jax.random.key(3), **new)
        t2i_changed = t2i.text2img("cat", [cn.image, cn.edges], t2i_params, jax.random.key(1),
                                   num_inference_steps=STEPS, latents=-latents, output_type="np",
                                   controlnet_conditioning_scale=[0.2, 2.0], control_guidance_start=[0.5, 0.0],
                                   guidance_scale=3.0, crops_coords_top_left=(8, 8), negative_prompt="red")
    assert compiles == []
    assert np.abs(changed - first).max() > 1e-2 and np.abs(t2i_changed.images - t2i_first.images).max() > 1e-2


def test_errors_name_the_fix(cn):
    pipe, params = cn.ours["t2i2"]
    with pytest.raises(ValueError, match=r"control_image has 1 entries for 2 ControlNets"):
        pipe.text2img("cat", [cn.edges], params, jax.random.key(0), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"params\['controlnet'\] must be a tuple with the params of each of the 2"):
        pipe.text2img("cat", [cn.edges, cn.image], {**params, "controlnet": params["controlnet"][0]},
                      jax.random.key(0), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"ControlNet 0 has in_channels=9; it is fed the VAE's 4 latent channels"):
        FlaxStableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=pipe.controlnets[0].clone(in_channels=9))
