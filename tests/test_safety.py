"""FlaxStableDiffusionSafetyChecker against diffusers' StableDiffusionSafetyChecker, and the in-program
CLIP preprocessing against transformers' CLIPImageProcessor (PIL backend). Tiny random models, CPU.

Tolerances: vision embeddings 1e-4 (fp32); nsfw flags and output images exactly equal; preprocessed
pixel values exactly equal (we reproduce Pillow's integer resampling, see models/safety.py). In the
pipelines (text-to-image, inpaint under pmap and a mesh, ControlNet): the same flags, images within 1e-3.
"""
import json
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from flax.training.common_utils import shard
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil

import tiny_sd
from flax_inpaint import (
    FlaxStableDiffusionControlNetPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionPipeline,
)
from flax_inpaint.io import CheckpointError
from flax_inpaint.models.safety import (
    CLIPImagePreprocessing,
    FlaxStableDiffusionSafetyChecker,
    pil_resize,
)

EMBED_TOL = 1e-4
PROJ = 16
SIZE = 32  # the tiny vision tower's image_size (and the preprocessing's shortest edge / crop)
TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def tiny_torch_checker(seed=0):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, bos_token_id=0, eos_token_id=2, **TINY),
        vision_config=dict(image_size=SIZE, patch_size=8, hidden_act="quick_gelu", **TINY),
        projection_dim=PROJ,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # diffusers initialises the concept heads to ones
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
    return model


def tiny_feature_extractor():
    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def sample_images(n=4, height=40, width=48, seed=0):
    """NHWC floats in [0, 1], each with its own brightness so the CLIP embeddings differ."""
    rng = np.random.RandomState(seed)
    base = rng.rand(n, 1, 1, 3) * 0.6
    return np.clip(base + 0.4 * rng.rand(n, height, width, 3), 0, 1).astype(np.float32)


def reference_clip_input(images, feature_extractor):
    """What diffusers' run_safety_checker hands the checker: uint8 PIL images through the processor."""
    pil = VaeImageProcessor.numpy_to_pil(images)
    return feature_extractor(pil, return_tensors="pt").pixel_values


def torch_embeds(model, clip_input):
    with torch.no_grad():
        return model.visual_projection(model.vision_model(clip_input)[1])


def design_thresholds(model, clip_input, special_care=True):
    """Set the concept heads so that, in diffusers, the 4 images hit every branch:

    image 0: a concept score of +0.1 -> flagged.
    image 1: a concept score of +0.0003, which rounds to 0.0 -> not flagged.
    image 2: special care (score > 0), and a concept score of -0.005 + 0.01 -> flagged.
    image 3: the same -0.005 concept score without special care -> not flagged.
    Concept directions come from the pseudo-inverse of the normalised image embeddings, so each
    addresses exactly the images it is meant for. Unused concepts get unreachable thresholds.
    """
    embeds = torch_embeds(model, clip_input).numpy().astype(np.float64)
    unit = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    inv = np.linalg.pinv(unit)  # [PROJ, 4]: unit @ inv = identity
    with torch.no_grad():
        model.concept_embeds[0] = torch.tensor(inv[:, 0])
        model.concept_embeds[1] = torch.tensor(inv[:, 2] + inv[:, 3])
        model.concept_embeds[2] = torch.tensor(inv[:, 1])
        model.special_care_embeds[0] = torch.tensor(inv[:, 2])
        cos = cosine_distance(torch_embeds(model, clip_input), model.concept_embeds).numpy()
        special = cosine_distance(torch_embeds(model, clip_input), model.special_care_embeds).numpy()
        concept_w = cos.max(0) + 0.5
        concept_w[0] = cos[0, 0] - 0.1
        concept_w[1] = cos[2, 1] + 0.005
        concept_w[2] = cos[1, 2] - 0.0003
        special_w = special.max(0) + 0.5
        if special_care:
            special_w[0] = special[2, 0] / 2
        # The design needs clear margins: targeted cosines well above the 0.01 adjustment.
        assert min(cos[0, 0], cos[2, 1], cos[1, 2], special[2, 0]) > 0.05
        assert abs(cos[2, 1] - cos[3, 1]) < 1e-5
        model.concept_embeds_weights.copy_(torch.tensor(concept_w))
        model.special_care_embeds_weights.copy_(torch.tensor(special_w))


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    """A tiny diffusers checker with designed thresholds and its feature extractor, saved."""
    model = tiny_torch_checker()
    fe = tiny_feature_extractor()
    design_thresholds(model, reference_clip_input(sample_images(), fe))
    folder = tmp_path_factory.mktemp("safety_checker")
    model.save_pretrained(folder)  # model.safetensors + a transformers 5 CLIPConfig config.json
    fe.save_pretrained(folder)  # preprocessor_config.json
    return model, folder


def load_ours(folder, **kwargs):
    checker, params = FlaxStableDiffusionSafetyChecker.from_pretrained(folder, **kwargs)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    return checker.clone(preprocessing=CLIPImagePreprocessing.from_config(config)), params


# ----------------------------------------------------------------------------- model parity

def test_vision_embeddings_match(checker_folder):
    model, folder = checker_folder
    checker, params = load_ours(folder)
    clip_input = reference_clip_input(sample_images(), tiny_feature_extractor())
    ours = checker.apply({"params": params}, jnp.asarray(clip_input.numpy()), method=checker.image_embeds)
    np.testing.assert_allclose(ours, torch_embeds(model, clip_input).numpy(), atol=EMBED_TOL, rtol=0)


@pytest.mark.parametrize("special_care", [True, False])
def test_flags_and_images_match_diffusers(checker_folder, tmp_path, special_care):
    model, folder = checker_folder
    if not special_care:  # the same model, with the special-care concept out of reach
        model = tiny_torch_checker()
        design_thresholds(model, reference_clip_input(sample_images(), tiny_feature_extractor()), False)
        model.save_pretrained(tmp_path)
        tiny_feature_extractor().save_pretrained(tmp_path)
        folder = tmp_path
    images = sample_images()
    clip_input = reference_clip_input(images, tiny_feature_extractor())
    ref_images, ref_flags = model(clip_input=clip_input, images=images.copy())
    # The design reaches every branch in diffusers: flagged, rounded away, special care, unflagged.
    assert ref_flags == [True, False, special_care, False]

    checker, params = load_ours(folder)
    out, flags = jax.jit(lambda p, x: checker.apply({"params": p}, x, method=checker.check_images))(
        params, jnp.asarray(images)
    )
    assert flags.dtype == jnp.bool_ and flags.shape == (4,)
    assert flags.tolist() == ref_flags
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_images, np.float32))
    assert not np.asarray(out)[0].any() and (np.asarray(out)[1] == images[1]).all()


def test_transformers_v4_layout_loads(checker_folder, tmp_path):
    """Hub checkpoints (transformers 4) use `vision_model.vision_model.*` keys and keep the
    position_ids buffer, in a pytorch_model.bin."""
    model, folder = checker_folder
    state = {
        (f"vision_model.{k}" if k.startswith("vision_model.") else k): v
        for k, v in model.state_dict().items()
    }
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours, params = FlaxStableDiffusionSafetyChecker.from_pretrained(tmp_path)
    clip_input = reference_clip_input(sample_images(), tiny_feature_extractor())
    got = ours.apply({"params": params}, jnp.asarray(clip_input.numpy()), method=ours.image_embeds)
    np.testing.assert_allclose(got, torch_embeds(model, clip_input).numpy(), atol=EMBED_TOL, rtol=0)


def test_bf16_is_finite(checker_folder):
    _, folder = checker_folder
    checker, params = load_ours(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ref_checker, ref_params = load_ours(folder)
    # The concept heads stay fp32 (a bf16 threshold could move by 4e-3); the tower is bf16.
    assert params["concept_embeds_weights"].dtype == jnp.float32
    assert params["visual_projection"]["kernel"].dtype == jnp.bfloat16
    images = jnp.asarray(sample_images())
    clip_input = checker.preprocessing(images)
    embeds = checker.apply({"params": params}, clip_input, method=checker.image_embeds)
    ref = ref_checker.apply({"params": ref_params}, clip_input, method=ref_checker.image_embeds)
    assert embeds.dtype == jnp.bfloat16
    embeds = np.asarray(embeds, np.float32)
    assert np.isfinite(embeds).all()
    # Projected embeddings are O(1); bf16 keeps ~3 significant digits through 2 layers.
    np.testing.assert_allclose(embeds, ref, atol=0.1, rtol=0)
    check = jax.jit(lambda p, x: checker.apply({"params": p}, x, method=checker.check_images))
    out, flags = check(params, images)
    assert out.dtype == images.dtype and flags.dtype == jnp.bool_ and np.isfinite(np.asarray(out)).all()


def test_jit_matches_eager_and_does_not_retrace(checker_folder):
    _, folder = checker_folder
    checker, params = load_ours(folder)
    traces = []

    @jax.jit
    def check(p, x):
        traces.append(1)
        return checker.apply({"params": p}, x, method=checker.check_images)

    images = jnp.asarray(sample_images())
    eager = checker.apply({"params": params}, images, method=checker.check_images)
    for seed in (1, 2):
        jitted = check(params, jnp.asarray(sample_images(seed=seed)))
    jitted = check(params, images)
    assert len(traces) == 1
    np.testing.assert_array_equal(jitted[1], eager[1])
    np.testing.assert_array_equal(jitted[0], eager[0])


def test_pmap_and_mesh_match_one_device(checker_folder):
    _, folder = checker_folder
    checker, params = load_ours(folder)
    n = jax.device_count()  # 8 fake CPU devices (conftest)
    images = np.concatenate([sample_images(seed=0), sample_images(seed=1)])  # 8 images, 2 flagged
    check = lambda p, x: checker.apply({"params": p}, x, method=checker.check_images)  # noqa: E731
    want_images, want_flags = jax.jit(check)(params, jnp.asarray(images))
    assert want_flags.any() and not want_flags.all()

    replicated = tiny_sd.replicated(params)
    out, flags = jax.pmap(check)(replicated, images.reshape(n, -1, *images.shape[1:]))
    np.testing.assert_array_equal(np.asarray(flags).reshape(-1), want_flags)
    np.testing.assert_array_equal(np.asarray(out).reshape(images.shape), want_images)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    out, flags = jax.jit(check)(jax.device_put(params, NamedSharding(mesh, P())), sharded)
    np.testing.assert_array_equal(flags, want_flags)
    np.testing.assert_array_equal(out, want_images)


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("height,width", [(64, 64), (300, 257), (257, 300), (224, 224)])
def test_preprocessing_matches_clip_image_processor(height, width):
    """SD's feature extractor (shortest edge 224, bicubic, crop 224): exact pixel values."""
    images = sample_images(2, height, width, seed=height + width)
    ref = CLIPImageProcessorPil()(VaeImageProcessor.numpy_to_pil(images), return_tensors="np").pixel_values
    ours = jax.jit(CLIPImagePreprocessing())(jnp.asarray(images))
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_legacy_feature_extractor_config_and_bilinear(tmp_path):
    """The old CLIPFeatureExtractor file (integer size and crop_size) and non-default settings."""
    legacy = {
        "crop_size": 20, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": False,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 24,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' backend-fallback notice
        fe = CLIPImageProcessorPil.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the file is understood
        pre = CLIPImagePreprocessing.from_config(legacy)
    assert (pre.size, pre.crop_size, pre.resample, pre.do_normalize) == (24, (20, 20), 2, False)
    images = sample_images(2, 50, 37)
    ref = fe(VaeImageProcessor.numpy_to_pil(images), return_tensors="np").pixel_values
    np.testing.assert_array_equal(np.asarray(pre(jnp.asarray(images))), ref)


@pytest.mark.parametrize("resample", [2, 3])
def test_pil_resize_is_exact(resample):
    """Up/down-scaling, both pass orders of Pillow (vertical first: 97x33 -> 12x50)."""
    rng = np.random.RandomState(resample)
    sizes = [(97, 33, 12, 50), (48, 40, 38, 32), (17, 23, 40, 11), (90, 60, 30, 58), (5, 9, 5, 20)]
    for h, w, oh, ow in sizes:
        u = rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8)
        ref = np.stack([np.asarray(Image.fromarray(x).resize((ow, oh), resample=resample)) for x in u])
        ours = pil_resize(jnp.asarray(u, jnp.int32), (oh, ow), resample)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_preprocessing_errors():
    with pytest.raises(ValueError, match="only CLIP's shortest-edge resize"):
        CLIPImagePreprocessing.from_config({"size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="resample=1 is not supported"):
        CLIPImagePreprocessing.from_config({"resample": 1})
    with pytest.raises(ValueError, match="do_pad=True is not supported"):
        CLIPImagePreprocessing.from_config({"do_pad": True})
    with pytest.warns(UserWarning, match="unknown preprocessor keys"):
        CLIPImagePreprocessing.from_config({"do_something_new": True})
    with pytest.raises(ValueError, match="larger than the 32x38 resized image"):
        CLIPImagePreprocessing(size=32, crop_size=(33, 33))(jnp.zeros((1, 40, 48, 3)))
    with pytest.raises(ValueError, match=r"NHWC RGB \[batch, height, width, 3\]"):
        CLIPImagePreprocessing()(jnp.zeros((1, 3, 40, 48)))


# ----------------------------------------------------------------------------- saving / config

def test_pytorch_format_loads_into_diffusers(checker_folder, tmp_path):
    model, folder = checker_folder
    checker, params = load_ours(folder)
    checker.save_pretrained(tmp_path, params, pytorch_format=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["StableDiffusionSafetyChecker"]
    reloaded = StableDiffusionSafetyChecker.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, atol=0, rtol=0)
    # And back through our loader (which prefers the safetensors).
    ours2, params2 = FlaxStableDiffusionSafetyChecker.from_pretrained(tmp_path)
    assert ours2.config == checker.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_config_keys(checker_folder):
    """transformers 5's config.json loads silently; so does a CompVis-era config with the legacy
    `vision_config_dict` (which wins over `vision_config`) and generic keys; bad values raise."""
    model, folder = checker_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checker, _ = FlaxStableDiffusionSafetyChecker.from_pretrained(folder)
        vision = model.config.vision_config.to_dict()
        legacy = {
            **model.config.to_dict(), "architectures": ["StableDiffusionSafetyChecker"],
            "vision_config": {**vision, "num_hidden_layers": 7},
            "vision_config_dict": {k: v for k, v in vision.items() if k != "model_type"},
            "text_config_dict": {"hidden_size": 32}, "torch_dtype": "float32", "top_k": 50,
        }
        legacy_checker = FlaxStableDiffusionSafetyChecker.from_config(legacy)
    assert legacy_checker.config == checker.config
    assert (checker.image_size, checker.patch_size, checker.projection_dim, checker.num_hidden_layers) == (
        SIZE, 8, PROJ, 2)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
        FlaxStableDiffusionSafetyChecker.from_config({**config, "model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="expected 'clip_vision_model'"):
        FlaxStableDiffusionSafetyChecker.from_config(
            {**config, "vision_config": {**config["vision_config"], "model_type": "clip_text_model"}})
    with pytest.raises(ValueError, match="Unsupported activation 'swiglu'"):
        FlaxStableDiffusionSafetyChecker.from_config(
            {**config, "vision_config": {**config["vision_config"], "hidden_act": "swiglu"}})


def test_bad_inputs_and_weights_raise(checker_folder, tmp_path):
    _, folder = checker_folder
    checker, params = load_ours(folder)
    with pytest.raises(ValueError, match="image_size=32 square images"):
        checker.apply({"params": params}, jnp.zeros((1, 3, 24, 24)), method=checker.image_embeds)
    with pytest.raises(ValueError, match=r"clip_input must be NCHW \[batch, 3, 32, 32\]"):
        checker.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        FlaxStableDiffusionSafetyChecker.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- pipeline wiring
# Tiny diffusers pipelines (tests/tiny_sd.py) with a tiny checker; ours are loaded from their saved
# folders. Images agree within 1e-3 (fp32); the checker's margins (aim_at) dwarf what that moves.

PROMPTS = ["a red cat", "a cat"]
CALL = dict(num_inference_steps=2, guidance_scale=7.5)  # 32x32 images: every pipeline's default


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """diffusers pipelines without a checker, 4- and 9-channel UNets, and the 4-channel one's folder."""
    root = tmp_path_factory.mktemp("sd")
    (folder4, torch4), (_, torch9) = (tiny_sd.make_pipeline(root, in_channels=c) for c in (4, 9))
    return SimpleNamespace(folder4=folder4, torch4=torch4, torch9=torch9)


def with_checker(cls, base, **extra):
    """A diffusers pipeline of class `cls` over `base`'s components, with a fresh tiny checker and its
    feature extractor."""
    return cls(**{**base.components, "safety_checker": tiny_torch_checker(seed=1),
                  "feature_extractor": tiny_feature_extractor(), **extra})


def out_of_reach(checker):
    """Thresholds no cosine (at most 1) reaches: nothing is flagged."""
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)


def aim_at(checker, images, targets):
    """Point concept k at image targets[k] alone (a column of the pseudo-inverse of the normalised
    embeddings: cosine 0 with every other image) with a threshold half its cosine, and put every other
    concept out of reach: the targets are flagged, the rest are not, by margins over 0.025."""
    clip_input = reference_clip_input(images, tiny_feature_extractor())
    embeds = torch_embeds(checker, clip_input).numpy().astype(np.float64)
    inv = np.linalg.pinv(embeds / np.linalg.norm(embeds, axis=1, keepdims=True))
    out_of_reach(checker)
    with torch.no_grad():
        for k, i in enumerate(targets):
            checker.concept_embeds[k] = torch.tensor(inv[:, i])
        cos = cosine_distance(torch_embeds(checker, clip_input), checker.concept_embeds)
        for k, i in enumerate(targets):
            assert cos[i, k] > 0.05
            checker.concept_embeds_weights[k] = cos[i, k] / 2


def flagged_reference(torch_pipe, run, targets):
    """(the images the checker sees, diffusers' output) of `run(torch_pipe)` with the pipe's checker aimed
    at the images `targets`: a first run with no concept in reach gives the images."""
    out_of_reach(torch_pipe.safety_checker)
    with torch.no_grad():
        images = run(torch_pipe).images
    aim_at(torch_pipe.safety_checker, images, targets)
    with torch.no_grad():
        ref = run(torch_pipe)
    assert ref.nsfw_content_detected == [i in targets for i in range(len(images))]
    return images, ref


def assert_matches_reference(out, ref):
    """Our nsfw_content_detected equals diffusers' per image (a leading device axis flattened), the
    flagged images are black and the others are diffusers' images."""
    flags = np.asarray(out.nsfw_content_detected).reshape(-1)
    images = np.asarray(out.images).reshape(ref.images.shape)
    assert flags.tolist() == ref.nsfw_content_detected
    assert not images[flags].any() and all(image.std() > 0.02 for image in images[~flags])
    np.testing.assert_allclose(images, ref.images, atol=1e-3, rtol=0)


def test_pipeline_flags_match_diffusers(sd, tmp_path):
    """FlaxStableDiffusionPipeline loaded from diffusers' StableDiffusionPipeline folder: the same
    nsfw_content_detected (one image flagged, one not), the feature extractor's preprocessing, and
    `safety_checker=None` skipping the check."""
    torch_pipe = with_checker(StableDiffusionPipeline, sd.torch4)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    images, ref = flagged_reference(torch_pipe, lambda p: p(PROMPTS, latents=noise.clone(), output_type="np", **CALL),
                                    targets=(0,))
    torch_pipe.save_pretrained(tmp_path, safe_serialization=True)

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.safety_checker.preprocessing == CLIPImagePreprocessing.from_config(tiny_feature_extractor().to_dict())
    ids = pipe.prepare_inputs(PROMPTS)
    assert_matches_reference(pipe(ids, params, jax.random.key(0), latents=noise.numpy(), **CALL), ref)

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    assert pipe.safety_checker is None and "safety_checker" not in params
    out = pipe(ids, params, jax.random.key(0), latents=noise.numpy(), **CALL)
    assert out.nsfw_content_detected is None
    np.testing.assert_allclose(np.asarray(out.images)[0], images[0], atol=1e-3, rtol=0)


def test_inpaint_pipeline_flags_match_diffusers_under_pmap_and_mesh(sd, tmp_path):
    """FlaxStableDiffusionInpaintPipeline (9-channel UNet) on 8 prompts, 3 flagged, over the 8 fake
    devices: pmap (one image per device) and a mesh give diffusers' StableDiffusionInpaintPipeline flags
    and images."""
    n = jax.device_count()
    torch_pipe = with_checker(StableDiffusionInpaintPipeline, sd.torch9)
    image, mask = tiny_sd.sample_image_and_mask()
    prompts = PROMPTS * (n // 2)
    noise = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    _, ref = flagged_reference(
        torch_pipe, lambda p: p(prompts, image=image, mask_image=mask, latents=noise.clone(), output_type="np", **CALL),
        targets=(0, 3, 6))
    torch_pipe.save_pretrained(tmp_path, safe_serialization=True)

    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(tmp_path)
    ids, masked, masks = pipe.prepare_inputs(prompts, image, mask)
    out = pipe(shard(ids), shard(masks), shard(masked), tiny_sd.replicated(params),
               jax.random.split(jax.random.key(0), n), latents=shard(noise.numpy()), jit=True, **CALL)
    assert np.shape(out.nsfw_content_detected) == (n, 1)
    assert_matches_reference(out, ref)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = pipe(ids, masks, masked, params, jax.random.key(0), latents=noise.numpy(), mesh=mesh, **CALL)
    assert_matches_reference(out, ref)


def test_controlnet_pipeline_flags_match_diffusers(sd, tmp_path):
    """FlaxStableDiffusionControlNetPipeline loaded from diffusers' StableDiffusionControlNetPipeline
    folder (ControlNet, checker, feature extractor): the same flags, the second image flagged."""
    torch_pipe = with_checker(StableDiffusionControlNetPipeline, sd.torch4, controlnet=tiny_sd.make_controlnet(1))
    control, _ = tiny_sd.sample_image_and_mask(seed=1)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    _, ref = flagged_reference(
        torch_pipe, lambda p: p(PROMPTS, image=control, latents=noise.clone(), output_type="np", **CALL),
        targets=(1,))
    torch_pipe.save_pretrained(tmp_path, safe_serialization=True)

    pipe, params = FlaxStableDiffusionControlNetPipeline.from_pretrained(tmp_path)
    ids, image = pipe.prepare_text_inputs(PROMPTS), pipe.prepare_image_inputs(control)
    assert_matches_reference(pipe(ids, image, params, jax.random.key(0), latents=noise.numpy(), **CALL), ref)


def test_feature_extractor_configures_the_checker_however_the_pipeline_is_built(sd, checker_folder):
    """The constructor applies feature_extractor (its preprocessor config) to the checker: pipelines
    built directly and with from_pipe preprocess as the config says, not with CLIP's 224 defaults."""
    checker, _ = FlaxStableDiffusionSafetyChecker.from_pretrained(checker_folder[1])
    assert checker.preprocessing == CLIPImagePreprocessing()  # config.json does not hold it
    plain, _ = FlaxStableDiffusionPipeline.from_pretrained(sd.folder4)
    parts = (plain.vae, plain.text_encoder, plain.tokenizer, plain.unet, plain.scheduler)
    config = tiny_feature_extractor().to_dict()
    small = {**config, "size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}

    built = FlaxStableDiffusionInpaintPipeline(*parts, checker, config)
    assert built.safety_checker.preprocessing == CLIPImagePreprocessing.from_config(config)
    assert (built.safety_checker.preprocessing.size, built.feature_extractor) == (SIZE, config)
    assert FlaxStableDiffusionPipeline.from_pipe(built).safety_checker == built.safety_checker
    swapped = FlaxStableDiffusionPipeline.from_pipe(built, feature_extractor=small)
    assert swapped.safety_checker.preprocessing.crop_size == (24, 24) and swapped.feature_extractor == small
    added = FlaxStableDiffusionInpaintPipeline.from_pipe(plain, safety_checker=checker, feature_extractor=config)
    assert added.safety_checker == built.safety_checker
    assert FlaxStableDiffusionPipeline(*parts, checker).safety_checker.preprocessing == CLIPImagePreprocessing()
    with pytest.raises(TypeError, match=r"feature_extractor must be its preprocessor_config.json dict .*got "
                                        r"CLIPImageProcessorPil"):
        FlaxStableDiffusionPipeline(*parts, checker, tiny_feature_extractor())
