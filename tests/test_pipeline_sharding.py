"""Multi-device runs give the images of single-device calls: `jit=True` (pmap over the 8 fake CPU
devices that conftest sets up) and `mesh=` (jax.jit over global arrays sharded along a data axis).

Randomness (sampling.py): one key covers the batch it is called with. So a pmapped call equals, on
each device, a single-device call on that device's shard with that device's key; a mesh call with one
key equals a single-device call on the whole global batch with that key. The calls draw the initial
noise and (DDIM, eta > 0) fresh noise every step from the key, with a different guidance per example,
so every random and per-example input takes part. The compiled programs differ only in batch layout;
images agree within 1e-5 max abs (values in [0, 1]).
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax.jax_utils import replicate
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
    return SimpleNamespace(pipe=pipe, params=params, ids=ids, masked=masked, mask=masks, image=images,
                           guidance=guidance)


def single(sd, rows: slice, key):
    """One unsharded, single-device call on batch rows `rows`."""
    return sd.pipe(sd.ids[rows], sd.mask[rows], sd.masked[rows], sd.params, key, image=sd.image[rows],
                   guidance_scale=sd.guidance[rows], **OPTS).images


def test_pmap_matches_per_shard_single_device_calls(sd):
    keys = jax.random.split(jax.random.key(0), N_DEV)
    out = sd.pipe(shard(sd.ids), shard(sd.mask), shard(sd.masked), replicate(sd.params), keys, jit=True,
                  image=shard(sd.image), guidance_scale=shard(sd.guidance), **OPTS).images
    assert out.shape == (N_DEV, 1, 32, 32, 3)
    for d in range(N_DEV):
        np.testing.assert_allclose(out[d], single(sd, slice(d, d + 1), keys[d]), atol=ATOL, rtol=0)
    assert np.abs(out[0] - out[2]).max() > 1e-2  # same prompt, other key and guidance: another image


def test_mesh_matches_single_device_call_on_global_batch(sd):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    key = jax.random.key(1)
    out = sd.pipe(sd.ids, sd.mask, sd.masked, sd.params, key, image=sd.image, mesh=mesh,
                  guidance_scale=sd.guidance, **OPTS).images
    assert out.shape == (N_DEV, 32, 32, 3)
    np.testing.assert_allclose(out, single(sd, slice(None), key), atol=ATOL, rtol=0)


def test_error_jit_needs_device_axis(sd):
    keys = jax.random.split(jax.random.key(0), N_DEV)
    params = sd.params  # never used: the inputs are rejected first
    with pytest.raises(ValueError, match=r"jit=True inputs need a leading device axis of 8 .* batch dims \(8,\)"):
        sd.pipe(sd.ids, sd.mask, sd.masked, params, keys, jit=True, image=sd.image, **OPTS)
    wrong = lambda x: x.reshape(4, 2, *x.shape[1:])  # noqa: E731  (4 "devices" of 2)
    with pytest.raises(ValueError, match=r"leading device axis of 8 .* batch dims \(4, 2\)"):
        sd.pipe(wrong(sd.ids), wrong(sd.mask), wrong(sd.masked), params, keys, jit=True,
                image=wrong(sd.image), **OPTS)
    with pytest.raises(ValueError, match=r"prng_seed must hold one key per device \(8\)"):
        sd.pipe(shard(sd.ids), shard(sd.mask), shard(sd.masked), params, keys[:4], jit=True,
                image=shard(sd.image), **OPTS)


def test_error_mesh_batch_not_divisible(sd):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = slice(0, 6)
    with pytest.raises(ValueError, match=r"batch of 6 is not divisible by the mesh's 'data' axis of size 8"):
        sd.pipe(sd.ids[rows], sd.mask[rows], sd.masked[rows], sd.params, jax.random.key(0), mesh=mesh,
                image=sd.image[rows], **OPTS)
    with pytest.raises(ValueError, match=r"either jit=True .* or mesh=..., not both"):
        sd.pipe(shard(sd.ids), shard(sd.mask), shard(sd.masked), sd.params,
                jax.random.split(jax.random.key(0), N_DEV), jit=True, mesh=mesh, image=shard(sd.image), **OPTS)
