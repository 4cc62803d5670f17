"""DiffEdit vs diffusers' StableDiffusionDiffEditPipeline (PyTorch, fp32) on a tiny random model.

The reference pipeline is built from tiny_sd's 4-channel model (DDIM, its near-deterministic VAE
posterior), saved with `save_pretrained` and loaded through our `from_pretrained`. Randomness is shared
as in the other pipeline tests: diffusers' `randn_tensor` in the DiffEdit module is patched to return
the mask noise we pass as `mask_noise`, and the auto-correlation rolls diffusers draws with
`torch.randint` are recorded and passed to ours as `auto_corr_rolls`.

Tolerances (fp32, both sides the same math in another order):
  * mask map (in [0, 1]) <= 1e-4 max abs; the thresholded mask equal element for element, on a case
    whose map stays > 1e-3 away from the 0.5 threshold (asserted, so the comparison is meaningful);
  * inverted latents <= 1e-4 max abs, relative to their largest magnitude (latents reach ~3-4), with
    and without regularisation;
  * final images (in [0, 1]) <= 1e-3 max abs, as for the other pipelines.
"""
from __future__ import annotations

from types import SimpleNamespace

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax.training.common_utils import shard
from jax.sharding import Mesh
from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline
from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as ref_module

from flax_inpaint.pipelines.diffedit import (
    FlaxStableDiffusionDiffEditPipeline,
    auto_corr_levels,
    auto_corr_loss,
    kl_divergence,
)
from tests.tiny_sd import count_compiles, make_pipeline, replicated, sample_image_and_mask

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SIZE = 64  # pixels; latents 16x16, so the auto-correlation loss pools once (two levels)
STEPS = 10
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(ours, params, diffusers' DiffEdit pipeline) over the same tiny random 4-channel model."""
    tmp = tmp_path_factory.mktemp("diffedit")
    _, base = make_pipeline(tmp, in_channels=4, scheduler="ddim")
    ref = StableDiffusionDiffEditPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(base.scheduler.config), requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    folder = tmp / "diffedit"
    ref.save_pretrained(folder, safe_serialization=True)
    pipe, params = FlaxStableDiffusionDiffEditPipeline.from_pretrained(folder, safety_checker=None)
    return pipe, params, ref


def image(seed: int = 0):
    return sample_image_and_mask(SIZE, seed)[0]


def generator():
    return torch.Generator().manual_seed(0)


def test_mask_matches_diffusers(pipes, monkeypatch):
    pipe, params, ref = pipes
    maps = 3
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((maps, 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    monkeypatch.setattr(ref_module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise).reshape(shape))
    captured = []
    hook = ref.unet.register_forward_hook(lambda module, args, out: captured.append(out.sample.detach()))
    common = dict(source_prompt="a cat", target_prompt="a red", num_maps_per_mask=maps, mask_encode_strength=0.6,
                  num_inference_steps=STEPS, guidance_scale=5.0)
    want = ref.generate_mask(image=image(), generator=generator(), output_type="np", **common)
    hook.remove()
    # diffusers' map from its one UNet call ([neg source, source, neg target, target]), steps 7-8 of its
    # generate_mask: guidance, |target - source| averaged over maps and channels, clamped at 3x its mean.
    neg_src, src, neg_tgt, tgt = captured[0].chunk(4)
    diff = ((neg_tgt + 5.0 * (tgt - neg_tgt)) - (neg_src + 5.0 * (src - neg_src))).abs()
    diff = diff.reshape(1, maps, 4, SIZE // 4, SIZE // 4).mean([1, 2])
    level = diff.mean() * 3.0
    want_map = (diff.clamp(0, level) / level).numpy()
    np.testing.assert_array_equal(want, want_map > 0.5)  # the recomputed map is the one diffusers thresholds

    mask, guidance_map = pipe.generate_mask(image(), params, KEY, mask_noise=noise, return_map=True, **common)
    assert guidance_map.shape == want.shape == (1, SIZE // 4, SIZE // 4)
    assert np.abs(guidance_map - want_map).max() <= 1e-4
    assert np.abs(want_map - 0.5).min() > 1e-3, "case too close to the threshold to compare masks exactly"
    assert 0 < want.sum() < want.size  # a real mask, neither empty nor full
    np.testing.assert_array_equal(mask, want.astype(np.float32))


def record_rolls(monkeypatch):
    """Patch torch.randint to record what diffusers' auto_corr_loss draws (calls of size (1,))."""
    rolls, real = [], torch.randint

    def randint(*args, **kwargs):
        out = real(*args, **kwargs)
        rolls.append(int(out.item()))
        return out

    monkeypatch.setattr(torch, "randint", randint)
    return rolls


@pytest.mark.parametrize("num_reg_steps", [0, 2])
def test_inverted_latents_match_diffusers(pipes, monkeypatch, num_reg_steps):
    pipe, params, ref = pipes
    strength, rolls_per_call = 0.7, 3
    common = dict(prompt="a cat", num_inference_steps=STEPS, inpaint_strength=strength, guidance_scale=3.0,
                  num_reg_steps=num_reg_steps, num_auto_corr_rolls=rolls_per_call, lambda_auto_corr=20.0,
                  lambda_kl=20.0)
    drawn = record_rolls(monkeypatch)
    want = ref.invert(image=image(), generator=generator(), **common).latents.numpy()
    monkeypatch.undo()
    n = int(STEPS * strength)
    rolls = None
    if num_reg_steps:
        shape = (n, num_reg_steps, rolls_per_call, 1, 4, auto_corr_levels(SIZE // 4))
        assert len(drawn) == np.prod(shape)
        rolls = np.array(drawn).reshape(shape)
    out = pipe.invert(image(), params, KEY, auto_corr_rolls=rolls, **common)
    assert out.latents.shape == want.shape == (1, n, 4, SIZE // 4, SIZE // 4)
    assert np.abs(out.latents - want).max() <= 1e-4 * np.abs(want).max()


def test_regularisation_changes_the_inversion(pipes):
    """Guards the test above: the regularised latents differ from the plain ones well beyond 1e-4 (with its
    settings and rolls of its shape, so its programs); without regularisation steps the regulariser's
    settings do not recompile."""
    pipe, params, _ = pipes
    common = dict(prompt="a cat", num_inference_steps=STEPS, inpaint_strength=0.7, guidance_scale=3.0)
    plain = pipe.invert(image(), params, KEY, **common).latents
    with count_compiles() as compiles:  # without regularisation steps its settings are unused: the same program
        pipe.invert(image(), params, KEY, num_auto_corr_rolls=3, lambda_kl=0.0, **common)
    assert compiles == []
    rolls = np.random.default_rng(0).integers(0, 4, (7, 2, 3, 1, 4, auto_corr_levels(SIZE // 4)))
    reg = pipe.invert(image(), params, KEY, num_reg_steps=2, num_auto_corr_rolls=3, auto_corr_rolls=rolls,
                      **common).latents
    assert np.abs(plain - reg).max() > 1e-2 * np.abs(plain).max()


def test_edit_matches_diffusers_and_keeps_the_unmasked_latents(pipes):
    pipe, params, ref = pipes
    strength = 0.7
    inv = ref.invert(image=image(), prompt="a cat", num_inference_steps=STEPS, inpaint_strength=strength,
                     guidance_scale=3.0, generator=generator()).latents
    mask = np.zeros((1, SIZE // 4, SIZE // 4), np.float32)
    mask[:, 4:12, 2:9] = 1
    common = dict(inpaint_strength=strength, num_inference_steps=STEPS, guidance_scale=4.0,
                  negative_prompt="a dog")
    want = ref(prompt="a red", mask_image=mask, image_latents=inv, generator=generator(), output_type="np",
               **common).images
    ours = pipe("a red", mask, inv.numpy(), params, KEY, **common).images
    assert ours.shape == want.shape == (1, SIZE, SIZE, 3) and want.std() > 0.05
    assert np.abs(ours - want).max() <= 1e-3
    latents = pipe("a red", mask, inv.numpy(), params, KEY, output_type="latent", **common).images
    outside = np.broadcast_to(mask[:, None] < 0.5, latents.shape)
    np.testing.assert_array_equal(latents[outside], inv.numpy()[:, -1][outside])  # diffusers' last blend


def test_batches_are_per_image_and_values_do_not_recompile(pipes):
    """Each image's mask and inversion are those of a call on it alone (per-image clamp level and KL),
    and new prompts, strengths, thresholds and lambdas reuse the compiled programs."""
    pipe, params, _ = pipes
    images = np.concatenate([pipe.image_processor.preprocess(image(s)) for s in (0, 1)])
    # Static options as in tests below (MASK_KW's mask, the regularised parity test's inversion): the
    # one-image programs are theirs, compiled once in this file.
    kw = dict(num_maps_per_mask=2, num_inference_steps=3, guidance_scale=5.0)
    both = pipe.generate_mask(images, params, KEY, source_prompt=["a cat", "a cat"],
                              target_prompt=["a red", "a dog"], return_map=True, **kw)[1]
    inv = dict(num_inference_steps=STEPS, inpaint_strength=0.7, num_reg_steps=2, num_auto_corr_rolls=3)
    rolls = np.random.default_rng(1).integers(0, 4, (7, 2, 3, 2, 4, 2))
    lat = pipe.invert(images, params, KEY, prompt=["a cat", "a dog"], auto_corr_rolls=rolls, **inv).latents
    for k in range(2):
        alone = pipe.generate_mask(images[k:k + 1], params, KEY, source_prompt="a cat",
                                   target_prompt=["a red", "a dog"][k], return_map=True,
                                   mask_noise=None, **kw)[1]
        assert alone.shape == (1, SIZE // 4, SIZE // 4)
        one = pipe.invert(images[k:k + 1], params, KEY, prompt=["a cat", "a dog"][k],
                          auto_corr_rolls=rolls[:, :, :, k:k + 1], **inv).latents
        # XLA picks other fp32 kernels (summation orders) for another batch size, and the regulariser's
        # gradient steps (lambda 20) amplify that: 1.2e-4 relative measured.
        assert np.abs(one[0] - lat[k]).max() <= 5e-4 * np.abs(lat[k]).max()
    del both  # the mask noise of a batch call differs from a single call's; the per-image level is below
    with count_compiles() as compiles:
        pipe.invert(images, params, jax.random.key(3), prompt=["a dog", "a cat"], lambda_kl=5.0,
                    lambda_auto_corr=3.0, auto_corr_rolls=rolls, **inv)
        pipe.generate_mask(images, params, jax.random.key(4), source_prompt=["a dog", "a dog"],
                           target_prompt=["a cat", "a red"], mask_thresholding_ratio=2.0,
                           mask_encode_strength=0.8, **kw)
    assert compiles == []


def test_mask_level_is_per_image():
    """Scaling one image's noise difference does not move another image's mask."""
    from flax_inpaint.pipelines.diffedit import mask_from_predictions

    rng = np.random.default_rng(0)
    src = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    tgt = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    a = mask_from_predictions(src, tgt, 2, 3.0)[0]
    tgt2 = tgt.copy()
    tgt2[2:] = src[2:] + 10 * (tgt[2:] - src[2:])
    b = mask_from_predictions(src, tgt2, 2, 3.0)[0]
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def test_losses_match_diffusers_functions():
    """auto_corr_loss with diffusers' rolls and kl_divergence equal diffusers' functions (fp32 sums in
    another order: <= 1e-5 relative), and their gradients too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    levels = auto_corr_levels(32)
    assert levels == 3
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    xt = torch.from_numpy(x).requires_grad_(True)
    want = ref_module.auto_corr_loss(xt, generator=gen)
    want.backward()
    gen.set_state(state)
    rolls = np.array([torch.randint(32 >> lvl >> 1, (1,), generator=gen).item()
                      for _ in range(2) for _ in range(4) for lvl in range(levels)]).reshape(2, 4, levels)
    nhwc = np.transpose(x, (0, 2, 3, 1))
    ours, grad = jax.jit(jax.value_and_grad(auto_corr_loss))(nhwc, rolls)  # one program, as the pipeline runs it
    assert abs(float(ours) - want.item()) <= 1e-5 * want.item()
    np.testing.assert_allclose(np.transpose(grad, (0, 3, 1, 2)), xt.grad.numpy(), rtol=1e-4,
                               atol=1e-6 * np.abs(xt.grad.numpy()).max())
    kl_t = ref_module.kl_divergence(torch.from_numpy(x[:1] * 1.3 + 0.2))
    assert abs(float(kl_divergence(x[:1] * 1.3 + 0.2)) - kl_t.item()) <= 1e-5 * abs(kl_t.item())


def test_bad_inputs_raise_one_clear_error(pipes):
    pipe, params, _ = pipes
    with pytest.raises(ValueError, match="num_maps_per_mask"):
        pipe.generate_mask(image(), params, KEY, source_prompt="a", target_prompt="b", num_maps_per_mask=0)
    with pytest.raises(ValueError, match="inpaint_strength"):
        pipe.invert(image(), params, KEY, prompt="a", inpaint_strength=1.5)
    with pytest.raises(ValueError, match="image_latents has shape"):
        pipe("a", np.ones((16, 16)), np.zeros((1, 3, 4, 16, 16)), params, KEY, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="exactly one of source_prompt"):
        pipe.generate_mask(image(), params, KEY, target_prompt="b")
    with pytest.raises(ValueError, match="With jit=True prompt must be token ids with a leading device axis"):
        pipe.invert(image(), params, KEY, prompt="a", jit=True)
    pixels, ids = pipe.image_processor.preprocess(image()), shard(pipe.tokenize(["a"] * jax.local_device_count()))
    with pytest.raises(ValueError, match=r"image has shape \(1, 3, 64, 64\); expected \(8, 1, 3, 'H', 'W'\)"):
        pipe.invert(pixels, params, KEY, prompt=ids, jit=True)
    with pytest.raises(ValueError, match="in_channels=4"):
        FlaxStableDiffusionDiffEditPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                            pipe.unet.clone(in_channels=9), pipe.scheduler)


def test_saved_folder_loads_in_diffusers(pipes, tmp_path):
    pipe, params, _ = pipes
    pipe.save_pretrained(tmp_path / "out", params)
    again = diffusers.StableDiffusionDiffEditPipeline.from_pretrained(tmp_path / "out")
    assert type(again.inverse_scheduler).__name__ == "DDIMInverseScheduler"
    ours, _ = FlaxStableDiffusionDiffEditPipeline.from_pretrained(tmp_path / "out")
    assert ours.inverse_scheduler == pipe.inverse_scheduler


def recorder(log: list):
    """diffusers' `callback(step, timestep, latents)` that keeps what it gets (torch or numpy)."""
    return lambda i, t, x: log.append((int(i), float(t), np.array(x, np.float32)))


def test_host_callbacks_match_diffusers(pipes, capsys):
    """`callback` / `callback_steps` in `invert` and `__call__` see diffusers' steps and timesteps once
    each, with its latents (<= 1e-4 relative, as the inverted latents above); `progress` moves per step."""
    pipe, params, ref = pipes
    inv_kw = dict(prompt="a cat", num_inference_steps=STEPS, inpaint_strength=0.7, guidance_scale=3.0)
    want, got = [], []
    inv = ref.invert(image=image(), generator=generator(), callback=recorder(want), callback_steps=3,
                     **inv_kw).latents
    pipe.set_progress_bar_config(desc="invert", ncols=60)
    try:
        pipe.invert(image(), params, KEY, callback=recorder(got), callback_steps=3, progress=True, **inv_kw)
    finally:
        pipe.set_progress_bar_config()
    err = capsys.readouterr().err
    assert "invert: 100%" in err and "7/7" in err  # int(10 * 0.7) inverse steps
    mask = np.zeros((1, SIZE // 4, SIZE // 4), np.float32)
    mask[:, 4:12, 2:9] = 1
    edit_kw = dict(inpaint_strength=0.7, num_inference_steps=STEPS, guidance_scale=4.0)
    ref(prompt="a red", mask_image=mask, image_latents=inv, generator=generator(), callback=recorder(want),
        callback_steps=3, **edit_kw)
    pipe("a red", mask, inv.numpy(), params, KEY, callback=recorder(got), callback_steps=3, **edit_kw)
    assert [(i, t) for i, t, _ in got] == [(i, t) for i, t, _ in want]
    assert [i for i, _, _ in got] == [0, 3, 6] * 2
    for (_, _, ours), (_, _, theirs) in zip(got, want):
        assert ours.shape == theirs.shape == (1, 4, SIZE // 4, SIZE // 4)
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


class _Lowered(Exception):
    pass


def lowered_programs(pipe, params, monkeypatch, **hooks):
    """The HLO text of the programs `invert` and `__call__` would run (lowered, not run), each traced anew
    (jit's trace cache is keyed by the function: a patched hook would go unseen in a cached trace)."""
    from flax_inpaint.pipelines import diffedit

    texts = []
    calls = {"_invert_jit": lambda: pipe.invert(image(), params, KEY, prompt="a cat", num_inference_steps=4,
                                                inpaint_strength=0.5, **hooks),
             "_edit_jit": lambda: pipe("a red", np.ones((16, 16)), np.zeros((1, 2, 4, 16, 16)), params, KEY,
                                       num_inference_steps=4, inpaint_strength=0.5, **hooks)}
    programs = {"_invert_jit": diffedit.invert_program, "_edit_jit": diffedit.edit_program}
    for name, call in calls.items():
        def lower(*args, program=programs[name]):
            texts.append(diffedit.grouped(program).lower(*args).as_text())  # a fresh jit
            raise _Lowered

        with monkeypatch.context() as mp:
            mp.setattr(diffedit, name, lower)
            with pytest.raises(_Lowered):
                call()
    return texts


def test_programs_unchanged_without_hooks(pipes, monkeypatch):
    """Without host callbacks the invert and edit programs trace no hook code: the same HLO when the hook
    functions are replaced by failing ones, with no host callback in it; with a callback they differ."""
    from flax_inpaint.pipelines import callbacks

    pipe, params, _ = pipes
    plain = lowered_programs(pipe, params, monkeypatch)
    assert len(plain) == 2 and not any("callback" in t for t in plain)

    def boom(*a, **k):
        raise AssertionError("a hook was traced")

    with monkeypatch.context() as mp:
        for name in ("send_step", "host_step", "decoded_step"):
            mp.setattr(callbacks, name, boom)
        assert lowered_programs(pipe, params, monkeypatch) == plain
    assert all("callback" in t for t in lowered_programs(pipe, params, monkeypatch, callback=print))


N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8
MASK_KW = dict(num_maps_per_mask=2, mask_encode_strength=0.6, num_inference_steps=3, guidance_scale=5.0)
INV_KW = dict(num_inference_steps=3, inpaint_strength=0.7, guidance_scale=3.0, num_reg_steps=1, num_auto_corr_rolls=2)
EDIT_KW = dict(num_inference_steps=3, inpaint_strength=0.7, guidance_scale=4.0, eta=0.5)


@pytest.fixture(scope="module")
def batch8(pipes):
    """Eight rows (two images, source and target prompts) as prepare_inputs gives them, and the pmap-convention
    results of the three steps over the 8 fake devices: one row per device, the random draws (mask noise,
    auto-correlation rolls, DDIM's eta noise) from each device's key."""
    pipe, params, _ = pipes
    assert jax.local_device_count() == N_DEV
    src, images = pipe.prepare_inputs(["a cat", "a dog"] * (N_DEV // 2), [image(k % 2) for k in range(N_DEV)])
    tgt = pipe.tokenize(["a red", "a cat", "a dog", "a red"] * (N_DEV // 4))
    keys, rep = jax.random.split(KEY, N_DEV), replicated(params)
    mask, guidance_map = pipe.generate_mask(shard(images), rep, keys, source_prompt=shard(src),
                                            target_prompt=shard(tgt), return_map=True, jit=True, **MASK_KW)
    inv = pipe.invert(shard(images), rep, keys, prompt=shard(src), jit=True, **INV_KW).latents
    out = pipe(shard(tgt), mask, inv, rep, keys, jit=True, **EDIT_KW).images
    return SimpleNamespace(src=src, tgt=tgt, images=images, keys=keys, rep=rep, mask=mask, map=guidance_map, inv=inv,
                           out=out)


def test_pmap_convention_matches_one_device_calls(pipes, batch8):
    """jit=True: outputs carry the device axis, and each device's mask, inverted latents and images are
    those of a one-device call on its row with its key (the same math batched another way: 1e-5)."""
    pipe, params, _ = pipes
    b = batch8
    assert b.mask.shape == (N_DEV, 1, SIZE // 4, SIZE // 4) and b.inv.shape == (N_DEV, 1, 2, 4, SIZE // 4, SIZE // 4)
    assert b.out.shape == (N_DEV, 1, SIZE, SIZE, 3)
    for d in range(N_DEV):
        row = slice(d, d + 1)
        mask, guidance_map = pipe.generate_mask(b.images[row], params, b.keys[d], source_prompt=b.src[row],
                                                target_prompt=b.tgt[row], return_map=True, **MASK_KW)
        np.testing.assert_allclose(b.map[d], guidance_map, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(b.mask[d], mask)
        inv = pipe.invert(b.images[row], params, b.keys[d], prompt=b.src[row], **INV_KW).latents
        np.testing.assert_allclose(b.inv[d], inv, atol=1e-5 * np.abs(inv).max(), rtol=0)
        out = pipe(b.tgt[row], b.mask[d], b.inv[d], params, b.keys[d], **EDIT_KW).images
        np.testing.assert_allclose(b.out[d], out, atol=1e-5, rtol=0)
    assert 0 < b.mask.sum() < b.mask.size and np.abs(b.out[0] - b.out[2]).max() > 1e-2  # other key: other image


def three_steps(pipe, params, b, mesh, edit_inputs=None):
    """generate_mask, invert and __call__ on batch8's rows with one key, on `mesh` (None: one device);
    __call__ takes `edit_inputs` (mask, inverted latents) when given, else the two results."""
    mask, guidance_map = pipe.generate_mask(b.images, params, KEY, source_prompt=b.src, target_prompt=b.tgt,
                                            return_map=True, mesh=mesh, **MASK_KW)
    inv = pipe.invert(b.images, params, KEY, prompt=b.src, mesh=mesh, **INV_KW).latents
    edit_mask, edit_inv = edit_inputs or (mask, inv)
    out = pipe(b.tgt, edit_mask, edit_inv, params, KEY, mesh=mesh, output_type="latent", **EDIT_KW).images
    return mask, guidance_map, inv, out


def test_mesh_matches_one_device_call_on_the_global_batch(pipes, batch8):
    """mesh=: one key covers the global batch sharded over the mesh, as a one-device call on it (each step
    on the same inputs). The edit is compared in latents: XLA's CPU kernels for the one-device batch of 8
    differ from those for the mesh's per-device row (with eta=0 the mesh call equals one-device calls on
    each row alone exactly), and 3 guided steps plus the VAE decoder amplify that to 1.9e-5 in pixels
    (measured), 2.7e-6 relative in the latents."""
    pipe, params, _ = pipes
    want = three_steps(pipe, params, batch8, None)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    mask, guidance_map, inv, out = three_steps(pipe, params, batch8, mesh, want[::2])
    assert out.shape == (N_DEV, 4, SIZE // 4, SIZE // 4)
    np.testing.assert_array_equal(mask, want[0])
    np.testing.assert_allclose(guidance_map, want[1], atol=1e-5, rtol=0)
    for ours, theirs in ((inv, want[2]), (out, want[3])):
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=0)


def test_sharded_new_values_do_not_recompile(pipes, batch8):
    """Under jit=True and on a mesh, new prompts, keys, guidance, mask strengths, thresholds, lambdas and eta
    reuse the compiled programs."""
    pipe, params, _ = pipes
    b, mesh = batch8, Mesh(np.array(jax.devices()), ("data",))
    three_steps(pipe, params, b, mesh)  # compiles the mesh programs unless the test above did
    keys, src = jax.random.split(jax.random.key(5), N_DEV), b.tgt[::-1].copy()
    mask_kw = {**MASK_KW, "mask_encode_strength": 0.9, "guidance_scale": 6.0}
    inv_kw = {**INV_KW, "guidance_scale": 2.0}
    with count_compiles() as compiles:
        mask = pipe.generate_mask(shard(b.images), b.rep, keys, source_prompt=shard(src),
                                  target_prompt=shard(b.src), mask_thresholding_ratio=2.0, jit=True, **mask_kw)
        inv = pipe.invert(shard(b.images), b.rep, keys, prompt=shard(src), lambda_kl=5.0, jit=True, **inv_kw).latents
        out = pipe(shard(b.src), mask, inv, b.rep, keys, jit=True, **{**EDIT_KW, "eta": 0.1}).images
        pipe.generate_mask(b.images, params, jax.random.key(6), source_prompt=src, target_prompt=b.src, mesh=mesh,
                           **mask_kw)
        pipe.invert(b.images, params, jax.random.key(6), prompt=src, lambda_auto_corr=3.0, mesh=mesh, **inv_kw)
        pipe(src, mask.reshape(N_DEV, *mask.shape[2:]), inv.reshape(N_DEV, *inv.shape[2:]), params,
             jax.random.key(6), mesh=mesh, output_type="latent", **EDIT_KW)
    assert compiles == []
    assert np.abs(out - b.out).max() > 1e-2  # the new values took effect
