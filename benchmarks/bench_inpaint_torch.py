#!/usr/bin/env python
"""diffusers' PyTorch inpainting pipeline on bench_inpaint.py's architectures, device and settings.

Started by `bench_inpaint.py --torch eager compile` (or run alone, same arguments plus --mode);
prints the same JSON lines with system="diffusers-eager" or "diffusers-compile" (the UNet and the
VAE decoder wrapped in torch.compile(mode="reduce-overhead"), diffusers' documented speed-up).
Weights are random like ours; the text encoder, VAE encode of the masked image, 2x-batch CFG UNet
loop and VAE decode all run inside the timed call, as in ours. The sdxl preset runs diffusers'
StableDiffusionXLInpaintPipeline (run this script alone for it: ours has no SDXL pipeline yet).
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the shared presets import flax_inpaint: keep JAX off the GPU

import statistics  # noqa: E402
import sys  # noqa: E402
from typing import Any, Dict  # noqa: E402

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from bench_inpaint import (  # noqa: E402
    PRESETS, PROMPT, SCHEDULERS, Preset, common_fields, cpu_name, emit, is_oom, largest_batch, make_tokenizer,
    once, parse_args, scene, speed_fields,
)


def build(preset: Preset, scheduler: str, device: torch.device, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: SD-sized models init slowly on a CPU
        unet = UNet2DConditionModel.from_config(preset.unet)
        vae = AutoencoderKL.from_config(preset.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(preset.text_encoder))
        if preset.text_encoder_2 is not None:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(preset.text_encoder_2))
    _, cls_name, overrides = SCHEDULERS[scheduler]
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=make_tokenizer(preset), unet=unet,
                  scheduler=getattr(diffusers, cls_name).from_config(preset.scheduler, **overrides))
    if preset.text_encoder_2 is not None:  # SDXL: the VAE decodes in fp32 (force_upcast), as diffusers does
        pipe = StableDiffusionXLInpaintPipeline(**common, text_encoder_2=text_encoder_2,
                                                tokenizer_2=make_tokenizer(preset))
    else:
        pipe = StableDiffusionInpaintPipeline(**common, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(batch: int, size: int, device: torch.device):
    """The same scene as ours, as [0, 1] NCHW tensors already on the device (no PIL work timed)."""
    image, mask = scene(size)
    image = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).repeat(batch, 1, 1, 1)
    mask = torch.from_numpy(mask)[None, None].float().div(255).repeat(batch, 1, 1, 1)
    return image.to(device), mask.to(device)


def main(argv=None) -> int:
    args = parse_args(argv, torch_side=True)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        args.dtype = "float16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    system = f"diffusers-{args.mode}"
    common: Dict[str, Any] = {
        **common_fields(args),
        "attention": "sdpa",
        "device": f"cuda: {torch.cuda.get_device_name(device)}" if cuda else f"cpu: cpu ({cpu_name()})",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
    }
    pipe = build(preset, args.scheduler, device, dtype, args.seed)
    if args.mode == "compile":
        torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per batch size, as in ours
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)

    def run(batch: int, steps: int) -> np.ndarray:
        image, mask = inputs(batch, args.size, device)
        return pipe(prompt=[PROMPT] * batch, image=image, mask_image=mask, height=args.size, width=args.size,
                    num_inference_steps=steps, guidance_scale=args.guidance, output_type="np",
                    generator=torch.Generator(device).manual_seed(args.seed)).images

    for batch in sorted(args.batch):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        out = {}

        def call():
            out["images"] = run(batch, args.steps)  # a host array: the call has finished

        first = once(call)
        # reduce-overhead records the VAE decoder's CUDA graph on its second call: not a steady one
        warmup = 1 if args.mode == "compile" else 0
        for _ in range(warmup):
            call()
        steady = [once(call) for _ in range(args.repeat)]
        emit({"kind": "throughput", "system": system, **common, "batch": batch,
              **speed_fields(batch, first, steady),
              # torch.compile works inside the first call: estimated as the first call's excess
              "compile_s": first - statistics.median(steady) if args.mode == "compile" else None,
              "warmup_calls": warmup,
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
              "finite": bool(np.isfinite(out["images"]).all())})

    if args.largest_batch:
        steps = 2

        def fits(batch: int) -> bool:
            try:
                run(batch, steps)
                return True
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                torch.cuda.empty_cache()
                return False

        emit({"kind": "largest_batch", "system": system, **common, "search_steps": steps,
              **largest_batch(fits, max(args.batch), args.max_batch)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
