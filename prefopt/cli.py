"""prefopt command line. The same under `python`, `accelerate launch` and `torchrun`:

    prefopt train RECIPE [key.sub=value ...]
    prefopt quickstart [key.sub=value ...]      build the sorting task, train on it, print before/after
    prefopt recipes                             list the example recipes shipped with prefopt
    prefopt inspect RECIPE [--rows N] [key.sub=value ...]   rows as the model sees them, boundary marked
    prefopt synth sort|arithmetic|chain|calculator|selfcheck OUT_DIR   write a tiny model and a synthetic task's data
    prefopt merge RUN_DIR [--out DIR]           merge a LoRA run's adapter into its base model
    prefopt eval RUN_DIR_OR_MODEL --data PATH   JSON report of a run (policy or reward model) on a preference set
    prefopt label --input ROWS --out PAIRS --reward RM [--reward RM2 ...]   best-vs-worst pairs
    prefopt plot RUN [RUN ...] [--metric KEY ...] [-o FILE.png]   a run's curves, several runs overlaid
    prefopt push RUN REPO_ID [--private]        upload RUN/final with its model card to the Hugging Face Hub
    prefopt verify RUN                          check every checkpoint's and final/'s files against their checksums
    prefopt serve MODEL [--engine hf|vllm] [--port P]   a rollout engine server (rollout.server: HOST:PORT)
    prefopt env                                 versions, devices and thread settings, for a bug report
    accelerate launch -m prefopt train RECIPE   (or: torchrun --nproc_per_node N -m prefopt train RECIPE)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from prefopt.errors import PrefoptError, Stopped

RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped in the wheel; ./recipes in a checkout links here
QUICKSTART_ASSETS = Path("runs/quickstart-assets")


def main(argv: list[str] | None = None) -> int:
    from prefopt.version import __version__

    parser = argparse.ArgumentParser(prog="prefopt", description="Train language models from preferences.")
    parser.add_argument("--version", action="version", version=f"prefopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a recipe", epilog=TRAIN_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="path to a recipe .yaml, or a shipped one by name")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    train.add_argument("--restart", action="store_true", help="move a previous run in output_dir to "
                       "output_dir/archive/<time> and start over (otherwise the same recipe resumes it)")
    look = commands.add_parser("inspect", help="show rows as the model will see them: tokens, boundary, truncation")
    look.add_argument("recipe", help="path to a recipe .yaml")
    look.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    look.add_argument("--rows", type=int, default=3, help="examples shown per split")
    commands.add_parser("recipes", help=f"list the example recipes (in {RECIPES})")
    quick = commands.add_parser("quickstart", help="train DPO on a tiny sorting task on this machine")
    quick.add_argument("overrides", nargs="*")
    synth = commands.add_parser("synth", help="write a synthetic task with its tiny model")
    synth.add_argument("task", choices=["sort", "arithmetic", "chain", "calculator", "selfcheck"])
    synth.add_argument("out_dir")
    synth.add_argument("--train", type=int, default=2000, help="training rows")
    synth.add_argument("--eval", type=int, default=200, help="held-out rows")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--hidden-size", type=int, help="the tiny model's width (the task's default: 64, calculator "
                       "128; vLLM needs 128+: head_dim 32+)")
    synth.add_argument("--layers", type=int, help="the tiny model's layers (the task's default: 2, calculator 4)")
    merge = commands.add_parser("merge", help="merge a LoRA run's adapter into its base model")
    merge.add_argument("run_dir")
    merge.add_argument("--out", help="where the merged model goes (default: RUN_DIR/merged)")
    evaluate = commands.add_parser("eval", help="evaluate a finished run (policy or reward model) on a preference set")
    evaluate.add_argument("model", help="a run directory, or a reward model directory / hub id")
    evaluate.add_argument("--data", required=True, help="preference pairs: hub id or local file")
    evaluate.add_argument("--out", help="also write the JSON report here")
    label = commands.add_parser("label", help="turn prompts and sampled completions into chosen/rejected pairs")
    label.add_argument("--input", required=True, help="jsonl rows {prompt, completions: [...]} (or {prompt} "
                       "with --policy)")
    label.add_argument("--out", required=True, help="jsonl pairs {prompt, chosen, rejected, *_score}")
    label.add_argument("--reward", action="append", default=[], help="reward model; repeat for an ensemble")
    label.add_argument("--verifier", help="a scoring function module:function(prompts, completions)")
    label.add_argument("--aggregate", default="mean", help="ensemble: mean, min or mean_minus_std")
    label.add_argument("--std-coef", type=float, default=1.0)
    label.add_argument("--policy", help="sample the completions from this model")
    label.add_argument("--n", type=int, default=4, help="completions sampled per prompt (with --policy)")
    label.add_argument("--max-new-tokens", type=int, default=128)
    label.add_argument("--temperature", type=float, default=1.0)
    label.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="what samples (as rollout.engine)")
    label.add_argument("--seed", type=int, default=0, help="the samples' seed (vllm: per completion)")
    plot = commands.add_parser("plot", help="plot runs' curves (matplotlib), overlaid")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--metric", action="append", help="a metric key (repeat); default: the method's panels")
    plot.add_argument("-o", "--out", help="the PNG to write (default: RUN/plot.png, or ./plot.png for several)")
    push = commands.add_parser("push", help="upload a run's final/ (weights, tokenizer, model card) to the hub")
    push.add_argument("run_dir")
    push.add_argument("repo_id", help="e.g. your-name/my-dpo-model")
    push.add_argument("--private", action="store_true")
    serve = commands.add_parser("serve", help="a rollout engine server on a copy of the policy (rollout.server)")
    serve.add_argument("model", nargs="?", help="the policy's starting checkpoint: hub id or directory")
    serve.add_argument("--recipe", help="take the model and engine from a recipe instead (as rollout.server: spawn)")
    serve.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    serve.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--max-model-len", type=int, help="vllm: prompt and completion tokens (default: the model's)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: its share of the GPU")
    serve.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # exit with this process (rollout.server: spawn)
    commands.add_parser("env", help="print versions, devices and thread settings (for a bug report)")
    verify = commands.add_parser("verify", help="check a run's checkpoints and final/ against their checksums")
    verify.add_argument("run_dir")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a flag where a recipe key was meant (--beta 0.1), or a typo
        parser.exit(2, f"prefopt: error: unrecognized arguments: {' '.join(unknown)}{suggest_overrides(unknown)}\n")
    if args.command == "train" and args.recipe is None:
        commands.choices["train"].print_help()
        return 2
    try:
        code = run(args)
    except BrokenPipeError:  # `prefopt recipes | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    end_launched_process(code)
    return code


TRAIN_EXAMPLES = """examples:
  prefopt train quickstart                               a shipped recipe by name (prefopt recipes lists them)
  prefopt train my-recipe.yaml train.max_steps=10 loss.beta=0.05    keys of the recipe set with key.sub=value
  accelerate launch -m prefopt train my-recipe.yaml      every GPU of the machine
  prefopt train my-recipe.yaml --restart                 start over (the previous run is archived)"""


def suggest_overrides(unknown: list[str]) -> str:
    """For `--beta 0.1` (a flag where prefopt takes key.sub=value): the recipe keys of that name, as overrides."""
    hints = []
    for i, arg in enumerate(unknown):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        value = value or (unknown[i + 1] if i + 1 < len(unknown) and not unknown[i + 1].startswith("--") else "VALUE")
        paths = key_paths().get(name.replace("-", "_"), [])
        hints += [f"{path}={value}" for path in paths]
    return f"; recipe keys are set as key.sub=value: did you mean {' or '.join(hints)}?" if hints else ""


def run(args: argparse.Namespace) -> int:
    try:
        if args.command in ("label", "eval", "merge", "synth"):  # training quiets them as its recipe says (log.quiet)
            from prefopt.run.tracking import quiet_libraries

            quiet_libraries()
        if args.command == "train":
            train_recipe(args.recipe, args.overrides, restart=args.restart)
        elif args.command == "quickstart":
            quickstart(args.overrides)
        elif args.command == "recipes":
            print(f"example recipes in {RECIPES} (run one by name, e.g. prefopt train quickstart or prefopt train "
                  "dpo/qwen2.5-0.5b, or copy it):")
            launch = RECIPES / "accelerate"
            for path in sorted(RECIPES.rglob("*.yaml")):
                if launch not in path.parents:
                    print(f"  {path.relative_to(RECIPES)}")
            print(f"launch configs, not recipes (accelerate launch --config_file {launch}/NAME.yaml -m prefopt train "
                  f"RECIPE): {', '.join(sorted(p.stem for p in launch.glob('*.yaml')))}")
        elif args.command == "inspect":
            from prefopt.preview import inspect_recipe

            print(inspect_recipe(args.recipe, args.overrides, args.rows))
        elif args.command == "eval":
            import json

            from prefopt.evaluation import evaluate_run

            report = json.dumps(evaluate_run(args.model, args.data), indent=2)
            print(report)
            if args.out:
                Path(args.out).write_text(report + "\n")
        elif args.command == "label":
            from prefopt.labeling import label_file

            print(label_file(args))
        elif args.command == "plot":
            from prefopt.plotting import plot_to_file

            print(f"wrote {plot_to_file(args.runs, args.out, args.metric)}")
        elif args.command == "push":
            from prefopt.run.card import push

            print(f"uploaded {Path(args.run_dir) / 'final'} to {push(args.run_dir, args.repo_id, args.private)}")
        elif args.command == "env":
            print(environment())
        elif args.command == "serve":
            from prefopt.online.server import serve_command

            serve_command(args)
        elif args.command == "verify":
            from prefopt.run.directory import verify_run

            report, bad = verify_run(Path(args.run_dir))
            print(report)
            return 1 if bad else 0
        elif args.command == "merge":
            from prefopt.models import merge_adapter

            print(f"wrote {merge_adapter(args.run_dir, args.out)}")
        else:
            from prefopt.data import synthetic

            write = getattr(synthetic, f"write_{args.task}_task")
            size = {key: value for key, value in (("hidden_size", args.hidden_size), ("num_layers", args.layers))
                    if value is not None}
            print(f"wrote {write(args.out_dir, args.train, args.eval, args.seed, **size)}")
    except Stopped as exc:
        print(f"prefopt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and stops on its own)
        print("prefopt: interrupted (Ctrl-C) before training or between its stages; nothing was lost: every "
              "checkpoint is complete. Run the same command to go on", file=sys.stderr)
        return 130
    except PrefoptError as exc:
        print(f"prefopt: error: {exc}", file=sys.stderr)
        return 2
    return 0


def key_paths() -> dict[str, list[str]]:
    """Every recipe key's dotted paths by its last name ({"beta": ["loss.beta"], ...}), for hints."""
    import dataclasses
    import typing

    from prefopt import recipe as recipe_lib

    paths: dict[str, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
            if dataclasses.is_dataclass(inner[0]):
                walk(inner[0], f"{prefix}{f.name}.")
            else:
                paths.setdefault(f.name, []).append(prefix + f.name)

    walk(recipe_lib.Recipe, "")
    from prefopt.losses import LOSSES  # a loss's hyper-parameters sit in loss: beside its name

    for spec in LOSSES.values():
        for name in spec.hyperparameters():
            if f"loss.{name}" not in paths.setdefault(name, []):
                paths[name].append(f"loss.{name}")
    return paths


def environment() -> str:
    """`prefopt env`: what a bug report needs, one `name: value` per line."""
    import importlib.metadata
    import platform

    import torch

    from prefopt.version import __version__

    lines = [f"prefopt: {__version__}", f"python: {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}"]
    for package in ("torch", "transformers", "accelerate", "datasets", "peft", "trl", "deepspeed", "vllm",
                    "safetensors", "tokenizers"):
        try:
            lines.append(f"{package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{package}: not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"cuda: {torch.version.cuda or 'none'}; devices: " + (", ".join(
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none (CPU)"))
    lines.append(f"cpu cores: {os.cpu_count()} (this process may use {len(os.sched_getaffinity(0))})"
                 if hasattr(os, "sched_getaffinity") else f"cpu cores: {os.cpu_count()}")
    lines.append(f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "ACCELERATE_CONFIG_FILE",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WORLD_SIZE"):
        lines.append(f"{name}: {os.environ.get(name, '(unset)')}")
    from accelerate.commands.config import default_config_file

    lines.append(f"accelerate default config: {default_config_file}"
                 + ("" if Path(default_config_file).exists() else " (none)"))
    return "\n".join(lines)


def end_launched_process(code: int) -> None:
    """In a multi-process launch (torchrun, accelerate launch), end this process with `code` without the
    interpreter's teardown; in a process alone, return. The process group's native threads outlive
    `destroy_process_group` (the sharded models still hold the group), and a gloo worker that frees a tensor
    during that teardown takes the GIL from a finalizing interpreter, which aborts a run that has finished and
    saved ("terminate called without an active exception", exit -6). Call it once everything is written and the
    process group ended."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_recipe(path: str | Path, overrides: list[str] = (), restart: bool = False):
    from prefopt import recipe as recipe_lib

    return run_recipe(recipe_lib.load(path, overrides), restart)


def run_recipe(recipe, restart: bool = False, trainer_cls=None):
    """Train a loaded recipe: the run's lock (main process), the resume check, the trainer, its end."""
    from prefopt.run.directory import RunLock, check_resume, check_writable
    from prefopt.trainers import trainer_for

    main = os.environ.get("RANK", "0") == "0"
    check_writable(Path(recipe.output_dir))
    lock = RunLock(Path(recipe.output_dir)).acquire() if main else None
    try:
        check_resume(recipe, restart, main)
        trainer = trainer_cls(recipe) if trainer_cls else trainer_for(recipe)
        try:
            return trainer.fit()
        finally:
            trainer.close()  # ends the process group, so that no rank aborts at exit
    finally:
        if lock:
            lock.release()


def quickstart(overrides: list[str] = ()):
    from prefopt.data.synthetic import write_sort_task

    if not (QUICKSTART_ASSETS / "model" / "config.json").exists():
        print(f"[prefopt] writing the sorting task and a tiny random model to {QUICKSTART_ASSETS}")
        write_sort_task(QUICKSTART_ASSETS)
    return train_recipe(RECIPES / "quickstart.yaml", overrides)
