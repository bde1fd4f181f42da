"""Metric averaging over micro-batches, examples and processes."""

from __future__ import annotations

import torch


class MetricMeans:
    """Sums and counts of metric values, averaged over micro-batches and processes.

    A value is a scalar (counted `weight` times) or a (B,) tensor of per-example
    values, where NaN marks an example the metric does not apply to (the reward
    of a desirable completion, say, on an undesirable one): it is skipped.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor, weight: float = 1.0) -> None:
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
        return {k: total / count for k, total, count in zip(keys, sums, counts) if count}
