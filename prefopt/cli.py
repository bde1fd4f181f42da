"""prefopt command line. The same under `python`, `accelerate launch` and `torchrun`:

    prefopt train RECIPE [key.sub=value ...]
    prefopt quickstart [key.sub=value ...]      build the sorting task, train on it, print before/after
    prefopt synth sort OUT_DIR                  write the tiny model and sorting data alone
    prefopt merge RUN_DIR [--out DIR]           merge a LoRA run's adapter into its base model
    accelerate launch -m prefopt train RECIPE   (or: torchrun --nproc_per_node N -m prefopt train RECIPE)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefopt.errors import PrefoptError

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUICKSTART_ASSETS = Path("runs/quickstart-assets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefopt", description="Train language models from preferences.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a recipe")
    train.add_argument("recipe", help="path to a recipe .yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    quick = commands.add_parser("quickstart", help="train DPO on a tiny sorting task on this machine")
    quick.add_argument("overrides", nargs="*")
    synth = commands.add_parser("synth", help="write a synthetic task with its tiny model")
    synth.add_argument("task", choices=["sort"])
    synth.add_argument("out_dir")
    synth.add_argument("--train", type=int, default=2000, help="training pairs")
    synth.add_argument("--eval", type=int, default=200, help="held-out pairs")
    synth.add_argument("--seed", type=int, default=0)
    merge = commands.add_parser("merge", help="merge a LoRA run's adapter into its base model")
    merge.add_argument("run_dir")
    merge.add_argument("--out", help="where the merged model goes (default: RUN_DIR/merged)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train_recipe(args.recipe, args.overrides)
        elif args.command == "quickstart":
            quickstart(args.overrides)
        elif args.command == "merge":
            from prefopt.models import merge_adapter

            print(f"wrote {merge_adapter(args.run_dir, args.out)}")
        else:
            from prefopt.data.synthetic import write_sort_task

            print(f"wrote {write_sort_task(args.out_dir, args.train, args.eval, args.seed)}")
    except PrefoptError as exc:
        print(f"prefopt: error: {exc}", file=sys.stderr)
        return 2
    return 0


def train_recipe(path: str | Path, overrides: list[str] = ()):
    from prefopt import recipe as recipe_lib
    from prefopt.trainers import PreferenceTrainer

    recipe = recipe_lib.load(path, overrides)
    trainer = PreferenceTrainer(recipe)
    try:
        return trainer.fit()
    finally:
        trainer.accelerator.end_training()  # destroys the process group, so no rank aborts at exit


def quickstart(overrides: list[str] = ()):
    from prefopt.data.synthetic import write_sort_task

    if not (QUICKSTART_ASSETS / "model" / "config.json").exists():
        print(f"[prefopt] writing the sorting task and a tiny random model to {QUICKSTART_ASSETS}")
        write_sort_task(QUICKSTART_ASSETS)
    return train_recipe(REPO_RECIPES / "quickstart.yaml", overrides)
