"""The on-policy study of docs/online.md. From one SFT start on the sorting task, the same number of steps of:
offline DPO on best-vs-worst pairs sampled once from the start policy, online DPO, iterative DPO (3 rounds),
SPPO (3 iterations) and GRPO; the held-out greedy verifier score against steps and against wall time, and the
KL of each final policy to the start, estimated on its own samples. Writes OUT/study.json, docs/online.png and
prints the table.

    python scripts/online_study.py [--steps 300] [--out runs/online-study] [--plot docs/online.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ASSETS, SFT = Path("runs/quickstart-assets"), Path("runs/sft-200")
VERIFIER = "prefopt.data.synthetic:sort_scores"


def prefopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefopt", *args], check=True, stdout=subprocess.DEVNULL)


def runs(out: Path, steps: int) -> dict[str, list[str]]:
    """name -> `prefopt train` arguments; every run evaluates every steps / 6 steps on the 200 held-out prompts."""
    every = f"train.eval_every={steps // 6}"
    common = [f"train.max_steps={steps}", every, "train.save_every=0", "train.progress_bar=false", "train.log_every=1"]
    online = ["recipes/online/dpo.yaml", *common]
    rounds = f"reference.sync_every={steps // 3}"
    return {
        "offline DPO (pairs from the start)": [
            "recipes/dpo/quickstart.yaml", f"output_dir={out}/offline-dpo", f"model.name_or_path={SFT}/final",
            f"data.train={out}/start-pairs.jsonl", "data.on_bad_row=drop", "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_steps=0",
            "train.batch_size=8", "train.micro_batch_size=8", "eval.generate=200",
            "eval.max_new_tokens=16", f"eval.rewards=[{{function: {VERIFIER}}}]", *common],
        "online DPO": [*online, f"output_dir={out}/online-dpo"],
        "iterative DPO (3 rounds)": [*online, f"output_dir={out}/iterative-dpo", rounds],
        "SPPO (3 iterations)": [*online, f"output_dir={out}/sppo", rounds, "loss={name: sppo, beta: 0.1}",
                                "train.batch_size=64", "train.micro_batch_size=64"],
        "GRPO": ["recipes/ppo/grpo.yaml", f"output_dir={out}/grpo", *common],
    }


def curve(run: Path) -> tuple[list[int], list[float], list[float]]:
    """(eval steps, held-out greedy verifier scores, training seconds up to each: the steps' own time, generation
    included, evaluation not). Needs train.log_every=1."""
    steps, scores, seconds, elapsed = [], [], [], 0.0
    for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        if r["split"] == "train":
            elapsed += r["step_seconds"]
        else:
            steps.append(r["step"])
            scores.append(r.get("score", r.get("samples/sort_scores")))
            seconds.append(elapsed)
    return steps, scores, seconds


def kl_to_start(final: Path, start: Path, prompts: list[str], samples: int = 4, max_new_tokens: int = 16) -> float:
    """Mean over held-out prompts of sum_t log pi(y_t) - log pi_start(y_t) on y ~ pi (temperature 1, the whole
    vocabulary), up to EOS: a Monte Carlo estimate of KL(pi || pi_start) per completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.padding_side = "left"
    policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (final, start))
    torch.manual_seed(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(prompts), 50):
            batch = tokenizer(prompts[i : i + 50], return_tensors="pt", padding=True)
            out = policy.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                  pad_token_id=tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            completion = out[:, width:]
            ended = (completion == tokenizer.eos_token_id).int().cumsum(1)
            keep = (ended == 0) | ((ended == 1) & (completion == tokenizer.eos_token_id))  # up to the first EOS
            mask = torch.cat([batch["attention_mask"].repeat_interleave(samples, 0), keep.long()], 1)
            logps = []
            for model in (policy, reference):
                logits = model(input_ids=out, attention_mask=mask).logits[:, width - 1 : -1].float()
                logps.append(logits.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1))
            total += ((logps[0] - logps[1]) * keep).sum().item()
            count += len(out)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/online-study")
    parser.add_argument("--plot", default="docs/online.png")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (ASSETS / "model").exists():
        prefopt("synth", "sort", str(ASSETS))
    if not (SFT / "final").exists():
        prefopt("train", "recipes/sft/sort-rows.yaml", "train.max_steps=200", f"output_dir={SFT}")
    if not (out / "start-pairs.jsonl").exists():  # best vs worst of 8 samples per prompt, as the online runs draw
        prefopt("label", "--input", str(ASSETS / "train.jsonl"), "--out", str(out / "start-pairs.jsonl"),
                "--policy", f"{SFT}/final", "--n", "8", "--temperature", "0.5", "--max-new-tokens", "16",
                "--verifier", VERIFIER)
    prompts = [json.loads(line)["prompt"] for line in (ASSETS / "eval.jsonl").read_text().splitlines()]
    results = {}
    for name, arguments in runs(out, args.steps).items():
        print(f"[study] {name}", flush=True)
        prefopt("train", *arguments, "--restart")
        run = Path(next(a.split("=", 1)[1] for a in arguments if a.startswith("output_dir=")))
        steps, scores, seconds = curve(run)
        results[name] = {"steps": steps, "score": scores, "seconds": seconds,
                         "kl_to_start": kl_to_start(run / "final", SFT / "final", prompts)}
    (out / "study.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        by_step.plot(r["steps"], r["score"], marker="o", label=name)
        by_time.plot(r["seconds"], r["score"], marker="o", label=name)
    for ax, label in ((by_step, "optimizer step"), (by_time, "training seconds (2-core CPU)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out greedy answers correct")
    by_step.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print("| method | " + " | ".join(f"step {s}" for s in next(iter(results.values()))["steps"])
          + " | training s | KL to start (nats per completion) |")
    print("|---" * (len(next(iter(results.values()))["steps"]) + 3) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in r["score"]) + f" | {r['seconds'][-1]:.0f} | "
              f"{r['kl_to_start']:.2f} |")


if __name__ == "__main__":
    main()
