"""Data preparation, prefopt against TRL 1.16's DPOTrainer: seconds and peak memory to turn N preference rows into
token ids, on the first run (an empty datasets cache) and on a rerun (the cache filled), each in a fresh process.

    python scripts/prepare_benchmark.py --rows 60000 [--out DIR]

Peak RSS counts the pages of memory-mapped files the process has read (the datasets cache of the rows and of
their token ids) beside what it allocated; the two are sampled apart (RssAnon, RssFile of /proc/self/status).

The rows are synthetic and UltraFeedback-shaped: log-normal word counts (prompt median 80 words, completions
median 190; the shape scripts/benchmark.py uses for lengths), English-like words, a byte-level BPE tokenizer of
16k tokens trained on them. Both libraries read the same jsonl with datasets.load_dataset and tokenize with the
same tokenizer; prefopt through prefopt.data.load_examples, TRL through DPOTrainer._prepare_dataset (what its
__init__ calls), with max_length 1024 and one process each unless --num-proc.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no what up out about who them "
         "then can more time could into only some other than its now over also after these two first way may "
         "answer question because model language data reason explain example people work well good first").split()


def write_rows(out: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        count = max(1, min(800, int(rng.lognormvariate(0, sigma) * median)))
        return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.08 else "") for _ in range(count))

    path = out / "rows.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(80, 0.9), "chosen": " " + text(190, 0.7),
                                "rejected": " " + text(190, 0.7)}) + "\n")
    from prefopt.data.synthetic import build_tokenizer

    corpus = [json.loads(line)["chosen"] for _, line in zip(range(2000), open(path))]
    build_tokenizer(corpus, vocab_size=16000).save_pretrained(out / "tokenizer")
    return path


def watch_memory(peaks: dict) -> None:
    """Sample /proc/self/status every 0.2 s: the peaks of anonymous memory (what the process allocated) and of
    file-backed resident pages (memory-mapped files read, the Arrow cache among them: the kernel reclaims them)."""
    import threading

    def loop():
        while True:
            for line in open("/proc/self/status"):
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) // 1024)
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()


def measure(tool: str, out: Path, num_proc: int | None) -> dict:
    """One preparation in this process: seconds, peak RSS (MiB) and its anonymous and file-backed parts, rows."""
    import resource

    peaks = {"RssAnon": 0, "RssFile": 0}
    watch_memory(peaks)
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from prefopt.models import load_tokenizer
    from prefopt.recipe import ModelConfig

    # prefopt: as a run loads it (the datasets cache's key covers the tokenizer, so a run then finds this cache)
    tokenizer = load_tokenizer(ModelConfig(str(out / "model"))) if tool == "prefopt" else \
        AutoTokenizer.from_pretrained(out / "tokenizer")
    start = time.perf_counter()
    if tool == "prefopt":
        from prefopt.data import load_examples
        from prefopt.recipe import DataConfig, DataSource

        cfg = DataConfig(train=[], max_length=1024, num_proc=num_proc)
        prepared = load_examples([DataSource(str(out / "rows.jsonl"))], tokenizer, cfg, 0, "data.train",
                                 log=lambda _: None)
    else:
        from types import SimpleNamespace

        from trl import DPOTrainer

        dataset = load_dataset("json", data_files=str(out / "rows.jsonl"), split="train")
        args = SimpleNamespace(dataset_num_proc=num_proc, max_length=1024, truncation_mode="keep_start")
        prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args,
                                               "train")
    seconds = time.perf_counter() - start
    time.sleep(0.4)  # the last sample, the prepared rows still held (their pages mapped)
    rows = len(prepared)
    return {"tool": tool, "seconds": round(seconds, 2), "rows": rows,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_anon_mib": peaks["RssAnon"], "peak_file_mib": peaks["RssFile"]}


def train_start(out: Path, env: dict, streaming: bool) -> dict:
    """`prefopt train` of one DPO step on the rows (a tiny model, reference copy, batch 8), in a fresh process:
    its seconds from launch to exit and its peaks (RSS, anonymous, file-backed) sampled from /proc."""
    import threading

    import yaml

    recipe = {"output_dir": str(out / "start-run"), "model": {"name_or_path": str(out / "model")},
              "data": {"train": str(out / "rows.jsonl"), "max_length": 1024, "streaming": streaming},
              "loss": {"name": "dpo"}, "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 1,
                                                 "eval_every": 0, "save_every": 0, "progress_bar": False}}
    (out / "start.yaml").write_text(yaml.safe_dump(recipe))
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prefopt", "train", str(out / "start.yaml"), "--restart"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def watch():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) // 1024)
            except OSError:
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    output = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(output[-3000:])
    return {"tool": "prefopt train, 1 step" + (" (streaming)" if streaming else ""),
            "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": peaks["VmHWM"],
            "peak_anon_mib": peaks["RssAnon"], "peak_file_mib": peaks["RssFile"], "rows": None}


def starts(out: Path, env: dict) -> list[dict]:
    results = []
    for streaming in (False, True):
        results.append({"run": "no cache" if streaming else "warm cache", **train_start(out, env, streaming)})
        print(json.dumps(results[-1]), flush=True)
    return results


def prepare_inputs(out: Path, rows: int) -> None:
    """The rows, their tokenizer and a tiny model holding it (what a run loads), kept for a rerun of the same
    size."""
    if (out / "rows.count").exists() and (out / "rows.count").read_text() == str(rows):
        return
    write_rows(out, rows)
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tiny_model

    build_tiny_model(AutoTokenizer.from_pretrained(out / "tokenizer"), out / "model")
    config = json.loads((out / "model" / "config.json").read_text())
    (out / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    (out / "rows.count").write_text(str(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--out", default="runs/prepare-benchmark")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--tools", default="prefopt,trl", help="comma-separated: prefopt, trl")
    parser.add_argument("--start", action="store_true", help="also time `prefopt train` of one step from the "
                        "warm cache, and streaming")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a worker: prefopt or trl
    args = parser.parse_args()
    out = Path(args.out)
    if args.measure:
        print(json.dumps(measure(args.measure, out, args.num_proc)))
        return
    out.mkdir(parents=True, exist_ok=True)
    prepare_inputs(out, args.rows)
    cache = out / "hf-datasets-cache"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    results = []
    for tool in filter(None, args.tools.split(",")):
        shutil.rmtree(cache, ignore_errors=True)  # the first run tokenizes; the rerun reads the cache
        for run in ("first run", "cached rerun"):
            command = [sys.executable, __file__, "--out", str(out), "--measure", tool]
            if args.num_proc:
                command += ["--num-proc", str(args.num_proc)]
            line = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            results.append({"run": run, **json.loads(line)})
            print(json.dumps(results[-1]), flush=True)
        if tool == "prefopt" and args.start:  # the cache prefopt filled
            results += starts(out, env)
    if args.start and "prefopt" not in args.tools:  # --tools '' --start: the cache as a previous call left it
        results += starts(out, env)
    print("\n| tool | run | seconds | peak RSS (MiB) | of it anonymous / file-backed (peaks) | rows |\n"
          "|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tool']} | {r['run']} | {r['seconds']} | {r['peak_rss_mib']} | {r['peak_anon_mib']} / "
              f"{r['peak_file_mib']} | {r['rows']} |")


if __name__ == "__main__":
    main()
