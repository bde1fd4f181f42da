"""The CPU timing table of docs/async.md: the seconds of a GRPO step, synchronous against asynchronous (rollout.lag 1
with the engine in a server process generating during the update), on the sort task's model made wider so that
generation weighs. Each setting is one run; the first `--skip` steps (start-up, the first rollouts made in turn)
are left out of the means. Writes OUT/timing.json and prints the table.

    python scripts/async_timing.py [--steps 24] [--skip 4] [--hidden-size 256] [--layers 4] [--new-tokens 48]
                                   [--out runs/async-timing]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {  # name -> (overrides, environment)
    "sync, engine in the trainer (lag 0)": (["rollout.lag=0"], {}),
    "lag 1, engine in the trainer (no overlap)": (["rollout.lag=1"], {}),
    "lag 1, engine server, in turn": (["rollout.lag=1", "rollout.server=spawn", "rollout.overlap=false"], {}),
    "lag 1, engine server, overlapped (cores shared out)": (["rollout.lag=1", "rollout.server=spawn"], {}),
    "lag 1, engine server, overlapped, all cores each": (["rollout.lag=1", "rollout.server=spawn"],
                                                         {"OMP_NUM_THREADS": str(os.cpu_count())}),
    "sync, half the cores (lag 0)": (["rollout.lag=0"], {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}),
}
KEYS = ("step_seconds", "timing/generate", "timing/wait", "timing/update", "timing/logps", "timing/score")


def recipe(assets: Path, new_tokens: int) -> dict:
    return {"method": "rl", "seed": 0, "model": {"name_or_path": str(assets / "model")},
            "data": {"train": str(assets / "train.jsonl"), "max_length": 24 + new_tokens, "max_prompt_length": 24},
            "rewards": {"function": "prefopt.data.synthetic:sort_scores"},
            "rollout": {"samples_per_prompt": 8, "max_new_tokens": new_tokens, "temperature": 1.0},
            "ppo": {"advantage": "grpo", "kl_coef": 0.0},
            "optim": {"lr": 1e-5, "schedule": "constant", "warmup_steps": 0},
            "train": {"batch_size": 64, "micro_batch_size": 32, "log_every": 1, "eval_every": 0, "save_every": 0,
                      "progress_bar": False}}


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("runs/async-timing"))
    args = parser.parse_args()
    assets = args.out / "assets"
    if not (assets / "model").exists():
        subprocess.run([sys.executable, "-m", "prefopt", "synth", "sort", str(assets), "--hidden-size",
                        str(args.hidden_size), "--layers", str(args.layers)], check=True, stdout=subprocess.DEVNULL)
    path = args.out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(assets, args.new_tokens)))
    results = {}
    for i, (name, (overrides, env)) in enumerate(SETTINGS.items()):
        run = args.out / f"run-{i}"
        subprocess.run([sys.executable, "-m", "prefopt", "train", str(path), f"output_dir={run}",
                        f"train.max_steps={args.steps}", *overrides, "--restart"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, **env})
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["split"] == "train"][args.skip :]
        results[name] = {key: statistics.mean(r.get(key, 0.0) for r in steps) for key in KEYS}
    (args.out / "timing.json").write_text(json.dumps(results, indent=1))
    base = results[next(iter(results))]["step_seconds"]
    print("| setting | s/step | generate | waited for it | update | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['step_seconds']:.3f} | {r['timing/generate']:.3f} | {r['timing/wait']:.3f} | "
              f"{r['timing/update']:.3f} | {base / r['step_seconds']:.2f}x |")


if __name__ == "__main__":
    main()
