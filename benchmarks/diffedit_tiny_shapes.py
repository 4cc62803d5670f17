#!/usr/bin/env python
"""DiffEdit and text-to-image on the bundled 4-channel tiny shapes model, as JSON on stdout.

    python benchmarks/diffedit_tiny_shapes.py                       # 24 scenes x seeds 0, 1, 2
    python benchmarks/diffedit_tiny_shapes.py --model runs/tiny/tiny-shapes-txt2img --cases 48

DiffEdit (see flax_inpaint/train/quality.py, `diffedit_scores`): a red circle on a background that is
neither red nor blue, source "a red circle on a <bg> background", target "a blue circle on ...".
mask_iou_*: IoU of generate_mask's mask (upsampled to pixels) with the circle (the acceptance bar is
0.6); target_colour_accuracy: share of edits whose circle's mean colour is nearest to blue.
Text-to-image ("a red circle on a blue background", one image per seed): circle_iou_*: IoU of the
red region with the disc of the same area at its centroid; colour_area_px_min: the smallest red region.
"""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(resources.files("flax_inpaint.assets") / "tiny-shapes-txt2img"))
    parser.add_argument("--cases", type=int, default=24, help="DiffEdit scenes per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--text-to-image-seeds", type=int, default=8)
    args = parser.parse_args()

    from flax_inpaint.pipelines import FlaxStableDiffusionPipeline
    from flax_inpaint.pipelines.diffedit import FlaxStableDiffusionDiffEditPipeline
    from flax_inpaint.train import quality

    start = time.perf_counter()
    pipe, params = FlaxStableDiffusionDiffEditPipeline.from_pretrained(args.model, safety_checker=None)
    per_seed = {}
    for seed in args.seeds:
        cases = quality.diffedit_cases(args.cases, seed)
        per_seed[seed] = quality.diffedit_scores(pipe, params, cases, seed, args.steps, args.guidance)
    overall = {k: float(sum(s[k] for s in per_seed.values()) / len(per_seed))
               for k in ("mask_iou_mean", "cases_iou_ge_0.6", "target_colour_accuracy")}
    overall["mask_iou_min"] = min(s["mask_iou_min"] for s in per_seed.values())
    t2i, t2i_params = FlaxStableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    text = quality.text_to_image_circles(t2i, t2i_params, "a red circle on a blue background",
                                         range(args.text_to_image_seeds), args.steps, args.guidance)
    print(json.dumps({"model": args.model, "diffedit": {"overall": overall, "per_seed": per_seed},
                      "text_to_image": text, "steps": args.steps, "guidance": args.guidance,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
