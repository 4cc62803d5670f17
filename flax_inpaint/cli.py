"""The `flax-inpaint` command line: demo, inpaint, img2img, sweep, convert, bench and
train-controlnet.

Errors from user input end in one line `flax-inpaint: error: ...` naming the option and the fix (exit
status 2), never a traceback; Ctrl-C and SIGTERM stop with one line too (130, 143). Outputs are
checked before any model loads and written atomically, so no file is ever half-written.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
DEMO_MODEL = "tiny-shapes-inpaint"
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inpaint.py"

EPILOG = """examples:
  flax-inpaint demo --out demo.png
  flax-inpaint inpaint --model path/to/sd-inpainting --image photo.png --mask mask.png \\
      --prompt "a cat on a bench" "a dog on a bench" --batch 2 --steps 30 --out outputs
  flax-inpaint img2img --model path/to/sd --image photo.png --prompt "a watercolor cat" --strength 0.6 \\
      --controlnet path/to/controlnet-canny --control-image edges.png
  flax-inpaint sweep sweep.json            (run again after a kill: it resumes)
  flax-inpaint convert --model path/to/sd-inpainting
  flax-inpaint convert --single-file sd-v1-5-inpainting.safetensors --out sd15-inpainting
  flax-inpaint inpaint --single-file model.safetensors --lora style.safetensors:0.8 \\
      --textual-inversion negemb.pt:negemb --negative-prompt negemb --image photo.png --mask mask.png --prompt "a cat"
  flax-inpaint bench --preset tiny --batch 1 --steps 2
  flax-inpaint diffedit --image photo.png --source-prompt "a bowl of fruits" --target-prompt "a bowl of pears" \\
      --model path/to/sd --out edits
  flax-inpaint train-controlnet --pretrained_model_name_or_path BASE --train_data_dir DATA --output_dir OUT

A model is a local diffusers folder (model_index.json) or a hub repo id (org/name), or with --single-file
one .safetensors/.ckpt in the original Stable Diffusion layout.
FLAX_INPAINT_TRACEBACK=1 shows the traceback of an unexpected error.
"""
TRACEBACK_ENV = "FLAX_INPAINT_TRACEBACK"
# What to lower when the device runs out of memory, per command.
MEMORY_HINT = {
    "demo": "lower --scale",
    "inpaint": "lower --batch or --size, or pass --dtype bfloat16",
    "img2img": "lower --batch or --size, or pass --dtype bfloat16",
    "diffedit": "lower --size or --num-maps-per-mask, or pass --dtype bfloat16",
    "sweep": "lower --per-device-batch or the spec's 'size', or set its 'dtype' to 'bfloat16'",
    "convert": "convert on a machine with more memory",
    "train": "lower --batch-size",
    "train-controlnet": "lower --train_batch_size or --resolution, or pass --gradient_checkpointing or "
                        "--mixed_precision bf16",
}


def _asset(name: str) -> Path:
    return ASSETS / name


def fail(message: str) -> "None":
    """End the command with one line on stderr naming the problem (exit status 2)."""
    print(f"flax-inpaint: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def say(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def load_image(path: str, arg: str):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        fail(f"{arg} {path!r} {what}; pass the path of a PNG/JPEG file.")
    try:
        with Image.open(p) as im:
            return im.convert("L" if arg == "--mask" else "RGB")
    except (OSError, ValueError) as e:  # not an image, truncated, unreadable
        fail(f"{arg} {path!r} is not a readable image ({e}); pass a PNG/JPEG file.")


def check_folder(path: Path, option: str) -> None:
    """Fail unless `path` is, or can be created as, a folder we may write into."""
    if path.exists() and not path.is_dir():
        fail(f"{option} {str(path)!r} is a file, not a folder; pass a folder path (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file; pass another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{option} {str(path)!r}: {str(existing)!r} is not writable; pass a folder you can write to.")


def _check_png(path: Path, option: str) -> None:
    """Fail unless `path` can be written as a PNG file."""
    if path.suffix.lower() != ".png":
        fail(f"{option} {str(path)!r} must end in .png (a PNG file is written).")
    if path.is_dir():
        fail(f"{option} {str(path)!r} is a folder; pass a file path such as {str(path / 'demo.png')!r}.")
    check_folder(path.parent, f"{option} {str(path)!r}: its folder")


def check_cache() -> None:
    """Fail unless the params cache that loading writes converted weights into is usable."""
    from flax_inpaint.io import default_cache_dir

    check_folder(default_cache_dir(), "the params cache ($FLAX_INPAINT_CACHE, default ~/.cache/flax_inpaint)")


def _load(model: Optional[str], dtype: str, scheduler: Optional[str], single_file: Optional[str] = None,
          config: Optional[str] = None, loras=(), embeddings=()):
    """(pipeline, params) of `model` (or of `single_file`, with `config`), with `scheduler` (a diffusers class
    name) swapped in and the LoRAs and textual-inversion embeddings loaded."""
    import jax.numpy as jnp

    from flax_inpaint import FlaxAutoPipelineForInpainting
    from flax_inpaint.loaders import options
    from flax_inpaint.pipelines.loading import model_error, with_scheduler

    if (model is None) == (single_file is None):
        fail("give --model (a diffusers folder or hub id) or --single-file (a .safetensors/.ckpt), not both or "
             "neither.")
    check_cache()
    say(f"loading {model or single_file} ({dtype}) ...")
    try:
        pipe, params = options.load(FlaxAutoPipelineForInpainting, model, single_file, config,
                                    dtype=getattr(jnp, dtype))
    except (ValueError, OSError) as e:  # CheckpointError, a bad config, or a component the loader cannot read
        fail(model_error("--model", model, e) if single_file is None else
             f"--single-file {single_file!r} could not be loaded: {e}\nFix --single-file (a Stable Diffusion "
             "1.x/2.x or SDXL checkpoint in the original layout) or pass --config a local diffusers folder of its "
             "architecture.")
    try:
        params = options.apply(pipe, params, loras, embeddings)
    except (ValueError, OSError) as e:
        fail(f"--lora / --textual-inversion could not be loaded: {e}")
    return with_scheduler(pipe, params, scheduler)


def _check_scheduler(name: Optional[str]) -> None:
    from flax_inpaint.pipelines.loading import scheduler_class

    if name is not None:
        try:
            scheduler_class(name)
        except ValueError as e:
            fail(f"--scheduler {name!r}: {e}")


def _check_steps(pipe, steps: int, strength: float) -> None:
    from flax_inpaint.pipelines.inputs import strength_fields

    try:
        strength_fields(pipe.scheduler, steps, strength)
    except ValueError:
        fail(f"--strength {strength} with --steps {steps} leaves no denoising step; raise --strength or --steps "
             "(steps x strength must reach 1).")


def write_png(image, path: Path, option: str) -> None:
    """Save atomically: a killed run never leaves a half-written PNG."""
    from flax_inpaint.io import write_bytes_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        write_bytes_atomic(path, buf.getvalue())
    except OSError as e:  # e.g. the disk is full
        fail(f"{option}: could not write {str(path)!r} ({e.strerror or e}); free space or pass another {option}.")


def _inpaint(pipe, params, image, mask, prompts: Sequence[str], negative: Optional[str], steps: int,
             guidance: float, strength: float, seeds: Sequence[int], size: Optional[int], overlay: bool,
             batch: Optional[int] = None, progress: Optional[bool] = False,
             save: Optional[Callable[[int, list], None]] = None, preview: Optional[Path] = None,
             preview_every: int = 1, preview_vae: bool = False, ip_image=None, control_image=None,
             controlnet_scale: Optional[float] = None):
    """One image per (prompt, seed) pair, each sampled with its own key; returns (PIL images, nsfw, seconds).
    Inpaints, or without a `mask` runs img2img (`pipe` is then an img2img pipeline).

    Calls of `batch` pairs each (default: all at once) advance a progress bar (`progress`: True,
    False, or None for only on a terminal); a pair's image does not depend on its batch companions.
    `save(first_index, images)` receives each call's images as soon as they exist. A second bar moves per
    denoising step of each call; `preview` gets a latent-to-RGB PNG per image every `preview_every` steps
    (`preview_vae`: the VAE's decode, at full size). `ip_image`: the IP-Adapter reference image;
    `control_image`: a ControlNet pipeline's control image, at `controlnet_scale` (None: the pipeline's default).
    """
    from tqdm import tqdm

    from flax_inpaint.pipelines.callbacks import PreviewWriter, wants_bar
    from flax_inpaint.pipelines.inputs import seed_keys

    f = pipe.vae_scale_factor
    if size and size % f:
        fail(f"--size {size} must be a multiple of {f} (the model's VAE scale factor); pass e.g. "
             f"{max(f, size - size % f)}.")
    if not size and min(image.size) < f:
        fail(f"--image is {image.width}x{image.height}; the model needs at least {f}x{f} pixels (its VAE factor): "
             "pass a larger image or --size.")
    height, width = (size, size) if size else (image.height - image.height % f, image.width - image.width % f)
    if overlay and (width, height) != image.size:
        fail(f"--overlay pastes the unmasked pixels of --image back, so the output must be the image's size "
             f"{image.width}x{image.height}, but it is {width}x{height} (--size, or flooring to a multiple of "
             f"{f}); drop --overlay or --size, or resize the image.")
    batch = batch or len(prompts)
    images, nsfw = [], []
    quiet = None if progress is None else not progress  # tqdm: None disables the bar off a terminal
    run, inputs = (pipe.img2img, (image,)) if mask is None else (pipe.inpaint, (image, mask))
    inputs += () if control_image is None else (control_image,)
    options = {} if mask is None else {"apply_overlay": overlay}
    options.update({} if ip_image is None else {"ip_adapter_image": ip_image})
    options.update({} if controlnet_scale is None else {"controlnet_conditioning_scale": controlnet_scale})
    start = time.perf_counter()
    with tqdm(total=len(prompts), unit="img", desc="inpaint" if mask is not None else "img2img",
              disable=quiet) as bar:
        for lo in range(0, len(prompts), batch):
            chunk = list(prompts[lo:lo + batch])
            pipe.set_progress_bar_config(desc=f"batch {lo // batch + 1}", unit="step", leave=False)
            writer = PreviewWriter(preview, preview_every, f"batch{lo // batch + 1}_", vae=preview_vae) \
                if preview else None
            hooks = [writer.host_callback()] if writer else []
            out = run(chunk, *inputs, params, seed_keys(seeds[lo:lo + batch]),
                      negative_prompt=None if negative is None else [negative] * len(chunk), height=height,
                      width=width, num_inference_steps=steps, guidance_scale=guidance, strength=strength,
                      progress=wants_bar(progress), host_callbacks=hooks, output_type="pil", **options)
            if save is not None:
                save(lo, list(out.images))
            images += list(out.images)
            flags = out.nsfw_content_detected  # None without a safety checker
            nsfw = None if flags is None else nsfw + list(flags)
            bar.update(len(chunk))
    return images, nsfw, time.perf_counter() - start


def cmd_demo(args) -> None:
    """Inpaint the bundled sample with the bundled tiny model; writes image | mask | result."""
    from flax_inpaint import make_image_grid

    _check_png(Path(args.out), "--out")
    folder = _asset(DEMO_MODEL)
    if not (folder / "model_index.json").is_file():
        fail(f"the bundled demo model is missing from {folder}; reinstall flax-inpaint.")
    image = load_image(str(_asset("sample_image.png")), "--image")
    mask = load_image(str(_asset("sample_mask.png")), "--mask")
    pipe, params = _load(str(folder), "float32", None)
    images, _, seconds = _inpaint(pipe, params, image, mask, [args.prompt], None, args.steps, args.guidance,
                                  1.0, [args.seed], None, True)
    from PIL import Image

    size = (image.width * args.scale, image.height * args.scale)  # nearest: every model pixel stays visible
    panels = [im.convert("RGB").resize(size, Image.NEAREST) for im in (image, mask, images[0])]
    grid = make_image_grid(panels, rows=1, cols=3)
    write_png(grid, Path(args.out), "--out")
    print(f"wrote {args.out} (image | mask | result) for {args.prompt!r} in {seconds:.1f} s")


def cmd_inpaint(args) -> None:
    """`inpaint`, and `img2img` (the same options without --mask and --overlay)."""
    img2img = args.command == "img2img"
    if args.preview_vae and not args.preview:
        fail("--preview-vae decodes the previews of --preview DIR; pass --preview DIR too.")
    image = load_image(args.image, "--image")
    mask = None if img2img else load_image(args.mask, "--mask")
    if (args.controlnet is None) != (args.control_image is None) or (
            args.controlnet_scale is not None and args.controlnet is None):
        fail("--controlnet DIR and --control-image IMG go together (--controlnet-scale S with them); pass both or "
             "neither.")
    control_image = None if args.control_image is None else load_image(args.control_image, "--control-image")
    if (args.ip_adapter is None) != (args.ip_image is None) or (args.ip_scale is not None and args.ip_adapter is None):
        fail("--ip-adapter FILE and --ip-image IMG go together (--ip-scale S with them); pass both or neither.")
    ip_image = None if args.ip_image is None else load_image(args.ip_image, "--ip-image")
    if args.ip_adapter is not None and not Path(args.ip_adapter).is_file():
        fail(f"--ip-adapter {args.ip_adapter!r} is not a file; pass an IP-Adapter .safetensors/.bin file "
             "(e.g. ip-adapter_sd15.safetensors).")
    if mask is not None and image.size != mask.size:
        fail(f"--image is {image.size[0]}x{image.size[1]} but --mask is {mask.size[0]}x{mask.size[1]}; "
             "they must be the same size.")
    if args.seed + args.batch > 2**32:
        fail(f"--seed {args.seed} with --batch {args.batch} uses seeds up to {args.seed + args.batch - 1}; "
             "seeds must lie in [0, 2**32).")
    out_dir = Path(args.out)
    check_folder(out_dir, "--out")
    _check_scheduler(args.scheduler)
    controlnet = _load_controlnet(args.controlnet, args.dtype)
    pipe, params = _load(args.model, args.dtype, args.scheduler, args.single_file, args.config, args.lora,
                         args.textual_inversion)
    if img2img and pipe.unet.in_channels != 4:
        fail(f"img2img needs a text-to-image model (a 4-channel UNet), but {args.model or args.single_file!r} is an "
             "inpainting model (9 channels); use `flax-inpaint inpaint` with it, or pass another --model.")
    _check_steps(pipe, args.steps, args.strength)
    if ip_image is not None:
        pipe, params = _with_ip_adapter(pipe, params, Path(args.ip_adapter), args.ip_scale, args.dtype)
    pipe, params = _for_task(pipe, params, img2img, controlnet, args.controlnet)
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    seeds = [args.seed + k for _ in args.prompt for k in range(args.batch)]
    names = [f"prompt{j // args.batch}_seed{seed}.png" for j, seed in enumerate(seeds)]
    replaced = sum((out_dir / name).exists() for name in names)

    def save(first: int, images: list) -> None:
        for name, im in zip(names[first:], images):
            write_png(im, out_dir / name, "--out")

    if args.preview:
        check_folder(Path(args.preview), "--preview")
    say(f"{'generating' if img2img else 'inpainting'} {len(prompts)} image(s) in batches of {args.batch}, "
        f"{args.steps} steps (the first batch compiles) ...")
    images, nsfw, seconds = _inpaint(pipe, params, image, mask, prompts, args.negative_prompt, args.steps,
                                     args.guidance, args.strength, seeds, args.size, not img2img and args.overlay,
                                     args.batch, progress=False if args.no_progress else None, save=save,
                                     preview=args.preview and Path(args.preview), preview_every=args.preview_every,
                                     preview_vae=args.preview_vae, ip_image=ip_image, control_image=control_image,
                                     controlnet_scale=args.controlnet_scale)
    flagged = 0 if nsfw is None else int(sum(bool(x) for x in nsfw))
    print(f"wrote {len(images)} image(s) to {out_dir} in {seconds:.1f} s"
          + (f", replacing {replaced} of the same name" if replaced else "")
          + (f"; the safety checker blacked out {flagged}" if flagged else ""))


def _load_controlnet(controlnet: Optional[str], dtype: str):
    """(FlaxControlNetModel, params) of the --controlnet folder or hub id, or None."""
    import jax.numpy as jnp

    from flax_inpaint import FlaxControlNetModel

    if controlnet is None:
        return None
    say(f"loading the ControlNet {controlnet} ...")
    try:
        return FlaxControlNetModel.from_pretrained(controlnet, dtype=getattr(jnp, dtype))
    except (ValueError, OSError) as e:
        fail(f"--controlnet {controlnet!r} could not be loaded ({_first_line(e)}); pass a diffusers ControlNet folder "
             "(config.json and its weights) or a hub repo id in the local hub cache or reachable online.")


def _for_task(pipe, params, img2img: bool, controlnet, option: str):
    """(pipeline, params) for inpaint or img2img of the model's family (SD or SDXL), with `controlnet` ((model,
    params) from `_load_controlnet`, given as `option`) if not None."""
    from flax_inpaint import FlaxAutoPipelineForImage2Image, FlaxAutoPipelineForInpainting

    auto = FlaxAutoPipelineForImage2Image if img2img else FlaxAutoPipelineForInpainting
    if controlnet is None:
        return auto.from_pipe(pipe), params
    try:
        return auto.from_pipe(pipe, controlnet=controlnet[0]), {**params, "controlnet": controlnet[1]}
    except ValueError as e:  # made for another VAE, or no such ControlNet pipeline for the family
        fail(f"--controlnet {option!r} does not fit the model: {e}")


def _with_ip_adapter(pipe, params, path: Path, scale: Optional[float], dtype: str):
    """(pipeline, params) with the IP-Adapter file `path` at `scale` (default 1) and an image encoder: the
    model's, else the `image_encoder` folder beside the file (the layout of h94/IP-Adapter's models/)."""
    import jax.numpy as jnp

    from flax_inpaint.models.clip_vision import FlaxCLIPVisionModelWithProjection

    if pipe.image_encoder is None:
        folder = path.parent / "image_encoder"
        if not folder.is_dir():
            fail(f"--ip-adapter {str(path)!r}: the model has no image_encoder and there is no {str(folder)!r}; put "
                 "the adapter's CLIP image encoder folder there (as in h94/IP-Adapter's models/).")
        try:
            encoder, encoder_params = FlaxCLIPVisionModelWithProjection.from_pretrained(folder,
                                                                                        dtype=getattr(jnp, dtype))
        except (ValueError, OSError) as e:
            fail(f"--ip-adapter {str(path)!r}: its image encoder {str(folder)!r} could not be loaded: "
                 f"{_first_line(e)}")
        pipe, params = type(pipe).from_pipe(pipe, image_encoder=encoder), {**params, "image_encoder": encoder_params}
    try:
        params = pipe.load_ip_adapter(params, path)
        return pipe, pipe.set_ip_adapter_scale(params, 1.0 if scale is None else scale)
    except (ValueError, OSError) as e:
        fail(f"--ip-adapter {str(path)!r} could not be loaded: {_first_line(e)}")


def cmd_sweep(args) -> None:
    from flax_inpaint.sweep import SweepLockError, SweepSpec, run_sweep

    out = None if args.out is None else str(Path(args.out).resolve())
    spec = SweepSpec.from_file(args.spec, out=out)
    out_option = "--out" if args.out is not None else f"the 'out' of {args.spec}"
    check_folder(spec.out, out_option)
    check_cache()
    if args.per_device_batch is not None:
        spec = dataclasses.replace(spec, per_device_batch=args.per_device_batch)
    cluster = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}
    if (args.process_id is None) != (args.num_processes is None) or (
            args.process_id is not None and not 0 <= args.process_id < args.num_processes):
        fail(f"--process-id {args.process_id} with --num-processes {args.num_processes}: give both, with the "
             "process id in 0 .. num-processes - 1.")
    if args.distributed or any(v is not None for v in cluster.values()):
        import jax

        try:
            jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})
        except Exception as e:  # no cluster found, an unreachable coordinator, a timeout
            fail(f"--distributed: jax.distributed.initialize() failed ({_first_line(e)}); pass "
                 "--coordinator-address HOST:PORT, --num-processes and --process-id, or run on a TPU pod or "
                 "under SLURM.")
    try:
        summary = run_sweep(spec, progress=False if args.no_progress else None)
    except SweepLockError as e:
        fail(f"{out_option}: {e}")
    print(f"sweep {args.spec}: {summary.total} result(s) in {summary.out}, {summary.already_done} found, "
          f"{summary.computed} computed; contact sheet {summary.contact_sheet}")


def cmd_convert(args) -> None:
    """Convert a PyTorch diffusers folder's models to Flax msgpack: into the params cache, and with
    --out into a folder that both diffusers and flax-inpaint load."""
    from flax_inpaint.io import default_cache_dir

    out = None if args.out is None else Path(args.out)
    if out is not None:
        if out.is_dir() and any(out.iterdir()):
            fail(f"--out {args.out!r} already exists and is not empty; pass a new folder (convert writes a "
                 "whole pipeline folder) or delete it.")
        check_folder(out, "--out")
    pipe, params = _load(args.model, args.dtype, None, args.single_file, args.config)
    if args.single_file is None:
        print(f"cached Flax msgpack params under {default_cache_dir()}: the next load of {args.model} skips conversion")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:  # written aside, then renamed into place: --out holds a complete pipeline folder or nothing
            pipe.save_pretrained(tmp, params)
            os.rename(tmp, out)  # replaces an empty folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"wrote Flax msgpack + safetensors weights to {args.out}")


def cmd_bench(args, rest: List[str]) -> None:
    """Run benchmarks/bench_inpaint.py (a source checkout's) with the remaining arguments."""
    script = Path(args.script) if args.script else BENCH_SCRIPT
    if not script.is_file():
        fail(f"the benchmark script is not at {script}: `flax-inpaint bench` runs benchmarks/bench_inpaint.py of a "
             "source checkout; pass --script PATH/TO/bench_inpaint.py.")
    spec = importlib.util.spec_from_file_location("bench_inpaint", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    raise SystemExit(module.main(rest))


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an int' if kind is int else 'a number'}, got {text!r}") from None


# argparse types shared by the commands (here, cli_diffedit, train.controlnet): one clear line on bad input.
def positive(kind, most=None):
    """`kind` (int or float) > 0, and <= `most` when given."""
    def parse(text):
        value = _number(kind, text)
        if value <= 0 or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be > 0{'' if most is None else f' and <= {most}'}, got {text}")
        return value
    return parse


def finite(text):
    """A finite float."""
    value = _number(float, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def unit(text):
    """A float in [0, 1] (strengths, proportions)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def uint32(text):
    """An int in [0, 2**32): a seed."""
    value = _number(int, text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {text}")
    return value


def _loader_arg(kind: str, parse):
    def check(text):
        from flax_inpaint.loaders import options

        try:
            value = parse(text)
            options.check_exists(kind, value[0])
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return check


def _add_source_options(parser, loaders: bool) -> None:
    """--model or --single-file (with --config); with `loaders` also --lora and --textual-inversion."""
    from flax_inpaint.loaders import options

    parser.add_argument("--model", default=None, help="local diffusers folder or hub repo id")
    parser.add_argument("--single-file", default=None, metavar="FILE",
                        help="instead of --model: a Stable Diffusion 1.x/2.x or SDXL checkpoint in the original layout "
                             "(.safetensors, or .ckpt read with torch.load(weights_only=True))")
    parser.add_argument("--config", default=None, metavar="FOLDER",
                        help="with --single-file: a local diffusers folder of the same architecture (tokenizer, "
                             "scheduler, sizes); default: the known family's built-in defaults")
    if loaders:
        parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                            type=_loader_arg("--lora", options.parse_lora),
                            help="a LoRA (diffusers/PEFT, kohya/A1111) at WEIGHT (default 1); repeatable")
        parser.add_argument("--textual-inversion", action="append", default=[], metavar="PATH[:TOKEN]",
                            type=_loader_arg("--textual-inversion", options.parse_embedding),
                            help="a textual-inversion embedding, as TOKEN (default: the file's); repeatable")


def _add_generation_options(inp, img2img: bool) -> None:
    """The options of `inpaint` and of `img2img` (which has no --mask and --overlay)."""
    _add_source_options(inp, loaders=True)
    inp.add_argument("--image", required=True, help="RGB image file")
    if not img2img:
        inp.add_argument("--mask", required=True, help="mask file of the image's size; white = repaint")
    inp.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    inp.add_argument("--negative-prompt", default=None, help="what to steer away from (with --guidance > 1)")
    inp.add_argument("--scheduler", default=None, help="diffusers class name, e.g. DDIMScheduler; "
                                                       "default: the model's")
    inp.add_argument("--steps", type=positive(int), default=50, help="denoising steps")
    inp.add_argument("--guidance", type=finite, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    inp.add_argument("--strength", type=unit, default=0.8 if img2img else 1.0,
                     help="how much of --image is noised away (1: all)" if img2img else
                     "1 repaints from noise; lower keeps more of --image")
    inp.add_argument("--seed", type=uint32, default=0, help="seed of the first image of each prompt")
    inp.add_argument("--batch", type=positive(int), default=1,
                     help="images per prompt, sampled together in one call")
    inp.add_argument("--size", type=positive(int), default=None,
                     help="square output size, a multiple of the model's VAE scale factor; default: the image's size "
                          "floored to that factor")
    inp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute and params dtype (bfloat16 for TPUs and GPUs)")
    if not img2img:
        inp.add_argument("--overlay", action="store_true", help="paste the unmasked pixels of --image back exactly")
    inp.add_argument("--out", default="outputs", help="output folder")
    inp.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    inp.add_argument("--preview", default=None, metavar="DIR",
                     help="write latent-to-RGB previews (batch<b>_<image>-step<s>.png) while sampling")
    inp.add_argument("--preview-every", type=positive(int), default=5, help="steps between previews")
    inp.add_argument("--preview-vae", action="store_true",
                     help="decode the previews with the VAE (full size; the decoder runs every --preview-every steps)")
    inp.add_argument("--ip-adapter", default=None, metavar="FILE",
                     help="IP-Adapter weights (.safetensors/.bin; plain or plus): prompt with --ip-image too")
    inp.add_argument("--ip-image", default=None, metavar="IMG", help="the IP-Adapter's reference image")
    inp.add_argument("--ip-scale", type=finite, default=None, metavar="S", help="IP-Adapter scale (default 1)")
    inp.add_argument("--controlnet", default=None, metavar="DIR",
                     help="a ControlNet (diffusers folder or hub id) guiding the model: with --control-image too")
    inp.add_argument("--control-image", default=None, metavar="IMG",
                     help="the ControlNet's control image (e.g. edges or depth), resized to the output size")
    inp.add_argument("--controlnet-scale", type=finite, default=None, metavar="S",
                     help=f"ControlNet conditioning scale (default {0.8 if img2img else 0.5}, as diffusers')")
    inp.set_defaults(func=cmd_inpaint)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only where an option has a default worth reading."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = argparse.ArgumentParser(
        prog="flax-inpaint", description="Stable Diffusion inpainting in JAX/Flax.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from flax_inpaint import __version__

    parser.add_argument("--version", action="version", version=f"flax-inpaint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="inpaint the bundled sample with the bundled tiny model", formatter_class=fmt,
                          description="Inpaint the bundled sample image with the bundled tiny model; no download.")
    demo.add_argument("--prompt", default="a red circle on a blue background")
    demo.add_argument("--seed", type=uint32, default=0)
    demo.add_argument("--steps", type=positive(int), default=25)
    demo.add_argument("--guidance", type=finite, default=4.0, help="classifier-free guidance scale")
    demo.add_argument("--scale", type=positive(int, most=32), default=4,
                      help="enlarge each 64x64 panel this many times")
    demo.add_argument("--out", default="demo.png", help="PNG grid: image | mask | result")
    demo.set_defaults(func=cmd_demo)

    inp = sub.add_parser(
        "inpaint", help="inpaint one image with a diffusers-format model", formatter_class=fmt,
        description="Repaint the white part of --mask in --image. Image k of every prompt uses seed --seed + k, "
                    "so `sweep` with that seed reproduces it. Writes OUT/prompt<i>_seed<s>.png.")
    _add_generation_options(inp, img2img=False)
    i2i = sub.add_parser(
        "img2img", help="turn one image into new ones with a text-to-image model", formatter_class=fmt,
        description="Generate images from --image noised by --strength (image k of every prompt with seed --seed "
                    "+ k), optionally guided by a ControlNet. Writes OUT/prompt<i>_seed<s>.png.")
    _add_generation_options(i2i, img2img=True)

    sw = sub.add_parser(
        "sweep", formatter_class=fmt, help="run (or resume) a research sweep from a .json/.yaml spec",
        description="Run every configuration of SPEC (a grid and/or list over prompts, seeds, guidance, strength, "
                    "steps, scheduler, images and masks; see flax_inpaint.sweep) across all devices. Results go to "
                    "OUT/images/<id>.png with one line each in OUT/manifest.jsonl, plus OUT/contact_sheet.png. "
                    "Rerunning the same command after a kill computes only what is missing.")
    sw.add_argument("spec", help="sweep spec file (.json; .yaml with PyYAML)")
    sw.add_argument("--out", default=None, help="output folder; default: the spec's 'out'")
    sw.add_argument("--per-device-batch", type=positive(int), default=None,
                    help="images per device per call; default: the spec's (1)")
    multi = sw.add_argument_group(
        "multi-host", "Run the same command in every process; each feeds its part of every batch and process 0 "
                      "writes. On TPU pods and SLURM, --distributed alone finds the cluster.")
    multi.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    multi.add_argument("--coordinator-address", default=None, help="host:port of process 0 (implies --distributed)")
    multi.add_argument("--num-processes", type=positive(int), default=None, help="how many processes take part")
    multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)

    conv = sub.add_parser(
        "convert", formatter_class=fmt, help="convert PyTorch diffusers weights to Flax msgpack",
        description="Convert a PyTorch diffusers model (folder or hub id) to Flax params, cached as msgpack so later "
                    "loads skip conversion ($FLAX_INPAINT_CACHE, default ~/.cache/flax_inpaint); with --out, also "
                    "write a folder with both the Flax msgpack and the PyTorch safetensors weights.")
    _add_source_options(conv, loaders=False)
    conv.add_argument("--out", default=None, help="also write the converted pipeline folder here")
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="params dtype")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser(
        "bench", add_help=False, allow_abbrev=False,
        help="benchmark throughput (benchmarks/bench_inpaint.py; --help lists its options)",
        description="Run benchmarks/bench_inpaint.py of a source checkout with the remaining arguments.")
    bench.add_argument("--script", default=None, help="path of bench_inpaint.py (default: the checkout's)")
    bench.set_defaults(func=cmd_bench)

    from flax_inpaint.cli_diffedit import add_parser as add_diffedit

    add_diffedit(sub, fmt)

    sub.add_parser(
        "train-controlnet", add_help=False, allow_abbrev=False,
        help="train a ControlNet on a base model and your data (flax_inpaint.train.controlnet; --help lists its "
             "options)")
    return parser


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that cleanup (temporary files, the sweep's lock) runs."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


def _stop(code: int, how: str, command: str) -> None:
    resume = {"sweep": "; rerun the same command to resume", "train": "; rerun the same command to resume",
              "train-controlnet": "; rerun it with --resume_from_checkpoint latest to resume"}.get(command, "")
    print(f"flax-inpaint: {how}; every file written so far is complete (none is half-written){resume}.",
          file=sys.stderr)
    raise SystemExit(code)


def run_command(command: str, body: Callable[[], None]) -> None:
    """Run a command's `body` so that every way it can fail ends in one line on stderr: SystemExit 2 for
    errors, 130 for Ctrl-C, 143 for SIGTERM (raised as an exception, so temporary files and locks are
    cleaned up). Unexpected errors say so; with FLAX_INPAINT_TRACEBACK=1 they raise instead."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """Our own warnings in one line like our errors, not Python's file:line and source; others as usual."""
        if Path(filename).resolve().is_relative_to(PACKAGE):
            print(f"flax-inpaint: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        body()
    except KeyboardInterrupt:
        _stop(130, "interrupted", command)
    except _Terminated:
        _stop(143, "terminated (SIGTERM)", command)
    except ValueError as e:  # raised below the CLI (a spec, a checkpoint); the message names the value
        fail(str(e))
    except OSError as e:  # a file that vanished or cannot be written (e.g. a full disk)
        fail(f"{e.filename!r}: {e.strerror}." if e.filename else _first_line(e))
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            # XLA's message may say "Failed to get configs ... Example failure:" first, the size on a later line
            said = next((line.strip() for line in str(e).splitlines() if "Out of memory" in line), _first_line(e))
            fail(f"out of memory ({said}); {MEMORY_HINT.get(command, 'lower the batch size')}.")
        fail(f"unexpected {_first_line(e)}; this is a bug: rerun with {TRACEBACK_ENV}=1 and report the traceback.")
    finally:
        warnings.showwarning = shown
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        run_command("bench", lambda: cmd_bench(args, rest))
        return
    if args.command == "train-controlnet":
        from flax_inpaint.train.controlnet import main as train_controlnet

        run_command("train-controlnet", lambda: train_controlnet(rest))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (see flax-inpaint {args.command} --help)")
    run_command(args.command, lambda: args.func(args))


if __name__ == "__main__":
    main()
