"""Derive `callbacks.LATENT_RGB`, the latent-to-RGB preview factors of the bundled tiny VAE.

Scenes of the training distribution (train/data.py) are encoded to scaled latents and decoded again; the
decoded pixels averaged over each latent cell are fitted by least squares as rgb = [latents, 1] @ W
(W: 5 x 3, RGB in [-1, 1]). Prints W and the fit's RMSE on held-out scenes. Run:
    python tools/fit_latent_rgb.py
"""
from __future__ import annotations

import jax
import numpy as np

from flax_inpaint import FlaxStableDiffusionInpaintPipeline
from flax_inpaint.cli import ASSETS, DEMO_MODEL
from flax_inpaint.pipelines.sampling import decode_latents, encode_image
from flax_inpaint.train.data import sample_scenes


def latents_and_rgb(vae, params, seed: int, n: int = 128, size: int = 64):
    """(scaled latents NHWC, decoded RGB in [-1, 1] averaged per latent cell, NHWC) of `n` scenes."""
    images = sample_scenes(np.random.default_rng(seed), n, size).images * 2 - 1
    latents = encode_image(vae, params, images, jax.random.key(seed))
    rgb = np.asarray(decode_latents(vae, params, latents)) * 2 - 1
    f = size // latents.shape[1]
    cells = rgb.reshape(n, size // f, f, size // f, f, 3).mean(axis=(2, 4))
    return np.asarray(latents), cells


def main() -> None:
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(ASSETS / DEMO_MODEL, safety_checker=None)
    lat, rgb = latents_and_rgb(pipe.vae, params["vae"], seed=0)
    x = np.concatenate([lat.reshape(-1, lat.shape[-1]), np.ones((lat[..., 0].size, 1), np.float32)], axis=1)
    w, *_ = np.linalg.lstsq(x, rgb.reshape(-1, 3), rcond=None)
    lat2, rgb2 = latents_and_rgb(pipe.vae, params["vae"], seed=1)
    pred = lat2 @ w[:-1] + w[-1]
    print("LATENT_RGB =", np.array2string(w.astype(np.float32), precision=4, separator=", "))
    print(f"held-out RMSE {np.sqrt(np.mean((pred - rgb2) ** 2)):.4f} (pixel std {rgb2.std():.4f}), RGB in [-1, 1]")


if __name__ == "__main__":
    main()
