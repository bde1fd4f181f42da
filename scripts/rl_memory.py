"""Peak memory and step time of an online (GRPO-family) run at a 152k vocabulary (docs/benchmarks.md).

    python scripts/rl_memory.py [--vocab 152064 --hidden 256 --layers 2 --steps 3 --batch 32 --new-tokens 64]

Builds a Llama-shaped model with random weights and Qwen2's vocabulary size (152,064 rows: the LM head dominates
memory), with the sorting task's prompts, then runs `prefopt train` once per configuration in a fresh process:
its peak resident memory (CPU) or peak allocated GPU memory (CUDA), and the median step time after the first.
`--reward-section reward_model` writes the recipe as prefopt before `rewards:` read it (to measure an older
checkout: PYTHONPATH=<its directory> python scripts/rl_memory.py --reward-section reward_model).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "GRPO, KL as a loss term (a reference)": ["ppo.kl_coef=0.04", "ppo.kl_penalty=loss", "ppo.kl_estimator=k3"],
    "DAPO-style, no KL (no reference)": ["ppo.kl_coef=0"],
}
TIMING = ("timing/generate", "timing/logps", "timing/update")  # what prefopt logs of each step (none before it did)
CHILD = """
import json, resource, sys, torch
from prefopt.cli import main
assert main(["train", *sys.argv[1:]]) == 0
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("PEAK " + json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_mb": gpu / 2**20}))
"""
RECIPE = """
method: rl
model: {{name_or_path: {model}}}
data: {{train: {task}/train.jsonl, eval: null, max_length: 128, max_prompt_length: 32}}
{rewards}: {{function: prefopt.data.synthetic:sort_scores}}
rollout: {{samples_per_prompt: 4, max_new_tokens: {new_tokens}, temperature: 1.0}}
ppo: {{advantage: grpo}}
optim: {{lr: 1.0e-5}}
train: {{batch_size: {batch}, micro_batch_size: {batch}, max_steps: {steps}, eval_every: 0, save_every: 0,
         progress_bar: false}}
"""


def build_model(task: Path, vocab: int, hidden: int, layers: int) -> Path:
    """The task's tokenizer with a model whose vocabulary is padded to `vocab` rows (as Qwen2's 151,646-token
    tokenizer with its 152,064-row embedding)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = task / "model-large-vocab"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="completions per step (8 prompts x 4)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reward-section", default="rewards")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for every configuration")
    args = parser.parse_args()
    from prefopt.data.synthetic import write_sort_task

    work = Path(tempfile.mkdtemp(prefix="prefopt-rlmem-"))
    task = write_sort_task(work / "task", n_train=256, n_eval=16)
    model = build_model(task, args.vocab, args.hidden, args.layers)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(task=task, model=model, rewards=args.reward_section, batch=args.batch,
                                    steps=args.steps, new_tokens=args.new_tokens))
    print(f"vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.batch} completions of up to "
          f"{args.new_tokens} tokens per step; medians over the steps after the first\n\n| configuration | peak RSS "
          f"(MB) | peak GPU allocated (MB) | step (s) | {' | '.join(TIMING)} |\n|---|---|---|---{'|---' * len(TIMING)}|")
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        run = work / f"run{i}"
        out = subprocess.run([sys.executable, "-c", CHILD, str(recipe), f"output_dir={run}", *overrides, *args.overrides],
                             capture_output=True, text=True, cwd=work)  # not this checkout: PYTHONPATH picks
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        peak = json.loads(out.stdout.split("PEAK ")[-1])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r["split"] == "train"][1:]

        print(f"| {name} | {peak['rss_mb']:.0f} | {peak['gpu_mb']:.0f} | {median(records, 'step_seconds')} | "
              f"{' | '.join(median(records, key) for key in TIMING)} |", flush=True)


def median(records: list[dict], key: str) -> str:
    values = [r[key] for r in records if key in r]
    return f"{statistics.median(values):.2f}" if values else "-"


if __name__ == "__main__":
    main()
