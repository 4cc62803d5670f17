"""`python -m flax_inpaint.train {vae,inpaint,controlnet,txt2img,all} --out DIR [--steps N] [--batch-size B] [--seed S]`.

Each stage resumes from `DIR/checkpoints` and needs the previous stages' output in DIR; see
`flax_inpaint.train.recipes` for what is written. `--export-to flax_inpaint/assets` then copies the
models and demo inputs into the package. Prints one JSON line: each stage's final loss and seconds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flax_inpaint.cli import check_folder, run_command
from flax_inpaint.train import recipes

# stage -> (the stage before it, the folder of DIR it reads)
NEEDS = {"inpaint": ("vae", "vae"), "controlnet": ("inpaint", "tiny-shapes-inpaint"),
         "txt2img": ("inpaint", "tiny-shapes-inpaint")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flax_inpaint.train",
        description="Train the tiny shapes models (VAE, text encoder + inpainting UNet, ControlNet, "
                    "text-to-image UNet) on "
                    "procedural data, resumably.",
    )
    parser.add_argument("stage", choices=[*recipes.STAGES, "all"])
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints and exported models)")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's); with 'all', per stage")
    parser.add_argument("--batch-size", type=int, help="global batch size (split across devices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-to", type=Path, help="afterwards copy the models and demo inputs here")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    stages = recipes.STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        before, folder = NEEDS.get(stage, (None, None))
        if before is not None and before not in stages and not (args.out / folder).is_dir():
            parser.error(f"stage {stage} reads the {before} stage's output {args.out / folder}, which is missing; "
                         f"train {before} first (or 'all') with the same --out.")

    def train() -> None:
        check_folder(args.out, "--out")
        if args.export_to is not None:
            check_folder(args.export_to, "--export-to")
        results = recipes.train_all(args.out, **{f"{s}_steps": args.steps for s in stages},
                                    batch_size=args.batch_size, seed=args.seed, stages=stages)
        if args.export_to is not None:
            recipes.export_assets(args.out, args.export_to)
        print(json.dumps({stage: {"final_loss": round(r.final_loss, 5), "resumed_from_step": r.start_step,
                                  "seconds": round(r.seconds, 1)} for stage, r in results.items()}))

    run_command("train", train)


if __name__ == "__main__":
    main()
