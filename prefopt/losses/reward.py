"""Reward-model losses: pure functions of the scalar rewards of chosen and rejected completions."""

from __future__ import annotations

import torch.nn.functional as F

from prefopt.losses.registry import LossOutput, PairRewards, register_loss


@register_loss("bradley_terry", needs_reference=False, data="rewards")
def bradley_terry_loss(rewards: PairRewards, reference: None = None, *, center_coef: float = 0.0) -> LossOutput:
    """Bradley-Terry reward-model loss: -log sigma(r_c - r_r - m), Eq. 1 of Ouyang et al. 2022 ("Training
    language models to follow instructions with human feedback"), with Llama 2's optional per-pair margin
    m (Touvron et al. 2023, Eq. 2; the data's `margin` column, 0 when absent), plus the centering term
    center_coef * (r_c + r_r)^2 of Eisenstein et al. 2023 ("Helping or Herding? Reward Model Ensembles
    Mitigate but do not Eliminate Reward Hacking"), which keeps rewards near zero. Per pair; the trainer
    takes the mean, as TRL's RewardTrainer (`center_rewards_coefficient`). Logged rewards are r itself.
    """
    logits = rewards.chosen - rewards.rejected  # (B,)
    if rewards.margin is not None:
        logits = logits - rewards.margin
    losses = -F.logsigmoid(logits) + center_coef * (rewards.chosen + rewards.rejected) ** 2
    return LossOutput(losses, rewards.chosen.detach(), rewards.rejected.detach())
