"""Folders written by diffusers' (0.39) and transformers' (4.57) Flax `save_pretrained` load through our
public API and compute what the PyTorch models of the same weights compute; what we save is that layout.

The fixtures in tests/flax_format/ were written by the reference Flax libraries themselves
(tests/flax_format/generate.py, in a throwaway environment); `*-pytorch/` hold the same weights (float16
numbers, stored exactly as float16) for diffusers/transformers PyTorch. Tolerances are those of each model's
own parity test, fp32: UNet, ControlNet and CLIP text encoder max abs 1e-4; VAE 1e-4 relative to the largest
reference value; safety checker embeddings max abs 1e-4 with equal flags; pipeline images max abs 1e-3.
"""
import json
import shutil
from pathlib import Path

import flax
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

import tiny_sd
from flax_inpaint import (
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxControlNetModel,
    FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionSafetyChecker,
    FlaxUNet2DConditionModel,
)
from flax_inpaint.io import CheckpointError

FIXTURES = Path(__file__).parent / "flax_format"
FLAX, PYTORCH = FIXTURES / "sd-inpaint-flax", FIXTURES / "sd-inpaint-pytorch"
CONTROLNET_FLAX, CONTROLNET_PYTORCH = FIXTURES / "controlnet-flax", FIXTURES / "controlnet-pytorch"
TOL = 1e-4
PIPELINE_TOL = 1e-3
# Our class, its folder written by the reference Flax library, and the file name that library writes.
MODELS = {
    "unet": (FlaxUNet2DConditionModel, FLAX / "unet", "diffusion_flax_model.msgpack"),
    "vae": (FlaxAutoencoderKL, FLAX / "vae", "diffusion_flax_model.msgpack"),
    "text_encoder": (FlaxCLIPTextModel, FLAX / "text_encoder", "flax_model.msgpack"),
    "safety_checker": (FlaxStableDiffusionSafetyChecker, FLAX / "safety_checker", "flax_model.msgpack"),
    "controlnet": (FlaxControlNetModel, CONTROLNET_FLAX, "diffusion_flax_model.msgpack"),
}


def flat_msgpack(file: Path):
    return flax.traverse_util.flatten_dict(flax.serialization.msgpack_restore(file.read_bytes()))


def assert_close(ours, ref, atol=TOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    assert ref.std() > 1e-2, "the reference output is nearly constant; the comparison would prove little"
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def test_fixtures_are_flax_only_folders():
    """The folders hold what the reference Flax libraries wrote, and no PyTorch weights."""
    for _, folder, name in MODELS.values():
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", name]
    index = json.loads((FLAX / "model_index.json").read_text())
    assert (index["_class_name"], index["_diffusers_version"]) == ("FlaxStableDiffusionInpaintPipeline", "0.39.0")
    assert index["unet"] == ["diffusers", "FlaxUNet2DConditionModel"]
    assert json.loads((FLAX / "text_encoder" / "config.json").read_text())["transformers_version"] == "4.57.6"


# ----------------------------------------------------------------------------- models vs PyTorch

def test_unet_matches_pytorch():
    unet, params = FlaxUNet2DConditionModel.from_pretrained(FLAX, subfolder="unet")
    ref_unet = UNet2DConditionModel.from_pretrained(PYTORCH, subfolder="unet", torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((2, 9, 8, 8), np.float32), rng.standard_normal((2, 16, 32), np.float32)
    t = np.array([3, 951])
    with torch.no_grad():
        ref = ref_unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    ours = jax.jit(lambda p, *a: unet.apply({"params": p}, *a).sample)(params, x, t, ctx)
    assert_close(ours, ref)


def test_vae_encode_decode_match_pytorch():
    vae, params = FlaxAutoencoderKL.from_pretrained(FLAX, subfolder="vae")
    ref_vae = AutoencoderKL.from_pretrained(PYTORCH, subfolder="vae", torch_dtype=torch.float32).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = ref_vae.encode(torch.tensor(x)).latent_dist
        ref = dict(mean=posterior.mean.numpy(), decoded=ref_vae.decode(torch.tensor(z)).sample.numpy())

    @jax.jit
    def run(p, x, z):
        posterior = vae.apply({"params": p}, x, method=vae.encode).latent_dist  # NHWC, as diffusers' Flax VAE
        return dict(mean=posterior.mean.transpose(0, 3, 1, 2),
                    decoded=vae.apply({"params": p}, z, method=vae.decode).sample)

    ours = run(params, x, z)
    for key in ref:
        err = np.abs(np.asarray(ours[key]) - ref[key]).max() / np.abs(ref[key]).max()
        assert err <= TOL, (key, err)


def test_text_encoder_matches_pytorch():
    te, params = FlaxCLIPTextModel.from_pretrained(FLAX, subfolder="text_encoder")
    ref_te = CLIPTextModel.from_pretrained(PYTORCH, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(FLAX / "tokenizer")
    ids = tokenizer(["a red cat", "a cat"], padding="max_length", return_tensors="np").input_ids
    with torch.no_grad():
        ref = ref_te(torch.tensor(ids))
    ours = te.apply({"params": params}, jnp.asarray(ids))
    assert_close(ours.last_hidden_state, ref.last_hidden_state.numpy())
    assert_close(ours.pooler_output, ref.pooler_output.numpy())


def test_safety_checker_matches_pytorch():
    checker, params = FlaxStableDiffusionSafetyChecker.from_pretrained(FLAX, subfolder="safety_checker")
    ref_checker = StableDiffusionSafetyChecker.from_pretrained(
        PYTORCH, subfolder="safety_checker", torch_dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    images = np.clip(rng.rand(8, 1, 1, 3) * 0.6 + 0.4 * rng.rand(8, 40, 48, 3), 0, 1).astype(np.float32)
    processor = CLIPImageProcessor.from_pretrained(FLAX / "feature_extractor")
    clip_input = processor([Image.fromarray((im * 255).round().astype(np.uint8)) for im in images],
                           return_tensors="pt").pixel_values
    with torch.no_grad():
        ref_embeds = ref_checker.visual_projection(ref_checker.vision_model(clip_input)[1]).numpy()
        _, ref_flags = ref_checker(clip_input=clip_input, images=images.copy())
    assert 0 < sum(ref_flags) < len(ref_flags), "the thresholds should flag some images and pass others"
    embeds = checker.apply({"params": params}, jnp.asarray(clip_input.numpy()), method=checker.image_embeds)
    assert_close(embeds, ref_embeds)
    flags = checker.apply({"params": params}, jnp.asarray(clip_input.numpy()))
    assert flags.tolist() == list(ref_flags)


def test_controlnet_matches_pytorch():
    """diffusers' Flax ControlNet with linear projections (SD2-style) and one down block."""
    net, params = FlaxControlNetModel.from_pretrained(CONTROLNET_FLAX)
    assert net.use_linear_projection
    ref_net = ControlNetModel.from_pretrained(CONTROLNET_PYTORCH, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((2, 4, 8, 8), np.float32), rng.standard_normal((2, 16, 32), np.float32)
    cond, t = rng.random((2, 3, 64, 64), np.float32), np.array([3, 951])
    with torch.no_grad():
        ref = ref_net(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(cond))
    out = jax.jit(lambda p, *a: net.apply({"params": p}, *a))(params, x, t, ctx, cond)
    assert len(out.down_block_res_samples) == len(ref.down_block_res_samples) == 2
    for ours, theirs in zip([*out.down_block_res_samples, out.mid_block_res_sample],
                            [*ref.down_block_res_samples, ref.mid_block_res_sample]):
        assert_close(ours, theirs.numpy())


def test_inpaint_pipeline_matches_pytorch():
    """diffusers' FlaxStableDiffusionInpaintPipeline folder (FlaxPNDMScheduler, safety checker included)
    through our from_pretrained, against diffusers' PyTorch pipeline of the same weights, same noise."""
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(FLAX)
    assert pipe.safety_checker is not None and type(pipe.scheduler).__name__ == "FlaxPNDMScheduler"
    torch_pipe = StableDiffusionInpaintPipeline.from_pretrained(PYTORCH, dtype=torch.float32)
    image, mask = tiny_sd.sample_image_and_mask()
    common = dict(height=32, width=32, num_inference_steps=4, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        ref = torch_pipe("a red cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0),
                         **common)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()  # diffusers' draw
    ours = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), latents=noise, **common)
    assert ours.nsfw_content_detected.tolist() == ref.nsfw_content_detected == [False]
    assert_close(ours.images, ref.images, atol=PIPELINE_TOL)


# ----------------------------------------------------------------------------- the layout, both ways

@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_writes_the_reference_layout(name, tmp_path):
    """What we save is, array for array, what diffusers/transformers Flax saved: same file, same names."""
    cls, folder, file = MODELS[name]
    model, params = cls.from_pretrained(folder)
    model.save_pretrained(tmp_path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", file]
    ours, theirs = flat_msgpack(tmp_path / file), flat_msgpack(folder / file)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg="/".join(key))
    again, params2 = cls.from_pretrained(tmp_path)
    assert again.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_pipeline_save_writes_the_tokenizer_vocabulary(tmp_path):
    """transformers 5 saves tokenizer.json alone; diffusers 0.39's Flax pipelines load the tokenizer with
    transformers 4's CLIPTokenizer, which reads vocab.json and merges.txt: those are written too, and a
    tokenizer built from them alone tokenizes like the pipeline's."""
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(FLAX, safety_checker=None)
    pipe.save_pretrained(tmp_path, params)
    folder = tmp_path / "tokenizer"
    from_files = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    for text in ("a red cat", "red, a cat"):
        assert from_files(text).input_ids == pipe.tokenizer(text).input_ids


def test_mismatched_flax_params_list_both_names(tmp_path):
    """A reference-layout array with no place in the model is named as in the file; a missing parameter
    by our name; a wrong shape by both."""
    shutil.copy(FLAX / "vae" / "config.json", tmp_path / "config.json")
    flat = flat_msgpack(FLAX / "vae" / "diffusion_flax_model.msgpack")
    attention = ("encoder", "mid_block", "attentions_0")
    del flat[(*attention, "query", "kernel")]
    flat[(*attention, "qkv", "kernel")] = np.zeros((16, 48), np.float32)
    flat[(*attention, "key", "bias")] = np.zeros(8, np.float32)
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(flat)))
    with pytest.raises(CheckpointError) as err:
        FlaxAutoencoderKL.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "encoder/mid_block/attentions_0/key/bias [8] -> encoder/mid_block/attentions_0/to_k/bias expects [16]" in msg
    assert "no place in the model (1):\n    encoder/mid_block/attentions_0/qkv/kernel" in msg
    assert "missing from the checkpoint (2):\n    encoder/mid_block/attentions_0/to_k/bias" in msg
    assert "encoder/mid_block/attentions_0/to_q/kernel" in msg


def test_sharded_transformers_msgpack(tmp_path):
    """transformers' Flax save_pretrained shards large models: flax_model.msgpack.index.json + shards."""
    shutil.copy(FLAX / "text_encoder" / "config.json", tmp_path / "config.json")
    flat = flat_msgpack(FLAX / "text_encoder" / "flax_model.msgpack")
    keys = sorted(flat)
    shards = {"flax_model-00001-of-00002.msgpack": keys[::2], "flax_model-00002-of-00002.msgpack": keys[1::2]}
    for shard, part in shards.items():
        tree = flax.traverse_util.unflatten_dict({k: flat[k] for k in part})
        (tmp_path / shard).write_bytes(flax.serialization.msgpack_serialize(tree))
    index = {"weight_map": {"/".join(k): shard for shard, part in shards.items() for k in part}}
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    _, sharded = FlaxCLIPTextModel.from_pretrained(tmp_path)
    _, whole = FlaxCLIPTextModel.from_pretrained(FLAX, subfolder="text_encoder")
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, whole)


def test_our_earlier_msgpack_layout_still_loads(tmp_path):
    """Before the reference layout, we saved our own param names (`layers_0`), as diffusion_flax_model.msgpack."""
    te, params = FlaxCLIPTextModel.from_pretrained(FLAX, subfolder="text_encoder")
    shutil.copy(FLAX / "text_encoder" / "config.json", tmp_path / "config.json")
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get(params)))
    assert "layers_0" in flax.serialization.msgpack_restore(
        (tmp_path / "diffusion_flax_model.msgpack").read_bytes())["text_model"]["encoder"]
    _, again = FlaxCLIPTextModel.from_pretrained(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_flax_msgpack_wins_over_safetensors_unless_from_pt(tmp_path):
    """A folder with both formats (a Flax fine-tune saved beside the original PyTorch weights) loads the
    Flax msgpack, as diffusers' Flax from_pretrained does; from_pt=True loads the safetensors."""
    shutil.copytree(PYTORCH / "unet", tmp_path / "unet")
    flat = flat_msgpack(FLAX / "unet" / "diffusion_flax_model.msgpack")
    tuned = {k: v + 1 for k, v in flat.items()}
    (tmp_path / "unet" / "diffusion_flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(tuned)))
    _, reference = FlaxUNet2DConditionModel.from_pretrained(FLAX, subfolder="unet")
    _, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b + 1), params, reference)
    _, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "unet", from_pt=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)


# ----------------------------------------------------------------------------- the hub's "flax" revision

def test_hub_revision_flax(tmp_path, monkeypatch):
    """A hub repo whose `flax` branch holds only Flax weights (as the original SD repos do) loads with
    revision="flax" through huggingface_hub's own cache lookup; the main branch is not there."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny-sd"
    shutil.copytree(FLAX, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "flax").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)

    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained("org/tiny-sd", revision="flax")
    _, local = FlaxStableDiffusionInpaintPipeline.from_pretrained(FLAX)
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], local[name])
    _, unet = FlaxUNet2DConditionModel.from_pretrained("org/tiny-sd", subfolder="unet", revision="flax",
                                                       local_files_only=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, unet, local["unet"])
    with pytest.raises(CheckpointError, match="'org/tiny-sd' is not a local folder"):
        FlaxUNet2DConditionModel.from_pretrained("org/tiny-sd", subfolder="unet")
