"""The studies of docs/dense.md, one command each; every run is a `prefopt train` of a recipe written under OUT.

    python scripts/dense_study.py distill [--steps 200] [--seeds 0 1] [--out runs/dense-distill]
    python scripts/dense_study.py prm     [--steps 200] [--seeds 0 1 2] [--out runs/dense-prm]
    python scripts/dense_study.py judge   [--steps 200] [--seeds 0 1] [--out runs/dense-judge]

distill: on the addition task, a 128-wide SFT teacher and a 64-wide student (from the 250-step SFT start) trained
three ways for the same number of student completions (64 a step): on-policy distillation (method distill, the
reverse KL per sampled token), SFT on the teacher's samples (sequence-level distillation), and GRPO on the exact
verifier. Held-out greedy accuracy against the student tokens each has sampled or trained on.

prm: on multi-step addition with the work shown (prefopt synth chain), GRPO on the outcome alone against an
implicit PRM's per-token rewards beside it (trained first on the start policy's labelled samples with method
reward, reward.kind implicit_prm, then updated online on each rollout's outcome labels), summed into GRPO's
returns or through PRIME's own advantage (ppo.advantage: prime).

judge: on the addition task, a judge model (a 128-wide model trained on the task, then fine-tuned to write 1 or 0
after a verdict prompt showing a training prompt with its answer or a wrong one) as the reward term,
against the exact verifier: the judge's
agreement with the verifier on held-out samples, and the two GRPO runs' held-out accuracy (by the verifier).

Each writes OUT/study.json, prints a table and writes its plot (docs/dense-<study>.png).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ADD = "prefopt.data.synthetic:arithmetic_correct"
CHAIN = "prefopt.data.synthetic:chain_correct"


def prefopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefopt", *args], check=True, stdout=subprocess.DEVNULL)


def train(recipe: dict) -> Path:
    """Run the recipe (unless its run finished before): its output directory."""
    out = Path(recipe["output_dir"])
    if not (out / "final").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        prefopt("train", str(path))
    return out


def records(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sampled(model: Path, rows: list[dict], n: int, temperature: float, max_new_tokens: int, verifier) -> list[dict]:
    """n samples of each row's prompt from `model`, each {prompt, completion, answer, label} (the verifier's)."""
    from prefopt.labeling import sample

    texts = sample(str(model), [row["prompt"] for row in rows], n, max_new_tokens, temperature, seed=1)
    out = [{"prompt": row["prompt"], "completion": c, "answer": row["answer"]} for row, cs in zip(rows, texts)
           for c in cs]
    for row, label in zip(out, verifier([r["completion"] for r in out], [r["answer"] for r in out])):
        row["label"] = bool(label)
    return out


def sft(out: Path, model: Path, data: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
        evals: Path | None = None) -> Path:
    """SFT (final/); with `evals`, greedy answers to 200 held-out prompts scored by the verifier 4 times."""
    sections = {"eval": {"generate": 200, "max_new_tokens": 8,
                         "rewards": [{"function": "prefopt.data.synthetic:sum_correct"}]}} if evals else {}
    return train({"method": "sft", "output_dir": str(out), "seed": seed, "model": {"name_or_path": str(model)},
                  "data": {"train": str(data), "eval": str(evals) if evals else None, "eval_fraction": 0.0,
                           "max_length": 48, "max_prompt_length": 40, "on_bad_row": "drop"},  # an empty sample
                  "loss": {"name": "sft"}, "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": 10},
                  "train": {"batch_size": batch, "micro_batch_size": batch, "max_steps": steps, "log_every": 1,
                            "eval_every": steps // 4 if evals else 0, "save_every": 0, "progress_bar": False},
                  **sections}) / "final"


def task_and_start(out: Path, task: str, steps: int) -> tuple[Path, Path]:
    """The synthetic task under out/assets (its tiny model, data) and its start policy after `steps` SFT steps."""
    assets = out / "assets"
    if not (assets / "model").exists():
        prefopt("synth", task, str(assets))
    return assets, sft(out / "start", assets / "model", assets / "sft.jsonl", steps)


def grpo(out: Path, model: Path, assets: Path, steps: int, seed: int, rewards: list, lr: float = 3e-5,
         max_new_tokens: int = 8, **sections) -> Path:
    """The GRPO of recipes/grpo/quickstart.yaml: 8 prompts x 8 samples an update, held-out greedy eval 4 times."""
    return train({"method": "rl", "output_dir": str(out), "seed": seed, "model": {"name_or_path": str(model)},
                  "data": {"train": str(assets / "train.jsonl"), "eval": str(assets / "eval.jsonl"),
                           "max_length": 40, "max_prompt_length": 28},
                  "rewards": rewards,
                  "rollout": {"samples_per_prompt": 8, "max_new_tokens": max_new_tokens, "temperature": 0.5},
                  "ppo": {"advantage": "grpo", "kl_coef": 0.04, "kl_penalty": "loss", "kl_estimator": "k3"},
                  "optim": {"lr": lr, "schedule": "constant", "warmup_steps": 0},
                  "train": {"batch_size": 64, "micro_batch_size": 64, "max_steps": steps, "log_every": 1,
                            "eval_every": steps // 4, "save_every": 0, "progress_bar": False}, **sections})


def curve(run: Path, metric: str) -> tuple[list[int], list[float]]:
    evals = records(run, "eval")
    return [r["step"] for r in evals], [r[metric] for r in evals]


def mean_curves(runs: list[tuple[list, list]]) -> list[float]:
    return [statistics.mean(values) for values in zip(*(ys for _, ys in runs))]


def plot(path: Path, title: str, xlabel: str, series: dict[str, tuple[list, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out greedy accuracy (mean of seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(results: dict[str, list[tuple[list, list]]], what: str) -> None:
    steps = results[next(iter(results))][0][0]
    print(f"| arm | {what} at steps {' / '.join(map(str, steps))} (mean of seeds) | final, each seed |")
    print("| --- | --- | --- |")
    for name, runs in results.items():
        print(f"| {name} | {' / '.join(f'{m:.3f}' for m in mean_curves(runs))} | "
              f"{', '.join(f'{ys[-1]:.3f}' for _, ys in runs)} |")


# ----- the studies --------------------------------------------------------------------------------


DISTILL_ARMS = [  # (name, kind, lr): each at two learning rates
    *[("on-policy distillation, reverse KL", "reverse_kl", lr) for lr in (3e-4, 1e-3)],
    *[("on-policy distillation, GKD JSD", "jsd", lr) for lr in (3e-4, 1e-3)],
    *[("SFT on the teacher's samples", "sft", lr) for lr in (3e-4, 1e-3)],
    *[("GRPO (verifier)", "grpo", lr) for lr in (3e-5, 3e-4)],
]


def distill_study(args) -> dict:
    from prefopt.data.synthetic import arithmetic_correct

    out = args.out
    student_assets, teacher_assets = out / "assets", out / "teacher-assets"
    if not (student_assets / "model").exists():  # the same rows and seed: the same tokenizer, two widths
        prefopt("synth", "arithmetic", str(student_assets))
        prefopt("synth", "arithmetic", str(teacher_assets), "--hidden-size", "128")
    teacher = sft(out / "teacher", teacher_assets / "model", teacher_assets / "sft.jsonl", 600)
    start = sft(out / "student-start", student_assets / "model", student_assets / "sft.jsonl", 250)
    completions = args.steps * 64
    prompts = read_jsonl(student_assets / "train.jsonl")
    samples = out / "teacher-samples.jsonl"
    if not samples.exists():  # sequence-level distillation's data: the teacher's samples at temperature 1
        rows = sampled(teacher, prompts, -(-completions // len(prompts)), 1.0, 8, arithmetic_correct)
        random.Random(0).shuffle(rows)
        write_jsonl(samples, [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows[:completions]])
    evals = write_jsonl(out / "eval-sft.jsonl", [{**r, "completion": " " + r["answer"]}
                                                 for r in read_jsonl(student_assets / "eval.jsonl")])
    teacher_acc = statistics.mean(r["label"] for r in sampled(teacher, read_jsonl(student_assets / "eval.jsonl"), 1,
                                                               1e-4, 8, arithmetic_correct))
    results: dict[str, list] = {}
    tokens: dict[str, list] = {}
    for seed in args.seeds:
        for name, kind, lr in DISTILL_ARMS:
            if kind == "sft":
                run = sft(out / f"sft-{lr:g}-s{seed}", start, samples, args.steps, batch=64, lr=lr, seed=seed,
                          evals=evals).parent
                steps, accuracy = curve(run, "samples/sum_correct")
                per_step = {r["step"]: 64 * r["logps/chosen"] / r["logps/per_token"] for r in records(run, "train")}
            else:
                rewards = [{"function": ADD}, {"function": "prefopt.data.synthetic:number_format", "weight": 0.2}]
                sections = {}
                if kind != "grpo":  # on-policy distillation, its loss; the verifier measured (weight 0)
                    rewards = [{"function": ADD, "weight": 0.0}]
                    sections = {"method": "distill", "distill": {"teacher": str(teacher), "loss": kind}, "ppo": {},
                                "rollout": {"samples_per_prompt": 8, "max_new_tokens": 8, "temperature": 1.0}}
                run = grpo(out / f"{kind}-{lr:g}-s{seed}", start, student_assets, args.steps, seed, rewards, lr=lr,
                           **sections)
                steps, accuracy = curve(run, "rewards/arithmetic_correct")
                per_step = {r["step"]: 64 * r["rollout/length"] for r in records(run, "train")}
            label = f"{name} (lr {lr:g})"
            results.setdefault(label, []).append((steps, accuracy))
            tokens.setdefault(label, []).append([sum(per_step[s] for s in range(1, step + 1)) for step in steps])
    table(results, "held-out accuracy")
    print(f"teacher (128 wide, 600 SFT steps): held-out greedy accuracy {teacher_acc:.3f}")
    for name, runs in tokens.items():
        print(f"{name}: student tokens by the last step {statistics.mean(t[-1] for t in runs):,.0f}")
    plot(args.plot, f"Distilling a 128-wide SFT teacher ({teacher_acc:.2f}) into a 64-wide student",
         "student tokens (sampled, or trained on)",
         {name: (mean_curves([(None, t) for t in tokens[name]]), mean_curves(runs)) for name, runs in results.items()})
    return {"teacher_accuracy": teacher_acc, "accuracy": results, "tokens": tokens}


def prm_study(args) -> dict:
    from prefopt.data.synthetic import chain_correct

    out = args.out
    assets, start = task_and_start(out, "chain", 500)
    labelled = out / "prm-data.jsonl"
    if not labelled.exists():  # the start policy's samples (at the rollouts' temperature), labelled by the outcome
        write_jsonl(labelled, sampled(start, read_jsonl(assets / "train.jsonl")[:1000], 4, 0.5, 12, chain_correct))
    rows = read_jsonl(labelled)
    prm_run = train({"method": "reward", "reward": {"kind": "implicit_prm"}, "output_dir": str(out / "prm"),
                     "seed": 0, "model": {"name_or_path": str(start)},
                     "data": {"train": str(labelled), "eval_fraction": 0.1, "max_length": 48, "max_prompt_length": 40,
                              "on_bad_row": "drop"},  # an empty sample
                     "loss": {"name": "implicit_prm_ce", "beta": 0.05},
                     "optim": {"lr": 1e-4, "schedule": "cosine", "warmup_steps": 10},
                     "train": {"batch_size": 32, "micro_batch_size": 32, "max_steps": 200, "log_every": 50,
                               "eval_every": 100, "save_every": 0, "progress_bar": False}})
    prm_eval = records(prm_run, "eval")[-1]
    results: dict[str, list] = {}
    prm = {"implicit_prm": {"model": str(prm_run / "final"), "reference": str(start), "beta": 0.05,
                            "online_update": True, "label": "chain_correct", "lr": 1e-6}}
    arms = (("GRPO, outcome only", "outcome", [{"function": CHAIN}], "grpo"),
            ("GRPO, outcome + implicit PRM (summed)", "prm", [{"function": CHAIN}, prm], "grpo"),
            ("PRIME: outcome + implicit PRM, PRIME's advantage", "prime", [{"function": CHAIN}, prm], "prime"))
    for seed in args.seeds:
        for name, short, rewards, advantage in arms:
            run = grpo(out / f"{short}-s{seed}", start, assets, args.steps, seed, rewards, max_new_tokens=12,
                       ppo={"advantage": advantage, "kl_coef": 0.04, "kl_penalty": "loss", "kl_estimator": "k3"})
            results.setdefault(name, []).append(curve(run, "rewards/chain_correct"))
    table(results, "held-out accuracy")
    print(f"PRM training data: {len(rows)} samples, {statistics.mean(r['label'] for r in rows):.3f} correct; "
          f"the PRM's held-out {', '.join(f'{k} {v:.3f}' for k, v in prm_eval.items() if k.startswith('rewards/'))}")
    plot(args.plot, "GRPO on multi-step addition, with and without implicit process rewards", "step",
         {name: (runs[0][0], mean_curves(runs)) for name, runs in results.items()})
    return {"accuracy": results, "prm_eval": prm_eval, "prm_data_correct": statistics.mean(r["label"] for r in rows)}


JUDGE_TEMPLATE = "check: {prompt}{completion} ->"


def judge_study(args) -> dict:
    from prefopt.data.synthetic import arithmetic_correct
    from prefopt.recipe_online import JudgeConfig, RewardTerm
    from prefopt.rewards import RewardTerms

    out = args.out
    assets, start = task_and_start(out, "arithmetic", 250)
    if not (out / "judge-assets" / "model").exists():  # the judge: a 128-wide model that learned the task first
        prefopt("synth", "arithmetic", str(out / "judge-assets"), "--hidden-size", "128")
    judge_start = sft(out / "judge-start", out / "judge-assets" / "model", out / "judge-assets" / "sft.jsonl", 600)
    judge_data = out / "judge-data.jsonl"
    if not judge_data.exists():  # each training prompt with its answer (1) and a wrong one (0), as judge SFT rows
        rng, rows = random.Random(0), []
        for row in read_jsonl(assets / "train.jsonl"):
            wrong = int(row["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 5)
            for completion, verdict in ((" " + row["answer"], " 1"), (f" {wrong}", " 0")):
                rows.append({"prompt": JUDGE_TEMPLATE.format(prompt=row["prompt"], completion=completion),
                             "completion": verdict})
        rng.shuffle(rows)
        write_jsonl(judge_data, rows)
    judge = sft(out / "judge", judge_start, judge_data, 600)
    config = {"model": str(judge), "template": JUDGE_TEMPLATE, "max_new_tokens": 2}
    held_out = sampled(start, read_jsonl(assets / "eval.jsonl"), 4, 1.0, 8, arithmetic_correct)
    terms = RewardTerms([RewardTerm(judge=JudgeConfig(**config))])
    scores = terms([r["prompt"] for r in held_out], [r["completion"] for r in held_out], held_out).terms[0].tolist()
    pairs = [(s, r["label"]) for s, r in zip(scores, held_out)]
    parsed = [(s >= 0.5, label) for s, label in pairs if s == s]  # NaN: unparsed
    agreement = {"samples": len(pairs), "unparsed": 1 - len(parsed) / len(pairs),
                 "agreement": statistics.mean(j == label for j, label in parsed),
                 "true_positive_rate": statistics.mean(j for j, label in parsed if label),
                 "true_negative_rate": statistics.mean(not j for j, label in parsed if not label),
                 "balanced_accuracy": (statistics.mean(j for j, label in parsed if label)
                                       + statistics.mean(not j for j, label in parsed if not label)) / 2,
                 "correct_share": statistics.mean(label for _, label in pairs)}
    results: dict[str, list] = {}
    for seed in args.seeds:
        for name, rewards in (("GRPO, exact verifier", [{"function": ADD}]),
                              ("GRPO, judge model", [{"judge": config, "name": "judge"},
                                                     {"function": ADD, "weight": 0.0}])):
            run = grpo(out / f"{'judge' if len(rewards) > 1 else 'verifier'}-s{seed}", start, assets, args.steps,
                       seed, rewards)
            results.setdefault(name, []).append(curve(run, "rewards/arithmetic_correct"))
    table(results, "held-out accuracy (verifier)")
    print("judge against the verifier on held-out samples: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in agreement.items()))
    plot(args.plot, f"GRPO on addition: judge (balanced accuracy {agreement['balanced_accuracy']:.2f}) or verifier",
         "step", {name: (runs[0][0], mean_curves(runs)) for name, runs in results.items()})
    return {"accuracy": results, "judge": agreement}


STUDIES = {"distill": (distill_study, [0, 1]), "prm": (prm_study, [0, 1, 2]), "judge": (judge_study, [0, 1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    study, seeds = STUDIES[args.study]
    args.seeds = args.seeds or seeds
    args.out = args.out or Path(f"runs/dense-{args.study}")
    args.plot = args.plot or Path(f"docs/dense-{args.study}.png")
    args.out.mkdir(parents=True, exist_ok=True)
    result = study(args)
    (args.out / "study.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
