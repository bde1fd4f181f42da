"""Rewards from reward models: for training, for `prefopt eval`, and as scorers for online methods (a model term
of prefopt.rewards.RewardTerms).

RewardScorer scores (prompt, completion) batches with a saved reward model, an
ensemble of them, or a plain Python function (a verifier). An ensemble of K
models combines their scores per completion (Coste et al. 2023, "Reward Model
Ensembles Help Mitigate Overoptimization"):

    mean            the members' mean
    min             the worst case: the lowest member score
    mean_minus_std  mean - std_coef * std, std over the members (population std, divisor K):
                    uncertainty-weighted optimisation with the std as the uncertainty
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from prefopt.errors import PrefoptError
from prefopt.losses import PairRewards

NORMALIZATION_FILE = "reward_normalization.json"  # {"mean", "std", "completions"} beside a saved reward model
AGGREGATES = ("mean", "min", "mean_minus_std")


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> PairRewards:
    """Rewards of a pair batch (chosen rows first), read at each sequence's last non-padding token."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits.squeeze(-1).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return PairRewards(chosen, rejected, batch.get("margin"))


def load_reward_model(path: str | Path):
    """A saved reward model (a run directory's final/, or any model directory or hub id), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if (path / "final").is_dir():
        path = path / "final"
    try:
        if (path / "adapter_config.json").exists():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PrefoptError(f"cannot load a reward model from {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def normalization(path: str | Path) -> dict | None:
    for candidate in (Path(path) / "final" / NORMALIZATION_FILE, Path(path) / NORMALIZATION_FILE):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return None


class RewardScorer:
    """Scores (prompt, completion) pairs: score(prompts, completions) -> (N,) tensor.

    source: a reward model path, a list of them (an ensemble), or a function
    (prompts, completions) -> list of floats. normalize: (r - mean) / std with each
    model's stored statistics (reward_normalization.json), before combining.
    """

    def __init__(self, source: str | Path | list | Callable, aggregate: str = "mean", std_coef: float = 1.0,
                 normalize: bool = False, batch_size: int = 16, max_length: int = 2048, device: str | None = None,
                 place: Callable | None = None, lockstep: Callable[[int], int] | None = None):
        """place(model) -> the model to call (default: moved to `device`), e.g. sharded like a trained policy.
        lockstep(batches) -> the most batches any process scores at once: sharded models gather their weights
        in every forward, so each process runs that many (repeating a row, uncounted, once out of its own)."""
        if aggregate not in AGGREGATES:
            raise PrefoptError(f"aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
        self.aggregate, self.std_coef, self.batch_size, self.max_length = aggregate, std_coef, batch_size, max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lockstep = lockstep
        place = place or (lambda model: model.to(self.device))
        self.function = source if callable(source) else None
        self.members = []  # (model, tokenizer, (mean, std))
        for path in [] if self.function else (source if isinstance(source, list) else [source]):
            model, tokenizer = load_reward_model(path)
            stats = normalization(path) if normalize else None
            if normalize and stats is None:
                raise PrefoptError(f"normalize: {path} has no {NORMALIZATION_FILE}; train it with prefopt, or "
                                   "score without normalize")
            self.members.append((place(model), tokenizer, (stats["mean"], stats["std"]) if stats else (0, 1)))

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        return self.combine(self.member_scores(prompts, completions))

    def member_scores(self, prompts: list, completions: list) -> torch.Tensor:
        """(K, N): each member's (normalised) score of each completion; K = 1 for a function."""
        if self.function:
            return torch.tensor([list(map(float, self.function(prompts, completions)))])
        return torch.stack([(self._score(model, tokenizer, prompts, completions) - mean) / std
                            for model, tokenizer, (mean, std) in self.members])

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        if self.aggregate == "min":
            return scores.min(0).values
        mean = scores.mean(0)
        if self.aggregate == "mean_minus_std":
            return mean - self.std_coef * scores.std(0, unbiased=False)
        return mean

    @torch.no_grad()
    def _score(self, model, tokenizer, prompts: list, completions: list) -> torch.Tensor:
        from prefopt.data.collate import pad_sequences
        from prefopt.data.formats import is_messages, render_example
        from prefopt.data.tokenize import tokenize_examples

        # no emptiness checks: a sampled completion may be nothing but EOS, and still gets a score
        rows = [render_example(tokenizer, p, {"completion": [{"role": "assistant", "content": c}] if is_messages(p)
                                              else c}) for p, c in zip(prompts, completions)]
        rows, _ = tokenize_examples(rows, tokenizer, self.max_length, self.max_length - 1, ("completion",))
        batches = math.ceil(len(rows) / self.batch_size)
        scores = []
        for i in range(self.lockstep(batches) if self.lockstep else batches):
            chunk = rows[i * self.batch_size : (i + 1) * self.batch_size]
            batch = pad_sequences([r["prompt_ids"] for r in chunk or rows[:1]],
                                  [r["completion_ids"] for r in chunk or rows[:1]], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device)).logits
            if chunk:
                scores.append(logits.squeeze(-1).float().cpu())
        return torch.cat(scores)


def evaluate_reward_model(path: str | Path, data: str, batch_size: int = 16, max_length: int = 2048) -> dict:
    """Accuracy, ties, margin and reward statistics of a saved reward model on a preference set."""
    from prefopt.data import load_examples
    from prefopt.data.collate import collate_pairs
    from prefopt.recipe import DataConfig, DataSource

    model, tokenizer = load_reward_model(path)
    cfg = DataConfig(train=[], max_length=max_length, max_prompt_length=max_length - 1, on_bad_row="drop")
    pairs = load_examples([DataSource(data)], tokenizer, cfg, 0, "--data", log=lambda _: None)
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            rewards = pair_rewards(model, collate_pairs(pairs[i : i + batch_size], tokenizer.pad_token_id))
            chosen.append(rewards.chosen)
            rejected.append(rewards.rejected)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    every = torch.cat([chosen, rejected])
    return {"model": str(path), "data": data, "pairs": len(pairs),  # named as the reward trainer logs them
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
            "rewards/ties": (chosen == rejected).float().mean().item(),
            "rewards/margin": (chosen - rejected).mean().item(), "rewards/mean": every.mean().item(),
            "rewards/std": every.std(unbiased=False).item(), "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item()}
