"""PreferenceTrainer: offline pairs (prompt, chosen, rejected) for DPO and its family."""

from __future__ import annotations

import random

import torch

from prefopt.data import load_pairs
from prefopt.data.collate import collate_pairs
from prefopt.logprobs import completion_logps
from prefopt.losses import PairLogps, get_loss
from prefopt.models import freeze, load_causal_lm
from prefopt.trainers.base import Trainer


class PreferenceTrainer(Trainer):
    def __init__(self, recipe):
        super().__init__(recipe)
        data, log = recipe.data, self.accelerator.print
        with self.accelerator.main_process_first():  # the first process fills the datasets cache
            self.train_data = load_pairs(data.train, self.tokenizer, data, recipe.seed, "data.train", log)
            if data.eval:
                self.eval_data = load_pairs(data.eval, self.tokenizer, data, recipe.seed, "data.eval", log)
        if data.eval_fraction:
            random.Random(recipe.seed).shuffle(self.train_data)
            held_out = max(1, round(data.eval_fraction * len(self.train_data)))
            self.eval_data, self.train_data = self.train_data[:held_out], self.train_data[held_out:]
        self.terms = [(get_loss(term.name), term) for term in recipe.loss]
        self.model = load_causal_lm(recipe.model)
        self.reference = None  # loaded only when a loss term uses one
        if any(spec.needs_reference for spec, _ in self.terms):
            reference = load_causal_lm(recipe.model, recipe.reference.name_or_path, key="reference.name_or_path")
            self.reference = freeze(reference).to(self.accelerator.device)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def compute_loss(self, batch):
        policy = pair_logps(self.model, batch)
        reference = None
        if self.reference is not None:
            with torch.no_grad(), self.accelerator.autocast():
                reference = pair_logps(self.reference, batch)
        outputs = [spec.fn(policy, reference, **term.params) for spec, term in self.terms]
        loss = sum(term.weight * out.losses.mean() for (_, term), out in zip(self.terms, outputs))
        metrics = {f"loss/{term.name}": out.losses.detach() for (_, term), out in zip(self.terms, outputs)
                   if len(outputs) > 1}
        chosen_rewards, rejected_rewards = outputs[0].chosen_rewards, outputs[0].rejected_rewards  # the first term's
        metrics.update({
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            # a tie (as at step 0, policy == reference) is a coin flip: it counts half
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float()
            + 0.5 * (chosen_rewards == rejected_rewards).float(),
            "rewards/margin": chosen_rewards - rejected_rewards,
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        })
        return loss, metrics


def pair_logps(model, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Chosen and rejected through the model in one forward (the batch holds chosen first)."""
    logps, counts = completion_logps(model, batch)  # (2B,) each
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
