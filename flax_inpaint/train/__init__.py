"""Training: a procedural shapes dataset, a data-parallel optax loop and the tiny-model recipes.

    from flax_inpaint.train import train_all
    results = train_all("runs/tiny", seed=0)   # VAE, text encoder + inpainting UNet, ControlNet

or `python -m flax_inpaint.train all --out runs/tiny`. `flax_inpaint.train.controlnet` is the
`flax-inpaint train-controlnet` command: a ControlNet on your own base model and data.
"""
from flax_inpaint.train.loop import FitResult, TrainConfig, TrainState, fit
from flax_inpaint.train.recipes import train_all, train_controlnet, train_inpaint, train_vae

__all__ = ["FitResult", "TrainConfig", "TrainState", "fit", "train_all", "train_controlnet", "train_inpaint", "train_vae"]
