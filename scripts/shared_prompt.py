"""Step time of GRPO with the k samples of a prompt sharing one copy of it, against plain padded rows, where
prompts are long beside their completions (docs/benchmarks.md).

    python scripts/shared_prompt.py [--prompt-words 60 --new-tokens 8 --hidden 256 --steps 6]

Builds the addition task with a long preamble before each question (so prompts are >= 4x the completions) on a
Llama-shaped model with random weights, and runs `prefopt train` once per layout in a fresh process, then TRL
1.16's GRPOTrainer on the same model and prompts; prints the median step time (and prefopt's logged split)
after the first step.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = """
method: rl
model: {{name_or_path: {task}/model}}
data: {{train: {task}/long.jsonl, eval: null, max_length: 512, max_prompt_length: 480}}
rewards: {{function: prefopt.data.synthetic:arithmetic_correct}}
rollout: {{samples_per_prompt: 8, max_new_tokens: {new_tokens}}}
ppo: {{advantage: grpo, kl_coef: 0.04, kl_penalty: loss, kl_estimator: k3}}
optim: {{lr: 1.0e-5}}
train: {{batch_size: 64, micro_batch_size: 64, max_steps: {steps}, eval_every: 0, save_every: 0, progress_bar: false}}
"""
KEYS = ("step_seconds", "timing/generate", "timing/logps", "timing/update")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import ENGLISH, write_arithmetic_task

    work = Path(tempfile.mkdtemp(prefix="prefopt-shared-"))
    task = write_arithmetic_task(work / "task", n_train=512, n_eval=8, hidden_size=args.hidden)
    rng = random.Random(0)
    words = " ".join(ENGLISH).split()
    with open(task / "train.jsonl") as f, open(task / "long.jsonl", "w") as out:
        for line in f:
            row = json.loads(line)
            preamble = " ".join(rng.choice(words) for _ in range(args.prompt_words))
            out.write(json.dumps({**row, "prompt": f"{preamble}\n{row['prompt']}"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    prompt_tokens = statistics.median(len(tokenizer(json.loads(line)["prompt"])["input_ids"])
                                      for line in open(task / "long.jsonl"))
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(task=task, new_tokens=args.new_tokens, steps=args.steps))
    print(f"prompts: median {prompt_tokens:.0f} tokens; completions: up to {args.new_tokens}; 64 completions per "
          f"step (8 per prompt); hidden {args.hidden}\n\n| layout | {' | '.join(KEYS)} |\n|---{'|---' * len(KEYS)}|")
    for name, share in (("padded rows", "false"), ("shared prompt", "true")):
        run = work / name.replace(" ", "-")
        out = subprocess.run([sys.executable, "-m", "prefopt", "train", str(recipe), f"output_dir={run}",
                              f"train.share_prompt={share}"], capture_output=True, text=True, cwd=work)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "train"][1:]
        print(f"| {name} | {' | '.join(f'{statistics.median(r[k] for r in records):.3f}' for k in KEYS)} |", flush=True)
    # TRL 1.16's GRPOTrainer on the same model, prompts and settings (scripts/online_benchmark.py's worker; its
    # reward the answers' format, as the task's answers are not passed to it: the reward changes no step's work)
    from online_benchmark import measure

    settings = argparse.Namespace(new_tokens=args.new_tokens, steps=args.steps, precision="no")
    result = measure(settings, "trl", "hf", task / "model", task / "long.jsonl", work,
                     reward="prefopt.data.synthetic:number_format")
    if result:
        step = statistics.median(r["step_seconds"] for r in result["records"])
        print(f"| TRL 1.16 GRPOTrainer | {step:.3f} |{' - |' * (len(KEYS) - 1)}", flush=True)


if __name__ == "__main__":
    main()
