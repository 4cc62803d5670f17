"""Multi-device runs give the images of single-device calls: `jit=True` (pmap over the 8 fake CPU
devices that conftest sets up) and `mesh=` (jax.jit over global arrays sharded along a data axis).

Randomness (sampling.py): one key covers the batch it is called with. So a pmapped call equals, on
each device, a single-device call on that device's shard with that device's key; a mesh call with one
key equals a single-device call on the whole global batch with that key. The calls draw the initial
noise and (DDIM, eta > 0) fresh noise every step from the key, with a different guidance per example,
so every random and per-example input takes part. The compiled programs differ only in batch layout;
images agree within 1e-5 max abs (values in [0, 1]). New inputs reuse the pmapped program, and
mis-shaped jit=True inputs get errors that name the argument and the fix.
"""
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax.training.common_utils import shard
from jax.sharding import Mesh

import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline

ATOL = 1e-5
N_DEV = 8  # conftest: --xla_force_host_platform_device_count=8
OPTS = dict(num_inference_steps=3, eta=0.5)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    assert jax.local_device_count() == N_DEV
    folder, _ = tiny_sd.make_pipeline(tmp_path_factory.mktemp("sd"), in_channels=9, scheduler="ddim")
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)
    image, mask = tiny_sd.sample_image_and_mask()
    ids, masked, masks, images = pipe.prepare_inputs(["a red cat", "a cat"] * (N_DEV // 2), image, mask,
                                                     return_image=True)
    guidance = np.linspace(2.0, 9.0, N_DEV).astype(np.float32)
    return SimpleNamespace(pipe=pipe, params=params, replicated=tiny_sd.replicated(params), ids=ids, masked=masked,
                           mask=masks, image=images, guidance=guidance)


def single(sd, rows: slice, key):
    """One unsharded, single-device call on batch rows `rows`."""
    return sd.pipe(sd.ids[rows], sd.mask[rows], sd.masked[rows], sd.params, key, image=sd.image[rows],
                   guidance_scale=sd.guidance[rows], **OPTS).images


def pmapped(sd, keys, **kwargs):
    """A jit=True call on the whole batch, sharded over the devices; `kwargs` replace the unsharded
    ids, mask, masked, image or guidance of `sd`, or add call options."""
    a = {name: kwargs.pop(name, getattr(sd, name)) for name in ("ids", "mask", "masked", "image", "guidance")}
    return sd.pipe(shard(a["ids"]), shard(a["mask"]), shard(a["masked"]), sd.replicated, keys, jit=True,
                   image=shard(a["image"]), guidance_scale=shard(a["guidance"]), **{**OPTS, **kwargs}).images


def test_pmap_matches_per_shard_single_device_calls(sd):
    keys = jax.random.split(jax.random.key(0), N_DEV)
    out = pmapped(sd, keys)
    assert out.shape == (N_DEV, 1, 32, 32, 3)
    for d in range(N_DEV):
        np.testing.assert_allclose(out[d], single(sd, slice(d, d + 1), keys[d]), atol=ATOL, rtol=0)
    assert np.abs(out[0] - out[2]).max() > 1e-2  # same prompt, other key and guidance: another image


def test_pmap_latent_output_matches_single_device_calls(sd):
    """output_type="latent" under jit=True: NCHW latents [devices, per_device, C, h, w], each device's those
    of a one-device call on its shard with its key (the adapter splits the one program's rows back)."""
    keys = jax.random.split(jax.random.key(2), N_DEV)
    out = pmapped(sd, keys, output_type="latent", strength=0.8)
    assert out.shape == (N_DEV, 1, 4, 8, 8)
    for d in (0, N_DEV - 1):
        rows = slice(d, d + 1)
        one = sd.pipe(sd.ids[rows], sd.mask[rows], sd.masked[rows], sd.params, keys[d], image=sd.image[rows],
                      guidance_scale=sd.guidance[rows], output_type="latent", strength=0.8, **OPTS).images
        np.testing.assert_allclose(out[d], one, atol=ATOL, rtol=0)


def test_pmap_new_inputs_do_not_recompile(sd):
    """Under jit=True too, new prompts, keys, masks, guidance, strength and eta reuse the program."""
    first = pmapped(sd, jax.random.split(jax.random.key(0), N_DEV))  # compiles unless an earlier test did
    keys = jax.random.split(jax.random.key(7), N_DEV)
    ids = sd.pipe.tokenize(["a cat", "red"] * (N_DEV // 2))
    mask = np.rot90(sd.mask, axes=(2, 3)).copy()
    masked = sd.image * (mask < 0.5)
    with tiny_sd.count_compiles() as compiles:
        out = pmapped(sd, keys, ids=ids, mask=mask, masked=masked, guidance=sd.guidance[::-1].copy(),
                      strength=0.6, eta=0.2)
        some_without_cfg = np.where(np.arange(N_DEV) % 2, 0.5, 5.0).astype(np.float32)  # <= 1: no CFG there
        pmapped(sd, keys, guidance=some_without_cfg, strength=0.9)
    assert compiles == []
    assert np.abs(out - first).max() > 1e-2  # the new inputs took effect


def test_mesh_matches_single_device_call_on_global_batch(sd):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    key = jax.random.key(1)
    out = sd.pipe(sd.ids, sd.mask, sd.masked, sd.params, key, image=sd.image, mesh=mesh,
                  guidance_scale=sd.guidance, **OPTS).images
    assert out.shape == (N_DEV, 32, 32, 3)
    np.testing.assert_allclose(out, single(sd, slice(None), key), atol=ATOL, rtol=0)


def test_mesh_new_inputs_do_not_recompile(sd):
    """On a mesh too, new prompts, keys (one, or one per prompt), masks, guidance, strength and eta reuse
    the program of their key form."""
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def meshed(key, ids=sd.ids, mask=sd.mask, guidance=sd.guidance, **kwargs):
        return sd.pipe(ids, mask, sd.image * (mask < 0.5), sd.params, key, image=sd.image, mesh=mesh,
                       guidance_scale=guidance, **{**OPTS, **kwargs}).images

    first = meshed(jax.random.key(0))
    per_prompt = meshed(jax.random.split(jax.random.key(0), N_DEV))
    mask = np.rot90(sd.mask, axes=(2, 3)).copy()
    with tiny_sd.count_compiles() as compiles:
        out = meshed(jax.random.key(7), ids=sd.pipe.tokenize(["a cat", "red"] * (N_DEV // 2)), mask=mask,
                     guidance=sd.guidance[::-1].copy(), strength=0.6, eta=0.2)
        meshed(jax.random.split(jax.random.key(3), N_DEV), mask=mask, strength=0.9)
    assert compiles == []
    assert np.abs(out - first).max() > 1e-2 and np.abs(per_prompt - first).max() > 1e-2


def test_error_jit_needs_device_axis(sd):
    keys = jax.random.split(jax.random.key(0), N_DEV)
    params = sd.params  # never used: the inputs are rejected first
    with pytest.raises(ValueError, match=r"jit=True inputs need a leading device axis of 8 .* batch dims \(8,\)"):
        sd.pipe(sd.ids, sd.mask, sd.masked, params, keys, jit=True, image=sd.image, **OPTS)
    wrong = lambda x: x.reshape(4, 2, *x.shape[1:])  # noqa: E731  (4 "devices" of 2)
    with pytest.raises(ValueError, match=r"leading device axis of 8 .* batch dims \(4, 2\)"):
        sd.pipe(wrong(sd.ids), wrong(sd.mask), wrong(sd.masked), params, keys, jit=True,
                image=wrong(sd.image), **OPTS)
    with pytest.raises(ValueError, match=r"prng_seed must hold one key per device \(8\); got shape \(4,\)"):
        pmapped(sd, keys[:4])
    with pytest.raises(ValueError, match=r"prng_seed must hold one key per device \(8\); got shape \(\)"):
        pmapped(sd, jax.random.key(0))


def batch_error(name: str, got: tuple, want: tuple) -> str:
    """The start of the error for a jit=True input whose batch dims are not prompt_ids' `want[:2]`."""
    return (rf"{name} has shape {re.escape(str(got))}; expected {re.escape(str(want))} .* shard\(\) every input "
            rf"alike: a leading device axis of 8, then the per-device batch of {want[1]}")


def test_error_jit_inputs_sharded_unlike_prompt_ids(sd):
    """Inputs that passed shard() (or skipped it) but do not match prompt_ids' device axis and
    per-device batch, and unreplicated params, are named with their shape and the fix."""
    keys = jax.random.split(jax.random.key(0), N_DEV)
    ids, mask, masked, image = shard(sd.ids), shard(sd.mask), shard(sd.masked), shard(sd.image)
    with pytest.raises(ValueError, match=batch_error("mask", (8, 1, 32, 32), (8, 1, 1, 32, 32))):  # not sharded
        sd.pipe(ids, sd.mask, masked, sd.params, keys, jit=True, image=image, **OPTS)
    with pytest.raises(ValueError, match=batch_error("masked_image", (4, 2, 3, 32, 32), (8, 1, 3, 32, 32))):
        sd.pipe(ids, mask, sd.masked.reshape(4, 2, 3, 32, 32), sd.params, keys, jit=True, image=image, **OPTS)
    twice = lambda x: shard(np.concatenate([x, x]))  # noqa: E731  (16 rows: a per-device batch of 2)
    with pytest.raises(ValueError, match=batch_error("image", (8, 2, 3, 32, 32), (8, 1, 3, 32, 32))):
        sd.pipe(ids, mask, masked, sd.params, keys, jit=True, image=twice(sd.image), **OPTS)
    with pytest.raises(ValueError, match=batch_error("mask", (8, 1, 1, 32, 32), (8, 2, 1, 32, 32))):
        sd.pipe(twice(sd.ids), mask, twice(sd.masked), sd.params, keys, jit=True, image=twice(sd.image), **OPTS)
    with pytest.raises(ValueError, match=r"guidance_scale has shape \(8,\); .* per prompt \(8, 1\) \(shard\(\) it"):
        sd.pipe(ids, mask, masked, sd.params, keys, jit=True, image=image, guidance_scale=sd.guidance, **OPTS)
    with pytest.raises(ValueError, match=r"latents has shape \(8, 4, 8, 8\); expected \(8, 1, 4, 8, 8\)"):
        pmapped(sd, keys, latents=np.zeros((N_DEV, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"params must be replicated over the 8 local devices: params\[\S+ has "
                                         r"shape .* Use flax.jax_utils.replicate\(params\)"):
        sd.pipe(ids, mask, masked, sd.params, keys, jit=True, image=image, **OPTS)


def test_error_mesh_batch_not_divisible(sd):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = slice(0, 6)
    with pytest.raises(ValueError, match=r"batch of 6 is not divisible by the mesh's 'data' axis of size 8"):
        sd.pipe(sd.ids[rows], sd.mask[rows], sd.masked[rows], sd.params, jax.random.key(0), mesh=mesh,
                image=sd.image[rows], **OPTS)
    with pytest.raises(ValueError, match=r"either jit=True .* or mesh=..., not both"):
        sd.pipe(shard(sd.ids), shard(sd.mask), shard(sd.masked), sd.params,
                jax.random.split(jax.random.key(0), N_DEV), jit=True, mesh=mesh, image=shard(sd.image), **OPTS)
