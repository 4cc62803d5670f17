"""Training: the procedural data and tokenizer, the data-parallel loop (checkpoints, resume, devices)
and a few CPU steps of each recipe, whose exported folders load through `from_pretrained`."""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_inpaint.io import CheckpointError
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.models.unet import FlaxUNet2DConditionModel
from flax_inpaint.runtime import data_mesh
from flax_inpaint.train import data, recipes
from flax_inpaint.train.controlnet import controlnet_from_unet
from flax_inpaint.train.loop import TrainConfig, checkpoint_path, fit

# ----------------------------------------------------------------------------- data


def test_scenes_draw_the_captioned_shape_in_its_colour():
    scenes = data.sample_scenes(np.random.default_rng(0), 24, 64, distractor=0.0, textured=0.0)
    assert scenes.images.shape == (24, 64, 64, 3) and scenes.images.dtype == np.float32
    inside = scenes.distance() < -1.0  # well inside the shape: exactly its colour
    for i in range(24):
        assert np.allclose(scenes.images[i][inside[i]], data.RGB[scenes.colour[i]])
        assert np.allclose(scenes.images[i][~(scenes.distance()[i] < 1.0)], data.RGB[scenes.background[i]])
    assert np.all(scenes.colour != scenes.background)
    caption = scenes.captions[0].split()
    assert caption[1] == data.COLOURS[scenes.colour[0]] and caption[2] == data.SHAPES[scenes.shape[0]]


def test_inpaint_masks_are_binary_and_cover_the_shape_when_shape_masks():
    rng = np.random.default_rng(1)
    scenes = data.sample_scenes(rng, 64, 64)
    masks = data.inpaint_masks(rng, scenes)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    covered = [np.all(m[d < 0]) for m, d in zip(masks, scenes.distance())]
    assert np.mean(covered) > 0.6  # bbox, silhouette and full masks cover it (80% of them)


def test_tokenizer_makes_each_caption_word_one_token(tmp_path):
    tok = data.build_tokenizer(tmp_path / "tok", max_length=16)
    ids = data.tokenize(tok, ["a red circle on a blue background", "an unknown word"])
    assert ids.shape == (2, 16)
    assert list(ids[0, :9]) == [tok.bos_token_id, *[tok.convert_tokens_to_ids(w + "</w>") for w in
                                 "a red circle on a blue background".split()], tok.eos_token_id]
    assert ids[1, 2] != tok.unk_token_id  # unknown words fall back to bytes


def test_learn_merges_reproduces_every_word():
    merges = data.learn_merges(["red", "green", "background", "rest", "reed"])
    assert len(merges) == len(set(merges))


# ----------------------------------------------------------------------------- loop


def _quadratic(params, frozen, batch, key):
    noise = 0.01 * jax.random.normal(key, params["w"].shape)
    pred = batch["x"] @ (params["w"] + noise)
    return jnp.mean(jnp.square(pred - batch["y"])), {"mean_pred": jnp.mean(pred) * frozen}


def _batches(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}


CONFIG = TrainConfig(steps=6, batch_size=8, learning_rate=0.5, warmup_steps=1, checkpoint_every=2, log_every=2)


def _fit(steps, out_dir=None, mesh=None, batches=_batches, progress=False):
    params = {"w": jnp.zeros(3)}
    return fit("toy", _quadratic, params, batches, dataclasses.replace(CONFIG, steps=steps), out_dir,
               frozen=jnp.float32(1.0), mesh=mesh, progress=progress)


def test_fit_learns_and_its_progress_bar_shows_the_loss(capsys):
    result = _fit(24, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("toy: 100%") and "24/24" in bar and f"loss={result.losses[-1]:.4f}" in bar, bar
    assert result.losses[-1] < 0.1 * result.losses[0]
    np.testing.assert_allclose(result.params["w"], [1.0, -2.0, 0.5], atol=0.25)


def test_fit_checkpoints_and_extends_a_finished_run(tmp_path):
    first = _fit(4, tmp_path)
    assert first.start_step == 0 and checkpoint_path(tmp_path, "toy").is_file()
    assert _fit(4, tmp_path).start_step == 4  # finished: nothing left to run
    longer = _fit(6, tmp_path)  # more steps: continues from the checkpoint
    assert longer.start_step == 4 and len(longer.losses) == 1  # steps 4 and 5, one log interval


def test_a_crash_leaves_the_last_checkpoint_whole_and_resume_equals_an_uninterrupted_run(tmp_path):
    def crashing(step):
        if step == 3:
            raise KeyboardInterrupt
        return _batches(step)

    with pytest.raises(KeyboardInterrupt):
        _fit(6, tmp_path, batches=crashing)
    assert [p.name for p in tmp_path.iterdir()] == ["toy.ckpt.msgpack"]  # no temporary file left
    resumed = _fit(6, tmp_path)
    assert resumed.start_step == 2
    np.testing.assert_allclose(resumed.params["w"], _fit(6).params["w"], rtol=1e-6, atol=1e-7)


def test_data_parallel_over_8_devices_matches_one_device():
    assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
    one = _fit(4, mesh=data_mesh(jax.devices()[:1]))
    eight = _fit(4, mesh=data_mesh())
    np.testing.assert_allclose(eight.params["w"], one.params["w"], rtol=1e-5, atol=1e-6)


def test_fit_rejects_a_batch_not_divisible_by_the_devices_and_a_foreign_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 8 devices"):
        fit("toy", _quadratic, {"w": jnp.zeros(3)}, _batches, dataclasses.replace(CONFIG, batch_size=6),
            progress=False)
    checkpoint_path(tmp_path, "toy").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it to start afresh"):
        _fit(2, tmp_path)


# ----------------------------------------------------------------------------- recipes


TINY_UNET = dict(recipes.UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                 attention_head_dim=2)
TINY_TEXT = dict(recipes.TEXT_CONFIG, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                 num_hidden_layers=1)
# The recipe stages' models: one width throughout and a one-level UNet whose only attention is the mid block's
# (the captions still reach it). Nothing the tests assert depends on these, and each stage's programs (random
# init, train step) compile in 30-50% less time than with TINY_UNET, VAE_CONFIG and CONTROLNET_EMBEDDING (XLA
# compiles every kernel on its own; fewer and smaller kernels compile faster).
RECIPE_VAE = dict(recipes.VAE_CONFIG, block_out_channels=(8, 8, 8))
RECIPE_UNET = dict(TINY_UNET, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                   up_block_types=("UpBlock2D",))
RECIPE_EMBEDDING = (8, 8, 8)


def test_recipes_train_resume_and_export_loadable_folders(tmp_path):
    from flax_inpaint import FlaxStableDiffusionInpaintPipeline, FlaxStableDiffusionPipeline

    steps = TrainConfig(steps=2, batch_size=8, checkpoint_every=1, log_every=1)
    vae, vae_params, result = recipes.train_vae(tmp_path, steps, RECIPE_VAE, progress=False)
    assert np.isfinite(result.final_loss) and len(result.losses) == 2
    assert vae.scaling_factor > 0 and (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    vae, _, again = recipes.train_vae(tmp_path, dataclasses.replace(steps, steps=3), RECIPE_VAE, progress=False)
    assert again.start_step == 2 and len(again.losses) == 1  # resumed: one step left

    pipe, params, result = recipes.train_inpaint(tmp_path, steps, scenes=16, unet_config=RECIPE_UNET,
                                                 text_config=TINY_TEXT, progress=False)
    assert np.isfinite(result.final_loss)
    assert (tmp_path / "checkpoints" / "inpaint.ckpt.msgpack").is_file()
    loaded, loaded_params = FlaxStableDiffusionInpaintPipeline.from_pretrained(
        tmp_path / "tiny-shapes-inpaint", safety_checker=None)
    assert loaded.unet.in_channels == 9 and loaded.vae.scaling_factor == pytest.approx(vae.scaling_factor)
    for name in ("unet", "text_encoder", "vae"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params[name], params[name])
    ids = loaded.tokenize("a red circle")
    assert list(ids[0, :5]) == list(pipe.tokenize("a red circle")[0, :5])

    controlnet, cn_params, result = recipes.train_controlnet(tmp_path, steps, scenes=16,
                                                           embedding_channels=RECIPE_EMBEDDING, progress=False)
    assert np.isfinite(result.final_loss) and controlnet.in_channels == 4
    again, again_params = FlaxControlNetModel.from_pretrained(tmp_path / "tiny-shapes-controlnet")
    assert again.cond_downscale == loaded.vae_scale_factor
    jax.tree_util.tree_map(np.testing.assert_array_equal, again_params, cn_params)

    txt2img, t2i_params, result = recipes.train_txt2img(tmp_path, steps, scenes=16, progress=False)
    assert np.isfinite(result.final_loss) and txt2img.unet.in_channels == 4
    plain, plain_params = FlaxStableDiffusionPipeline.from_pretrained(tmp_path / "tiny-shapes-txt2img")
    assert plain.unet.in_channels == 4 and plain.config["_class_name"] == "StableDiffusionPipeline"
    for name in ("unet", "text_encoder", "vae"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, plain_params[name], t2i_params[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain_params["text_encoder"], params["text_encoder"])


@pytest.fixture(scope="module")
def tiny_unet():
    """The 9-channel TINY_UNET with random params drawn on the host (N(0, 1 / fan_in)): the two tests below
    hold for any weights, and `init_weights` would compile a ~1100-kernel program (~20 s of CPU) per call
    just to draw them."""
    unet = FlaxUNet2DConditionModel.from_config(TINY_UNET)
    rng = np.random.default_rng(0)
    flat = {path: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
            for path, s in unet.param_shapes().items()}
    return unet, flax.traverse_util.unflatten_dict(flat)


def test_txt2img_unet_starts_as_the_inpainting_unet_on_its_latent_channels(tiny_unet):
    """unet_from_inpaint drops conv_in's mask and masked-image rows: on inputs whose extra channels
    are zero the two UNets agree exactly."""
    unet, params = tiny_unet
    plain, plain_params = recipes.unet_from_inpaint(unet, params)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    context = jax.random.normal(jax.random.key(2), (2, 5, TINY_UNET["cross_attention_dim"]))
    t = jnp.array([10, 900])
    ref = unet.apply({"params": params}, jnp.concatenate([x, jnp.zeros((2, 16, 16, 5))], -1), t, context,
                     method=unet.nhwc)
    ours = plain.apply({"params": plain_params}, x, t, context, method=plain.nhwc)
    assert plain.in_channels == 4
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)  # the dropped rows multiplied zeros


def test_controlnet_starts_as_the_unets_encoder_and_changes_nothing(tiny_unet):
    """Copied encoder (conv_in restricted to the latent channels) and zero convolutions: a fresh
    ControlNet's residuals are all zero, so the UNet's prediction is unchanged."""
    unet, unet_params = tiny_unet
    net, params = controlnet_from_unet(unet, unet_params, RECIPE_EMBEDDING, jax.random.key(1))
    np.testing.assert_array_equal(params["conv_in"]["kernel"], unet_params["conv_in"]["kernel"][:, :, :4])
    np.testing.assert_array_equal(params["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"],
                                  unet_params["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"])
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
    context = jax.random.normal(jax.random.key(3), (2, 16, TINY_UNET["cross_attention_dim"]))
    down, mid = net.apply({"params": params}, x, jnp.array([5, 900]), context, jnp.ones((2, 64, 64, 3)),
                          method=net.nhwc)
    assert all(not np.any(d) for d in down) and not np.any(mid)
