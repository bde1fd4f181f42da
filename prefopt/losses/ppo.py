"""The maths of KL-regularized PPO and its critic-free cousins, as pure functions of tensors.

Shapes: B completions, T completion tokens (right-padded); `mask` (B, T) is 1 on the
completion's tokens up to and including its last (EOS, or the last one generated).
Log-probs are per token of the sampled tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries, var with Bessel's correction (as TRL);
    shift_mean=False keeps the mean (used to whiten rewards). Masked-out entries are 0."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)  # one token: variance 0, not NaN
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
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).max(1).values.clamp(min=0)  # (B,) each one's last token
    return rewards.index_put((torch.arange(len(scores)), last), scores, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lam)^l delta_{t+l}; the value after the last token is 0. The steps are the tokens where
    mask is 1: a multi-turn completion's inserted tool tokens (mask 0) are skipped, so t + 1 is the model's next
    token after them. Returns (advantages, returns = advantages + values), both (B, T), 0 where mask is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_values = torch.zeros_like(running)  # the value of the next step (0 after the last)
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = torch.where(step, delta + gamma * lam * running, running)
        next_values = torch.where(step, values[:, t], next_values)
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


# ----- off-policy correction --------------------------------------------------------------------------
# The samples come from a behaviour policy (the engine's weights and kernels) that is not the proximal one the
# update clips against (the trainer's log-probs at the rollout): the decoupled PPO objective (Hilton et al. 2022;
# AReaL, Fu et al. 2025) keeps the clip against the proximal policy and weighs each token's loss by
# rho = pi_proximal / pi_behaviour, corrected by one of these modes (verl's rollout correction; Liu, Li et al.
# 2025, "When Speed Kills Stability"): truncated importance sampling (the weight capped at `high`) or rejection
# (tokens or sequences whose weight leaves [low, high] leave the loss; the others weigh 1), per token, per
# sequence (the product of its tokens' rho) or per sequence's geometric mean.
IS_MODES = ("none", "truncate", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask",
            "geometric_mask")


def importance_weights(mode: str, log_rho: torch.Tensor, mask: torch.Tensor, low: float, high: float
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(B, T) weights of each token's loss from log rho = log pi_proximal - log pi_behaviour (0 where mask is 0),
    and their stats: mean and max over the masked tokens, and the share of tokens truncated or rejected.
    `truncate` is `token_truncate` (prefopt's engine_is before the other modes)."""
    if mode == "none":
        return None, {}
    log_rho = log_rho * mask
    level, action = ("token", "truncate") if mode == "truncate" else mode.split("_")
    if level == "token":
        rho = torch.exp(log_rho)
    else:  # one weight per sequence, on each of its tokens: the product of rho, or its geometric mean
        total = log_rho.sum(1, keepdim=True)
        if level == "geometric":
            total = total / mask.sum(1, keepdim=True).clamp(min=1)
        rho = torch.exp(total).expand_as(log_rho)
    if action == "truncate":
        weights, changed = rho.clamp(max=high), rho > high
    else:
        kept = (rho >= low) & (rho <= high)
        weights, changed = kept.to(log_rho.dtype), ~kept
    weights = weights * mask
    on = mask.bool()
    stats = {"rollout/is_weight_mean": weights[on].mean(), "rollout/is_weight_max": weights[on].max(),
             "rollout/is_corrected_fraction": changed[on].float().mean()}
    return weights, stats


# ----- advantage estimators ------------------------------------------------------------------------
# An estimator maps the rollout's per-token rewards (B, T) (the score at each completion's last token, minus
# beta x KL per token where the KL is in the reward) to advantages: a sequence-level one (B,) per completion, a
# token-level one (B, T) with value targets (B, T) or None. The scale (ppo.advantage_scale: the group's std,
# whitening over the batch, or none) is applied after, apart from the estimator. Each estimator declares the
# scale and the loss aggregation a recipe gets when it names none (GRPO's paper: the group's std and a mean over
# each sequence's tokens; the others: batch whitening and a mean over every token).


@dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable
    level: str = "sequence"  # "sequence": (B,) per completion; "token": (B, T)
    critic: bool = False  # needs values (a value head)
    min_group: int = 1  # completions per prompt it needs
    scale: str = "batch"  # its default ppo.advantage_scale
    aggregation: str = "token_mean"  # its default ppo.loss_aggregation
    process: bool = False  # takes the reward terms' per-token (process) rewards apart: fn(..., process=(B, T))


ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str | None = None, *, level: str = "sequence", critic: bool = False,
                       min_group: int = 1, scale: str = "batch", aggregation: str = "token_mean",
                       process: bool = False) -> Callable:
    """Decorator: `@register_advantage("rloo", min_group=2)` above fn(rewards, mask, *, values, group_size, gamma,
    lam) -> (advantages, returns or None); a recipe's `ppo.advantage: <name>` then picks it. Without a name it only
    declares the function's properties, for a recipe that names it as `module:function`."""

    def add(fn: Callable) -> Callable:
        fn.estimator = Estimator(name or f"{fn.__module__}:{fn.__qualname__}", fn, level, critic, min_group, scale,
                                 aggregation, process)
        if name:
            ADVANTAGES[name] = fn.estimator
        return fn

    return add


def get_advantage(name: str) -> Estimator:
    """A registered estimator, or a user's `module:function` (its properties from @register_advantage, else a
    sequence-level estimator without a critic, batch-whitened, token-mean)."""
    if name in ADVANTAGES:
        return ADVANTAGES[name]
    if ":" not in name:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ADVANTAGES)}, or a user's "
                         "module:function (prefopt.losses.ppo.register_advantage declares one)")
    from prefopt.errors import import_object

    fn = import_object(name, "ppo.advantage")
    if isinstance(fn, Estimator):
        return fn
    if not callable(fn):
        raise ValueError(f"ppo.advantage: {name} is not a function fn(rewards, mask, *, values, group_size, gamma, "
                         "lam) -> (advantages, returns or None)")
    return getattr(fn, "estimator", None) or Estimator(name, fn)


@register_advantage("gae", level="token", critic=True)
def gae_advantages(rewards, mask, *, values, gamma, lam, **_):
    """Generalised advantage estimation with a learned value function (Schulman et al. 2016, Eq. 16)."""
    return gae(rewards, values, mask, gamma, lam)


@register_advantage("grpo", min_group=2, scale="group", aggregation="sequence_mean")
def grpo_advantages(rewards, mask, *, group_size, **_):
    """Each completion's return minus its group's mean (Shao et al. 2024, Eq. 3; its division by the group's std
    is advantage_scale: group, GRPO's default, which Dr. GRPO drops: Liu et al. 2025, Sec. 3.1)."""
    groups = rewards.sum(1).view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).reshape(-1), None


@register_advantage("rloo", min_group=2)
def rloo_advantages(rewards, mask, *, group_size, **_):
    """Return minus the mean of the other k - 1 of its group (Ahmadian et al. 2024, Eq. 9)."""
    groups = rewards.sum(1).view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1), None


@register_advantage("reinforce")
def reinforce_advantages(rewards, mask, **_):
    """Return minus the batch mean (REINFORCE with a batch baseline; Williams 1992)."""
    returns = rewards.sum(1)
    return returns - returns.mean(), None


@register_advantage("reinforce_pp", level="token")
def reinforce_pp_advantages(rewards, mask, *, gamma, **_):
    """REINFORCE++ (Hu 2025, Sec. 3): each token's discounted return-to-go of the per-token rewards (the KL
    penalty at every token, the score at the last), no critic; whitened over the batch (advantage_scale: batch)."""
    return returns_to_go(rewards, mask, gamma), None


@register_advantage("prime", level="token", min_group=2, process=True)
def prime_advantages(rewards, mask, *, process, group_size, gamma, **_):
    """PRIME (Cui et al. 2025, Sec. 3.3): leave-one-out baselines for both kinds of reward. Each token's process
    reward less the mean per-token process reward of the other k - 1 samples of its group; each completion's
    other rewards (the outcome, any KL in the reward) summed, less the others' mean (RLOO), at its last token;
    then each token's discounted return-to-go (gamma); whitened over the batch (advantage_scale: batch), as
    verl's PRIME recipe does."""
    k = group_size
    lengths = mask.sum(1).clamp(min=1)
    per_token = (process.sum(1) / lengths).view(-1, k)
    process_baseline = ((per_token.sum(1, keepdim=True) - per_token) / (k - 1)).reshape(-1, 1)
    outcome = (rewards - process).sum(1).view(-1, k)
    outcome = (outcome - (outcome.sum(1, keepdim=True) - outcome) / (k - 1)).reshape(-1)
    shaped = (process - process_baseline) * mask
    last = (mask.cumsum(1) == lengths[:, None]) & mask.bool()  # each completion's last token
    return returns_to_go(shaped + last * outcome[:, None], mask, gamma), None


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each token's discounted sum of the rewards from it to its completion's end (B, T)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def estimate_advantages(rewards: torch.Tensor, mask: torch.Tensor, estimator: str | Estimator, scale: str, *,
                        values: torch.Tensor | None = None, group_size: int = 1, gamma: float = 1.0,
                        lam: float = 0.95, process: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (B, T), 0 past each completion, and value targets (zeros without a critic): the estimator, then
    its scale: "group" divides each completion's advantage by its group's std of returns + 1e-4 (Bessel; GRPO, as
    TRL), "batch" whitens over every completion token (TRL's PPO, OpenRLHF), "none" leaves it."""
    spec = estimator if isinstance(estimator, Estimator) else get_advantage(estimator)
    extra = {"process": torch.zeros_like(rewards) if process is None else process} if spec.process else {}
    advantages, returns = spec.fn(rewards, mask, values=values, group_size=group_size, gamma=gamma, lam=lam, **extra)
    expected = (len(rewards),) if spec.level == "sequence" else tuple(rewards.shape)
    if tuple(advantages.shape) != expected:
        raise ValueError(f"advantage estimator {spec.name} ({spec.level}-level) gave advantages of shape "
                         f"{tuple(advantages.shape)}, expected {expected}")
    if scale == "group":
        if spec.level != "sequence":
            raise ValueError(f"advantage_scale group needs a sequence-level estimator, not {spec.name}")
        groups = rewards.sum(1).view(-1, group_size)
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        advantages = (advantages.view(-1, group_size) / (std + 1e-4)).reshape(-1)
    if spec.level == "sequence":
        advantages = advantages[:, None] * mask
    if scale == "batch":
        advantages = masked_whiten(advantages, mask)
    elif scale not in ("group", "none"):
        raise ValueError(f"advantage_scale must be group, batch or none, got {scale!r}")
    return advantages, torch.zeros_like(mask) if returns is None else returns


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), per completion (B,): 0 up to max_new_tokens -
    buffer tokens, then falling linearly to -penalty at max_new_tokens (verl's overlong_penalty_factor)."""
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start) / buffer).clamp(0, 1)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss: mean over completion tokens of
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old. Also the clip fraction and approximate KL."""
    loss = policy_loss(logps, old_logps, advantages, mask, clip_low=clip, clip_high=clip)
    return loss, clip_stats(logps, old_logps, advantages, mask, clip, clip)


@torch.no_grad()
def clip_stats(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_low: float = 0.2, clip_high: float = 0.2, normalizer=None, ratio: str = "token"
               ) -> dict[str, torch.Tensor]:
    """The share of tokens whose ratio the clip holds (the clipped term binds; with ratio "sequence" the
    sequence's ratio, GSPO's), and the approximate KL 0.5 * mean((log r)^2) of the token ratios (as TRL's PPO):
    token means over the completion tokens (see aggregate's normalizer)."""
    token_log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratios(logps, old_logps, mask, ratio))
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return {"clipfrac": aggregate((clipped > unclipped).float(), mask, normalizer=normalizer),
            "approx_kl": 0.5 * aggregate(token_log_ratio**2, mask, normalizer=normalizer)}


def log_ratios(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, ratio: str = "token") -> torch.Tensor:
    """(B, T) log pi / pi_old per token ("token"), or each sequence's mean of them on every token ("sequence")."""
    log_ratio = (logps - old_logps) * mask  # (B, T)
    if ratio == "sequence":
        return (log_ratio.sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(logps)
    if ratio != "token":
        raise ValueError(f"ratio must be token or sequence, got {ratio!r}")
    return log_ratio


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, ratio: str = "token",
                aggregation: str = "token_mean", normalizer: float | torch.Tensor | None = None,
                max_new_tokens: int | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
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

    `weights` (B, T) multiply each token's loss: truncated importance weights for samples drawn by another engine
    (TIS; TRL's vllm_importance_sampling_correction). `normalizer` is the count that divides: tokens (token_mean) or sequences (the others). None takes this
    batch's own; a trainer passes the count of the whole global mini-batch per micro-batch share, so that
    however the mini-batch is cut (micro-batches, processes) the gradient is the same.
    """
    log_ratio = log_ratios(logps, old_logps, mask, ratio)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    # exp overflows past a log-ratio of ~88.7, and the clipped branch's 0 gradient times inf is NaN. Where the
    # clip binds (A >= 0, or any A under the dual clip) the gradient through the ratio is 0 anyway: the log-ratio
    # is capped there at 20 (as verl), which leaves every finite loss and gradient as it was
    binds = advantages >= 0 if dual_clip is None else torch.ones_like(advantages, dtype=torch.bool)
    importance = torch.exp(torch.where(binds, log_ratio.clamp(max=20.0), log_ratio))
    per_token = -torch.min(importance * advantages, importance.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    if weights is not None:
        per_token = per_token * weights
    return aggregate(per_token, mask, aggregation, normalizer, max_new_tokens)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean",
              normalizer: float | torch.Tensor | None = None, max_new_tokens: int | None = None) -> torch.Tensor:
    """A per-token loss (B, T) to a scalar, as policy_loss describes; every token term of one objective (policy,
    KL, entropy, value) aggregates the same way (as verl's loss_agg_mode)."""
    per_token = per_token * mask
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
                       clip: float = 0.2, **aggregation) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2) (as TRL and OpenAI's PPO2),
    and the fraction where the clipped term is the larger. `aggregation`: aggregate()'s keywords (token mean)."""
    # clamped to the band itself (as TRL), not V_old + clamp(V - V_old): inside the band that returns V exactly,
    # so rounding never counts an unclipped value as clipped
    clipped_values = values.clamp(old_values - clip, old_values + clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.max(unclipped_loss, clipped_loss), mask, **aggregation)
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
