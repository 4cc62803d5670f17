"""The `flax-inpaint` command line: demo, inpaint and convert."""
from __future__ import annotations

import argparse
import io
import sys
import time
from importlib import resources
from pathlib import Path
from typing import List, Optional

ASSETS = "flax_inpaint.assets"
DEMO_MODEL = "tiny-shapes-inpaint"


def _asset(name: str) -> Path:
    return Path(str(resources.files(ASSETS) / name))


def _fail(message: str) -> "None":
    print(f"flax-inpaint: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _load_image(path: str, arg: str):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        _fail(f"{arg} {path!r} does not exist; pass the path of a PNG/JPEG file.")
    try:
        return Image.open(p).convert("RGB" if arg == "--image" else "L")
    except OSError as e:
        _fail(f"{arg} {path!r} is not a readable image ({e}).")


def _inpaint(model: str, image, mask, prompt: str, negative: Optional[str], scheduler: Optional[str],
             steps: int, guidance: float, strength: float, seed: int, batch: int, dtype: str, size: Optional[int]):
    """Load `model`, inpaint `batch` images for `prompt`; returns (PIL images, seconds)."""
    import jax

    from flax_inpaint import FlaxStableDiffusionInpaintPipeline
    from flax_inpaint.pipelines.loading import scheduler_class

    sched = None
    if scheduler:
        from flax_inpaint.models.checkpoint import resolve_folder

        folder = resolve_folder(model)
        sched = scheduler_class(scheduler).from_pretrained(folder, subfolder="scheduler")
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(
        model, dtype=_dtype(dtype), scheduler=sched, safety_checker=None
    )
    start = time.perf_counter()
    out = pipe.inpaint(
        [prompt] * batch, image, mask, params, jax.random.key(seed),
        negative_prompt=None if negative is None else [negative] * batch,
        height=size or image.height // 8 * 8, width=size or image.width // 8 * 8,
        num_inference_steps=steps, guidance_scale=guidance, strength=strength, apply_overlay=True,
    )
    return out.images, time.perf_counter() - start


def _write_png(image, path: Path) -> None:
    """Save atomically: a killed run never leaves a half-written PNG."""
    from flax_inpaint.models.checkpoint import write_bytes_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _save_grid(rows: List[list], out: Path) -> None:
    from flax_inpaint import make_image_grid

    cells = [im.convert("RGB").resize(rows[0][0].size) for row in rows for im in row]
    _write_png(make_image_grid(cells, rows=len(rows), cols=len(rows[0])), out)


def cmd_demo(args) -> None:
    """Inpaint the bundled sample with the bundled tiny model; writes image | mask | result."""
    image = _load_image(str(_asset("sample_image.png")), "--image")
    mask = _load_image(str(_asset("sample_mask.png")), "--mask")
    images, seconds = _inpaint(str(_asset(DEMO_MODEL)), image, mask, args.prompt, None, None, args.steps,
                               args.guidance, 1.0, args.seed, 1, "float32", None)
    _save_grid([[image, mask, images[0]]], Path(args.out))
    print(f"wrote {args.out} (image | mask | result) for {args.prompt!r} in {seconds:.1f} s")


def cmd_inpaint(args) -> None:
    image, mask = _load_image(args.image, "--image"), _load_image(args.mask, "--mask")
    if image.size != mask.size:
        _fail(f"--image is {image.size[0]}x{image.size[1]} but --mask is {mask.size[0]}x{mask.size[1]}; "
              "they must be the same size.")
    out_dir = Path(args.out)
    images, seconds = _inpaint(args.model, image, mask, args.prompt, args.negative_prompt, args.scheduler,
                               args.steps, args.guidance, args.strength, args.seed, args.batch, args.dtype,
                               args.size)
    for i, im in enumerate(images):
        _write_png(im, out_dir / f"inpaint_seed{args.seed}_{i}.png")
    print(f"wrote {len(images)} image(s) to {out_dir} in {seconds:.1f} s")


def cmd_convert(args) -> None:
    """Convert a PyTorch diffusers pipeline folder's models to Flax msgpack in place of the cache."""
    from flax_inpaint import FlaxStableDiffusionInpaintPipeline

    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.save_pretrained(args.out, params)
    print(f"wrote Flax + safetensors weights to {args.out}")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _unit(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-inpaint", description="Stable Diffusion inpainting in JAX/Flax.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="inpaint the bundled sample with the bundled tiny model",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--prompt", default="a red circle on a blue background")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=_positive(int), default=25)
    demo.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    demo.add_argument("--out", default="demo.png", help="PNG grid: image | mask | result")
    demo.set_defaults(func=cmd_demo)

    inp = sub.add_parser("inpaint", help="inpaint an image with a diffusers-format model folder",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inp.add_argument("--model", required=True, help="local diffusers folder (or hub id if cached)")
    inp.add_argument("--image", required=True)
    inp.add_argument("--mask", required=True, help="white = repaint")
    inp.add_argument("--prompt", required=True)
    inp.add_argument("--negative-prompt", default=None)
    inp.add_argument("--scheduler", default=None, help="e.g. DDIMScheduler; None keeps the model's")
    inp.add_argument("--steps", type=_positive(int), default=50)
    inp.add_argument("--guidance", type=float, default=7.5)
    inp.add_argument("--strength", type=_unit, default=1.0)
    inp.add_argument("--seed", type=int, default=0)
    inp.add_argument("--batch", type=_positive(int), default=1)
    inp.add_argument("--size", type=_positive(int), default=None, help="square size; None keeps the image size (floored to 8)")
    inp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    inp.add_argument("--out", default="outputs")
    inp.set_defaults(func=cmd_inpaint)

    conv = sub.add_parser("convert", help="convert a PyTorch diffusers folder to Flax msgpack weights")
    conv.add_argument("--model", required=True)
    conv.add_argument("--out", required=True)
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
