"""`python -m flax_inpaint.train {vae,inpaint,controlnet,all} --out DIR [--steps N] [--batch-size B] [--seed S]`.

Each stage resumes from `DIR/checkpoints`; see `flax_inpaint.train.recipes` for what is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flax_inpaint.train import recipes

STAGES = {
    "vae": (recipes.train_vae, recipes.VAE_TRAINING),
    "inpaint": (recipes.train_inpaint, recipes.INPAINT_TRAINING),
    "controlnet": (recipes.train_controlnet, recipes.CONTROLNET_TRAINING),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flax_inpaint.train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints and exported models)")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's); with 'all', per stage")
    parser.add_argument("--batch-size", type=int, help="global batch size (split across devices)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    summary = {}
    for stage in stages:
        train, base = STAGES[stage]
        start = time.perf_counter()
        result = train(args.out, dataclasses.replace(base, seed=args.seed, **overrides))[-1]
        summary[stage] = {"final_loss": round(result.final_loss, 5), "resumed_from_step": result.start_step,
                          "seconds": round(time.perf_counter() - start, 1)}
    if args.stage == "all":
        recipes.write_demo_sample(args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
