"""The maths of KL-regularized PPO and its critic-free cousins, as pure functions of tensors.

Shapes: B completions, T completion tokens (right-padded); `mask` (B, T) is 1 on the
completion's tokens up to and including its last (EOS, or the last one generated).
Log-probs are per token of the sampled tokens.
"""

from __future__ import annotations

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries, var with Bessel's correction (as TRL);
    shift_mean=False keeps the mean (used to whiten rewards). Masked-out entries are 0."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
    Divergence"): k1 = log pi - log pi_ref; k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, >= 0)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        log_ratio = ref_logps - logps  # log r
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be k1 or k3, got {estimator!r}")


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * KL on every completion token, plus the sequence's score at its
    last token (Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1  # (B,) index of each completion's last token
    return rewards.index_put((torch.arange(len(scores)), last), scores, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lam)^l delta_{t+l}; the value after the last token is 0. Returns (advantages,
    returns = advantages + values), both (B, T), 0 past each completion's end."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, method: str) -> torch.Tensor:
    """Critic-free sequence advantages from `group_size` completions per prompt (scores (B,), grouped
    consecutively):
    - rloo: score minus the mean of the other k - 1 of its group (Ahmadian et al. 2024, Eq. 9);
    - grpo: (score - group mean) / (group std + 1e-4), std with Bessel's correction (Shao et al. 2024, Eq. 3,
      as TRL);
    - reinforce: score minus the batch mean (REINFORCE with a batch baseline; Williams 1992).
    """
    if method == "reinforce":
        return scores - scores.mean()
    groups = scores.view(-1, group_size)  # (prompts, k)
    if method == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 completions per prompt")
        baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - baseline).reshape(-1)
    if method == "grpo":
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        return ((groups - groups.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1)
    raise ValueError(f"advantage method must be gae, rloo, grpo or reinforce, got {method!r}")


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss: mean over completion tokens of
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old. Also the clip fraction and approximate KL
    0.5 * mean((log r)^2) (as TRL)."""
    loss = policy_loss(logps, old_logps, advantages, mask, clip_low=clip, clip_high=clip)
    with torch.no_grad():
        log_ratio = logps - old_logps
        ratio = torch.exp(log_ratio)
        unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio**2, mask)}
    return loss, stats


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, ratio: str = "token",
                aggregation: str = "token_mean", normalizer: float | torch.Tensor | None = None,
                max_new_tokens: int | None = None) -> torch.Tensor:
    """The clipped surrogate of the GRPO family, as a loss: per token -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),
    aggregated. logps, old_logps, mask: (B, T); advantages: (B,) per sequence or (B, T) per token.

    - ratio "token": r_t = pi(y_t) / pi_old(y_t) (PPO, Schulman et al. 2017, Eq. 7); "sequence": one ratio per
      sequence, exp of the mean of its tokens' log-ratios (GSPO, Zheng et al. 2025, Eq. 7), gradient through all;
    - clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, Eq. 10);
    - dual_clip c > 1 bounds the loss of a negative advantage by -c A (dual-clip PPO, Ye et al. 2020, Eq. 5);
    - aggregation "token_mean": the sum over tokens divided by the token count (DAPO, Eq. 12; TRL's bnpo and
      dapo); "sequence_mean": the sum over sequences of each one's token mean, divided by the sequence count
      (GRPO, Shao et al. 2024, Eq. 3); "constant": the sum over tokens divided by sequences x max_new_tokens
      (Dr. GRPO, Liu et al. 2025).

    `normalizer` is the count that divides: tokens (token_mean) or sequences (the others). None takes this
    batch's own; a trainer passes the count of the whole global mini-batch per micro-batch share, so that
    however the mini-batch is cut (micro-batches, processes) the gradient is the same.
    """
    log_ratio = (logps - old_logps) * mask  # (B, T)
    if ratio == "sequence":
        log_ratio = (log_ratio.sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(logps)
    elif ratio != "token":
        raise ValueError(f"ratio must be token or sequence, got {ratio!r}")
    importance = torch.exp(log_ratio)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    per_token = -torch.min(importance * advantages, importance.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    per_token = per_token * mask  # (B, T)
    if aggregation == "token_mean":
        return per_token.sum() / (mask.sum().clamp(min=1) if normalizer is None else normalizer)
    sequences = len(mask) if normalizer is None else normalizer
    if aggregation == "sequence_mean":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / sequences
    if aggregation == "constant":
        if max_new_tokens is None:
            raise ValueError("aggregation constant divides by max_new_tokens: give it")
        return per_token.sum() / (sequences * max_new_tokens)
    raise ValueError(f"aggregation must be token_mean, sequence_mean or constant, got {aggregation!r}")


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2) (as TRL and OpenAI's PPO2),
    and the fraction where the clipped term is the larger."""
    # clamped to the band itself (as TRL), not V_old + clamp(V - V_old): inside the band that returns V exactly,
    # so rounding never counts an unclipped value as clipped
    clipped_values = values.clamp(old_values - clip, old_values + clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


class AdaptiveKLController:
    """Ziegler et al. 2019, Sec. 2.2: beta <- beta * (1 + K_beta e), e = clip(KL / target - 1, -0.2, 0.2),
    K_beta = n_steps / horizon. Saved and restored with checkpoints."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
