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

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    start = time.perf_counter()
    if tool == "prefopt":
        from prefopt.data import load_examples
        from prefopt.recipe import DataConfig, DataSource

        cfg = DataConfig(train=[], max_length=1024, num_proc=num_proc)
        rows = len(load_examples([DataSource(str(out / "rows.jsonl"))], tokenizer, cfg, 0, "data.train",
                                 log=lambda _: None))
    else:
        from types import SimpleNamespace

        from trl import DPOTrainer

        dataset = load_dataset("json", data_files=str(out / "rows.jsonl"), split="train")
        args = SimpleNamespace(dataset_num_proc=num_proc, max_length=1024, truncation_mode="keep_start")
        rows = len(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args,
                                               "train"))
    seconds = time.perf_counter() - start
    time.sleep(0.4)  # the last sample
    return {"tool": tool, "seconds": round(seconds, 2), "rows": rows,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_anon_mib": peaks["RssAnon"], "peak_file_mib": peaks["RssFile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--out", default="runs/prepare-benchmark")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--tools", default="prefopt,trl", help="comma-separated: prefopt, trl")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a worker: prefopt or trl
    args = parser.parse_args()
    out = Path(args.out)
    if args.measure:
        print(json.dumps(measure(args.measure, out, args.num_proc)))
        return
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out, args.rows)
    cache = out / "hf-datasets-cache"
    results = []
    for tool in args.tools.split(","):
        shutil.rmtree(cache, ignore_errors=True)  # the first run tokenizes; the rerun reads the cache
        for run in ("first run", "cached rerun"):
            env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            command = [sys.executable, __file__, "--out", str(out), "--measure", tool]
            if args.num_proc:
                command += ["--num-proc", str(args.num_proc)]
            line = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            results.append({"run": run, **json.loads(line)})
            print(json.dumps(results[-1]), flush=True)
    print("\n| tool | run | seconds | peak RSS (MiB) | of it anonymous / file-backed (peaks) | rows |\n"
          "|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tool']} | {r['run']} | {r['seconds']} | {r['peak_rss_mib']} | {r['peak_anon_mib']} / "
              f"{r['peak_file_mib']} | {r['rows']} |")


if __name__ == "__main__":
    main()
