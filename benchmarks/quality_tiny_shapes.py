#!/usr/bin/env python
"""Quality of the bundled tiny shapes model, as JSON on stdout (see flax_inpaint/train/quality.py).

    python benchmarks/quality_tiny_shapes.py                      # the bundled model
    python benchmarks/quality_tiny_shapes.py --model runs/tiny/tiny-shapes-inpaint --cases 60

colour_accuracy: share of "a <colour> <shape> on a <colour> background" inpaintings whose mean
colour inside the mask is nearest the prompted colour (the acceptance bar is 0.9);
overlay_unchanged_fraction: share of unmasked pixels returned exactly with apply_overlay=True (1.0);
controlnet_iou: mean IoU of the circle the ControlNet pipeline fills (whole image masked) with the
control outline's interior (the acceptance bar is 0.7), plus its minimum and the share of cases >= 0.7.
"""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(resources.files("flax_inpaint.assets") / "tiny-shapes-inpaint"))
    parser.add_argument("--controlnet", default=str(resources.files("flax_inpaint.assets") / "tiny-shapes-controlnet"),
                        help="ControlNet folder; 'none' skips the ControlNet score")
    parser.add_argument("--cases", type=int, default=36, help="inpainting cases (shapes x colours cycle)")
    parser.add_argument("--control-cases", type=int, default=24, help="fill-the-circle cases")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flax_inpaint import FlaxStableDiffusionControlNetInpaintPipeline, FlaxStableDiffusionInpaintPipeline
    from flax_inpaint.train import quality

    start = time.perf_counter()
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(args.model, safety_checker=None)
    scores = quality.evaluate_inpaint(pipe, params, args.cases, args.steps, args.guidance, args.seed)
    if args.controlnet != "none":
        pipe, params = FlaxStableDiffusionControlNetInpaintPipeline.from_pretrained(
            args.model, controlnet=args.controlnet, safety_checker=None)
        cases = quality.control_cases(args.control_cases, args.seed)
        scores.update(quality.controlnet_iou(pipe, params, cases, args.seed, args.steps, args.guidance))
    print(json.dumps({"model": args.model, **scores, "steps": args.steps, "guidance": args.guidance,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
