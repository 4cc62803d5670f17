"""What a ControlNet training run reports: tracker logs (TensorBoard, Weights & Biases) and
validation images generated with the ControlNet being trained."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from PIL import Image

from flax_inpaint.io import write_bytes_atomic

REPORT_TO = ("tensorboard", "wandb", "all", "none")


def _summary_writer():
    """tensorboardX's SummaryWriter class, or None where it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError:
        return None
    return wandb


class Trackers:
    """The `--report_to` loggers of process 0 (other processes log nothing).

    "tensorboard" needs tensorboardX (`pip install 'flax-inpaint[train]'`) and "wandb" needs wandb;
    asking for one that is not installed is an error, "all" takes those that are.
    """

    def __init__(self, report_to: str, logging_dir: Path, project: str, config: Dict[str, Any], enabled: bool):
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.check(report_to)
        writer = _summary_writer()
        if report_to in ("tensorboard", "all") and writer is not None:
            self.tensorboard = writer(str(logging_dir))
        if report_to in ("wandb", "all"):
            self.wandb = _wandb()
            if self.wandb is not None:
                self.wandb.init(project=project, config=config)
        if self.tensorboard is not None:
            self.tensorboard.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    @staticmethod
    def check(report_to: str) -> None:
        """Raise, naming the install, if `report_to` asks for a logger that is not installed."""
        if report_to == "tensorboard" and _summary_writer() is None:
            raise ValueError("--report_to tensorboard needs tensorboardX: pip install 'flax-inpaint[train]' "
                             "(or pass --report_to none).")
        if report_to == "wandb" and _wandb() is None:
            raise ValueError("--report_to wandb needs wandb: pip install wandb (or pass --report_to none).")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def images(self, groups: Sequence[Tuple[str, Image.Image, List[Image.Image]]], step: int) -> None:
        """Per (prompt, control image, generated images): one row, the control image first."""
        if self.tensorboard is not None:
            for prompt, control, images in groups:
                rows = np.stack([np.asarray(im.convert("RGB")) for im in (control, *images)])
                self.tensorboard.add_images(prompt, rows, step, dataformats="NHWC")
        if self.wandb is not None:
            logged = []
            for prompt, control, images in groups:
                logged.append(self.wandb.Image(control, caption="ControlNet conditioning"))
                logged += [self.wandb.Image(im, caption=prompt) for im in images]
            self.wandb.log({"validation": logged}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def validation_pairs(prompts: Optional[Sequence[str]], images: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """(prompt, control image path) pairs as diffusers pairs them: equal numbers one to one, or one of
    either used with every entry of the other."""
    if prompts is None and images is None:
        return []
    if prompts is None or images is None:
        raise ValueError("--validation_prompt and --validation_image go together; pass both or neither.")
    if len(images) == len(prompts):
        return list(zip(prompts, images))
    if len(images) == 1:
        return [(p, images[0]) for p in prompts]
    if len(prompts) == 1:
        return [(prompts[0], im) for im in images]
    raise ValueError(f"got {len(prompts)} --validation_prompt and {len(images)} --validation_image; pass as many "
                     "of each, or one of either.")


class Validation:
    """Generates `num_images` images per (prompt, control image) pair with the ControlNet's current
    params, 20 steps of the base model's scheduler, on process 0's first device.

    With a 9-channel inpainting UNet the whole image is masked (the ControlNet inpaint pipeline
    then generates everything, guided by the control image alone).
    """

    def __init__(self, components: Dict[str, Any], base_params: Dict[str, Any], controlnet, pairs, resolution: int,
                 num_images: int, seed: int):
        from flax_inpaint.pipelines import (
            FlaxStableDiffusionControlNetInpaintPipeline,
            FlaxStableDiffusionControlNetPipeline,
        )
        from flax_inpaint.train.dataset import open_image, resize_and_crop

        kinds = {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
        parts = {k: components[k] for k in kinds}
        self.inpaint = parts["unet"].in_channels == 9
        cls = FlaxStableDiffusionControlNetInpaintPipeline if self.inpaint else FlaxStableDiffusionControlNetPipeline
        self.pipe = cls(**parts, controlnet=controlnet, dtype=parts["unet"].runtime.dtype)
        self.params = jax.device_put(base_params, jax.local_devices()[0])
        self.pairs = [(prompt, Image.fromarray(resize_and_crop(open_image(path, Path.cwd(), "--validation_image"),
                                                               resolution)))
                      for prompt, path in pairs]
        self.resolution, self.num_images, self.seed = resolution, num_images, seed

    def run(self, controlnet_params) -> List[Tuple[str, Image.Image, List[Image.Image]]]:
        params = {**self.params, "controlnet": jax.device_put(controlnet_params, jax.local_devices()[0])}
        key = jax.random.key(self.seed)
        out = []
        for prompt, control in self.pairs:
            if self.inpaint:
                r = self.resolution
                black = Image.new("RGB", (r, r))
                whole = Image.new("L", (r, r), 255)
                images = self.pipe.inpaint(prompt, black, whole, control, params, key, height=r, width=r,
                                           num_inference_steps=20, controlnet_conditioning_scale=1.0,
                                           num_images_per_prompt=self.num_images, output_type="pil").images
            else:
                ids = self.pipe.prepare_text_inputs([prompt])
                cond = self.pipe.prepare_image_inputs(control)
                images = self.pipe(ids, cond, params, key, num_inference_steps=20,
                                   num_images_per_prompt=self.num_images, output_type="pil").images
            out.append((prompt, control, list(images)))
        return out


def save_validation(groups, folder: Path) -> None:
    """`<folder>/<pair>_control.png` and `<folder>/<pair>_<image>.png`, each written atomically."""

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    for i, (_, control, images) in enumerate(groups):
        write_bytes_atomic(folder / f"{i}_control.png", png(control))
        for j, image in enumerate(images):
            write_bytes_atomic(folder / f"{i}_{j}.png", png(image))
