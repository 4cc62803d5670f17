"""`flax-inpaint diffedit`: DiffEdit from the command line (mask from two prompts, inversion, edit).

Writes OUT/mask.png (the mask at the image's size, white = edited), OUT/result.png and
OUT/side_by_side.png (image | mask | result), each atomically; errors end in one line naming the option,
like the other commands (flax_inpaint.cli).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flax_inpaint.cli import (
    check_cache, fail, finite, load_image, positive, say, uint32, unit, write_png, check_folder,
)

DIFFEDIT_MODEL = "tiny-shapes-txt2img"
OUTPUTS = ("mask.png", "result.png", "side_by_side.png")


def add_parser(sub, formatter_class) -> None:
    """The `diffedit` subcommand of `flax-inpaint`."""
    from flax_inpaint.cli import ASSETS

    p = sub.add_parser(
        "diffedit", formatter_class=formatter_class,
        help="edit an image from two prompts, no mask needed (DiffEdit)",
        description="DiffEdit (Couairon et al. 2022): the mask is where the noise predictions for "
                    "--source-prompt (what is there) and --target-prompt (what should be there) disagree; the "
                    "image is DDIM-inverted under the source prompt and only the masked region is regenerated. "
                    f"Writes OUT/{OUTPUTS[0]}, OUT/{OUTPUTS[1]} and OUT/{OUTPUTS[2]} (image | mask | result). "
                    "Needs a plain 4-channel text-to-image model.")
    p.add_argument("--model", default=str(ASSETS / DIFFEDIT_MODEL),
                   help="local diffusers text-to-image folder or hub repo id; default: the bundled tiny shapes model")
    p.add_argument("--image", required=True, help="RGB image file")
    p.add_argument("--source-prompt", required=True, help="what the image shows, e.g. 'a bowl of fruits'")
    p.add_argument("--target-prompt", required=True, help="what it should show, e.g. 'a bowl of pears'")
    p.add_argument("--negative-prompt", default=None, help="what the edit steers away from (with --guidance > 1)")
    p.add_argument("--steps", type=positive(int), default=50, help="DDIM steps of all three stages")
    p.add_argument("--guidance", type=finite, default=7.5, help="guidance of the mask and the edit (<= 1: off)")
    p.add_argument("--invert-guidance", type=finite, default=7.5, help="guidance of the inversion (<= 1: off)")
    p.add_argument("--inpaint-strength", type=unit, default=0.8, help="share of the steps inverted and regenerated")
    p.add_argument("--mask-encode-strength", type=unit, default=0.5, help="noise level the mask is computed at")
    p.add_argument("--mask-thresholding-ratio", type=positive(float), default=3.0,
                   help="the map is clamped at this many times its mean, then thresholded at half")
    p.add_argument("--num-maps-per-mask", type=positive(int), default=10, help="noise draws averaged per mask")
    p.add_argument("--seed", type=uint32, default=0)
    p.add_argument("--size", type=positive(int), default=None,
                   help="square size the image is resized to, a multiple of the model's VAE scale factor; default: "
                        "the image's size floored to that factor")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and params dtype")
    p.add_argument("--out", default="outputs", help="output folder")
    p.set_defaults(func=cmd_diffedit)


def cmd_diffedit(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from flax_inpaint import make_image_grid
    from flax_inpaint.pipelines.diffedit import FlaxStableDiffusionDiffEditPipeline
    from flax_inpaint.pipelines.inputs import strength_steps
    from flax_inpaint.pipelines.loading import model_error

    for option, value in (("--inpaint-strength", args.inpaint_strength),
                          ("--mask-encode-strength", args.mask_encode_strength)):
        try:
            strength_steps(option, value, args.steps)
        except ValueError:
            fail(f"{option} {value} with --steps {args.steps} runs no step; raise {option} or --steps "
                 "(steps x strength must reach 1).")
    image = load_image(args.image, "--image")
    out_dir = Path(args.out)
    check_folder(out_dir, "--out")
    check_cache()
    say(f"loading {args.model} ({args.dtype}) ...")
    try:
        pipe, params = FlaxStableDiffusionDiffEditPipeline.from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    except (ValueError, OSError) as e:  # CheckpointError, a bad config, a 9-channel (inpainting) UNet
        fail(model_error("--model", args.model, e).replace("inpainting folder", "text-to-image folder"))
    f = pipe.vae_scale_factor
    if args.size is not None and args.size % f:
        fail(f"--size {args.size} must be a multiple of {f} (the model's VAE scale factor); pass e.g. "
             f"{max(f, args.size - args.size % f)}.")
    if args.size is None and min(image.size) < f:
        fail(f"--image is {image.width}x{image.height}; the model needs at least {f}x{f} pixels (its VAE factor): "
             "pass a larger image or --size.")
    size = (args.size, args.size) if args.size else (image.width - image.width % f, image.height - image.height % f)
    image = image.resize(size, Image.BICUBIC) if size != image.size else image

    say(f"DiffEdit {args.source_prompt!r} -> {args.target_prompt!r}, {args.steps} steps (each stage compiles) ...")
    mask, edited = pipe.edit(image, params, jax.random.key(args.seed), source_prompt=[args.source_prompt],
                             target_prompt=[args.target_prompt], num_inference_steps=args.steps,
                             guidance_scale=args.guidance, invert_guidance_scale=args.invert_guidance,
                             inpaint_strength=args.inpaint_strength, num_maps_per_mask=args.num_maps_per_mask,
                             mask_encode_strength=args.mask_encode_strength,
                             mask_thresholding_ratio=args.mask_thresholding_ratio,
                             negative_prompt=None if args.negative_prompt is None else [args.negative_prompt])
    mask_image = Image.fromarray((np.kron(mask[0], np.ones((f, f))) * 255).astype(np.uint8))
    result = pipe.numpy_to_pil(edited)[0]
    side = make_image_grid([image, mask_image.convert("RGB"), result], rows=1, cols=3)
    for name, im in zip(OUTPUTS, (mask_image, result, side)):
        write_png(im, out_dir / name, "--out")
    print(f"wrote {', '.join(OUTPUTS)} to {out_dir} (masked {mask.mean():.0%} of the image)")
