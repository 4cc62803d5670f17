#!/usr/bin/env python
"""Benchmark the Flax Stable Diffusion inpainting pipeline on a real architecture with random weights.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from the SD1.5-inpainting or
SD2 (768x768) configs below, or a tiny one for CPU smoke runs, and randomly initialised; speed does
not depend on the weights' values. The sdxl preset (SDXL inpainting, 1024x1024) has no Flax pipeline
to drive yet: it supports --flops-only, summing its models' passes (see `sdxl_flops`), and its VAE's
--nan-check (`sdxl_vae_nan_check`). Every measurement is one JSON line on stdout, with a "kind":

  throughput     img/s, s/img, first-call and compile seconds, steady-state seconds, peak device
                 memory, TFLOP per image (XLA cost analysis) and the fraction of the compute floor;
  ratio          ours against each diffusers run of the same invocation (--torch);
  largest_batch  the largest batch that fits in device memory (--largest-batch);
  psnr           bf16 against fp32 images from the same weights, seed and inputs (--psnr);
  nan_check      whether every scheduler gives finite images in this dtype (--nan-check; sdxl: the VAE);
  flops          compute per image only, from the lowered program, nothing run (--flops-only).

diffusers runs in a subprocess (`bench_inpaint_torch.py`), started before JAX touches the device,
so neither framework's allocator holds memory while the other is measured. See README.md here.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import gzip
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import common_utils
from jax.experimental.pallas import tpu as pltpu
from PIL import Image

import flax_inpaint
from flax_inpaint import (
    FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection, FlaxStableDiffusionInpaintPipeline,
    FlaxUNet2DConditionModel, Runtime,
)
from flax_inpaint.pipelines.inputs import build
from flax_inpaint.pipelines.sampling import Components, generate_groups
from flax_inpaint.train.data import build_tokenizer

SD_SCHEDULE = {  # scheduler_config.json of SD1.5 (inpainting); SD2 adds prediction_type
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}

# name -> (flax_inpaint class, diffusers class, overrides applied to the preset's scheduler config)
SCHEDULERS: Dict[str, tuple] = {
    "pndm": ("FlaxPNDMScheduler", "PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("FlaxDPMSolverMultistepScheduler", "DPMSolverMultistepScheduler",
              {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("FlaxDDIMScheduler", "DDIMScheduler", {}),
    "ddpm": ("FlaxDDPMScheduler", "DDPMScheduler", {}),
    "lms": ("FlaxLMSDiscreteScheduler", "LMSDiscreteScheduler", {}),
    "euler": ("FlaxEulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
    "euler-a": ("FlaxEulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler", {}),
    "unipc": ("FlaxUniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
}

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
}
_CLIP_TEXT = {  # keys every SD text_encoder/config.json carries
    "model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
    "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Component configs (diffusers / transformers config.json contents) and the image size."""

    unet: Dict[str, Any]
    vae: Dict[str, Any]
    text_encoder: Dict[str, Any]
    scheduler: Dict[str, Any]
    size: int
    reference_tflop_per_image: Optional[float] = None  # the reference figure, for this workload only
    text_encoder_2: Optional[Dict[str, Any]] = None  # SDXL's second text encoder (with projection)
    steps: int = 50  # --steps default
    default_scheduler: str = "pndm"  # --scheduler default


PRESETS: Dict[str, Preset] = {
    # runwayml/stable-diffusion-inpainting: 9-channel UNet, CLIP ViT-L/14 text tower.
    "sd15": Preset(
        unet={
            "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": _SD_DOWN,
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64, "up_block_types": _SD_UP,
        },
        vae=_SD_VAE,
        text_encoder={**_CLIP_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
        scheduler=SD_SCHEDULE,
        size=512,
        reference_tflop_per_image=82.5,
    ),
    # stabilityai/stable-diffusion-2 (768-v) with the 9 input channels of the SD2 inpainting UNet:
    # linear projections, per-level head counts, OpenCLIP ViT-H text tower (23 layers), v-prediction.
    "sd2": Preset(
        unet={
            "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "cross_attention_dim": 1024, "down_block_types": _SD_DOWN,
            "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": 9, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
            "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
            "sample_size": 96, "up_block_types": _SD_UP, "upcast_attention": True, "use_linear_projection": True,
        },
        vae={**_SD_VAE, "sample_size": 768},
        text_encoder={**_CLIP_TEXT, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512},
        scheduler={**SD_SCHEDULE, "prediction_type": "v_prediction"},
        size=768,
    ),
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: SDXL's UNet with 9 input channels (2048-wide
    # context from both text encoders, size conditioning), SDXL's VAE (the SD one, scaling 0.13025,
    # force_upcast), CLIP ViT-L and OpenCLIP ViT-bigG/14 with projection; Euler, 30 steps, 1024x1024.
    "sdxl": Preset(
        unet={
            "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
            "center_input_sample": False, "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
            "norm_num_groups": 32, "num_attention_heads": None, "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
            "use_linear_projection": True,
        },
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoder={**_CLIP_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
        text_encoder_2={**_CLIP_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                        "num_hidden_layers": 32, "projection_dim": 1280},
        scheduler={**SD_SCHEDULE, "interpolation_type": "linear", "timestep_spacing": "leading"},
        size=1024,
        steps=30,
        default_scheduler="euler",
    ),
    # The test suite's tiny pipeline: runs on a CPU in seconds.
    "tiny": Preset(
        unet={
            "sample_size": 8, "in_channels": 9, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        },
        vae={"block_out_channels": [8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
             "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 4,
             "latent_channels": 4, "sample_size": 32},
        text_encoder={**_CLIP_TEXT, "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 37,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 16,
                      "vocab_size": 1000, "projection_dim": 32},
        scheduler=SD_SCHEDULE,
        size=32,
    ),
}

PROMPT = "a red circle on a blue background"
# Dense bf16 TFLOP/s the floor is measured against, by device kind (gpu-facts: ~790 on an H100,
# which makes SD1.5's 82.5 TFLOP/image a floor of ~9.6 img/s). Others: pass --peak-tflops.
# TPUs: Google's published bf16 peaks per chip (device_kind "TPU v5 lite" is a v5e).
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0,  # the H200 has the H100's compute (788 measured here)
               "TPU v5 lite": 197.0, "TPU v4": 275.0}


# ----------------------------------------------------------------------------- shared helpers


def scene(size: int, seed: int = 0):
    """A random RGB image [size, size, 3] uint8 and a rectangular mask [size, size] uint8 (255 = repaint)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size * 3 // 4, size // 8: size // 2] = 255
    return image, mask


def make_tokenizer(preset: Preset):
    """A real CLIP BPE tokenizer (bytes plus the prompt's words), padded to the text encoder's length."""
    with tempfile.TemporaryDirectory() as folder:  # CLIPTokenizer reads its files when constructed
        return build_tokenizer(Path(folder), max_length=preset.text_encoder["max_position_embeddings"])


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> Dict[str, Any]:
    """Largest batch <= limit for which `fits` holds: double from `start`, then bisect."""
    tried, ok, bad, b = {}, 0, None, start
    while b <= limit:
        tried[b] = fits(b)
        if not tried[b]:
            bad = b
            break
        ok, b = b, b * 2
    if bad is not None:
        while bad - ok > 1:
            mid = (ok + bad) // 2
            tried[mid] = fits(mid)
            ok, bad = (mid, bad) if tried[mid] else (ok, mid)
    return {"largest_batch": ok or None, "hit_limit": bad is None, "tried": {str(k): v for k, v in tried.items()}}


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def once(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes; `fn` must block until its result is on the host."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed_fields(batch: int, first: float, steady: List[float]) -> Dict[str, Any]:
    med = statistics.median(steady)
    return {"img_per_s": batch / med, "s_per_img": med / batch, "steady_s": med, "steady_runs_s": steady,
            "first_call_s": first}


# ----------------------------------------------------------------------------- ours (JAX)


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (persistent-cache reads included), and how
    many executables came from the persistent cache."""

    def __init__(self):
        self.seconds, self.cache_hits = 0.0, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def _on_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1


def build_models(preset: Preset, runtime):
    return (FlaxUNet2DConditionModel.from_config(preset.unet, runtime=runtime),
            FlaxAutoencoderKL.from_config(preset.vae, runtime=runtime),
            FlaxCLIPTextModel.from_config(preset.text_encoder, runtime=runtime))


def build_scheduler(preset: Preset, name: str):
    cls_name, _, overrides = SCHEDULERS[name]
    return getattr(flax_inpaint, cls_name).from_config(preset.scheduler, **overrides)


def init_params(models, key, abstract: bool = False):
    """{"unet", "vae", "text_encoder"} params in each model's param_dtype (shapes only if `abstract`)."""
    keys = jax.random.split(key, 3)
    init = (lambda m, k: jax.eval_shape(m.init_weights, k)) if abstract else (lambda m, k: m.init_weights(k))
    return {name: init(m, k) for name, m, k in zip(("unet", "vae", "text_encoder"), models, keys)}


class Ours:
    """Our inpainting pipeline over one set of models and params, with inputs for any batch size."""

    def __init__(self, preset: Preset, scheduler: str, runtime, params=None, models=None, tokenizer=None,
                 abstract: bool = False, seed: int = 0):
        self.preset, self.runtime = preset, runtime
        self.models = models or build_models(preset, runtime)
        unet, vae, text_encoder = self.models
        sched = build_scheduler(preset, scheduler)
        self.params = dict(params or init_params(self.models, jax.random.key(seed), abstract))
        self.params["scheduler"] = sched.create_state()
        self.pipe = FlaxStableDiffusionInpaintPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or make_tokenizer(preset), unet=unet,
            scheduler=sched, dtype=runtime.dtype,
        )
        self.key = jax.random.PRNGKey(seed)
        self._replicated = None  # the params through flax's replicate, for jit=True

    def inputs(self, batch: int, size: int) -> Dict[str, np.ndarray]:
        image, mask = scene(size)
        ids, masked, masks = self.pipe.prepare_inputs([PROMPT] * batch, Image.fromarray(image), Image.fromarray(mask))
        return {"prompt_ids": ids, "neg_prompt_ids": self.pipe.tokenize([""] * batch), "mask": masks,
                "masked_image": masked}

    def run(self, inputs, steps: int, guidance: float, jit: bool = False, **hooks) -> np.ndarray:
        """NHWC images in [0, 1] as a host array (so the call has finished); `hooks`: the pipeline's per-step
        keywords (progress, host_callbacks). `jit`: diffusers' pmap calling convention (inputs sharded over the
        local devices, params replicated once, a key per device)."""
        params, key, names = self.params, self.key, ("prompt_ids", "mask", "masked_image", "neg_prompt_ids")
        if jit:
            if self._replicated is None:
                self._replicated = flax.jax_utils.replicate(self.params)
            n = jax.local_device_count()
            params, key = self._replicated, jax.random.split(key, n)
            inputs = {k: common_utils.shard(inputs[k]) for k in names}
        images = self.pipe(inputs["prompt_ids"], inputs["mask"], inputs["masked_image"], params, key,
                           num_inference_steps=steps, guidance_scale=guidance,
                           neg_prompt_ids=inputs["neg_prompt_ids"], jit=jit, **hooks).images
        return images.reshape(-1, *images.shape[-3:])

    def program(self, inputs, steps: int, guidance: float, size: int, runtime=None):
        """(the jitted sampling program, its arguments) for one pipeline call, the models running with
        `runtime` (default: this pipeline's): what the pipeline compiles, without its host plumbing."""
        unet, vae, text_encoder = (m.clone(runtime=runtime or self.runtime) for m in self.models)
        batch_size = inputs["prompt_ids"].shape[0]
        call = build(self.pipe, False, prompt_ids=inputs["prompt_ids"], neg_prompt_ids=inputs["neg_prompt_ids"],
                     mask=inputs["mask"], masked_image=inputs["masked_image"], num_inference_steps=steps,
                     height=size, width=size, guidance_scale=np.full((batch_size,), guidance, np.float32),
                     inpainting=True)
        comps = Components(unet, vae, text_encoder, self.pipe.scheduler)
        keys = jax.random.wrap_key_data(self.key)[None]  # one key for the batch, as `run` passes it
        return (jax.jit(generate_groups, static_argnums=(0, 1, 5)),
                (comps, call.opts, self.params, call.batch, keys, None))

    def flops(self, inputs, steps: int, guidance: float, size: int, platform: Optional[str] = None) -> Dict[str, Any]:
        """Compute per image from XLA's cost analysis of the lowered sampling program.

        XLA counts a while loop's body once, so the loop's remaining iterations are added as UNet
        passes (the scheduler and guidance arithmetic per step is elementwise and negligible).
        Lowered for this host, attention is costed as the XLA einsum form (a cuDNN kernel is a custom
        call without a count). Lowered for `platform="tpu"` (possible on any host), long attention is
        the Pallas flash kernel, costed by the kernel's own estimate at its padded head dim.
        """
        runtime = dataclasses.replace(self.runtime, attention="pallas" if platform == "tpu" else "xla")
        platforms = None if platform is None else (platform,)
        fn, call = self.program(inputs, steps, guidance, size, runtime)
        program = _flops(fn.trace(*call).lower(lowering_platforms=platforms))

        unet = self.models[0].clone(runtime=runtime)
        f = self.models[1].downscale
        batch_size = inputs["prompt_ids"].shape[0]
        n = batch_size * (2 if guidance > 1.0 else 1)
        latent = (n, size // f, size // f, unet.in_channels)
        context = (n, self.pipe.max_length, self.models[2].hidden_size)
        n_iter = int(self.pipe.scheduler.set_timesteps(self.params["scheduler"], steps, latent).timesteps.shape[0])
        unet_fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c, method=unet.nhwc))
        unet_pass = _flops(unet_fn.trace(
            self.params["unet"], jax.ShapeDtypeStruct(latent, runtime.dtype), jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct(context, runtime.dtype)).lower(lowering_platforms=platforms))
        total = {k: program[k] + (n_iter - 1) * unet_pass[k] for k in program}
        out = {"tflop_per_image": total["flops"] / batch_size / 1e12,
               "unet_tflop_per_pass": unet_pass["flops"] / n / 1e12,  # one sample through the UNet once
               "unet_passes_per_image": n_iter * n // batch_size}
        if platform == "tpu":
            out["kernel_tflop_per_image"] = total["kernel_flops"] / batch_size / 1e12
            out["kernel_calls_per_unet_pass"] = unet_pass["kernel_calls"]
        return out


def _flops(lowered) -> Dict[str, float]:
    """XLA's flop count of a lowered program plus, where it holds Pallas TPU kernels (custom calls XLA
    does not count), each kernel's own cost estimate times the number of times the program runs it."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    calls = kernel_calls(lowered.as_text())
    kernel = sum(flops * n for flops, n in calls.values())
    return {"flops": float(cost["flops"]) + kernel, "kernel_flops": kernel,
            "kernel_calls": sum(n for _, n in calls.values())}


def kernel_calls(text: str) -> Dict[str, tuple]:
    """{function: (kernel flops, times run)} for each StableHLO function holding a tpu_custom_call.

    jax outlines nested jits (the kernel's, and repeated model blocks) as private functions, so a
    kernel's run count is the product of call counts down the call graph from @main (a while loop's
    body counted once, as XLA's cost analysis does)."""
    funcs = re.split(r"\n\s*func\.func ", text)
    callees, kernels = {}, {}
    for body in funcs[1:]:
        name = re.match(r"(?:public |private )?@([\w.$-]+)", body).group(1)
        callees[name] = collections.Counter(re.findall(r"(?<!_)call @([\w.$-]+)\(", body))
        flops = re.findall(r"tpu_custom_call.*?\\22flops\\22:(\d+)", body)
        if flops:
            kernels[name] = sum(map(int, flops))
    runs: Dict[str, int] = collections.Counter()

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for callee, n in callees.get(name, {}).items():
            visit(callee, times * n)

    visit("main", 1)
    return {name: (flops, runs[name]) for name, flops in kernels.items()}


def jax_context() -> Dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {dev.device_kind}" + (f" ({cpu_name()})" if dev.platform == "cpu" else ""),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "flax_inpaint": flax_inpaint.__version__,
                     "python": platform.python_version()},
    }


def peak_memory_bytes() -> Optional[int]:
    """The device allocator's high-water mark for this process (None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def peak_tflops(args, device_kind: str) -> Optional[float]:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.dtype not in ("bfloat16", "float16"):
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def step_hooks(args) -> Dict[str, Any]:
    """The per-step keywords of --progress (a tqdm bar on stderr) and --preview K (latent-to-RGB PNGs every
    K steps into a temporary folder: the latents go to the host at every step; with --preview-vae the VAE's
    decode, run in the program every K steps)."""
    from flax_inpaint.pipelines.callbacks import PreviewWriter

    hooks: Dict[str, Any] = {"progress": True} if args.progress else {}
    if args.preview:
        writer = PreviewWriter(tempfile.mkdtemp(prefix="bench-preview-"), args.preview, vae=args.preview_vae)
        hooks["host_callbacks"] = [writer.host_callback()]
    return hooks


def bench_ours(args, preset: Preset, common: Dict[str, Any], clock: CompileClock) -> List[Dict[str, Any]]:
    ours = Ours(preset, args.scheduler, runtime_for(args), seed=args.seed)
    hooks = step_hooks(args)
    peak = peak_tflops(args, jax.devices()[0].device_kind)
    records = []
    # ascending: the process-wide memory high-water mark is this batch's
    for batch in [] if args.no_throughput else sorted(args.batch):
        inputs = ours.inputs(batch, args.size)
        before, hits = clock.seconds, clock.cache_hits
        out = {}

        def call():
            out["images"] = ours.run(inputs, args.steps, args.guidance, jit=args.jit, **hooks)

        first = once(call)
        compile_s = clock.seconds - before
        steady = [once(call) for _ in range(args.repeat)]
        recompiled = clock.seconds > before + compile_s
        flops = ours.flops(inputs, args.steps, args.guidance, args.size)
        rec = {"kind": "throughput", "system": "flax-inpaint", **common, "batch": batch,
               **speed_fields(batch, first, steady), "compile_s": compile_s,
               "persistent_cache_hits": clock.cache_hits - hits, "peak_mem_bytes": peak_memory_bytes(),
               "finite": bool(np.isfinite(out["images"]).all()), "recompiled_in_steady_state": recompiled,
               **flops}
        rec["achieved_tflops"] = flops["tflop_per_image"] * rec["img_per_s"]
        rec["peak_tflops"] = peak
        rec["floor_s_per_img"] = None if peak is None else flops["tflop_per_image"] / peak
        rec["fraction_of_floor"] = None if peak is None else rec["floor_s_per_img"] / rec["s_per_img"]
        emit(rec)
        records.append(rec)
    if args.profile:
        emit(_profile(args, ours, common))
    if args.largest_batch:
        emit(_largest_ours(args, ours, common))
    if args.psnr:
        emit(_psnr(args, preset, ours, common))
    if args.nan_check:
        for rec in _nan_check(args, preset, ours, common):
            emit(rec)
    return records


def _profile(args, ours: Ours, common, top: int = 40) -> Dict[str, Any]:
    """Trace one call at the largest batch (already compiled) with the JAX profiler; the Chrome trace
    stays in --profile, and the record sums device time per kernel name (the `top` largest)."""
    batch = max(args.batch)
    inputs = ours.inputs(batch, args.size)
    ours.run(inputs, args.steps, args.guidance)  # compiled before the trace starts
    with jax.profiler.trace(args.profile):
        wall = once(lambda: ours.run(inputs, args.steps, args.guidance))
    trace = max(Path(args.profile).glob("plugins/profile/*/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    # Device timelines are processes named "/device:..."; of their threads, the "Stream #..." ones hold
    # the kernels (the "XLA Ops" / "XLA Modules" lines repeat the same time per HLO op and per program).
    meta = [(e["name"], e["pid"], e.get("tid"), str(e.get("args", {}).get("name", ""))) for e in events
            if e.get("ph") == "M"]
    device = {pid for kind, pid, _, name in meta if kind == "process_name" and name.startswith("/device:")}
    threads = {(pid, tid): name for kind, pid, tid, name in meta if kind == "thread_name"}
    per_line: Dict[str, float] = collections.defaultdict(float)
    per_kernel: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        line = threads.get((e["pid"], e.get("tid")), "")
        per_line[line] += e.get("dur", 0) / 1e6
        if line.startswith("Stream"):
            acc = per_kernel[e["name"]]
            acc[0] += e.get("dur", 0) / 1e6
            acc[1] += 1
    busy = sum(v[0] for v in per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kind": "profile", "system": "flax-inpaint", **common, "batch": batch, "wall_s": wall,
            "device_busy_s": busy, "kernel_launches": sum(v[1] for v in per_kernel.values()),
            "distinct_kernels": len(per_kernel), "trace": str(trace), "seconds_per_line": per_line,
            "top_kernels": [{"name": k, "s": v[0], "count": v[1]} for k, v in ranked]}


def _largest_ours(args, ours: Ours, common) -> Dict[str, Any]:
    steps = 2  # memory does not grow with the number of steps: the loop reuses its buffers

    def fits(batch: int) -> bool:
        try:
            ours.run(ours.inputs(batch, args.size), steps, args.guidance)
            return True
        except Exception as e:  # XLA reports an allocation failure as a runtime error
            if is_oom(e):
                return False
            raise

    return {"kind": "largest_batch", "system": "flax-inpaint", **common, "search_steps": steps,
            **largest_batch(fits, max(args.batch), args.max_batch)}


def _without_scheduler(params):
    return {k: v for k, v in params.items() if k != "scheduler"}


def _psnr(args, preset: Preset, ours: Ours, common) -> Dict[str, Any]:
    """Images of this dtype against float32 ones (XLA attention): same weights (cast from float32), seed
    and inputs."""
    tok = ours.pipe.tokenizer
    fp32 = Runtime(dtype=jnp.float32, param_dtype=jnp.float32, attention="xla")
    ref = Ours(preset, args.scheduler, fp32, tokenizer=tok, seed=args.seed)
    low = jax.tree_util.tree_map(lambda x: x.astype(ours.runtime.param_dtype), _without_scheduler(ref.params))
    test = Ours(preset, args.scheduler, ours.runtime, params=low, models=ours.models, tokenizer=tok, seed=args.seed)
    batch = min(args.batch)
    inputs = ref.inputs(batch, args.size)
    a = ref.run(inputs, args.steps, args.guidance).astype(np.float64)
    b = test.run(inputs, args.steps, args.guidance).astype(np.float64)
    mse = ((a - b) ** 2).reshape(batch, -1).mean(axis=1)
    psnr = [float("inf") if m == 0 else float(10 * np.log10(1.0 / m)) for m in mse]
    return {"kind": "psnr", "system": "flax-inpaint", **common, "batch": batch, "reference_dtype": "float32",
            "psnr_db": psnr, "psnr_db_mean": float(np.mean(psnr)), "max_abs_diff": float(np.abs(a - b).max()),
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all())}


def _nan_check(args, preset: Preset, ours: Ours, common):
    """One record per scheduler: are the images of a full run finite in this dtype?"""
    batch = min(args.batch)
    inputs = ours.inputs(batch, args.size)
    params = _without_scheduler(ours.params)
    for name in SCHEDULERS:
        run = Ours(preset, name, ours.runtime, params=params, models=ours.models, tokenizer=ours.pipe.tokenizer,
                   seed=args.seed)
        images = run.run(inputs, args.steps, args.guidance)
        yield {"kind": "nan_check", "system": "flax-inpaint", **common, "scheduler": name, "batch": batch,
               "finite": bool(np.isfinite(images).all()), "min": float(np.nanmin(images)),
               "max": float(np.nanmax(images))}


def runtime_for(args) -> Runtime:
    """The models' runtime: --dtype, and --attention ("auto" lowered for a TPU from another host is
    what it would pick there: the Pallas kernel)."""
    dtype = jnp.dtype(args.dtype)
    attention = "pallas" if args.platform == "tpu" and args.attention == "auto" else args.attention
    return Runtime(dtype=dtype, param_dtype=dtype, attention=attention, flash_min_length=args.flash_min_length)


def flops_only(args, preset: Preset, common) -> None:
    """TFLOP per image for each batch size from the lowered program: no weights, nothing run."""
    if preset.text_encoder_2 is not None:
        for batch in sorted(args.batch):
            emit({"kind": "flops", "system": "flax-inpaint", **common, "attention": "xla", "batch": batch,
                  "lowered_for": jax.default_backend(), **sdxl_flops(args, preset, batch),
                  "reference_tflop_per_image": preset.reference_tflop_per_image})
        return
    ours = Ours(preset, args.scheduler, runtime_for(args), abstract=True, seed=args.seed)
    attention = "pallas" if args.platform == "tpu" else "xla"
    for batch in sorted(args.batch):
        flops = ours.flops(ours.inputs(batch, args.size), args.steps, args.guidance, args.size, args.platform)
        emit({"kind": "flops", "system": "flax-inpaint", **common, "attention": attention, "batch": batch,
              "lowered_for": args.platform or jax.default_backend(), **flops,
              "reference_tflop_per_image": preset.reference_tflop_per_image})


def sdxl_flops(args, preset: Preset, batch: int) -> Dict[str, Any]:
    """Compute per image of SDXL inpainting as the sum of its models' passes, each lowered alone with
    abstract weights (no SDXL pipeline program exists yet): both text encoders on the prompt and the
    negative prompt, the VAE encoding the masked image, the 9-channel UNet once per scheduler
    iteration for each CFG half, the VAE decoding the latents. XLA attention; nothing runs."""
    runtime = dataclasses.replace(runtime_for(args), attention="xla")
    unet = FlaxUNet2DConditionModel.from_config(preset.unet, runtime=runtime)
    vae = FlaxAutoencoderKL.from_config(preset.vae, runtime=runtime).upcasted()  # force_upcast: VAE in fp32
    te1 = FlaxCLIPTextModel.from_config(preset.text_encoder, runtime=runtime)
    te2 = FlaxCLIPTextModelWithProjection.from_config(preset.text_encoder_2, runtime=runtime)
    cfg = args.guidance > 1.0
    n, size, tokens = batch * (2 if cfg else 1), args.size, preset.text_encoder["max_position_embeddings"]
    f = 2 ** (len(vae.block_out_channels) - 1)
    latent = (n, size // f, size // f)
    context = te1.hidden_size + te2.hidden_size  # SDXL concatenates both penultimate hidden states

    def spec(shape, dtype=runtime.dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    def cost(model, *inputs, method=None, **static):
        params = jax.eval_shape(model.init_weights, jax.random.key(0))
        fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **static))
        return _flops(fn.trace(params, *inputs).lower())["flops"]

    added = {"text_embeds": spec((n, te2.projection_dim)), "time_ids": spec((n, 6))}
    parts = {
        "text_encoders": sum(cost(te, spec((n, tokens), jnp.int32), output_hidden_states=True) for te in (te1, te2)),
        "vae_encode": cost(vae, spec((batch, 3, size, size), vae.runtime.dtype), method=vae.encode),
        "unet_pass": cost(unet, spec((*latent, unet.in_channels)), spec((n,), jnp.int32),
                          spec((n, tokens, context)), None, None, added, method=unet.nhwc),
        "vae_decode": cost(vae, spec((batch, *latent[1:], vae.latent_channels), vae.runtime.dtype),
                           method=vae.decode),
    }
    scheduler = build_scheduler(preset, args.scheduler)
    passes = int(scheduler.set_timesteps(scheduler.create_state(), args.steps, (*latent, 4)).timesteps.shape[0])
    total = parts["text_encoders"] + parts["vae_encode"] + passes * parts["unet_pass"] + parts["vae_decode"]
    return {"tflop_per_image": total / batch / 1e12, "unet_tflop_per_pass": parts["unet_pass"] / n / 1e12,
            "unet_passes_per_image": passes * n // batch, "method": "sum of model passes",
            "tflop_per_image_by_model": {k: v / batch / 1e12 for k, v in parts.items() if k != "unet_pass"}}


def sdxl_vae_nan_check(args, preset: Preset, common):
    """SDXL's VAE in this dtype on random weights, a random image of --size pixels encoded and its latents
    decoded: one record as the pipeline will run it (`upcasted()`: float32 activations, `force_upcast`) and
    one with half-precision activations (what an fp16-fix VAE, force_upcast=False, runs)."""
    vae = FlaxAutoencoderKL.from_config(preset.vae, runtime=runtime_for(args))
    params = vae.init_weights(jax.random.key(args.seed))
    image = jax.random.uniform(jax.random.key(args.seed + 1), (min(args.batch), 3, args.size, args.size),
                               minval=-1.0, maxval=1.0)
    for model in (vae.upcasted(), vae.clone(force_upcast=False)):
        @jax.jit
        def roundtrip(p, x):
            latents = model.apply({"params": p}, x.astype(model.runtime.dtype), method=model.encode).latent_dist.mode()
            return model.apply({"params": p}, latents, method=model.decode).sample.astype(jnp.float32)

        decoded = np.asarray(roundtrip(params, image))
        yield {"kind": "nan_check", "system": "flax-inpaint", **common, "model": "vae", "batch": image.shape[0],
               "activations": str(jnp.dtype(model.runtime.dtype)), "force_upcast": bool(model.force_upcast),
               "finite": bool(np.isfinite(decoded).all()), "min": float(np.nanmin(decoded)),
               "max": float(np.nanmax(decoded))}


class Phase:
    """Wall and process CPU seconds of a `with` block. CPU time counts every thread of this process
    (XLA compiles on several) and is less disturbed than wall time by other jobs on a shared host."""

    def __init__(self, record: Dict[str, Any], name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.record[f"{self.name}_s"] = time.perf_counter() - self.wall
        self.record[f"{self.name}_cpu_s"] = time.process_time() - self.cpu


def compile_only(args, preset: Preset, common, clock: CompileClock) -> None:
    """Per batch size: seconds tracing, lowering and compiling the sampling program (cold: in-memory
    caches cleared first; the persistent cache, if given, is used), the lowered program's size, and the
    compiled program's memory analysis (weights included: they are arguments). Abstract weights,
    nothing runs. Lowered for another platform (--platform tpu on a CPU host) nothing compiles, so
    there is no compile time or memory figure."""
    rec = {}
    with Phase(rec, "setup"):  # models, abstract params, tokenizer
        ours = Ours(preset, args.scheduler, runtime_for(args), abstract=True, seed=args.seed)
    platforms = None if args.platform is None else (args.platform,)
    compiles = args.platform in (None, jax.default_backend())
    for batch in sorted(args.batch):
        jax.clear_caches()
        fn, call = ours.program(ours.inputs(batch, args.size), args.steps, args.guidance, args.size)
        rec = {"kind": "compile", "system": "flax-inpaint", **common, "batch": batch,
               "attention": ours.runtime.attention, "lowered_for": args.platform or jax.default_backend(),
               "setup_s": rec.get("setup_s"), "setup_cpu_s": rec.get("setup_cpu_s")}
        hits = clock.cache_hits
        memory = None
        with pltpu.force_tpu_interpret_mode() if args.pallas_interpret else contextlib.nullcontext():
            with Phase(rec, "trace"):
                traced = fn.trace(*call)
            with Phase(rec, "lower"):
                lowered = traced.lower(lowering_platforms=platforms)
            if compiles:
                with Phase(rec, "compile"):
                    compiled = lowered.compile()
                memory = compiled.memory_analysis()
        rec["pallas_interpret"] = args.pallas_interpret
        rec["total_s"] = sum(rec.get(f"{k}_s") or 0.0 for k in ("trace", "lower", "compile"))
        rec["total_cpu_s"] = sum(rec.get(f"{k}_cpu_s") or 0.0 for k in ("trace", "lower", "compile"))
        rec["persistent_cache_hits"] = clock.cache_hits - hits
        rec["stablehlo_chars"] = len(lowered.as_text())
        rec["kernel_calls"] = sum(n for _, n in kernel_calls(lowered.as_text()).values())
        rec.update(memory_fields(memory))
        emit(rec)


def memory_fields(memory) -> Dict[str, Optional[int]]:
    """Bytes of a compiled program's buffers as XLA assigned them; total = arguments + outputs +
    temporaries - aliased (None where the backend gives no analysis)."""
    names = ("argument", "output", "temp", "alias", "generated_code")
    if memory is None:
        return {f"{n}_bytes": None for n in (*names, "total")}
    out = {f"{n}_bytes": int(getattr(memory, f"{n}_size_in_bytes")) for n in names}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


# ----------------------------------------------------------------------------- diffusers (subprocess)


def run_torch(args, mode: str) -> List[Dict[str, Any]]:
    """Run bench_inpaint_torch.py in its own process; forward and return its JSON lines."""
    cmd = [sys.executable, str(Path(__file__).with_name("bench_inpaint_torch.py")), "--mode", mode,
           "--preset", args.preset, "--batch", *map(str, args.batch), "--steps", str(args.steps),
           "--scheduler", args.scheduler, "--guidance", str(args.guidance), "--size", str(args.size),
           "--dtype", args.torch_dtype, "--repeat", str(args.repeat), "--seed", str(args.seed)]
    if args.largest_batch:
        cmd += ["--largest-batch", "--max-batch", str(args.max_batch)]
    records = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                records.append(json.loads(line))
    if proc.returncode:
        records.append({"kind": "error", "system": f"diffusers-{mode}", "returncode": proc.returncode,
                        "message": "the diffusers benchmark failed; its traceback is on stderr above"})
        emit(records[-1])
    return records


def ratios(ours: List[Dict[str, Any]], theirs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """ours / diffusers for each batch both measured (speed > 1 and memory < 1 favour ours)."""
    out = []
    by_batch = {r["batch"]: r for r in theirs if r.get("kind") == "throughput"}
    for r in ours:
        t = by_batch.get(r["batch"])
        if t is None:
            continue

        def ratio(key):
            return None if not r.get(key) or not t.get(key) else r[key] / t[key]

        out.append({"kind": "ratio", "system": "flax-inpaint", "baseline": t["system"], "batch": r["batch"],
                    "preset": r["preset"], "device": r["device"], "img_per_s": ratio("img_per_s"),
                    "first_call_s": ratio("first_call_s"), "peak_mem_bytes": ratio("peak_mem_bytes")})
    return out


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None, torch_side: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16], help="batch sizes (prompts per call)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the preset's, 50 or 30)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                   help="default: the preset's (pndm; euler for sdxl)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance_scale (> 1: classifier-free guidance)")
    p.add_argument("--size", type=int, default=None, help="image height = width (default: the preset's)")
    p.add_argument("--repeat", type=int, default=3, help="steady-state calls timed after the first (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--largest-batch", action="store_true", help="search the largest batch that fits in memory")
    p.add_argument("--max-batch", type=int, default=256, help="upper limit of --largest-batch")
    if torch_side:
        p.add_argument("--mode", choices=["eager", "compile"], default="eager")
        p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                       help="auto: float16 on CUDA (diffusers' usual choice), float32 on CPU")
    else:
        p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
        p.add_argument("--attention", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                       help="auto: cuDNN flash attention on NVIDIA GPUs, the Pallas flash kernel on TPUs, else XLA")
        p.add_argument("--torch", nargs="+", choices=["none", "eager", "compile"], default=["none"],
                       help="also run diffusers: eager and/or torch.compile(mode='reduce-overhead')")
        p.add_argument("--torch-dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
        p.add_argument("--cache-dir", default=None, help="enable JAX's persistent compilation cache here")
        p.add_argument("--psnr", action="store_true", help="PSNR of --dtype images against float32 ones")
        p.add_argument("--nan-check", action="store_true", help="finite images with every scheduler")
        p.add_argument("--flops-only", action="store_true", help="only TFLOP per image (lowering, no run)")
        p.add_argument("--jit", action="store_true",
                       help="call with jit=True: diffusers' pmap convention (sharded inputs, replicated params)")
        p.add_argument("--progress", action="store_true", help="with a per-step progress bar (a host callback)")
        p.add_argument("--preview", type=int, default=0, metavar="K",
                       help="with latent-to-RGB preview PNGs every K steps (the latents go to the host every step)")
        p.add_argument("--preview-vae", action="store_true",
                       help="--preview K decodes with the VAE in the program every K steps (full-size PNGs)")
        p.add_argument("--flash-min-length", type=int, default=Runtime.flash_min_length,
                       help="shortest sequence the Pallas TPU kernel takes (Runtime.flash_min_length)")
        p.add_argument("--compile-only", action="store_true",
                       help="only trace/lower/compile seconds and the compiled program's memory per batch (no run)")
        p.add_argument("--pallas-interpret", action="store_true",
                       help="with --compile-only --attention pallas off a TPU: compile the Pallas kernels in TPU "
                            "interpret mode, for this host's memory analysis of the TPU program's buffers")
        p.add_argument("--platform", choices=["tpu"], default=None,
                       help="with --flops-only/--compile-only: lower for this platform from any host (no compile "
                            "unless it is this host's)")
        p.add_argument("--no-throughput", action="store_true",
                       help="skip the timed runs: only the other measurements asked for (--psnr, --nan-check, ...)")
        p.add_argument("--profile", default=None, metavar="DIR",
                       help="trace one call at the largest batch into DIR; a 'profile' record sums time per kernel")
        p.add_argument("--peak-tflops", type=float, default=None,
                       help=f"dense TFLOP/s the floor is measured against (default: {PEAK_TFLOPS}, by device)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.steps = preset.steps if args.steps is None else args.steps
    args.scheduler = args.scheduler or preset.default_scheduler
    if min(args.batch) < 1 or args.steps < 1 or args.repeat < 1:
        p.error(f"--batch, --steps and --repeat must be >= 1; got {args.batch}, {args.steps}, {args.repeat}.")
    args.size = args.size or PRESETS[args.preset].size
    if not torch_side:
        vae_check = args.nan_check and args.no_throughput and not (args.psnr or args.largest_batch)
        if preset.text_encoder_2 is not None and (not (args.flops_only or vae_check) or args.platform
                                                  or args.compile_only or args.torch != ["none"]):
            p.error(f"--preset {args.preset}: only --flops-only (lowered for this host) or --nan-check "
                    "--no-throughput (the VAE) until the Flax SDXL pipeline exists; run "
                    "benchmarks/bench_inpaint_torch.py alone for diffusers.")
        if "none" in args.torch and len(args.torch) > 1:
            p.error(f"--torch {' '.join(args.torch)}: 'none' cannot be combined with eager/compile.")
        if args.platform and not (args.flops_only or args.compile_only):
            p.error(f"--platform {args.platform} only lowers: combine it with --flops-only or --compile-only.")
        if args.pallas_interpret and not args.compile_only:
            p.error("--pallas-interpret only applies to --compile-only (interpreted kernels are for analysis).")
        if args.preview_vae and not args.preview:
            p.error("--preview-vae decodes the previews of --preview K; pass --preview K too.")
        if args.psnr and args.dtype == "float32":
            p.error("--psnr compares --dtype against float32; pass --dtype bfloat16 or float16.")
    return args


def common_fields(args) -> Dict[str, Any]:
    return {"preset": args.preset, "height": args.size, "width": args.size, "steps": args.steps,
            "scheduler": args.scheduler, "guidance_scale": args.guidance, "dtype": args.dtype,
            "jit": getattr(args, "jit", False), "progress": getattr(args, "progress", False),
            "preview_every": getattr(args, "preview", 0), "preview_vae": getattr(args, "preview_vae", False),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    common = common_fields(args)
    theirs = {}
    if not (args.flops_only or args.compile_only):  # before JAX allocates device memory, held until exit
        theirs = {mode: run_torch(args, mode) for mode in args.torch if mode != "none"}

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    common.update(jax_context(), attention=args.attention, persistent_cache=bool(args.cache_dir))
    if args.flops_only:  # nothing compiles (and tests call it in-process: no listeners left behind)
        flops_only(args, preset, common)
        return 0
    clock = CompileClock()
    if args.compile_only:
        compile_only(args, preset, common, clock)
        return 0
    if preset.text_encoder_2 is not None:  # sdxl: parse_args let only the VAE's NaN check through
        for rec in sdxl_vae_nan_check(args, preset, common):
            emit(rec)
        return 0
    ours = bench_ours(args, preset, common, clock)
    for records in theirs.values():
        for rec in ratios(ours, records):
            emit(rec)
    failed = any(r.get("kind") == "error" for records in theirs.values() for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
