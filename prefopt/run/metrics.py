"""Metric averaging over micro-batches, examples and processes, and the run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.run.checkpoints import write_atomic, writing


class MetricMeans:
    """Sums and counts of metric values, averaged over micro-batches and processes.

    A value is a scalar (counted `weight` times) or a (B,) tensor of per-example
    values, where NaN marks an example the metric does not apply to (the reward
    of a desirable completion, say, on an undesirable one): it is skipped.
    A key `corr:NAME` takes (B, 2) pairs (x, y): the result holds NAME, their
    Pearson correlation over every example (from the summed moments).
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor, weight: float = 1.0) -> None:
        if key.startswith("corr:") and value.dim() == 2:  # the five moments, each a mean over the examples
            x, y = value.detach().float().unbind(1)
            for name, moment in zip(MOMENTS, (x, y, x * x, y * y, x * y)):
                self.add(f"{key}/{name}", moment)
            return
        value = value.detach().float()
        if value.dim() == 0:
            value, counts = value * weight, torch.tensor(float(weight), device=value.device)
        else:
            present = ~torch.isnan(value)
            value, counts = value[present].sum(), present.sum().float()
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0.0) + counts

    def result(self, accelerator) -> dict[str, float]:
        keys = sorted(self.sums)  # the same order on every process
        totals = accelerator.reduce(torch.stack([self.sums[k] for k in keys] + [self.counts[k] for k in keys]),
                                    reduction="sum").tolist()
        sums, counts = totals[: len(keys)], totals[len(keys) :]
        return correlations({k: total / count for k, total, count in zip(keys, sums, counts) if count})


MOMENTS = ("x", "y", "xx", "yy", "xy")


def correlations(record: dict[str, float]) -> dict[str, float]:
    """`corr:NAME/<moment>` means -> NAME, their Pearson correlation (left out where x or y does not vary)."""
    out = {k: v for k, v in record.items() if not k.startswith("corr:")}
    for key in {k.rpartition("/")[0] for k in record if k.startswith("corr:")}:
        x, y, xx, yy, xy = (record[f"{key}/{m}"] for m in MOMENTS)
        var_x, var_y = xx - x * x, yy - y * y
        if var_x > 1e-12 * max(1.0, xx) and var_y > 1e-12 * max(1.0, yy):
            out[key.removeprefix("corr:")] = (xy - x * y) / (var_x * var_y) ** 0.5
    return out


def append(path: Path, record: dict[str, float], step: int, split: str) -> None:
    """One line of metrics.jsonl: step, split, loss first, then the rest sorted."""
    line = {"step": step, "split": split, **({"loss": record["loss"]} if "loss" in record else {})}
    line.update({k: v for k, v in sorted(record.items()) if k != "loss"})
    with writing(f"step {step}'s metrics", path), open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_records(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines and records; a torn line (a full disk, a kill mid-write) is left out."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            out.append((line, record))
    return out


def truncate(path: Path, step: int) -> None:
    """Keep the records up to `step` (none for 0), rewritten atomically."""
    if path.exists():
        kept = [ln for ln, record in read_records(path) if record["step"] <= step] if step else []
        write_atomic(path, "".join(ln + "\n" for ln in kept))


def eval_summary(output_dir: Path) -> list[dict]:
    """The run's eval records; the first and last printed side by side."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    evals = [r for _, r in read_records(path) if r["split"] == "eval"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        keys = [k for k in first if k not in ("step", "split")]
        width = max(22, *(len(key) + 2 for key in keys))
        print(f"\n{'eval metric':<{width}}{'step ' + str(first['step']):>14}{'step ' + str(last['step']):>14}")
        for key in keys:
            print(f"{key:<{width}}{first[key]:>14.4f}{last.get(key, float('nan')):>14.4f}")
        print()
        print_samples(output_dir / "samples.jsonl", first["step"], last["step"])
    return evals


def print_samples(path: Path, first: int, last: int, rows: int = 3) -> None:
    """The greedy samples (eval.generate) of the first and the last eval side by side: what was learned, in words."""
    if not path.exists():
        return
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    before = [s for s in samples if s.get("step") == first and "cycle" not in s][:rows]
    after = {json.dumps(s["prompt"]): s for s in samples if s.get("step") == last and "cycle" not in s}
    pairs = [(s, after[json.dumps(s["prompt"])]) for s in before if json.dumps(s["prompt"]) in after]
    if not pairs:
        return
    scored = [k for k in pairs[0][0] if k not in ("step", "prompt", "completion", "chosen")]

    def shown(sample):
        score = ", ".join(f"{k} {sample[k]:g}" for k in scored if isinstance(sample.get(k), (int, float)))
        return repr(sample["completion"]) + (f" ({score})" if score else "")

    print(f"greedy samples, step {first} -> step {last}:")
    for a, b in pairs:
        print(f"  {a['prompt']!r}\n    step {first}: {shown(a)}\n    step {last}: {shown(b)}")
    print()
