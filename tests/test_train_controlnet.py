"""ControlNet training (`flax-inpaint train-controlnet`): one step against diffusers' train_controlnet.py
computed in PyTorch, gradient accumulation, remat, bf16, the lr schedules against diffusers', the data
sources, a real SIGKILL and resume, 2 processes x 2 devices against 1 x 4, and the output folder in
diffusers and in our pipeline.

Tiny random models (tests/tiny_sd.py): VAE factor 4, so 32 px images give the UNet's 8x8 latents.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flax_inpaint.io import read_safetensors
from flax_inpaint.models.conversion import to_torch_state_dict
from flax_inpaint.models.controlnet import FlaxControlNetModel
from flax_inpaint.pipelines.loading import load_components
from flax_inpaint.schedulers.common import make_alphas_cumprod
from flax_inpaint.train import controlnet as tc
from flax_inpaint.train import dataset as ds
from flax_inpaint.train.loop import TrainState
from tests import tiny_sd

SIZE = 32  # pixels: the tiny VAE's factor 4 gives the tiny UNet's 8x8 latents
BATCH = 4  # examples in the one-step tests' batch: the accumulation test's large batch (2 micro-batches of 2)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


def _base_model(tmp: Path, in_channels: int) -> Path:
    """A tiny SD folder whose VAE posterior has real variance (tiny_sd's is made negligible), so the
    posterior's sampling noise matters in the step."""
    folder, pipe = tiny_sd.make_pipeline(tmp, in_channels=in_channels, scheduler="ddim")
    with torch.no_grad():
        torch.manual_seed(1)
        pipe.vae.quant_conv.reset_parameters()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_controlnet_models")
    base4, base9 = _base_model(tmp, 4), _base_model(tmp, 9)
    tiny_sd.make_controlnet(seed=3).save_pretrained(tmp / "controlnet", safe_serialization=True)
    return {"base4": base4, "base9": base9, "controlnet": tmp / "controlnet"}


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    return ds.make_example_dataset(tmp_path_factory.mktemp("fill") / "data", num_examples=24, resolution=SIZE)


def _batch(tokenizer, n: int, seed: int = 0, masks: bool = False):
    rng = np.random.default_rng(seed)
    captions = ["a red cat", "a cat on a mat", "", "red"] * n
    batch = {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "conditioning_image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "input_ids": tokenizer(captions[:n], max_length=tokenizer.model_max_length, padding="max_length",
                               truncation=True, return_tensors="np").input_ids.astype(np.int32),
        "position": np.arange(n, dtype=np.int32) + 1000 * seed,
    }
    if masks:
        batch["mask"] = np.stack([ds.box_or_whole_mask(rng, SIZE, 0.3) for _ in range(n)])
    return batch


def _setup(folder: Path, controlnet_folder: Path, prediction_type="epsilon", snr_gamma=None, dtype=jnp.float32):
    """Models, ControlNet params, frozen arrays and tokenizer. The ControlNet's params stay float32
    (master weights) below float64."""
    comps, params, _ = load_components(folder, dtype=dtype, param_dtype=dtype)
    net, net_params = FlaxControlNetModel.from_pretrained(controlnet_folder, dtype=dtype,
                                                          param_dtype=jnp.promote_types(dtype, jnp.float32))
    models = tc.Models(comps["unet"], comps["vae"], comps["text_encoder"], net, prediction_type, snr_gamma)
    frozen = {k: params[k] for k in ("unet", "vae", "text_encoder")}
    frozen["alphas_cumprod"] = make_alphas_cumprod(comps["scheduler"])
    return models, net_params, frozen, comps["tokenizer"]


def _draws(models, batch):
    return tc.draw(7, jnp.asarray(batch["position"]), (SIZE // 4, SIZE // 4, 4), 1000)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(models, params, frozen, batch, draws):
    """The loss and the ControlNet's gradients, jitted once per (models, shapes): the fp32 base4 epsilon
    program on a batch of BATCH is compiled once for the one-step, accumulation and bf16 tests."""
    return jax.value_and_grad(functools.partial(tc.controlnet_loss, models))(params, frozen, batch, draws)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- one step vs PyTorch


def _torch_step(models_dir, base: str, batch, draws, prediction_type, snr_gamma):
    """diffusers' train_controlnet.py step on the same batch with our draws: frozen VAE / text
    encoder / UNet, trainable ControlNet; returns (loss, {param name: grad})."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel

    folder = models_dir[base]
    vae = AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False)
    controlnet = ControlNetModel.from_pretrained(models_dir["controlnet"]).train()
    noise_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", prediction_type=prediction_type)

    def nchw(x):
        return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()

    pixel_values = (nchw(batch["image"]).float() / 255 - 0.5) / 0.5  # ToTensor, Normalize([0.5], [0.5])
    conditioning = nchw(batch["conditioning_image"]).float() / 255  # ToTensor

    def encode(pixels, eps):
        dist = vae.encode(pixels).latent_dist
        return (dist.mean + dist.std * eps) * vae.config.scaling_factor  # latent_dist.sample() with our eps

    latents = encode(pixel_values, nchw(draws.latents))
    noise = nchw(draws.noise)
    timesteps = torch.from_numpy(np.asarray(draws.timesteps)).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(torch.from_numpy(batch["input_ids"]).long())[0]
    down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                           controlnet_cond=conditioning, return_dict=False)
    unet_in = noisy_latents
    if unet.config.in_channels == 9:  # the inpainting UNet's extra channels, as the pipeline builds them
        mask = torch.from_numpy(batch["mask"]).float()[:, None]
        masked = encode(pixel_values * (mask < 0.5), nchw(draws.masked_latents))
        unet_in = torch.cat([noisy_latents, mask[:, :, ::4, ::4], masked], dim=1)
    model_pred = unet(unet_in, timesteps, encoder_hidden_states=encoder_hidden_states,
                      down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    if prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    if snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:  # diffusers' train_text_to_image.py min-SNR weighting
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * weights
        loss = loss.mean()
    loss.backward()
    return float(loss), {name: p.grad.numpy() for name, p in controlnet.named_parameters()}


@pytest.mark.parametrize("base,prediction_type,snr_gamma", [
    ("base4", "epsilon", None), ("base4", "v_prediction", 5.0), ("base9", "epsilon", 2.0),
])
def test_one_step_equals_diffusers_train_controlnet_in_pytorch(models_dir, base, prediction_type, snr_gamma):
    models, params, frozen, tokenizer = _setup(models_dir[base], models_dir["controlnet"], prediction_type, snr_gamma)
    batch = _batch(tokenizer, BATCH, masks=base == "base9")
    draws = _draws(models, batch)
    assert len(set(np.asarray(draws.timesteps).tolist())) == BATCH
    loss, grads = _loss_and_grads(models, params, frozen, batch, draws)
    ref_loss, ref_grads = _torch_step(models_dir, base, batch, draws, prediction_type, snr_gamma)

    # fp32 on both sides; the loss is a mean of ~1e3 squared errors, each a few ulps apart
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    ours = to_torch_state_dict(jax.device_get(grads))
    assert set(ours) == set(ref_grads)
    # Per tensor, relative to its norm: each gradient sums over the batch and the whole UNet's backward
    # pass, where float32 reassociation costs up to ~1e-5.
    errors = {k: _rel(ours[k], g) for k, g in ref_grads.items() if np.linalg.norm(g) > 0}
    assert len(errors) == len(ref_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


# ----------------------------------------------------------------------------- accumulation, remat, bf16


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(models_dir):
    models, params, frozen, tokenizer = _setup(models_dir["base4"], models_dir["controlnet"])
    big = _batch(tokenizer, BATCH)
    k = 2
    # The large batch's loss and gradient with the draws train_step makes (seed 7), by the one-step tests' program.
    big_loss, grad = _loss_and_grads(models, params, frozen, big, _draws(models, big))

    # An optimiser that keeps the gradient it is given as its state (and leaves the params alone):
    # the gradients themselves are compared, not params minus gradients rounded to the params' ulps.
    keep = optax.GradientTransformation(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                                        lambda g, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, g), g))
    optimizer = optax.MultiSteps(keep, k)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    step = jax.jit(functools.partial(tc.train_step, models, optimizer, 7))
    losses = []
    for i in range(k):  # rows 0,2 / 1,3
        state, loss = step(state, frozen, {key: v[i::k] for key, v in big.items()})
        losses.append(float(loss))
    accumulated = state.opt_state
    assert int(accumulated.gradient_step) == 1  # the mean gradient was applied once, after k micro-batches
    assert abs(np.mean(losses) - float(big_loss)) <= 1e-5 * float(big_loss)
    pairs = zip(jax.tree_util.tree_leaves(accumulated.inner_opt_state), jax.tree_util.tree_leaves(grad))
    errors = [_rel(a, b) for a, b in pairs if np.any(b)]
    assert errors and max(errors) <= 1e-5


@contextlib.contextmanager
def _float64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def test_gradient_checkpointing_remats_the_blocks_and_changes_nothing(models_dir):
    """Compared in float64: in float32 the gradients of this UNet already differ by up to 2.6e-6 per
    tensor between two compilations of the same function (jit vs eager, measured), because remat's
    recomputation is fused differently and float32 sums over the batch and the image reassociate. In
    float64 that floor is ~1e-15, so what remains is whatever remat changes in the computation."""
    grads = {}
    with _float64():
        models, params, frozen, tokenizer = _setup(models_dir["base4"], models_dir["controlnet"], dtype=jnp.float64)
        batch = _batch(tokenizer, 2)
        args = (params, frozen, batch, _draws(models, batch))
        for remat in (False, True):
            models = dataclasses.replace(models, unet=tc._with_runtime(models.unet, remat=remat),
                                         controlnet=tc._with_runtime(models.controlnet, remat=remat))
            traced = jax.jit(jax.value_and_grad(functools.partial(tc.controlnet_loss, models))).trace(*args)
            assert ("remat" in str(traced.jaxpr)) == remat
            grads[remat] = jax.device_get(traced.lower().compile()(*args))
    (loss, g), (loss_remat, g_remat) = grads[False], grads[True]
    assert all(x.dtype == np.float64 for x in jax.tree_util.tree_leaves(g))
    assert abs(float(loss_remat) - float(loss)) <= 1e-6 * abs(float(loss))
    assert max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g))
               if np.any(b)) <= 1e-6


def test_bf16_loss_is_within_1e_2_of_fp32(models_dir):
    models, params, frozen, tokenizer = _setup(models_dir["base4"], models_dir["controlnet"])
    batch = _batch(tokenizer, BATCH)
    draws = _draws(models, batch)
    fp32 = float(_loss_and_grads(models, params, frozen, batch, draws)[0])  # the one-step tests' program
    models, params, frozen, _ = _setup(models_dir["base4"], models_dir["controlnet"], dtype=jnp.bfloat16)
    # what --mixed_precision bf16 does: bf16 compute and frozen weights
    frozen = {k: tc._cast(v, jnp.bfloat16) if k != "alphas_cumprod" else v for k, v in frozen.items()}
    assert models.unet.runtime.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))  # fp32 master weights
    bf16 = float(jax.jit(functools.partial(tc.controlnet_loss, models))(params, frozen, batch, draws))
    assert abs(bf16 - fp32) <= 1e-2 * fp32


# ----------------------------------------------------------------------------- lr schedules


@pytest.mark.parametrize("name", tc.LR_SCHEDULERS)
def test_lr_schedules_equal_diffusers_get_scheduler(name):
    from diffusers.optimization import get_scheduler

    lr, warmup, total = 1e-3, 5, 30
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=3, power=2.0)
    expected = []
    for _ in range(total + 3):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = tc.lr_schedule(name, lr, warmup, total, num_cycles=3, power=2.0)
    got = [float(ours(step)) for step in range(total + 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-10)  # float32 schedule vs Python floats


# ----------------------------------------------------------------------------- data


def test_data_sources_give_the_same_rows(tmp_path, example_data):
    """The example folder (path columns), an imagefolder (file_name columns), a JSONL file elsewhere and
    a `datasets` save_to_disk folder read the same examples."""
    rows = ds.open_rows(train_data_dir=str(example_data))
    assert len(rows) == 24 and rows.column_names == ["text", "image", "conditioning_image"]
    imagefolder = tmp_path / "imagefolder"
    imagefolder.mkdir()
    lines = []
    for i in range(4):
        Image.open(example_data / rows[i]["image"]).save(imagefolder / f"{i}.png")
        Image.open(example_data / rows[i]["conditioning_image"]).save(imagefolder / f"c{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"c{i}.png",
                                 "text": rows[i]["text"]}))
    (imagefolder / "metadata.jsonl").write_text("\n".join(lines))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({**rows[i], "image": str(example_data / rows[i]["image"]),
                                           "conditioning_image": str(example_data / rows[i]["conditioning_image"])})
                               for i in range(4)))
    import datasets  # the test extra installs it
    hf = datasets.Dataset.from_dict(
        {"image": [Image.open(example_data / rows[i]["image"]) for i in range(4)],
         "conditioning_image": [Image.open(example_data / rows[i]["conditioning_image"]) for i in range(4)],
         "text": [rows[i]["text"] for i in range(4)]},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "saved"))

    def examples(source):
        src = ds.open_rows(**source)
        ds.Columns().check(src)
        ex = ds.Examples(src, ds.Columns(), 16, seed=0)
        return [ex.example(p, p) for p in range(4)]

    reference = examples({"train_data_dir": str(example_data)})
    assert reference[0]["image"].shape == (16, 16, 3) and reference[0]["caption"] == rows[0]["text"]
    for source in ({"train_data_dir": str(imagefolder)}, {"train_data_dir": str(jsonl)},
                   {"dataset_name": str(tmp_path / "saved")}, {"train_data_dir": str(tmp_path / "saved")}):
        for a, b in zip(examples(source), reference):
            assert a["caption"] == b["caption"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["conditioning_image"], b["conditioning_image"])


def test_resize_crop_and_the_stream_order():
    wide = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8)[None, :, None], (30, 1, 3)))
    out = ds.resize_and_crop(wide, 10)  # 60x30 -> 20x10 (bilinear), then the centre 10x10
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out, np.asarray(wide.resize((20, 10), Image.BILINEAR))[:, 5:15])
    stream = ds.Stream(num_rows=10, global_batch=4, seed=0)  # 2 batches per epoch, 2 rows dropped
    first = stream.rows(np.arange(8))
    assert len(set(first.tolist())) == 8 and set(first) < set(range(10))
    assert not np.array_equal(stream.rows(np.arange(8, 16)), first)  # a new order each epoch
    rng = np.random.default_rng(0)
    masks = [ds.box_or_whole_mask(rng, 32, 0.5) for _ in range(2000)]
    whole = np.mean([m.all() for m in masks])  # binomial: 0.5 +- 0.011
    assert 0.45 < whole < 0.55 and all(set(np.unique(m)) <= {0, 1} for m in masks)


def test_empty_prompts_and_caption_lists_follow_the_seed(example_data):
    rows = ds.JsonRows([{"image": "images/0.png", "conditioning_image": "conditioning_images/0.png",
                         "text": ["one", "two"]}], example_data, "mem")
    ex = ds.Examples(rows, ds.Columns(), 8, seed=0, proportion_empty_prompts=0.3)
    captions = [ex.example(p, 0)["caption"] for p in range(200)]
    assert 0.2 < captions.count("") / 200 < 0.4 and {"one", "two"} < set(captions)
    assert captions == [ex.example(p, 0)["caption"] for p in range(200)]  # a function of (seed, position)
    other = ds.Examples(rows, ds.Columns(), 8, seed=1, proportion_empty_prompts=0.3)
    assert captions != [other.example(p, 0)["caption"] for p in range(200)]


def test_each_process_reads_only_its_rows_of_every_batch(example_data):
    read = []

    class Recording(ds.JsonRows):
        def __getitem__(self, index):
            read.append(index)
            return super().__getitem__(index)

    plain = ds.open_rows(train_data_dir=str(example_data))
    rows = Recording(plain.records, plain.base, plain.source)
    examples = ds.Examples(rows, ds.Columns(), 16, seed=0, whole_image_mask_proportion=0.5)
    stream = ds.Stream(len(rows), global_batch=8, seed=0)

    def tokenize(captions):
        return np.array([[len(c)] for c in captions], np.int32)

    full = ds.make_batches(examples, stream, tokenize, slice(None))(4)  # epoch 1, its second batch
    parts = []
    for p in range(2):
        read.clear()
        parts.append(ds.make_batches(examples, stream, tokenize, ds.shard_of_process(8, p, 2), workers=2)(4))
        assert sorted(read) == sorted(stream.rows(np.arange(32, 40)[p * 4:(p + 1) * 4]))
    for key, value in full.items():
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)
    assert full["image"].shape == (8, 16, 16, 3) and full["mask"].shape == (8, 16, 16)
    np.testing.assert_array_equal(full["position"], np.arange(32, 40))


def test_prefetcher_keeps_order_and_raises_the_threads_error():
    fetched = list(ds.Prefetcher(lambda step: {"x": np.array([step])}, lambda b: b["x"][0] * 10, 3, 7))
    assert fetched == [30, 40, 50, 60]

    def broken(step):
        if step == 2:
            raise ds.DataError("row 7 is unreadable")
        return step

    prefetch = ds.Prefetcher(broken, lambda b: b, 0, 5)
    assert [next(prefetch), next(prefetch)] == [0, 1]
    with pytest.raises(ds.DataError, match="row 7"):
        next(prefetch)
    prefetch.close()


def test_trackers_log_to_wandb_where_installed_and_fail_clearly_where_not(tmp_path, monkeypatch):
    import types

    from flax_inpaint.train import reporting

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", data, step)),
                                 Image=lambda image, caption: ("image", caption),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trackers = reporting.Trackers("wandb", tmp_path, "proj", {"lr": 1.0}, enabled=True)
    trackers.log({"loss": 0.5}, 3)
    image = Image.new("RGB", (4, 4))
    trackers.images([("a cat", image, [image, image])], 3)
    trackers.close()
    assert calls[0] == ("init", {"project": "proj", "config": {"lr": 1.0}})
    assert calls[1] == ("log", {"loss": 0.5}, 3)
    assert calls[2] == ("log", {"validation": [("image", "ControlNet conditioning"), ("image", "a cat"),
                                               ("image", "a cat")]}, 3)
    assert calls[3] == ("finish",)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="--report_to wandb needs wandb"):
        reporting.Trackers("wandb", tmp_path, "proj", {}, enabled=True)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ValueError, match="--report_to tensorboard needs tensorboardX"):
        reporting.Trackers.check("tensorboard")
    reporting.Trackers("all", tmp_path, "proj", {}, enabled=True).close()  # "all": those installed
    assert reporting.Trackers("wandb", tmp_path, "proj", {}, enabled=False).wandb is None  # not process 0


def _event_tags(folder: Path) -> set:
    """Tags of the TensorBoard event files in `folder` (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        at = 0
        while at < len(raw):
            length = int.from_bytes(raw[at:at + 8], "little")
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + length + 4
    return tags


# ----------------------------------------------------------------------------- the command


def _argv(models_dir, data, out, *extra, base="base4"):
    return ["--pretrained_model_name_or_path", str(models_dir[base]), "--train_data_dir", str(data),
            "--output_dir", str(out), "--resolution", str(SIZE), "--train_batch_size", "1", "--learning_rate", "1e-3",
            "--seed", "5", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent compilation cache for this file's commands: a program that several runs compile alike
    (the new ControlNet's init; the uninterrupted run's step again in the killed and in the resumed run) is
    compiled once. The same program runs either way; only the compile time is saved. (The processes of a
    2-process run cannot share theirs: on CPU each process's device topology enters the cache key.)"""
    return tmp_path_factory.mktemp("xla_cache")


def _env(devices: int, cache: Path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if "device_count" not in f] + [f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = str(REPO)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    return env


def _cmd(*argv):
    return [sys.executable, "-m", "flax_inpaint.train.controlnet", *argv]


def _params(folder: Path):
    return read_safetensors(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(models_dir, example_data, xla_cache, tmp_path_factory):
    """8 steps, 2 micro-batches each, on 4 devices, with validation and TensorBoard (in a subprocess
    with 4 fake devices, like the interrupted runs)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    argv = _argv(models_dir, example_data, out, "--max_train_steps", "8", "--gradient_accumulation_steps", "2",
                 "--checkpointing_steps", "3", "--checkpoints_total_limit", "2", "--validation_steps", "8",
                 "--validation_prompt", "a red cat", "--validation_image",
                 str(example_data / "conditioning_images" / "0.png"), "--num_validation_images", "2")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    done = subprocess.run(_cmd(*argv), env=_env(4, xla_cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_the_command_writes_a_controlnet_that_diffusers_and_our_pipeline_load(uninterrupted, models_dir):
    from diffusers import ControlNetModel

    out, done = uninterrupted
    assert "after 8 steps" in done.stdout
    assert "img_s=" in done.stderr and "step_s=" in done.stderr and "loss=" in done.stderr  # the progress bar
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]  # limit 2
    assert len(list((out / "validation" / "step-8").glob("0_*.png"))) == 3  # control + 2 images
    assert {"loss", "lr", "a_red_cat"} <= _event_tags(out / "logs")  # per step; images (tag sanitised)

    torch_net = ControlNetModel.from_pretrained(out).eval()
    net, params = FlaxControlNetModel.from_pretrained(out)
    trained = _params(out)
    rng = np.random.default_rng(0)
    x, cond = rng.normal(size=(1, 4, 8, 8)).astype(np.float32), rng.random((1, 3, 32, 32)).astype(np.float32)
    ctx = rng.normal(size=(1, 5, 32)).astype(np.float32)
    with torch.no_grad():
        ref = torch_net(torch.from_numpy(x), 500, torch.from_numpy(ctx), torch.from_numpy(cond), return_dict=False)
    ours = net.apply({"params": params}, x, 500, ctx, cond)
    for a, b in zip([*ours.down_block_res_samples, ours.mid_block_res_sample], [*ref[0], ref[1]]):
        assert _rel(a, b.numpy()) <= 1e-5
    assert trained.keys() == to_torch_state_dict(params).keys()

    from flax_inpaint import FlaxStableDiffusionControlNetPipeline

    pipe, pipe_params = FlaxStableDiffusionControlNetPipeline.from_pretrained(models_dir["base4"], controlnet=str(out),
                                                                              safety_checker=None)
    ids = pipe.prepare_text_inputs(["a red cat"])
    image = pipe(ids, pipe.prepare_image_inputs(Image.new("RGB", (32, 32))), pipe_params, jax.random.key(0),
                 num_inference_steps=2).images
    assert image.shape[-3:] == (32, 32, 3) and np.isfinite(image).all()


def test_sigkill_and_resume_end_with_the_same_params(uninterrupted, models_dir, example_data, xla_cache, tmp_path):
    out = tmp_path / "out"
    argv = _argv(models_dir, example_data, out, "--max_train_steps", "8", "--gradient_accumulation_steps", "2",
                 "--checkpointing_steps", "1")
    proc = subprocess.Popen(_cmd(*argv), env=_env(4, xla_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-3").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "config.json").exists()  # it was stopped before the end
    steps = [n for n, _ in tc.list_checkpoints(out)]
    assert 3 <= steps[-1] < 8
    resumed = subprocess.run(_cmd(*argv, "--resume_from_checkpoint", "latest"), env=_env(4, xla_cache),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out / f'checkpoint-{steps[-1]}'}" in resumed.stderr
    expected, got = _params(uninterrupted[0]), _params(out)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)  # same program, same inputs: bit-identical


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_train_like_one_of_four(models_dir, example_data, xla_cache, tmp_path):
    # adam_epsilon 1e-2: with 1e-8, Adam's m / sqrt(v) is the sign of a near-zero gradient, so the last-ulp
    # differences of the two all-reduce orders (below) become +-lr steps in a few of the 160k elements
    # (measured: 23 off by more than 1e-5 relative). With 1e-2 the update is ~ lr * g / eps and they stay ulps.
    base = ["--max_train_steps", "3", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "100",
            "--adam_epsilon", "1e-2"]
    validation = ["--validation_steps", "3", "--validation_prompt", "a red cat", "--validation_image",
                  str(example_data / "conditioning_images" / "0.png"), "--num_validation_images", "1"]
    single = subprocess.Popen(_cmd(*_argv(models_dir, example_data, tmp_path / "one", *base, *validation,
                                          base="base9")),
                              env=_env(4, xla_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = _free_port()
    procs = [subprocess.Popen(_cmd(*_argv(models_dir, example_data, tmp_path / "two", *base, base="base9"),
                                   "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                                   "--process_id", str(i)),
                              env=_env(2, xla_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in [single, *procs]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = _params(tmp_path / "one"), _params(tmp_path / "two")
    # The same global batches and draws; only the gradient all-reduce differs (XLA's in one process, gloo's
    # across two), which reorders float32 sums (measured: 2e-10 relative over all params).
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert len(list((tmp_path / "one" / "validation" / "step-3").glob("0_*.png"))) == 2  # the inpaint pipeline's


def test_bad_inputs_are_one_line_errors(models_dir, example_data, tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            tc.main(list(argv))
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    common = _argv(models_dir, example_data, tmp_path / "o")
    assert "--image_column 'photo' is not a column" in error(*common, "--image_column", "photo")
    assert "--train_data_dir" in error(*_argv(models_dir, tmp_path / "missing", tmp_path / "o"))
    assert "--resolution 30 must be a multiple" in error(*common, "--resolution", "30")
    assert "fewer than one step's batch" in error(*common, "--train_batch_size", "4")
    assert "--validation_prompt and --validation_image go together" in error(*common, "--validation_prompt", "x")
    assert "is not a checkpoint folder" in error(*common, "--resume_from_checkpoint", str(tmp_path))
    assert "--mixed_precision" in error(*common, "--mixed_precision", "fp16")


def test_cli_subcommand_and_example_dataset(tmp_path, capsys):
    from flax_inpaint import cli

    cli.main(["train-controlnet", "--make-example-dataset", str(tmp_path / "fill"), "--num_examples", "5"])
    assert "wrote 5 examples" in capsys.readouterr().out
    rows = ds.open_rows(train_data_dir=str(tmp_path / "fill"))
    first = rows[0]
    image = np.asarray(Image.open(tmp_path / "fill" / first["image"]))
    outline = np.asarray(Image.open(tmp_path / "fill" / first["conditioning_image"]))
    assert image.shape == outline.shape == (64, 64, 3) and first["text"].split()[2] == "circle"
    assert outline.min() == 0 and outline.max() == 255  # a white outline on black
