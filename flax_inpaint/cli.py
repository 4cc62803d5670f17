"""The `flax-inpaint` command line: demo, inpaint, sweep, convert, bench and train-controlnet."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = "tiny-shapes-inpaint"
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inpaint.py"

EPILOG = """examples:
  flax-inpaint demo --out demo.png
  flax-inpaint inpaint --model path/to/sd-inpainting --image photo.png --mask mask.png \\
      --prompt "a cat on a bench" "a dog on a bench" --batch 2 --steps 30 --out outputs
  flax-inpaint sweep sweep.json            (run again after a kill: it resumes)
  flax-inpaint convert --model path/to/sd-inpainting
  flax-inpaint bench --preset tiny --batch 1 --steps 2
  flax-inpaint train-controlnet --pretrained_model_name_or_path BASE --train_data_dir DATA --output_dir OUT

A model is a local diffusers folder (model_index.json) or a hub repo id (org/name).
"""


def _asset(name: str) -> Path:
    return ASSETS / name


def _fail(message: str) -> "None":
    print(f"flax-inpaint: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_image(path: str, arg: str):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        _fail(f"{arg} {path!r} does not exist; pass the path of a PNG/JPEG file.")
    try:
        with Image.open(p) as im:
            return im.convert("RGB" if arg == "--image" else "L")
    except OSError as e:
        _fail(f"{arg} {path!r} is not a readable image ({e}).")


def _load(model: str, dtype: str, scheduler: Optional[str]):
    """(pipeline, params) of `model`, with `scheduler` (a diffusers class name) swapped in."""
    import jax.numpy as jnp

    from flax_inpaint import FlaxStableDiffusionInpaintPipeline
    from flax_inpaint.sweep import model_error, with_scheduler

    _say(f"loading {model} ({dtype}) ...")
    try:
        pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(model, dtype=getattr(jnp, dtype))
    except (ValueError, OSError) as e:  # CheckpointError, a bad config, or a component the loader cannot read
        _fail(model_error("--model", model, e))
    return with_scheduler(pipe, params, scheduler)


def _write_png(image, path: Path) -> None:
    """Save atomically: a killed run never leaves a half-written PNG."""
    from flax_inpaint.models.checkpoint import write_bytes_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _inpaint(pipe, params, image, mask, prompts: Sequence[str], negative: Optional[str], steps: int,
             guidance: float, strength: float, seeds: Sequence[int], size: Optional[int], overlay: bool,
             batch: Optional[int] = None, progress: Optional[bool] = False):
    """One image per (prompt, seed) pair, each sampled with its own key; returns (PIL images, nsfw, seconds).

    Calls of `batch` pairs each (default: all at once) advance a progress bar (`progress`: True,
    False, or None for only on a terminal); a pair's image does not depend on its batch companions.
    """
    from tqdm import tqdm

    from flax_inpaint.sweep import seed_keys

    f = pipe.vae_scale_factor
    height, width = (size, size) if size else (image.height - image.height % f, image.width - image.width % f)
    if overlay and (width, height) != image.size:
        _fail(f"--overlay pastes the unmasked pixels of --image back, so the output must be the image's size "
              f"{image.width}x{image.height}, but it is {width}x{height} (--size, or flooring to a multiple of "
              f"{f}); drop --overlay or --size, or resize the image.")
    batch = batch or len(prompts)
    images, nsfw = [], []
    quiet = None if progress is None else not progress  # tqdm: None disables the bar off a terminal
    start = time.perf_counter()
    with tqdm(total=len(prompts), unit="img", desc="inpaint", disable=quiet) as bar:
        for lo in range(0, len(prompts), batch):
            chunk = list(prompts[lo:lo + batch])
            out = pipe.inpaint(chunk, image, mask, params, seed_keys(seeds[lo:lo + batch]),
                               negative_prompt=None if negative is None else [negative] * len(chunk),
                               height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                               strength=strength, apply_overlay=overlay)
            images += list(out.images)
            flags = out.nsfw_content_detected  # None without a safety checker
            nsfw = None if flags is None else nsfw + list(flags)
            bar.update(len(chunk))
    return images, nsfw, time.perf_counter() - start


def cmd_demo(args) -> None:
    """Inpaint the bundled sample with the bundled tiny model; writes image | mask | result."""
    from flax_inpaint import make_image_grid

    folder = _asset(DEMO_MODEL)
    if not (folder / "model_index.json").is_file():
        _fail(f"the bundled demo model is missing from {folder}; reinstall flax-inpaint.")
    image = _load_image(str(_asset("sample_image.png")), "--image")
    mask = _load_image(str(_asset("sample_mask.png")), "--mask")
    pipe, params = _load(str(folder), "float32", None)
    images, _, seconds = _inpaint(pipe, params, image, mask, [args.prompt], None, args.steps, args.guidance,
                                  1.0, [args.seed], None, True)
    from PIL import Image

    size = (image.width * args.scale, image.height * args.scale)  # nearest: every model pixel stays visible
    panels = [im.convert("RGB").resize(size, Image.NEAREST) for im in (image, mask, images[0])]
    grid = make_image_grid(panels, rows=1, cols=3)
    _write_png(grid, Path(args.out))
    print(f"wrote {args.out} (image | mask | result) for {args.prompt!r} in {seconds:.1f} s")


def cmd_inpaint(args) -> None:
    image, mask = _load_image(args.image, "--image"), _load_image(args.mask, "--mask")
    if image.size != mask.size:
        _fail(f"--image is {image.size[0]}x{image.size[1]} but --mask is {mask.size[0]}x{mask.size[1]}; "
              "they must be the same size.")
    if args.seed + args.batch > 2**32:
        _fail(f"--seed {args.seed} with --batch {args.batch} uses seeds up to {args.seed + args.batch - 1}; "
              "seeds must lie in [0, 2**32).")
    pipe, params = _load(args.model, args.dtype, args.scheduler)
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    seeds = [args.seed + k for _ in args.prompt for k in range(args.batch)]
    _say(f"inpainting {len(prompts)} image(s) in batches of {args.batch}, {args.steps} steps (the first batch "
         "compiles) ...")
    images, nsfw, seconds = _inpaint(pipe, params, image, mask, prompts, args.negative_prompt, args.steps,
                                     args.guidance, args.strength, seeds, args.size, args.overlay, args.batch,
                                     progress=False if args.no_progress else None)
    out_dir = Path(args.out)
    for j, (im, seed) in enumerate(zip(images, seeds)):
        _write_png(im, out_dir / f"prompt{j // args.batch}_seed{seed}.png")
    flagged = 0 if nsfw is None else int(sum(bool(x) for x in nsfw))
    print(f"wrote {len(images)} image(s) to {out_dir} in {seconds:.1f} s"
          + (f"; the safety checker blacked out {flagged}" if flagged else ""))


def cmd_sweep(args) -> None:
    from flax_inpaint.sweep import SweepSpec, run_sweep

    out = None if args.out is None else str(Path(args.out).resolve())
    spec = SweepSpec.from_file(args.spec, out=out)
    if args.per_device_batch is not None:
        spec = dataclasses.replace(spec, per_device_batch=args.per_device_batch)
    cluster = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}
    if args.distributed or any(v is not None for v in cluster.values()):
        import jax

        jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})
    summary = run_sweep(spec, progress=False if args.no_progress else None)
    print(f"sweep {args.spec}: {summary.total} result(s) in {summary.out}, {summary.already_done} found, "
          f"{summary.computed} computed; contact sheet {summary.contact_sheet}")


def cmd_convert(args) -> None:
    """Convert a PyTorch diffusers folder's models to Flax msgpack: into the params cache, and with
    --out into a folder that both diffusers and flax-inpaint load."""
    from flax_inpaint.models.checkpoint import default_cache_dir

    pipe, params = _load(args.model, args.dtype, None)
    print(f"cached Flax msgpack params under {default_cache_dir()}: the next load of {args.model} skips conversion")
    if args.out:
        pipe.save_pretrained(args.out, params)
        print(f"wrote Flax msgpack + safetensors weights to {args.out}")


def cmd_bench(args, rest: List[str]) -> None:
    """Run benchmarks/bench_inpaint.py (a source checkout's) with the remaining arguments."""
    script = Path(args.script) if args.script else BENCH_SCRIPT
    if not script.is_file():
        _fail(f"the benchmark script is not at {script}: `flax-inpaint bench` runs benchmarks/bench_inpaint.py of a "
              "source checkout; pass --script PATH/TO/bench_inpaint.py.")
    spec = importlib.util.spec_from_file_location("bench_inpaint", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    raise SystemExit(module.main(rest))


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} > 0, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _unit(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _seed(text):
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {text}")
    return value


def _size(text):
    value = _positive(int)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {text}")
    return value


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
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--steps", type=_positive(int), default=25)
    demo.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    demo.add_argument("--scale", type=_positive(int), default=4, help="enlarge each 64x64 panel this many times")
    demo.add_argument("--out", default="demo.png", help="PNG grid: image | mask | result")
    demo.set_defaults(func=cmd_demo)

    inp = sub.add_parser(
        "inpaint", help="inpaint one image with a diffusers-format model", formatter_class=fmt,
        description="Repaint the white part of --mask in --image. Image k of every prompt uses seed --seed + k, "
                    "so `sweep` with that seed reproduces it. Writes OUT/prompt<i>_seed<s>.png.")
    inp.add_argument("--model", required=True, help="local diffusers folder or hub repo id")
    inp.add_argument("--image", required=True, help="RGB image file")
    inp.add_argument("--mask", required=True, help="mask file of the image's size; white = repaint")
    inp.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    inp.add_argument("--negative-prompt", default=None, help="what to steer away from (with --guidance > 1)")
    inp.add_argument("--scheduler", default=None, help="diffusers class name, e.g. DDIMScheduler; "
                                                       "default: the model's")
    inp.add_argument("--steps", type=_positive(int), default=50, help="denoising steps")
    inp.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    inp.add_argument("--strength", type=_unit, default=1.0, help="1 repaints from noise; lower keeps more of --image")
    inp.add_argument("--seed", type=_seed, default=0, help="seed of the first image of each prompt")
    inp.add_argument("--batch", type=_positive(int), default=1,
                     help="images per prompt, sampled together in one call")
    inp.add_argument("--size", type=_size, default=None, help="square output size; default: the image's size "
                                                             "floored to the VAE factor")
    inp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute and params dtype (bfloat16 for TPUs and GPUs)")
    inp.add_argument("--overlay", action="store_true", help="paste the unmasked pixels of --image back exactly")
    inp.add_argument("--out", default="outputs", help="output folder")
    inp.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    inp.set_defaults(func=cmd_inpaint)

    sw = sub.add_parser(
        "sweep", formatter_class=fmt, help="run (or resume) a research sweep from a .json/.yaml spec",
        description="Run every configuration of SPEC (a grid and/or list over prompts, seeds, guidance, strength, "
                    "steps, scheduler, images and masks; see flax_inpaint.sweep) across all devices. Results go to "
                    "OUT/images/<id>.png with one line each in OUT/manifest.jsonl, plus OUT/contact_sheet.png. "
                    "Rerunning the same command after a kill computes only what is missing.")
    sw.add_argument("spec", help="sweep spec file (.json; .yaml with PyYAML)")
    sw.add_argument("--out", default=None, help="output folder; default: the spec's 'out'")
    sw.add_argument("--per-device-batch", type=_positive(int), default=None,
                    help="images per device per call; default: the spec's (1)")
    multi = sw.add_argument_group(
        "multi-host", "Run the same command in every process; each feeds its part of every batch and process 0 "
                      "writes. On TPU pods and SLURM, --distributed alone finds the cluster.")
    multi.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    multi.add_argument("--coordinator-address", default=None, help="host:port of process 0 (implies --distributed)")
    multi.add_argument("--num-processes", type=_positive(int), default=None, help="how many processes take part")
    multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)

    conv = sub.add_parser(
        "convert", formatter_class=fmt, help="convert PyTorch diffusers weights to Flax msgpack",
        description="Convert a PyTorch diffusers model (folder or hub id) to Flax params, cached as msgpack so later "
                    "loads skip conversion ($FLAX_INPAINT_CACHE, default ~/.cache/flax_inpaint); with --out, also "
                    "write a folder with both the Flax msgpack and the PyTorch safetensors weights.")
    conv.add_argument("--model", required=True, help="local diffusers folder or hub repo id")
    conv.add_argument("--out", default=None, help="also write the converted pipeline folder here")
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="params dtype")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser(
        "bench", add_help=False, allow_abbrev=False,
        help="benchmark throughput (benchmarks/bench_inpaint.py; --help lists its options)",
        description="Run benchmarks/bench_inpaint.py of a source checkout with the remaining arguments.")
    bench.add_argument("--script", default=None, help="path of bench_inpaint.py (default: the checkout's)")
    bench.set_defaults(func=cmd_bench)

    sub.add_parser(
        "train-controlnet", add_help=False, allow_abbrev=False,
        help="train a ControlNet on a base model and your data (flax_inpaint.train.controlnet; --help lists its "
             "options)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if args.command == "train-controlnet":
        from flax_inpaint.train.controlnet import main as train_controlnet

        return train_controlnet(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (see flax-inpaint {args.command} --help)")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
