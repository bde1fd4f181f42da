"""Losses on unpaired feedback: (prompt, completion, thumbs up/down) rows.

Paired data fed to these losses becomes two rows per pair: chosen (desirable)
and rejected (undesirable). r = log pi(y|x) - log pi_ref(y|x), summed over the
completion's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.losses.registry import LossOutput, RunningMean, UnpairedLogps, check_range, register_loss


def split_rewards(rewards: torch.Tensor, desirable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards -> desirable rows' rewards and undesirable rows' rewards, NaN elsewhere, detached."""
    rewards = rewards.detach()
    nan = torch.full_like(rewards, float("nan"))
    return torch.where(desirable, rewards, nan), torch.where(desirable, nan, rewards)


@register_loss("kto", needs_reference=True, data="unpaired", kl=True)
def kto_loss(policy: UnpairedLogps, reference: UnpairedLogps, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO, Eq. 7 of Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization":
    desirable rows lambda_D (1 - sigma(beta (r - z0))), undesirable rows lambda_U (1 - sigma(beta (z0 - r))).

    The reference point z0 is the KL term estimated, as in the paper and TRL, from mismatched pairs
    within the micro-batch (prompt i with completion i - 1): z0 = max(0, mean(r of those)), detached.
    TRL averages z0 over processes first; here it is each process's micro-batch (the same on one process).
    Log-probs are sums over completion tokens; logged rewards are beta * r.
    """
    check_range("kto", beta=(beta, "> 0"), desirable_weight=(desirable_weight, ">= 0"),
                undesirable_weight=(undesirable_weight, ">= 0"))
    logratios = policy.logps - reference.logps  # (N,)
    z0 = (policy.kl_logps - reference.kl_logps).mean().detach().clamp(min=0)
    losses = torch.where(policy.desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    return LossOutput(losses, *split_rewards(beta * logratios, policy.desirable))


@register_loss("implicit_prm_ce", needs_reference=True, data="unpaired")
def implicit_prm_ce_loss(policy: UnpairedLogps, reference: UnpairedLogps, *, beta: float = 0.05) -> LossOutput:
    """The implicit PRM's cross-entropy on outcome labels, Eq. 5 of Yuan et al. 2024, "Free Process Rewards
    without Process Labels": the outcome reward r = beta * sum_t log pi(y_t)/pi_ref(y_t) as a logit,
    -log sigma(r) on correct (desirable) rows and -log(1 - sigma(r)) on incorrect ones. The model it trains gives
    process rewards beta * log pi/pi_ref per token (rewards[i].implicit_prm). Logged rewards are r."""
    check_range("implicit_prm_ce", beta=(beta, "> 0"))
    rewards = beta * (policy.logps - reference.logps)  # (N,)
    losses = torch.where(policy.desirable, -F.logsigmoid(rewards), -F.logsigmoid(-rewards))
    return LossOutput(losses, *split_rewards(rewards.detach(), policy.desirable))


@register_loss("bco", needs_reference=True, data="unpaired", state=RunningMean)
def bco_loss(policy: UnpairedLogps, reference: UnpairedLogps, reward_shift: RunningMean, *,
             beta: float = 0.1) -> LossOutput:
    """BCO, Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment" (Eq. 7,
    without the optional density-ratio weighting): a logistic classifier on the implicit reward beta * r,
    -log sigma(beta r - delta) on desirable rows and -log sigma(-(beta r - delta)) on undesirable ones.

    delta is the running mean of the batch-mean rewards of every training micro-batch so far, this one
    included (the reward shift of the paper; TRL's former BCO trainer updated it the same way). It is
    kept in `reward_shift`, saved and restored with checkpoints, and only read during evaluation.
    Logged rewards are beta * r.
    """
    check_range("bco", beta=(beta, "> 0"))
    rewards = beta * (policy.logps - reference.logps)  # (N,)
    delta = reward_shift.update(rewards.mean())
    losses = torch.where(policy.desirable, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
    return LossOutput(losses, *split_rewards(rewards, policy.desirable))
