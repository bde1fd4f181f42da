"""Peak memory of each way to get reference log-probs, for the same DPO run (docs/benchmarks.md).

    python scripts/reference_memory.py [--hidden 768 --layers 12 --steps 3]

Builds a Llama-shaped model with random weights (hidden 768, 12 layers: 106M parameters, 426 MB in
fp32) and the sorting task, then runs `prefopt train` once per configuration in a fresh process and
reports that process's peak resident memory (CPU) or peak allocated GPU memory (CUDA).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "full, copy": ["reference.kind=copy"],
    "full, precomputed": ["reference.kind=precomputed"],
    "LoRA, copy": ["model.lora={r: 16, alpha: 32, dropout: 0.0}", "reference.kind=copy"],
    "LoRA, adapter_off": ["model.lora={r: 16, alpha: 32, dropout: 0.0}", "reference.kind=adapter_off"],
    "LoRA, precomputed": ["model.lora={r: 16, alpha: 32, dropout: 0.0}", "reference.kind=precomputed"],
}
CHILD = """
import json, resource, sys, torch
from prefopt.cli import main
assert main(["train", *sys.argv[1:]]) == 0
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("PEAK " + json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_mb": gpu / 2**20}))
"""
RECIPE = """
model: {{name_or_path: {task}/model}}
data: {{train: {task}/train.jsonl, eval: {task}/eval.jsonl, max_length: 64, max_prompt_length: 32}}
loss: {{name: dpo, beta: 0.1}}
optim: {{lr: 1.0e-5}}
train: {{batch_size: 8, micro_batch_size: 8, max_steps: {steps}, eval_every: 0, save_every: 0, progress_bar: false}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from prefopt.data.synthetic import write_sort_task

    work = Path(tempfile.mkdtemp(prefix="prefopt-refmem-"))
    task = write_sort_task(work / "task", n_train=64, n_eval=16, hidden_size=args.hidden, num_layers=args.layers)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(task=task, steps=args.steps))
    print("| reference | peak RSS (MB) | peak GPU allocated (MB) |\n|---|---|---|")
    for name, overrides in CONFIGS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(recipe), f"output_dir={work / 'run'}",
                              f"reference.cache_dir={work / 'cache'}", "train.resume=false", *overrides],
                             capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.split("PEAK ")[-1])
        print(f"| {name} | {peak['rss_mb']:.0f} | {peak['gpu_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
