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

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline
from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as ref_module

from flax_inpaint.pipelines.diffedit import (
    FlaxStableDiffusionDiffEditPipeline,
    auto_corr_levels,
    auto_corr_loss,
    kl_divergence,
)
from tests.tiny_sd import count_compiles, make_pipeline, sample_image_and_mask

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
    """Guards the test above: the regularised latents differ from the plain ones well beyond 1e-4."""
    pipe, params, _ = pipes
    common = dict(prompt="a cat", num_inference_steps=STEPS, inpaint_strength=0.7, guidance_scale=3.0)
    plain = pipe.invert(image(), params, KEY, **common).latents
    reg = pipe.invert(image(), params, KEY, num_reg_steps=2, num_auto_corr_rolls=3, **common).latents
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
    kw = dict(num_maps_per_mask=2, num_inference_steps=STEPS, guidance_scale=5.0)
    both = pipe.generate_mask(images, params, KEY, source_prompt=["a cat", "a cat"],
                              target_prompt=["a red", "a dog"], return_map=True, **kw)[1]
    inv = dict(num_inference_steps=STEPS, inpaint_strength=0.5, num_reg_steps=1, num_auto_corr_rolls=2)
    rolls = np.asarray(jax.random.randint(KEY, (5, 1, 2, 2, 4, 2), 0, 4))
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
    ours, grad = jax.value_and_grad(auto_corr_loss)(nhwc, rolls)
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
