"""Run every loss's quickstart recipe and print the before/after table for docs/losses.md.

    python scripts/loss_table.py [LOSS ...]      (after `prefopt synth sort runs/quickstart-assets`)

Each recipes/<loss>/quickstart.yaml is trained with `prefopt train`; the table gives
held-out rewards/accuracy (each loss's own implicit reward; a tie counts half) and
loss at step 0 and at the end, and the wall time of the run.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(names: list[str]) -> None:
    recipes = sorted(ROOT.glob("recipes/*/quickstart.yaml"))
    rows = ["| loss | held-out accuracy, step 0 | held-out accuracy, end | eval loss, step 0 | eval loss, end "
            "| steps | wall time |", "|---|---|---|---|---|---|---|"]
    for recipe in recipes:
        name = recipe.parent.name
        if names and name not in names:
            continue
        out = ROOT / "runs" / "losses" / name
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefopt", "train", str(recipe), f"output_dir={out}",
                        "train.progress_bar=false", "train.resume=false"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
        first, last = evals[0], evals[-1]
        rows.append(f"| {name} | {first['rewards/accuracy']:.3f} | {last['rewards/accuracy']:.3f} | "
                    f"{first['loss']:.4f} | {last['loss']:.4f} | {last['step']} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
