"""Offline preference losses: pure functions of per-example log-probs.

Notation: h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)),
each log-prob summed over the completion's tokens; sigma is the logistic function.
"""

from __future__ import annotations

import torch.nn.functional as F

from prefopt.losses import LossOutput, PairLogps, register_loss


@register_loss("dpo", needs_reference=True)
def dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> LossOutput:
    """DPO: -log sigma(beta * h), Eq. 7 of Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model".

    label_smoothing eps > 0 gives conservative DPO (Mitchell 2023, "A note on DPO
    with noisy preferences"): the label is flipped with probability eps, so
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    Log-probs are sums over completion tokens; implicit rewards are
    beta * (log pi - log pi_ref) of each completion.
    """
    chosen_logratios = policy.chosen - reference.chosen  # (B,)
    rejected_logratios = policy.rejected - reference.rejected  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
