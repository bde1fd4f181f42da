"""RewardTrainer: a scalar reward model trained on preference pairs (Bradley-Terry and friends)."""

from __future__ import annotations

import json
import math
from functools import partial

import torch

from prefopt.data.collate import collate_pairs
from prefopt.losses import get_loss
from prefopt.models import load_policy
from prefopt.scoring import NORMALIZATION_FILE, pair_rewards
from prefopt.trainers.base import Trainer


class RewardTrainer(Trainer):
    """The model is read as AutoModelForSequenceClassification with one output (a causal LM checkpoint
    gets a new scalar head); the reward of a sequence is its output at the last non-padding token."""


    def __init__(self, recipe):
        super().__init__(recipe)
        self.terms = [(get_loss(term.name), term) for term in recipe.loss]
        self.load_data("paired")
        self.model = load_policy(recipe.model, reward_head=True)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # where each sequence's reward is read

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def compute_loss(self, batch):
        rewards = pair_rewards(self.model, batch)
        outputs = [spec.fn(rewards, None, **term.params) for spec, term in self.terms]
        loss = sum(term.weight * out.losses.mean() for (_, term), out in zip(self.terms, outputs))
        chosen, rejected = rewards.chosen.detach(), rewards.rejected.detach()
        return loss, {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracy": (chosen > rejected).float(),  # strict, as TRL; ties are counted apart
            "rewards/ties": (chosen == rejected).float(),
            "rewards/margin": chosen - rejected,
            "rewards/mean": (chosen + rejected) / 2,  # over every completion
            "rewards/square": (chosen**2 + rejected**2) / 2,  # for the std, below
        }

    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        record = super().evaluate(examples)
        if "rewards/square" in record:  # std over every completion, from the first two moments
            square = record.pop("rewards/square")
            record["rewards/std"] = math.sqrt(max(0.0, square - record["rewards/mean"] ** 2))
        return record

    def save_final(self):
        """The reward model, with the mean and std of its rewards over the eval set (else the train set),
        for normalising rewards downstream (PPO, scorers)."""
        examples = self.eval_data or getattr(self.train_data, "sample", self.train_data)  # a stream: its first rows
        self.compute_loss = partial(RewardTrainer.compute_loss, self)  # the statistics whatever a subclass trains
        try:
            stats = RewardTrainer.evaluate(self, examples)
        finally:
            del self.compute_loss
        normalization = {"mean": stats["rewards/mean"], "std": stats["rewards/std"], "completions": 2 * len(examples)}
        return super().save_final({NORMALIZATION_FILE: json.dumps(normalization, indent=2) + "\n"})
