"""prefopt against TRL, side by side: DPO and SimPO throughput and peak memory on the same model, data,
batch and precision (docs/benchmarks.md).

    python scripts/benchmark.py                                # CPU: small model, variable lengths, DPO
    python scripts/benchmark.py --lengths fixed --methods dpo simpo
    python scripts/benchmark.py --preset qwen2.5-0.5b --methods dpo dpo-precomputed simpo  # GPU
    python scripts/benchmark.py --backends single_gpu ddp zero2 zero3 fsdp2    # prefopt per launch config
    python scripts/benchmark.py --backends single_gpu zero2 zero3 fsdp2 --lora 16
    python scripts/benchmark.py --online [--models tiny wide vocab32k --new-tokens 16 128]   # GRPO: online_benchmark.py

With `--backends`, prefopt alone runs under each launch config of recipes/accelerate (`--processes` of
them, default: every GPU, or 2 on a CPU), with the same global batch; the peak is the largest of any process.

The model is built from a config with random weights (Qwen2 shapes), with a word-level tokenizer whose
words are one token each, so every library sees exactly the token counts drawn below. Each measurement
is a fresh process; TRL and prefopt alternate, `--repeats` times, and the table gives medians.

Lengths, in tokens: `fixed` gives every sequence `max_length` (a quarter prompt). `variable` draws
prompt and completion lengths from log-normal distributions shaped like a public preference set of
chat data (UltraFeedback: prompts with a median near 110 tokens and a long tail, completions near
260), scaled to `max_length` / 1024 and cut to fit. The distribution is an approximation written down
here, not measured from the data set (which this machine cannot download).

Throughput counts the prompt + completion tokens of every sequence (a pair is two sequences, its
prompt counted twice, as a padded trainer processes it), over the timed steps after `--warmup`.
Peak memory is the peak resident set (CPU, from /proc, reset once the trainer is built) or the peak
allocated GPU memory during training. MFU counts the model FLOPs of that same work (policy forward
and backward, 6 N per token, plus 2 N per token for a reference forward, plus attention) against
`--peak-tflops`; layouts that skip work (a shared prompt) do less than they are credited with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"  # the launch configs, for --backends
# Qwen2 shapes (the 0.5B one is Qwen2.5-0.5B's) on the Llama architecture, which differs only by Qwen2's q/k/v
# biases: with model_type qwen2, AutoTokenizer would swap the word-level tokenizer for Qwen2's own
PRESETS = {
    "cpu-small": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=16384,
                      max_length=512, batch=8),
    "cpu-medium": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048, vocab=32768,  # 48M parameters
                       max_length=256, batch=8),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                         max_length=1024, batch=8),
}
# name -> (prefopt recipe sections, TRL trainer and its config). Without a reference model: SimPO (reference-free)
# and DPO with precomputed reference log-probs (no reference model in memory while training)
METHODS = {
    "dpo": ({"loss": {"name": "dpo", "beta": 0.1}, "reference": {"kind": "copy"}}, ("dpo", {"beta": 0.1})),
    "dpo-precomputed": ({"loss": {"name": "dpo", "beta": 0.1}, "reference": {"kind": "precomputed"}},
                        ("dpo", {"beta": 0.1, "precompute_ref_log_probs": True})),
    "simpo": ({"loss": {"name": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5}},
              ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0})),
}
PLAIN = {"packing": False, "logps_chunk_size": 0, "group_by_length": False}  # prefopt with every switch off
ABLATION = {  # the switches turned on one at a time, from PLAIN to prefopt's defaults
    "prefopt, switches off": PLAIN,
    "+ chunked LM head": {**PLAIN, "logps_chunk_size": 1024},
    "+ length grouping": {"packing": False, "logps_chunk_size": 1024},
    "+ packing": {"share_prompt": False},
}


# ----- set-up: model, tokenizer, data --------------------------------------------------------------

def build(work: Path, preset: dict, lengths: str, pairs: int, seed: int) -> tuple[Path, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(preset["vocab"] - 2)]
    vocab = {"<|pad|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
                         num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                         intermediate_size=preset["intermediate"], max_position_embeddings=4 * preset["max_length"],
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None,
                         attention_bias=False)
    torch.manual_seed(seed)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(seed)
    data = work / f"pairs-{lengths}.jsonl"
    with open(data, "w") as f:
        for _ in range(pairs):
            p, c, r = draw_lengths(rng, lengths, preset["max_length"])
            f.write(json.dumps({key: " ".join(rng.choices(words, k=n)) for key, n in
                                (("prompt", p), ("chosen", c), ("rejected", r))}) + "\n")
    return model_dir, data


def draw_lengths(rng: random.Random, lengths: str, max_length: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts; the EOS each library appends makes completions one longer."""
    if lengths == "fixed":
        prompt = max_length // 4
        return prompt, max_length - prompt - 1, max_length - prompt - 1
    scale = max_length / 1024

    def lognormal(median, sigma, low, high):
        return int(min(high, max(low, round(scale * median * math.exp(rng.gauss(0.0, sigma))))))

    prompt = lognormal(110, 0.9, 4, max_length // 2)
    return prompt, *(lognormal(260, 0.7, 4, max_length - prompt - 1) for _ in range(2))


def flops_per_token(preset: dict, mean_length: float, reference: bool) -> float:
    h, layers, kv = preset["hidden"], preset["layers"], preset["kv_heads"]
    head_dim = h // preset["heads"]
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * preset["intermediate"]  # q, o, k, v, gate/up/down
    n = layers * per_layer + h * preset["vocab"]  # + the LM head (tied embeddings: counted once)
    forward = 2 * n + 2 * 2 * layers * h * mean_length / 2  # + scores and values over half the context (causal)
    return 3 * forward + (forward if reference else 0)  # forward and backward (2x), + the reference's forward


# ----- one measurement, in a fresh process --------------------------------------------------------

def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)


def peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def run_prefopt(args, work: Path, sections: dict, steps: int) -> tuple[list[float], list[int], float]:
    from prefopt import recipe as recipe_lib
    from prefopt.trainers import trainer_for

    recipe = {"output_dir": str(work / "prefopt-run"), "seed": 0,
              "model": {"name_or_path": str(args.model)},
              "data": {"train": str(args.data), "max_length": args.max_length + 1,
                       "max_prompt_length": args.max_length // 2},
              "optim": {"lr": 1e-6, "schedule": "constant", "warmup_steps": 0},
              "train": {"batch_size": args.batch, "micro_batch_size": args.micro_batch or args.batch,
                        "max_steps": steps, "eval_every": 0, "save_every": 0, "progress_bar": False,
                        "resume": False, "mixed_precision": args.precision},
              "reference": {"cache_dir": str(work / "reference-cache")}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if key != "loss" else value
    path = work / f"prefopt-{os.environ.get('RANK', '0')}.yaml"  # under a launcher, every process writes its own
    path.write_text(json.dumps(recipe))
    trainer = trainer_for(recipe_lib.load(path))
    save_final, peaks = trainer.save_final, []

    def measured_save_final(*args, **kwargs):  # the peak of training, before the final model is written
        peaks.append(peak_mib())
        return save_final(*args, **kwargs)

    trainer.save_final = measured_save_final
    peak_reset()
    trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in (work / "prefopt-run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    return [r["step_seconds"] for r in train], [int(r["num_tokens"]) for r in train], peaks[0]


def run_trl(args, work: Path, trainer_name: str, config: dict, steps: int) -> tuple[list[float], list[int], float]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if trainer_name == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    cuda = torch.cuda.is_available()
    times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    settings = dict(output_dir=str(work / "trl-run"), per_device_train_batch_size=args.micro_batch or args.batch,
                    gradient_accumulation_steps=args.batch // (args.micro_batch or args.batch), max_steps=steps,
                    learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, use_cpu=not cuda,
                    bf16=args.precision == "bf16", report_to=[], save_strategy="no", logging_steps=10**6,
                    disable_tqdm=True, max_length=args.max_length + 1, dataloader_num_workers=0, seed=0, **config)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=str(args.data), split="train")
    trainer = Trainer(model=model, args=Config(**settings), train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        # DPO: rows prompt + chosen, prompt + rejected; CPO: chosen_* and rejected_* hold the prompt too
        masks = ["attention_mask"] if "attention_mask" in batch else ["chosen_attention_mask", "rejected_attention_mask"]
        tokens.append(sum(int(batch[key].sum()) for key in masks))
        return batch

    trainer.data_collator = counting
    peak_reset()
    start = time.perf_counter()
    trainer.train()  # save_strategy "no": nothing is written
    seconds = [b - a for a, b in zip([start, *times], times)]
    accumulation = settings["gradient_accumulation_steps"]
    per_step = [sum(tokens[i * accumulation : (i + 1) * accumulation]) for i in range(len(seconds))]
    return seconds, per_step, peak_mib()


def worker(args) -> None:
    work = args.run_dir or Path(tempfile.mkdtemp(prefix=f"bench-{args.framework}-", dir=args.work))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.warmup + args.steps
    sections, trl = METHODS[args.method]
    if args.framework == "trl":
        seconds, tokens, peak = run_trl(args, work, *trl, steps)
    else:
        lora = {"model": {"lora": {"r": args.lora, "alpha": 2 * args.lora}}} if args.lora else {}
        seconds, tokens, peak = run_prefopt(args, work, {**sections, **lora, "train": json.loads(args.switches)}, steps)
    timed = slice(args.warmup, steps)
    print("RESULT " + json.dumps({"tokens_per_second": sum(tokens[timed]) / sum(seconds[timed]),
                                  "pairs_per_second": args.batch * args.steps / sum(seconds[timed]),
                                  "peak_mib": peak, "tokens": sum(tokens[timed])}))


# ----- the driver ---------------------------------------------------------------------------------

def measure(args, framework: str, method: str, switches: dict, backend: str | None = None) -> dict:
    """One run in fresh processes: one, or `args.processes` under launch config `backend`."""
    command = [sys.executable, __file__, "--worker", framework, "--method", method, "--switches", json.dumps(switches),
               "--model", str(args.model), "--data", str(args.data), "--work", str(args.work)]
    for key in ("batch", "micro_batch", "max_length", "warmup", "steps", "precision", "lora"):
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if backend:  # every process of the run shares one run directory
        processes = 1 if backend == "single_gpu" else args.processes
        command[1:1] = ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{backend}.yaml"),
                        "--num_processes", str(processes), "--main_process_port", str(free_port())]
        command += ["--run-dir", tempfile.mkdtemp(prefix=f"bench-{backend}-", dir=args.work)]
        if processes > 1 and not args.micro_batch:
            command += ["--micro-batch", str(args.batch // processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(CONFIGS.parent.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{framework} {method} {backend or ''} failed:\n{out.stderr[-4000:]}")
    # one result per process; processes print at the same time, so two may share a line
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", out.stdout)]
    return {**results[0], "peak_mib": max(r["peak_mib"] for r in results)}  # the busiest process's peak


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_backends(args, method: str) -> None:
    """prefopt under each launch config, the same global batch: speed and the largest per-process peak."""
    print("| launch config | processes | tokens/s | pairs/s | peak MiB (largest process) | speed vs first | memory vs first |")
    print("|---|---|---|---|---|---|---|")
    results: dict[str, list[dict]] = {backend: [] for backend in args.backends}
    for _ in range(args.repeats):
        for backend in args.backends:
            results[backend].append(measure(args, "prefopt", method, {}, backend))
    base = None
    for backend, values in results.items():
        speed = statistics.median(v["tokens_per_second"] for v in values)
        pairs_s = statistics.median(v["pairs_per_second"] for v in values)
        peak = statistics.median(v["peak_mib"] for v in values)
        base = base or (speed, peak)
        processes = 1 if backend == "single_gpu" else args.processes
        print(f"| {backend} | {processes} | {speed:,.0f} | {pairs_s:.2f} | {peak:,.0f} | {speed / base[0]:.2f}x | "
              f"{peak / base[1]:.2f}x |", flush=True)


def main() -> None:
    if "--online" in sys.argv:  # online GRPO: prefopt (hf, vllm) against TRL GRPOTrainer
        sys.path.insert(0, str(Path(__file__).parent))
        from online_benchmark import main as online

        online([arg for arg in sys.argv[1:] if arg != "--online"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: cpu-small, or qwen2.5-0.5b on a GPU")
    parser.add_argument("--lengths", choices=["variable", "fixed"], default="variable")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["dpo"])
    parser.add_argument("--batch", type=int, help="pairs per optimizer step (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, help="pairs per forward (default: the whole batch)")
    parser.add_argument("--max-length", type=int, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["no", "bf16"], help="default: bf16 on a GPU, else no (fp32)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--ablation", action="store_true", help="also prefopt with its speed switches off, then "
                        "turned on one at a time")
    parser.add_argument("--compile", action="store_true", help="also prefopt with train.compile")
    parser.add_argument("--backends", nargs="+", choices=sorted(p.stem for p in CONFIGS.glob("*.yaml")
                                                             if p.stem != "multi_node"),
                        help="prefopt alone under these launch configs instead of against TRL")
    parser.add_argument("--processes", type=int, help="processes for --backends (default: GPUs, or 2 on a CPU)")
    parser.add_argument("--lora", type=int, help="with --backends: train a LoRA adapter of this rank")
    parser.add_argument("--worker", choices=["prefopt", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--switches", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.framework = args.worker
        from prefopt.cli import end_launched_process

        worker(args)
        return end_launched_process(0)

    import torch

    cuda = torch.cuda.is_available()
    preset = PRESETS[args.preset or ("qwen2.5-0.5b" if cuda else "cpu-small")]
    args.batch, args.max_length = args.batch or preset["batch"], args.max_length or preset["max_length"]
    preset["max_length"] = args.max_length
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.work = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    pairs = args.batch * (args.warmup + args.steps)
    args.model, args.data = build(args.work, preset, args.lengths, pairs, seed=0)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    mean_length = statistics.mean(len(r["prompt"].split()) + (len(r["chosen"].split()) + len(r["rejected"].split())) / 2
                                  for r in rows)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"{device}; torch {torch.__version__}; preset {args.preset or ('qwen2.5-0.5b' if cuda else 'cpu-small')} "
          f"{preset}; {args.lengths} lengths (mean sequence {mean_length:.0f} tokens); {args.batch} pairs per step; "
          f"precision {args.precision}; {args.warmup} warm-up + {args.steps} timed steps; median of {args.repeats}\n")
    if args.lora and not args.backends:
        parser.error("--lora goes with --backends (the comparison with TRL trains every weight)")
    if args.backends:
        args.processes = args.processes or (torch.cuda.device_count() if cuda else 2)
        return compare_backends(args, args.methods[0])
    print("| method | trainer | tokens/s | pairs/s | peak MiB | MFU | speed vs TRL | memory vs TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        sections = METHODS[method][0]
        runs = (ABLATION if args.ablation else {}) | {"prefopt": {}} | (
            {"prefopt + compile": {"compile": True}} if args.compile else {})
        results: dict[str, list[dict]] = {name: [] for name in ["TRL", *runs]}
        for _ in range(args.repeats):  # alternate, so that drifts in machine speed hit every trainer alike
            results["TRL"].append(measure(args, "trl", method, {}))
            for name, switches in runs.items():
                results[name].append(measure(args, "prefopt", method, switches))
        reference = "reference" in sections and sections["reference"]["kind"] == "copy"
        flops = flops_per_token(preset, mean_length, reference)
        base = None
        for name, values in results.items():
            speed = statistics.median(v["tokens_per_second"] for v in values)
            pairs_s = statistics.median(v["pairs_per_second"] for v in values)
            peak = statistics.median(v["peak_mib"] for v in values)
            mfu = f"{speed * flops / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "n/a"
            base = base or (speed, peak)  # TRL's, the first row
            versus = f"{speed / base[0]:.2f}x | {peak / base[1]:.2f}x"
            print(f"| {method} | {name} | {speed:,.0f} | {pairs_s:.2f} | {peak:,.0f} | {mfu} | {versus} |", flush=True)


if __name__ == "__main__":
    main()
