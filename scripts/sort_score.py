"""Greedy-generation verifier score on the sorting task: the share of held-out prompts answered correctly.

    python scripts/sort_score.py MODEL_DIR [MODEL_DIR ...] [--data runs/quickstart-assets/eval.jsonl]
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.data.synthetic import sort_score


def greedy_score(model_dir: str, prompts: list[str], max_new_tokens: int = 16) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(sort_score(p, c) for p, c in zip(prompts, completions)) / len(prompts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="runs/quickstart-assets/eval.jsonl")
    args = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in open(args.data)]
    for model_dir in args.models:
        print(f"{model_dir}: {greedy_score(model_dir, prompts):.3f} of {len(prompts)} prompts sorted correctly")
