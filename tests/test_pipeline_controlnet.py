"""ControlNet pipelines against diffusers' StableDiffusionControlNetInpaintPipeline,
StableDiffusionControlNetPipeline and StableDiffusionControlNetImg2ImgPipeline.

Tiny random PyTorch components (tiny_sd) and ControlNets are saved with `save_pretrained` (diffusers'
single- and multi-ControlNet pipeline folders, and the nets alone) and loaded through our
`from_pretrained`; both sides run on the same prompts, images, control images and initial noise (drawn
from a torch generator as diffusers draws it). Images agree within 1e-3 max abs (fp32, values in
[0, 1]); multi-device runs equal single-device ones within 1e-5. PNDM with 4 steps runs 5 iterations,
so the guidance windows fall between steps and, with strength 0.6, count only the 3 that run.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)
from flax.training.common_utils import shard
from jax.sharding import Mesh

import tiny_sd
from flax_inpaint import (
    FlaxControlNetModel,
    FlaxDiffusionPipeline,
    FlaxStableDiffusionControlNetImg2ImgPipeline,
    FlaxStableDiffusionControlNetInpaintPipeline,
    FlaxStableDiffusionControlNetPipeline,
    make_inpaint_condition,
)

ATOL = 1e-3
DEVICE_ATOL = 1e-5
STEPS = 4
LATENT = (1, 4, 8, 8)  # 32x32 pixels, VAE factor 4
N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8


def torch_components(pipe) -> dict:
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def docs_inpaint_condition(image, mask) -> torch.Tensor:
    """The recipe of diffusers' docs for inpaint ControlNets: RGB / 255 with the pixels whose L mask / 255
    exceeds 0.5 set to -1, as an NCHW tensor."""
    rgb = np.asarray(image.convert("RGB"), np.float32) / 255
    rgb[np.asarray(mask.convert("L"), np.float32) / 255 > 0.5] = -1.0
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]))


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """Inpainting: a 9-channel UNet with one ControlNet (diffusers folder: ControlNetModel), a 4-channel
    UNet with two (MultiControlNetModel). Text-to-image (4-channel UNet): the first net given as a
    FlaxControlNetModel, and both nets from a saved MultiControlNetModel pipeline."""
    root = tmp_path_factory.mktemp("cn")
    sd9, base9 = tiny_sd.make_pipeline(root, in_channels=9)
    sd4, base4 = tiny_sd.make_pipeline(root, in_channels=4)
    nets = [tiny_sd.make_controlnet(seed) for seed in (1, 2)]
    for k, net in enumerate(nets):
        net.save_pretrained(root / f"net{k}", safe_serialization=True)
    torch9 = StableDiffusionControlNetInpaintPipeline(**torch_components(base9), controlnet=nets[0])
    torch4 = StableDiffusionControlNetInpaintPipeline(**torch_components(base4), controlnet=nets)
    torch_t2i = {k: StableDiffusionControlNetPipeline(**torch_components(base4), controlnet=nets[0] if k == 1 else nets)
                 for k in (1, 2)}
    torch9.save_pretrained(root / "cn9", safe_serialization=True)
    torch4.save_pretrained(root / "cn4", safe_serialization=True)
    torch_t2i[2].save_pretrained(root / "t2i2", safe_serialization=True)
    p9, params9 = FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(root / "cn9")
    p4, params4 = FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(root / "cn4")
    net, net_params = FlaxControlNetModel.from_pretrained(root / "net0")
    t2i, t2i_params = FlaxStableDiffusionControlNetPipeline.from_pretrained(sd4, controlnet=net)
    t2i_params["controlnet"] = net_params
    image, mask = tiny_sd.sample_image_and_mask()
    edges, _ = tiny_sd.sample_image_and_mask(seed=1)  # any RGB image serves as a control image
    return SimpleNamespace(
        root=root, sd4=sd4, nets=nets, image=image, mask=mask, edges=edges,
        torch={9: torch9, 4: torch4}, ours={9: (p9, params9), 4: (p4, params4)},
        torch_t2i=torch_t2i,
        t2i={1: (t2i, t2i_params), 2: FlaxStableDiffusionControlNetPipeline.from_pretrained(root / "t2i2")},
    )


def diffusers_noise(in_channels: int, strength: float) -> torch.Tensor:
    """The initial noise diffusers draws from `Generator().manual_seed(0)`: the image's posterior sample
    comes first when the image is encoded (strength < 1 or a 4-channel UNet)."""
    g = torch.Generator().manual_seed(0)
    if strength < 1.0 or in_channels == 4:
        torch.randn(LATENT, generator=g)
    return torch.randn(LATENT, generator=g)


def inpaint_control(cn, in_channels: int):
    """(ours, diffusers') control images: the inpaint condition for the one net of the 9-channel pipeline;
    an RGB image and the inpaint condition for the two nets of the 4-channel one."""
    ours, ref = make_inpaint_condition(cn.image, cn.mask), docs_inpaint_condition(cn.image, cn.mask)
    return (ours, ref) if in_channels == 9 else ([cn.edges, ours], [cn.edges, ref])


def t2i_control(cn, nets: int):
    """The control images (PIL) of the text-to-image pipeline with `nets` ControlNets."""
    return cn.edges if nets == 1 else [cn.edges, cn.image]


def ours_inpaint(cn, in_channels: int, key=0, **kwargs):
    pipe, params = cn.ours[in_channels]
    control, _ = inpaint_control(cn, in_channels)
    ids, masked, mask, image, control = pipe.prepare_inputs("a red cat", cn.image, cn.mask, control)
    return pipe(ids, mask, masked, params, jax.random.key(key), num_inference_steps=STEPS, control_image=control,
                image=image, **kwargs).images


# ---------------------------------------------------------------------------------------- parity

def test_inpaint_condition_matches_docs_recipe(cn):
    cond = make_inpaint_condition(cn.image, cn.mask)
    assert cond.shape == (1, 3, 32, 32) and cond.dtype == np.float32
    np.testing.assert_array_equal(cond, docs_inpaint_condition(cn.image, cn.mask).numpy())
    assert (cond == -1).any() and (cond >= 0).any()


@pytest.mark.parametrize(
    "in_channels,kwargs",
    [
        (9, dict()),  # defaults: conditioning scale 0.5, the whole schedule
        (9, dict(strength=0.6, controlnet_conditioning_scale=0.8, control_guidance_start=0.25)),
        (9, dict(guess_mode=True, controlnet_conditioning_scale=1.0)),
        (4, dict(controlnet_conditioning_scale=[0.3, 0.9], control_guidance_start=[0.0, 0.25],
                 control_guidance_end=[0.5, 1.0])),
        (4, dict(strength=0.6, controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[0.5, 1.0])),
    ],
    ids=["9ch", "9ch-strength-window", "9ch-guess-mode", "4ch-multi-windows", "4ch-multi-strength"],
)
def test_inpaint_matches_diffusers(cn, in_channels, kwargs):
    _, ref_control = inpaint_control(cn, in_channels)
    with torch.no_grad():
        ref = cn.torch[in_channels](
            "a red cat", image=cn.image, mask_image=cn.mask, control_image=ref_control, height=32, width=32,
            num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs,
        ).images
    noise = diffusers_noise(in_channels, kwargs.get("strength", 1.0)).numpy()
    ours = ours_inpaint(cn, in_channels, latents=noise, **kwargs)
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert ref.std() > 0.02  # a real image, not a constant
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


# Two ControlNets with their own scales and guidance windows (the second net stops before the end).
MULTI_T2I = dict(controlnet_conditioning_scale=[0.4, 1.2], control_guidance_start=[0.25, 0.0],
                 control_guidance_end=[1.0, 0.75])


@pytest.mark.parametrize("nets,kwargs", [
    (1, dict()),
    (1, dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.5, num_images_per_prompt=2)),
    (2, MULTI_T2I),
    (2, dict(guess_mode=True, controlnet_conditioning_scale=[1.0, 0.6], control_guidance_start=0.3)),
], ids=["1-net", "1-net-window-2-images", "2-nets-scales-windows", "2-nets-guess-mode-start"])
def test_text2img_matches_diffusers(cn, nets, kwargs):
    """diffusers' Flax API: prepare_text_inputs / prepare_image_inputs, the size of the control image;
    two nets come from a saved MultiControlNetModel pipeline."""
    n = kwargs.get("num_images_per_prompt", 1)
    latents = torch.randn((n, *LATENT[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cn.torch_t2i[nets]("a red cat", image=t2i_control(cn, nets), num_inference_steps=STEPS,
                                 latents=latents, output_type="np", **kwargs).images
    pipe, params = cn.t2i[nets]
    ids, image = pipe.prepare_text_inputs("a red cat"), pipe.prepare_image_inputs(t2i_control(cn, nets))
    ours = pipe(ids, image, params, jax.random.key(0), STEPS, latents=latents.numpy(), **kwargs).images
    assert ours.shape == ref.shape == (n, 32, 32, 3)
    assert ref.std() > 0.02
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_inpaint_convenience_with_padding_mask_crop_matches_diffusers(cn):
    """inpaint(): PIL images in; with padding_mask_crop the control image is cut to the mask's box like
    the image, and the result is pasted back (PIL, uint8: rounding may move a value by one level)."""
    kwargs = dict(num_inference_steps=STEPS, padding_mask_crop=2, output_type="pil")
    with torch.no_grad():
        ref = cn.torch[9]("a red cat", image=cn.image, mask_image=cn.mask, control_image=cn.edges,
                          generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe, params = cn.ours[9]
    ours = pipe.inpaint("a red cat", cn.image, cn.mask, cn.edges, params, jax.random.key(0),
                        latents=diffusers_noise(9, 1.0).numpy(), **kwargs).images
    ref, ours = np.asarray(ref[0], np.int32), np.asarray(ours[0], np.int32)
    assert ref.shape == ours.shape == (32, 32, 3)
    assert np.abs(ours - ref).max() <= 1


@pytest.fixture(scope="module")
def i2i(cn):
    """ControlNet img2img (4-channel UNet) with one and two nets: diffusers' pipelines over the torch
    components; ours from our text-to-image ControlNet pipelines (from_pipe) and, for two nets, loaded back
    from diffusers' saved folder through FlaxDiffusionPipeline's class lookup."""
    torch_pipes = {k: StableDiffusionControlNetImg2ImgPipeline(**torch_components(cn.torch_t2i[k]),
                                                               controlnet=cn.torch_t2i[k].controlnet) for k in (1, 2)}
    torch_pipes[2].save_pretrained(cn.root / "i2i2", safe_serialization=True)
    loaded, loaded_params = FlaxDiffusionPipeline.from_pretrained(cn.root / "i2i2")
    assert type(loaded) is FlaxStableDiffusionControlNetImg2ImgPipeline
    one, one_params = cn.t2i[1]
    return SimpleNamespace(torch=torch_pipes, ours={1: (FlaxStableDiffusionControlNetImg2ImgPipeline.from_pipe(one),
                                                        one_params), 2: (loaded, loaded_params)})


def ours_img2img(cn, i2i, nets: int, key=0, control=None, **kwargs):
    pipe, params = i2i.ours[nets]
    ids, image, control = pipe.prepare_inputs("a red cat", cn.image, control or t2i_control(cn, nets))
    return pipe(ids, image, params, jax.random.key(key), num_inference_steps=STEPS, control_image=control,
                **kwargs).images


@pytest.mark.parametrize("nets,kwargs", [
    (1, dict()),  # diffusers' defaults: strength 0.8, conditioning scale 0.8
    (1, dict(strength=1.0, controlnet_conditioning_scale=0.5, control_guidance_end=0.5)),  # the image noised too
    (2, dict(strength=0.6, **MULTI_T2I)),
    (1, dict(guess_mode=True, controlnet_conditioning_scale=1.0, control_guidance_start=0.3)),
], ids=["1-net", "1-net-strength-1-window", "2-nets-scales-windows", "guess-mode"])
def test_img2img_matches_diffusers(cn, i2i, nets, kwargs):
    """The noise is shared (diffusers draws the image's posterior sample first, then the noise); with strength
    0.6 the guidance windows count only the 3 iterations that run."""
    with torch.no_grad():
        ref = i2i.torch[nets]("a red cat", image=cn.image, control_image=t2i_control(cn, nets),
                              num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                              **kwargs).images
    ours = ours_img2img(cn, i2i, nets, noise=diffusers_noise(4, 0.5).numpy(), **kwargs)
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert ref.std() > 0.02
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_img2img_convenience_equals_call(cn, i2i):
    pipe, params = i2i.ours[1]
    noise = diffusers_noise(4, 0.5).numpy()
    out = pipe.img2img("a red cat", cn.image, cn.edges, params, jax.random.key(0), num_inference_steps=STEPS,
                       noise=noise, output_type="np").images
    np.testing.assert_array_equal(out, ours_img2img(cn, i2i, 1, noise=noise))


def test_img2img_new_strength_scales_and_images_do_not_recompile(cn, i2i):
    """After one call, new strengths, scales, windows, images and control images reuse the program, and
    each changes the image."""
    noise = diffusers_noise(4, 0.5).numpy()
    pipe, params = i2i.ours[1]
    ids, image, control = pipe.prepare_inputs("a red cat", cn.image, cn.edges)

    def call(**kwargs):
        args = {**dict(image=image, control_image=control, noise=noise, num_inference_steps=STEPS), **kwargs}
        return pipe(ids, args.pop("image"), params, jax.random.key(0), **args).images

    base = call()
    with tiny_sd.count_compiles() as compiles:
        others = [call(**kw) for kw in (
            dict(strength=0.5), dict(strength=1.0), dict(controlnet_conditioning_scale=0.0),
            dict(control_guidance_start=0.5), dict(image=-image), dict(control_image=1.0 - control))]
    assert compiles == []
    for other in others:
        assert np.abs(other - base).max() > 1e-2


# ------------------------------------------------------------------------ behaviour without a reference

def test_inpaint_convenience_equals_call(cn):
    """inpaint() takes make_inpaint_condition's output as the control image, like prepare_inputs."""
    pipe, params = cn.ours[9]
    noise = diffusers_noise(9, 1.0).numpy()
    out = pipe.inpaint("a red cat", cn.image, cn.mask, make_inpaint_condition(cn.image, cn.mask), params,
                       jax.random.key(0), num_inference_steps=STEPS, latents=noise, output_type="np").images
    np.testing.assert_array_equal(out, ours_inpaint(cn, 9, latents=noise))


def test_scales_windows_and_strength_do_not_recompile(cn):
    """Scales, guidance windows and strength are traced: after one call, none compiles; each changes
    the image (a zero scale too, so the ControlNet's residuals matter)."""
    noise = diffusers_noise(9, 1.0).numpy()
    base = ours_inpaint(cn, 9, latents=noise)
    with tiny_sd.count_compiles() as compiles:
        others = [ours_inpaint(cn, 9, latents=noise, **kw) for kw in (
            dict(controlnet_conditioning_scale=0.0), dict(control_guidance_start=0.5),
            dict(control_guidance_end=0.3), dict(strength=0.8, controlnet_conditioning_scale=[1.5]))]
    assert compiles == []
    for other in others:
        assert np.abs(other - base).max() > 1e-2


def test_host_callback_sees_every_step(cn):
    """The per-step keywords reach the ControlNet pipelines too: `callback` sees each of PNDM's 5 loop
    iterations once, the last with the latents the call returns (output_type="latent")."""
    noise, got = diffusers_noise(9, 1.0).numpy(), []
    out = ours_inpaint(cn, 9, latents=noise, output_type="latent", callback=lambda s, t, x: got.append((s, x.copy())))
    assert [s for s, _ in got] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(got[-1][1], out)


def random_examples(seed: int, nets: int) -> dict:
    """N_DEV examples' own control images (one array per ControlNet for several), latents and guidance."""
    rng = np.random.default_rng(seed)
    control = [rng.uniform(0, 1, (N_DEV, 3, 32, 32)).astype(np.float32) for _ in range(nets)]
    return dict(control=control[0] if nets == 1 else control,
                latents=rng.standard_normal((N_DEV, *LATENT[1:])).astype(np.float32),
                guidance=np.linspace(2.0, 9.0, N_DEV).astype(np.float32))


def with_single_device_rows(call, inputs: dict, params) -> SimpleNamespace:
    """`call` (inputs dict -> images) with its N_DEV examples and the single-device call on each alone,
    example d with key d."""
    singles = np.concatenate([call(jax.tree_util.tree_map(lambda v: v[d:d + 1], inputs), key=jax.random.key(d))
                              for d in range(N_DEV)])
    return SimpleNamespace(inputs=inputs, call=call, singles=singles, params=params)


PROMPTS = ["a red cat", "a cat"] * (N_DEV // 2)


@pytest.fixture(scope="module")
def per_example_inputs(cn):
    """The 9-channel inpaint pipeline (one ControlNet, a non-default scale and window) on eight prompts
    with their own control images, latents and guidance: `call(inputs, key=..., **kwargs)`."""
    pipe, params = cn.ours[9]
    ids, masked, mask, image, _ = pipe.prepare_inputs(PROMPTS, cn.image, cn.mask, cn.edges)
    inputs = dict(ids=ids, mask=mask, masked=masked, image=image, **random_examples(0, nets=1))
    opts = dict(num_inference_steps=STEPS, controlnet_conditioning_scale=0.8, control_guidance_start=0.25)

    def call(x, **kwargs):
        return pipe(x["ids"], x["mask"], x["masked"], kwargs.pop("params", params), kwargs.pop("key"),
                    control_image=x["control"], image=x["image"], latents=x["latents"],
                    guidance_scale=x["guidance"], **{**opts, **kwargs}).images

    return SimpleNamespace(inputs=inputs, call=call, params=params)


@pytest.fixture(scope="module")
def per_example(per_example_inputs):
    """per_example_inputs with each example's single-device images (a fixture of its own: the
    no-recompile test needs only the inputs)."""
    ex = per_example_inputs
    return with_single_device_rows(ex.call, ex.inputs, ex.params)


@pytest.fixture(scope="module")
def per_example_t2i(cn):
    """The text-to-image pipeline with two ControlNets (MULTI_T2I's scales and windows) on eight prompts,
    each with its own pair of control images, latents and guidance."""
    pipe, params = cn.t2i[2]
    inputs = dict(ids=pipe.prepare_text_inputs(PROMPTS), **random_examples(1, nets=2))

    def call(x, **kwargs):
        return pipe(x["ids"], x["control"], kwargs.pop("params", params), kwargs.pop("key"), STEPS,
                    x["guidance"], x["latents"], **MULTI_T2I, **kwargs).images

    return with_single_device_rows(call, inputs, params)


@pytest.mark.parametrize("examples", ["per_example", "per_example_t2i"], ids=["inpaint-1-net", "t2i-2-nets"])
def test_pmap_over_8_devices_matches_single_device(request, examples):
    ex = request.getfixturevalue(examples)
    out = ex.call(shard(ex.inputs), params=tiny_sd.replicated(ex.params), jit=True,
                  key=jax.random.split(jax.random.key(0), N_DEV))
    assert out.shape == (N_DEV, 1, 32, 32, 3)
    np.testing.assert_allclose(out.reshape(ex.singles.shape), ex.singles, atol=DEVICE_ATOL, rtol=0)
    assert np.abs(ex.singles[0] - ex.singles[2]).max() > 1e-2  # other control images, guidance


@pytest.mark.parametrize("examples", ["per_example", "per_example_t2i"], ids=["inpaint-1-net", "t2i-2-nets"])
def test_mesh_over_8_devices_matches_single_device(request, examples):
    """The latents are given, so the key plays no part: the global-batch call equals the per-prompt calls."""
    ex = request.getfixturevalue(examples)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = ex.call(ex.inputs, mesh=mesh, key=jax.random.key(0))
    np.testing.assert_allclose(out, ex.singles, atol=DEVICE_ATOL, rtol=0)


def test_scales_and_inputs_do_not_recompile_on_pmap_and_mesh(cn, per_example_inputs):
    """On the pmap convention and on a mesh too, new ControlNet scales and windows, strength, prompts,
    seeds, masks and guidance reuse the compiled program (the latents given, as in the tests above, whose
    programs these are)."""
    ex, (pipe, _) = per_example_inputs, cn.ours[9]
    x, copies, mesh = ex.inputs, tiny_sd.replicated(ex.params), Mesh(np.array(jax.devices()), ("data",))

    def both(seed, x, **kwargs):
        pmapped = ex.call(shard(x), params=copies, key=jax.random.split(jax.random.key(seed), N_DEV), jit=True,
                          **kwargs)
        meshed = ex.call(x, key=jax.random.key(seed), mesh=mesh, **kwargs)
        return pmapped, meshed

    first = both(0, x)
    other = dict(x, ids=pipe.tokenize(PROMPTS[::-1]), mask=x["mask"][:, :, ::-1].copy(), guidance=x["guidance"][::-1])
    with tiny_sd.count_compiles() as compiles:
        second = both(1, other, controlnet_conditioning_scale=0.3, control_guidance_start=0.5, strength=0.8)
        both(2, x, controlnet_conditioning_scale=1.5, control_guidance_end=0.4)
    assert compiles == []
    for a, b in zip(first, second):
        assert np.abs(a - b).max() > 1e-2  # the new inputs took effect


def test_per_prompt_keys_match_single_prompt_calls(per_example):
    """One key per prompt samples each prompt as if alone: its control image goes with it."""
    x = jax.tree_util.tree_map(lambda v: v[:3], per_example.inputs)
    out = per_example.call(x, key=jax.random.split(jax.random.key(0), 3))
    np.testing.assert_allclose(out, per_example.singles[:3], atol=DEVICE_ATOL, rtol=0)


# ------------------------------------------------------------------------------ loading and saving

def test_save_and_load_round_trip(cn, tmp_path):
    """Our multi-ControlNet pipeline saves diffusers' MultiControlNetModel layout, which diffusers loads
    with the original weights; ControlNet folders given to from_pretrained load the same params; the
    feature extractor's config survives."""
    pipe, params = cn.ours[4]
    extractor = {"crop_size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5]}
    FlaxStableDiffusionControlNetInpaintPipeline.from_pipe(pipe, feature_extractor=extractor).save_pretrained(
        tmp_path / "saved", params)
    reloaded = StableDiffusionControlNetInpaintPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    for theirs, original in zip(reloaded.controlnet.nets, cn.nets, strict=True):
        for (name, a), b in zip(theirs.state_dict().items(), original.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ours, ours_params = FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(tmp_path / "saved")
    assert ours.controlnet == pipe.controlnet and ours.feature_extractor == extractor
    by_folder, folder_params = FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(
        cn.root / "cn4", controlnet=[cn.root / "net0", cn.root / "net1"])
    assert by_folder.controlnet == pipe.controlnet
    for loaded in (ours_params, folder_params):
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["controlnet"], params["controlnet"])


# ---------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def multi_inputs(cn):
    pipe, params = cn.ours[4]
    control, _ = inpaint_control(cn, 4)
    ids, masked, mask, image, control = pipe.prepare_inputs("a red cat", cn.image, cn.mask, control)
    return SimpleNamespace(pipe=pipe, params=params, ids=ids, masked=masked, mask=mask, image=image,
                           control=control)


def call_multi(x, **kwargs):
    args = dict(control_image=x.control, image=x.image, num_inference_steps=STEPS)
    return x.pipe(x.ids, x.mask, x.masked, kwargs.pop("params", x.params), jax.random.key(0), **{**args, **kwargs})


def test_error_control_image_size(multi_inputs):
    small = [c[:, :, :24, :24] for c in multi_inputs.control]
    with pytest.raises(ValueError, match=r"control_image\[0\] has shape \(1, 3, 24, 24\); expected \(1, 3, 32, 32\)"):
        call_multi(multi_inputs, control_image=small)


def test_error_list_lengths(multi_inputs, cn):
    with pytest.raises(ValueError, match=r"control_image has 1 entries for 2 ControlNets"):
        call_multi(multi_inputs, control_image=multi_inputs.control[:1])
    with pytest.raises(ValueError, match=r"must be a list with one control image .* for the 2 ControlNets"):
        call_multi(multi_inputs, control_image=multi_inputs.control[0])
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale has 3 entries for 2 ControlNets"):
        call_multi(multi_inputs, controlnet_conditioning_scale=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"control_guidance_end has 1 entries for 2 ControlNets"):
        call_multi(multi_inputs, control_guidance_end=[0.5])
    with pytest.raises(ValueError, match=r"params\['controlnet'\] must be a tuple with the params of each of the 2"):
        call_multi(multi_inputs, params={**multi_inputs.params, "controlnet": multi_inputs.params["controlnet"][0]})
    with pytest.raises(ValueError, match=r"params has no 'controlnet' entry"):
        call_multi(multi_inputs, params={k: v for k, v in multi_inputs.params.items() if k != "controlnet"})
    with pytest.raises(ValueError, match=r"controlnet mixes folders and FlaxControlNetModel objects"):
        FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(
            cn.sd4, controlnet=[cn.root / "net0", multi_inputs.pipe.controlnets[1]])


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), ([0.0, 1.0], 1.0)])
def test_error_guidance_window(multi_inputs, start, end):
    with pytest.raises(ValueError, match=r"control_guidance_start=.* and control_guidance_end=.*: need 0 <= start "
                                         r"< end <= 1"):
        call_multi(multi_inputs, control_guidance_start=start, control_guidance_end=end)


def test_error_bad_controlnets(cn):
    p, _ = cn.t2i[1]
    args = (p.vae, p.text_encoder, p.tokenizer, p.unet)
    with pytest.raises(ValueError, match=r"ControlNet 0 has in_channels=9; it is fed the VAE's 4 latent channels"):
        FlaxStableDiffusionControlNetPipeline(*args, p.controlnet.clone(in_channels=9), p.scheduler)
    with pytest.raises(ValueError, match=r"ControlNet 1 takes control images 8x its latent size, but the VAE "
                                         r"downsamples by 4"):
        FlaxStableDiffusionControlNetPipeline(
            *args, [p.controlnet, p.controlnet.clone(conditioning_embedding_out_channels=(4, 8, 8, 16))], p.scheduler)
    with pytest.raises(TypeError, match=r"controlnet must be a FlaxControlNetModel or a non-empty list"):
        FlaxStableDiffusionControlNetPipeline(*args, [], p.scheduler)
    with pytest.raises(ValueError, match=r"has no controlnet in its model_index.json; pass controlnet="):
        FlaxStableDiffusionControlNetPipeline.from_pretrained(cn.sd4)
