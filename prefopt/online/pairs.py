"""Pairs from a group's samples, win rates, and the pairwise judge: how method online turns each prompt's k scored
samples into what a pair loss (or a group loss) takes."""

from __future__ import annotations

import itertools

import torch

from prefopt.errors import PrefoptError


def make_pairs(scores: torch.Tensor, select: str, min_gap: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pairs within each group of scores (P, k): (chosen, rejected) sample indices (P, S) each, a (P, S) bool of
    the slots that hold a pair, and the ties (slots without one). best_worst: S = 1, the highest against the
    lowest score (the first of equals); all: S = k(k-1)/2, each (i, j), i < j, the higher-scored chosen.
    A slot holds a pair when the gap exceeds min_gap."""
    groups, k = scores.shape
    if select == "best_worst":
        best, worst = scores.argmax(1, keepdim=True), scores.argmin(1, keepdim=True)
        gap = scores.gather(1, best) - scores.gather(1, worst)
        return best, worst, gap > min_gap, int((gap <= min_gap).sum())
    first, second = (torch.tensor(index) for index in zip(*itertools.combinations(range(k), 2)))
    a, b = scores[:, first], scores[:, second]  # (P, S)
    a_wins = a >= b
    chosen = torch.where(a_wins, first, second)
    rejected = torch.where(a_wins, second, first)
    valid = (a - b).abs() > min_gap
    return chosen, rejected, valid, int((~valid).sum())


def win_rates(preference: torch.Tensor) -> torch.Tensor:
    """Each sample's estimated P(y_i beats the policy): its mean preference over the group's other samples,
    from (P, k, k) pairwise P(y_i > y_j) (diagonal ignored)."""
    k = preference.shape[-1]
    off = ~torch.eye(k, dtype=torch.bool, device=preference.device)
    return (preference * off).sum(-1) / (k - 1)


def bradley_terry(scores: torch.Tensor) -> torch.Tensor:
    """(P, k, k) P(y_i > y_j) = sigmoid(s_i - s_j) from (P, k) scalar scores (reward models, verifiers)."""
    return torch.sigmoid(scores[:, :, None] - scores[:, None, :])


def judge_preferences(judge, name: str, prompts: list, texts: list[str], k: int) -> torch.Tensor:
    """(groups, k, k) P(y_i > y_j) from a pairwise judge(prompts, a, b) -> P(a beats b) per row, over every pair
    of each group of k samples (`prompts` has one per sample, `texts` the samples)."""
    groups = len(texts) // k
    pairs = [(g, i, j) for g in range(groups) for i, j in itertools.combinations(range(k), 2)]
    try:
        values = judge([prompts[g * k] for g, _, _ in pairs], [texts[g * k + i] for g, i, _ in pairs],
                       [texts[g * k + j] for g, _, j in pairs])
        values = torch.as_tensor([float(v) for v in values])
    except Exception as exc:
        raise PrefoptError(f"pairs.judge {name} failed: {type(exc).__name__}: {exc}") from exc
    if values.shape != (len(pairs),) or not ((values >= 0) & (values <= 1)).all():
        raise PrefoptError(f"pairs.judge {name} must return one probability in [0, 1] per (prompt, a, b): got "
                           f"{values.tolist()[:8]} for {len(pairs)} pairs")
    out = torch.full((groups, k, k), 0.5)
    for (g, i, j), p in zip(pairs, values.tolist()):
        out[g, i, j], out[g, j, i] = p, 1 - p
    return out
