"""Per-step hooks against diffusers' PyTorch StableDiffusionInpaintPipeline / StableDiffusionPipeline.

`callback_on_step_end` (dynamic CFG, latent edits), `guidance_rescale` and custom `timesteps=` / `sigmas=`
run in both on tiny random models with the same noise; images must agree within 1e-3 max abs (fp32,
values in [0, 1]), the tolerance of the plain pipeline tests. Host callbacks are counted under the four
execution paths (one device, per-prompt keys, pmap over 8 fake devices, a mesh of 8): one call per step.
"""
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from flax.training.common_utils import shard
from jax.sharding import Mesh

import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline, FlaxStableDiffusionPipeline
from flax_inpaint.pipelines import callbacks, sampling
from flax_inpaint.pipelines.inputs import build
from flax_inpaint.pipelines.loading import scheduler_class

ATOL = 1e-3
STEPS = 5
CUTOFF = int(STEPS * 0.4)  # diffusers' dynamic-CFG example switches guidance off at 40% of the steps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    return {c: tiny_sd.make_pipeline(root, in_channels=c) for c in (9, 4)}


@pytest.fixture(scope="module")
def loaded(models):
    return tiny_sd.flax_loader(models)


def noise_for(in_channels: int) -> np.ndarray:
    """The initial noise diffusers draws from Generator().manual_seed(0) at strength 1 (after the image's
    posterior sample for a 4-channel UNet)."""
    g = torch.Generator().manual_seed(0)
    if in_channels == 4:
        torch.randn((1, 4, 8, 8), generator=g)
    return torch.randn((1, 4, 8, 8), generator=g).numpy()


def run_both(models, loaded, in_channels, scheduler, torch_kwargs=None, our_kwargs=None, steps=STEPS):
    _, torch_pipe = models[in_channels]
    cls, extra = tiny_sd.SCHEDULERS[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    pipe, params = loaded(in_channels, scheduler)
    image, mask = tiny_sd.sample_image_and_mask()
    common = dict(height=32, width=32, guidance_scale=7.5, output_type="np")
    tk, ok = dict(torch_kwargs or {}), dict(our_kwargs or {})
    if "timesteps" not in tk and "sigmas" not in tk:
        tk["num_inference_steps"] = ok["num_inference_steps"] = steps
    with torch.no_grad():
        ref = torch_pipe("a red cat", image=image, mask_image=mask, negative_prompt="blurry",
                         generator=torch.Generator().manual_seed(0), **common, **tk).images
    ours = pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), negative_prompt="blurry",
                        latents=noise_for(in_channels), **common, **ok).images
    return np.asarray(ref, np.float32), np.asarray(ours, np.float32)


# ----------------------------------------------------------------------------- callback_on_step_end

def torch_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    """diffusers' documented dynamic-CFG callback, for the inpaint pipeline (whose doubled mask and masked
    image latents must be halved with the prompt embeddings)."""
    if step_index == CUTOFF:
        for k in ("prompt_embeds", "mask", "masked_image_latents"):
            callback_kwargs[k] = callback_kwargs[k].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return callback_kwargs


def jax_dynamic_cfg(pipe, step, timestep, tensors):
    """The same in the compiled loop: shapes stay, guidance <= 1 takes the text prediction alone."""
    return {"guidance_scale": jnp.where(step >= CUTOFF, 0.0, tensors["guidance_scale"])}


def test_step_end_dynamic_cfg_matches_diffusers(models, loaded):
    ref, ours = run_both(
        models, loaded, 9, "pndm",
        dict(callback_on_step_end=torch_dynamic_cfg,
             callback_on_step_end_tensor_inputs=["prompt_embeds", "mask", "masked_image_latents"]),
        dict(callback_on_step_end=jax_dynamic_cfg, callback_on_step_end_tensor_inputs=["guidance_scale"]))
    _, plain = run_both(models, loaded, 9, "pndm")
    assert ref.std() > 0.02
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert np.abs(ours - plain).max() > 10 * ATOL  # the callback changed the image


def test_step_end_edits_latents_matches_diffusers(models, loaded):
    """A latent edit after every step (clamp and shrink), on the 4-channel UNet with blending."""
    def torch_edit(pipe, i, t, kw):
        return {"latents": torch.clamp(kw["latents"] * 0.9, -1.5, 1.5)}

    def jax_edit(pipe, i, t, kw):
        return {"latents": jnp.clip(kw["latents"] * 0.9, -1.5, 1.5)}

    ref, ours = run_both(models, loaded, 4, "euler", dict(callback_on_step_end=torch_edit),
                         dict(callback_on_step_end=jax_edit))
    _, plain = run_both(models, loaded, 4, "euler")
    assert ref.std() > 0.02
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert np.abs(ours - plain).max() > 10 * ATOL


def test_step_end_sees_diffusers_tensors(loaded):
    """Names, shapes and the step / timestep a callback gets (pipeline first, like diffusers)."""
    pipe, params = loaded(9, "pndm")
    seen = {}

    def spy(p, step, t, tensors):
        seen.update(pipeline=p, names=sorted(tensors), shapes={k: v.shape for k, v in tensors.items()})
        jax.debug.callback(lambda s, tt: seen.setdefault("steps", []).append((int(s), float(tt))), step, t)
        return {}

    image, mask = tiny_sd.sample_image_and_mask()
    pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), height=32, width=32, num_inference_steps=3,
                 callback_on_step_end=spy, callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs))
    assert seen["pipeline"] is pipe
    assert seen["names"] == sorted(callbacks.INPAINT_TENSOR_INPUTS)
    assert seen["shapes"] == {"latents": (1, 8, 8, 4), "prompt_embeds": (2, 16, 32),
                              "negative_prompt_embeds": (1, 16, 32), "mask": (2, 8, 8, 1),
                              "masked_image_latents": (2, 8, 8, 4)}
    state = pipe.scheduler.set_timesteps(params["scheduler"], 3, (1, 8, 8, 4))
    assert seen["steps"] == [(i, float(t)) for i, t in enumerate(np.asarray(state.timesteps))]


def test_step_end_errors(loaded):
    pipe, params = loaded(9, "pndm")
    image, mask = tiny_sd.sample_image_and_mask()
    call = lambda **kw: pipe.inpaint("a", image, mask, params, jax.random.key(0), height=32, width=32,  # noqa: E731
                                     num_inference_steps=2, **kw)
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` has to be in .*but found \['noise'\]"):
        call(callback_on_step_end=jax_dynamic_cfg, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="returned latents of shape .* must keep the shape"):
        call(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"][:, :4]})
    with pytest.raises(ValueError, match=r"returned \['eta'\]"):
        call(callback_on_step_end=lambda p, i, t, kw: {"eta": 1.0})
    with pytest.raises(ValueError, match="`callback_steps` has to be a positive integer but is 0"):
        call(callback=print, callback_steps=0)


def test_step_end_values_do_not_recompile(loaded):
    """The same callback with other prompts / guidance (so other returned values) reuses the program (the
    call of test_step_end_dynamic_cfg_matches_diffusers, whose program this file has compiled already)."""
    pipe, params = loaded(9, "pndm")
    image, mask = tiny_sd.sample_image_and_mask()
    kw = dict(height=32, width=32, num_inference_steps=STEPS, latents=noise_for(9), output_type="np",
              callback_on_step_end=jax_dynamic_cfg, callback_on_step_end_tensor_inputs=["guidance_scale"])
    pipe.inpaint("a", image, mask, params, jax.random.key(0), guidance_scale=5.0, **kw)
    with tiny_sd.count_compiles("generate") as compiles:
        pipe.inpaint("a blue dog", image, mask, params, jax.random.key(1), guidance_scale=9.0, **kw)
    assert compiles == []


# ----------------------------------------------------------------------------- host callbacks

@pytest.fixture(scope="module")
def batch8(loaded):
    """An 8-prompt inpaint batch for the execution-path tests."""
    pipe, params = loaded(9, "pndm")
    image, mask = tiny_sd.sample_image_and_mask()
    ids, masked, masks = pipe.prepare_inputs(["a red cat"] * 8, [image] * 8, [mask] * 8)
    return pipe, params, ids, masked, masks


def run_path(batch8, path: str, **kw):
    pipe, params, ids, masked, masks = batch8
    common = dict(num_inference_steps=3, guidance_scale=7.5, **kw)
    if path == "pmap":
        keys = jax.random.split(jax.random.key(0), 8)
        return pipe(shard(ids), shard(masks), shard(masked), tiny_sd.replicated(params), keys, jit=True,
                    **common).images
    key = jax.random.split(jax.random.key(0), 8) if path == "per-prompt" else jax.random.key(0)
    mesh = Mesh(np.array(jax.devices()), ("data",)) if path == "mesh" else None
    return pipe(ids, masks, masked, params, key, mesh=mesh, **common).images


@pytest.mark.parametrize("path", ["single", "per-prompt", "pmap", "mesh"])
def test_host_callbacks_once_per_step(batch8, path):
    """`callback` (every callback_steps, with the whole batch's latents) and the progress bar see every
    loop step exactly once, whether the program runs on one device, per prompt, per device or on a mesh;
    the latents they get are the loop's (checked against output_type="latent" at the last step). PNDM's 3
    steps are 4 loop iterations, as in diffusers (whose `callback` also sees i = 0..3)."""
    got, ticks = [], []
    progress = callbacks.HostCallback(lambda s, t, x: ticks.append(s), latents=False)
    images = run_path(batch8, path, callback=lambda s, t, x: got.append((s, t, x.copy())), callback_steps=3,
                      host_callbacks=[progress], output_type="latent")
    assert sorted(ticks) == [0, 1, 2, 3]
    assert [s for s, _, _ in sorted(got, key=lambda g: g[0])] == [0, 3]
    last = max(got, key=lambda g: g[0])[2]
    assert last.shape == (8, 4, 8, 8)
    np.testing.assert_allclose(last, np.asarray(images).reshape(8, 4, 8, 8), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["pmap", "mesh"])
def test_step_end_dynamic_cfg_matches_diffusers_on_8_devices(models, batch8, path):
    """The dynamic-CFG callback in the program split over 8 (fake) devices, per device under the pmap
    convention and on a mesh: every image agrees with diffusers' (one prompt, its initial noise for all 8),
    and a host callback beside it still sees each loop step once (PNDM's 3 steps: 4 iterations)."""
    _, torch_pipe = models[9]
    cls, extra = tiny_sd.SCHEDULERS["pndm"]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    image, mask = tiny_sd.sample_image_and_mask()
    with torch.no_grad():
        ref = torch_pipe("a red cat", image=image, mask_image=mask, negative_prompt="blurry", height=32, width=32,
                         guidance_scale=7.5, num_inference_steps=3, output_type="np",
                         generator=torch.Generator().manual_seed(0), callback_on_step_end=torch_dynamic_cfg,
                         callback_on_step_end_tensor_inputs=["prompt_embeds", "mask", "masked_image_latents"]).images
    pipe = batch8[0]
    latents, neg = np.repeat(noise_for(9), 8, axis=0), pipe.tokenize(["blurry"] * 8)
    if path == "pmap":
        latents, neg = shard(latents), shard(neg)
    ticks = []
    ours = run_path(batch8, path, latents=latents, neg_prompt_ids=neg, callback_on_step_end=jax_dynamic_cfg,
                    callback_on_step_end_tensor_inputs=["guidance_scale"],
                    host_callbacks=[callbacks.HostCallback(lambda s, t, x: ticks.append(s), latents=False)])
    ours = np.asarray(ours, np.float32).reshape(8, 32, 32, 3)
    assert ref.std() > 0.02 and sorted(ticks) == [0, 1, 2, 3]
    np.testing.assert_allclose(ours, np.broadcast_to(ref, ours.shape), atol=ATOL, rtol=0)


def test_progress_bar_counts_steps(batch8, capsys):
    pipe = batch8[0]
    pipe.set_progress_bar_config(desc="denoise", ncols=60)
    try:
        run_path(batch8, "single", progress=True)
    finally:
        pipe.set_progress_bar_config()
    err = capsys.readouterr().err
    assert "denoise: 100%" in err and "4/4" in err  # PNDM: 3 steps, 4 loop iterations


def test_early_stop_after_k_steps(batch8):
    """A StopFlag set by a host callback at step 1 ends the loop after that step: no later step reaches the
    host, and the result is the step-1 estimate, not the finished image. With the flag never set, the
    while loop gives the fori_loop's images."""
    stop, seen = callbacks.StopFlag(), []

    def watch(step, t, latents):
        seen.append(step)
        if step == 1:
            stop.set()

    watcher = callbacks.HostCallback(watch, latents=False)
    stopped = np.asarray(run_path(batch8, "single", stop=stop, host_callbacks=[watcher]))
    assert sorted(seen) == [0, 1]
    full = np.asarray(run_path(batch8, "single"))
    assert np.isfinite(stopped).all() and np.abs(stopped - full).max() > 1e-2
    stop.clear()
    unstopped = np.asarray(run_path(batch8, "single", stop=stop))
    np.testing.assert_allclose(unstopped, full, atol=1e-6, rtol=0)


def test_stop_from_another_thread(batch8):
    stop, seen = callbacks.StopFlag(), []
    gate = threading.Event()

    def watch(step, t, latents):
        seen.append(step)
        if step == 0:
            threading.Thread(target=lambda: (stop.set(), gate.set())).start()
            gate.wait(5)

    run_path(batch8, "single", stop=stop, host_callbacks=[callbacks.HostCallback(watch, latents=False)])
    assert sorted(seen) == [0]


@pytest.mark.parametrize("path", ["single", "per-prompt", "mesh"])
def test_vae_previews_every_k_steps(batch8, tmp_path, path):
    """Decoded host callbacks get the VAE's images of the whole batch on their steps only (PNDM's 3 steps:
    loop steps 0-3), the last being the call's images (the same decoder on the same latents: 1e-5, fp32
    kernels fused otherwise); PreviewWriter(vae=True) writes them at full size every 2 steps."""
    got = []
    decoded = callbacks.HostCallback(lambda s, t, x: got.append((s, x.copy())), every=3, decoded=True)
    writer = callbacks.PreviewWriter(tmp_path, every=2, vae=True)
    images = np.asarray(run_path(batch8, path, host_callbacks=[decoded, writer.host_callback()]))
    assert [s for s, _ in sorted(got, key=lambda g: g[0])] == [0, 3]
    np.testing.assert_allclose(max(got, key=lambda g: g[0])[1], images.reshape(8, 32, 32, 3), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{k:03d}-step{s:03d}.png" for k in range(8) for s in (0, 2)]
    from PIL import Image

    assert Image.open(writer.written[0]).size == (32, 32)


def test_vae_decodes_only_on_its_steps(batch8, monkeypatch):
    """The program runs the decoder only on the steps a decoded callback wants (a lax.cond), not on every
    step: with k = 2 over PNDM's loop steps 0-3 it decodes at steps 0 and 2, plus the final decode."""
    pipe, params, ids, masked, masks = batch8
    runs, seen = [], []
    real = sampling.decode_latents

    def counted(vae, p, x):
        jax.debug.callback(lambda: runs.append(1))
        return real(vae, p, x)

    monkeypatch.setattr(sampling, "decode_latents", counted)
    call = build(pipe, False, prompt_ids=ids, neg_prompt_ids=ids, mask=masks, masked_image=masked,
                 num_inference_steps=3, guidance_scale=7.5, inpainting=True)
    opts = dataclasses.replace(call.opts, decode_every=2)
    host = [callbacks.HostCallback(lambda s, t, x: seen.append(s), every=2, decoded=True)]
    with callbacks.host_session((8,), host) as ids_:
        batch = call.batch.replace(callback_ids=ids_)
        program = jax.jit(lambda *a: sampling.generate(*a), static_argnums=(0, 1))  # traced anew
        jax.block_until_ready(program(pipe._components(), opts, params, batch, jax.random.key(0)))
        jax.effects_barrier()
    assert sorted(seen) == [0, 2] and len(runs) == 3


# ----------------------------------------------------------------------------- no cost when unused

def lowered_text(pipe, params, opts, batch):
    """A fresh function each time: jit's trace cache is keyed by the function, so lowering `generate` itself
    twice would not trace it again (and a patched hook would go unseen)."""
    comps = pipe._components()
    program = jax.jit(lambda *a: sampling.generate(*a), static_argnums=(0, 1))
    return program.lower(comps, opts, params, batch, jax.random.key(0)).as_text()


def test_program_unchanged_without_hooks(batch8, monkeypatch):
    """Without hooks the program has no host callback and is the same HLO when every hook function is
    replaced by one that fails (so none of them is traced into it: the loop carries no extra tensors)."""
    pipe, params, ids, masked, masks = batch8
    call = build(pipe, False, prompt_ids=ids, neg_prompt_ids=ids, mask=masks, masked_image=masked,
                 num_inference_steps=3, guidance_scale=7.5, inpainting=True)
    opts, batch = call.opts, call.batch
    text = lowered_text(pipe, params, opts, batch)
    assert "callback" not in text

    def boom(*a, **k):
        raise AssertionError("a hook was traced")

    for name in ("step_end", "host_step", "loop_until_stopped", "send_step", "decoded_step"):
        monkeypatch.setattr(callbacks, name, boom)
    monkeypatch.setattr(sampling, "rescale_noise_cfg", boom)
    assert lowered_text(pipe, params, opts, batch) == text
    monkeypatch.undo()
    # The check can fail: with a host callback the program differs.
    hooked = dataclasses.replace(opts, host_callback=True)
    ids_batch = batch.replace(callback_ids=callbacks.call_ids(1, (8,)))
    assert "callback" in lowered_text(pipe, params, hooked, ids_batch)


# ----------------------------------------------------------------------------- guidance_rescale

@pytest.fixture(scope="module")
def vpred(models):
    """diffusers' text-to-image pipeline over the 4-channel UNet with a v-prediction zero-SNR DDIM (trailing
    spacing, as Lin et al. recommend), and ours over the same folder."""
    folder, torch_pipe = models[4]
    config = dict(torch_pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    from diffusers import DDIMScheduler

    ref = StableDiffusionPipeline(**{**torch_pipe.components, "scheduler": DDIMScheduler.from_config(config)},
                                  requires_safety_checker=False)
    sched = scheduler_class("DDIMScheduler").from_config(config)
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, scheduler=sched)
    return ref, pipe, params


T2I = dict(height=32, width=32, num_inference_steps=4, guidance_scale=7.5)


def text2img_ref(vpred, **kw):
    with torch.no_grad():
        images = vpred[0]("a red cat", generator=torch.Generator().manual_seed(0), output_type="np", **T2I, **kw)
    return np.asarray(images.images, np.float32)


def text2img_both(vpred, **kw):
    _, pipe, params = vpred
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
    ids = pipe.prepare_inputs(["a red cat"])
    o = pipe(ids, params, jax.random.key(0), latents=noise, **T2I, **kw).images
    return text2img_ref(vpred, **kw), np.asarray(o, np.float32)


def test_guidance_rescale_matches_diffusers(vpred):
    ref, ours = text2img_both(vpred, guidance_rescale=0.7)
    ref0 = text2img_ref(vpred)
    assert ref.std() > 0.02 and np.abs(ref - ref0).max() > 10 * ATOL  # the rescale matters here
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    _, pipe, params = vpred
    ids = pipe.prepare_inputs(["a red cat"])
    noise = np.zeros((1, 4, 8, 8), np.float32)
    with tiny_sd.count_compiles("generate") as compiles:  # another rescale value: the same program
        pipe(ids, params, jax.random.key(0), latents=noise, guidance_rescale=0.3, **T2I)
    assert compiles == []


# ----------------------------------------------------------------------------- custom schedules

@pytest.mark.parametrize("scheduler,kind,values", [
    ("euler", "timesteps", [999, 800, 500, 250, 60]),
    ("euler", "sigmas", [14.6, 6.0, 2.0, 0.7, 0.1, 0.0]),
    ("dpm++", "timesteps", [999, 750, 420, 200, 45]),
])
def test_custom_schedule_matches_diffusers(models, loaded, scheduler, kind, values):
    ref, ours = run_both(models, loaded, 9, scheduler, {kind: values}, {kind: values})
    assert ref.std() > 0.02
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    _, plain = run_both(models, loaded, 9, scheduler)
    assert np.abs(ours - plain).max() > 10 * ATOL
    pipe, params = loaded(9, scheduler)
    image, mask = tiny_sd.sample_image_and_mask()
    other = [v * 0.9 for v in values]
    with tiny_sd.count_compiles("generate") as compiles:  # other values, same length: the same program
        pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), negative_prompt="blurry", height=32,
                     width=32, guidance_scale=7.5, latents=noise_for(9), **{kind: other})
    assert compiles == []


@pytest.mark.parametrize("scheduler,kind", [("ddim", "timesteps"), ("pndm", "sigmas"), ("dpm++", "sigmas")])
def test_custom_schedule_unsupported_raises_like_diffusers(models, loaded, scheduler, kind):
    pipe, params = loaded(9, scheduler)
    image, mask = tiny_sd.sample_image_and_mask()
    word = "timestep" if kind == "timesteps" else "sigmas"
    with pytest.raises(ValueError, match=rf"The current scheduler class .*`set_timesteps` does not support custom "
                                         rf"{word} schedules"):
        pipe.inpaint("a", image, mask, params, jax.random.key(0), height=32, width=32, **{kind: [999, 500, 0]})
    _, torch_pipe = models[9]
    cls, extra = tiny_sd.SCHEDULERS[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    with pytest.raises(ValueError, match=rf"does not support custom {word} schedules"):
        torch_pipe("a", image=image, mask_image=mask, height=32, width=32, **{kind: [999, 500, 0]})


# ----------------------------------------------------------------------------- previews

def test_latent_rgb_preview_tracks_the_vae(tmp_path):
    """LATENT_RGB (fitted by tools/fit_latent_rgb.py on scenes of seed 0) explains most of the bundled VAE's
    decoded colours on other scenes: RMSE under half the pixels' std. PreviewWriter writes one PNG per
    image and step, at the latent resolution."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    tool = Path(__file__).resolve().parents[1] / "tools" / "fit_latent_rgb.py"
    spec = importlib.util.spec_from_file_location("fit", tool)
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(fit.ASSETS / fit.DEMO_MODEL, safety_checker=None)
    latents, rgb = fit.latents_and_rgb(pipe.vae, params["vae"], seed=2, n=32)
    preview = callbacks.latents_to_rgb(np.transpose(latents, (0, 3, 1, 2))).astype(np.float32) / 127.5 - 1
    assert np.sqrt(np.mean((preview - rgb) ** 2)) < 0.5 * rgb.std()

    writer = callbacks.PreviewWriter(tmp_path / "previews", every=2)
    writer(4, 500.0, np.transpose(latents[:2], (0, 3, 1, 2)))
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["000-step004.png", "001-step004.png"]
    assert Image.open(writer.written[0]).size == (16, 16)  # 64 px scenes, VAE factor 4
