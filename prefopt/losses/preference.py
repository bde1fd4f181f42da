"""Offline preference losses: pure functions of per-example log-probs.

Notation: h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)),
each log-prob summed over the completion's tokens; sigma is the logistic function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prefopt.losses.registry import (
    GroupLogps,
    LossOutput,
    PairLogps,
    UnpairedLogps,
    check_range,
    register_loss,
)
from prefopt.losses.unpaired import split_rewards


def _logratios(policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log pi - log pi_ref of the chosen and of the rejected completions, each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _scores(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, f_divergence_type: str,
            f_alpha_divergence_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(pi / pi_ref) of each completion, the f-divergence generalisation of DPO's log-ratio (Wang et al. 2024,
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
    Theorem 1 and Table 1), with u = log pi - log pi_ref summed over the completion:
    reverse_kl f'(t) = log t (DPO: u itself); forward_kl 1 - 1/t = 1 - exp(-u); js_divergence
    log(2t / (1 + t)) = log 2 + log sigma(u); alpha_divergence (t^(alpha - 1) - 1) / (alpha - 1) (alpha = 1 is
    reverse_kl; the exponent capped at 80, as TRL, so that it stays finite)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence"
                                             and abs(f_alpha_divergence_coef - 1.0) < 1e-6):
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef - 1.0
        return tuple(torch.expm1((a * u).clamp(max=80.0)) / a for u in (chosen_logratios, rejected_logratios))
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence_type!r}")


def _mean_logps(policy: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs of the chosen and of the rejected completions, each (B,); 0 for a completion
    with no scored token (losses on means drop that pair through _scored)."""
    return policy.chosen / policy.chosen_tokens.clamp(min=1), policy.rejected / policy.rejected_tokens.clamp(min=1)


def _scored(policy: PairLogps, losses: torch.Tensor) -> torch.Tensor:
    """losses (B,), with 0 for a pair whose chosen or rejected completion has no scored token (a mean over no
    token is undefined: such a pair contributes nothing rather than a NaN)."""
    return torch.where((policy.chosen_tokens > 0) & (policy.rejected_tokens > 0), losses, 0.0)


def _chosen_nll(policy: PairLogps) -> torch.Tensor:
    """NLL of the chosen completions per pair, -log pi(y_c) / n, with n the mean chosen tokens per pair of the
    whole global batch (PairLogps.token_normalizer; this batch's when None). The mean over the global batch is
    then its token mean, -sum(chosen) / sum(chosen_tokens) (TRL's "sft" loss and CPO/SimPO's cross-entropy),
    however the batch is cut into micro-batches and processes."""
    n = policy.token_normalizer if policy.token_normalizer is not None else policy.chosen_tokens.mean()
    return -policy.chosen / n.clamp(min=1e-6)


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean log-prob) < 1. A mean that rounds to 0 (a near-certain completion)
    would give log(0): it is held at the smallest normal float below 0, the same value wherever that is finite."""
    below_zero = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return mean_logps - torch.log(-torch.expm1(below_zero))


@register_loss("dpo", needs_reference=True)
def dpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 1.0) -> LossOutput:
    """DPO: -log sigma(beta * h), Eq. 7 of Rafailov et al. 2023, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model".

    label_smoothing eps > 0 gives conservative DPO (Mitchell 2023, "A note on DPO
    with noisy preferences"): the label is flipped with probability eps, so
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    Log-probs are sums over completion tokens; implicit rewards are
    beta * (log pi - log pi_ref) of each completion. f_divergence_type other than reverse_kl replaces each
    log-ratio by f' of the ratio (f-DPO, see _scores), TRL's option of the same name.
    """
    check_range("dpo", beta=(beta, "> 0"), label_smoothing=(label_smoothing, "in [0, 0.5]"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    chosen_scores, rejected_scores = _scores(chosen_logratios, rejected_logratios, f_divergence_type,
                                             f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)  # beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("ipo", needs_reference=True)
def ipo_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO: (h_mean - 1/(2 beta))^2, Eq. 17 of Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences" (beta is the paper's tau).

    h_mean uses per-token MEAN log-ratios, each completion's summed log-ratio divided by its token
    count, not the sums of the paper's notation: the convention the IPO authors confirmed to TRL (its
    results correspond to it), which keeps beta comparable across completion lengths.
    Logged rewards are beta * summed log-ratios, as for DPO (and as TRL logs them).
    """
    check_range("ipo", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,) sums
    h_mean = (chosen_logratios / policy.chosen_tokens.clamp(min=1)
              - rejected_logratios / policy.rejected_tokens.clamp(min=1))  # (B,)
    losses = _scored(policy, (h_mean - 1 / (2 * beta)) ** 2)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("simpo", needs_reference=False)
def simpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, sft_weight: float = 0.0) -> LossOutput:
    """SimPO: -log sigma(beta * (a_c - a_r) - gamma), Eq. 6 of Meng et al. 2024, "SimPO: Simple
    Preference Optimization with a Reference-Free Reward", where a = log pi(y) / |y| is the policy's
    per-token mean log-prob; no reference model.

    The margin is set as in the authors' code: gamma = gamma_beta_ratio * beta (TRL's CPO trainer
    takes gamma itself, `simpo_gamma`). sft_weight > 0 gives CPO-SimPO: + sft_weight * NLL of the
    chosen completions, a token mean over the micro-batch (TRL CPO's `cpo_alpha` cross-entropy).
    Logged rewards are beta * a, the SimPO implicit rewards.
    """
    check_range("simpo", beta=(beta, "> 0"), gamma_beta_ratio=(gamma_beta_ratio, ">= 0"),
                sft_weight=(sft_weight, ">= 0"))
    chosen_mean, rejected_mean = _mean_logps(policy)  # (B,) per-token mean log-probs
    losses = _scored(policy, -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma_beta_ratio * beta))
    if sft_weight:
        losses = losses + sft_weight * _chosen_nll(policy)
    return LossOutput(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


@register_loss("rpo", needs_reference=True)
def rpo_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO: DPO + alpha * NLL of the chosen completions, Liu et al. 2024, "Provably Mitigating
    Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer" (arXiv 2405.16436).

    The NLL is a token mean over the chosen completion tokens of the micro-batch,
    -sum(chosen) / sum(chosen_tokens), as TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha].
    Logged rewards are DPO's, beta * summed log-ratios.
    """
    check_range("rpo", alpha=(alpha, ">= 0"))
    dpo = dpo_loss(policy, reference, beta=beta)
    return LossOutput(dpo.losses + alpha * _chosen_nll(policy), dpo.chosen_rewards, dpo.rejected_rewards)


@register_loss("robust", needs_reference=True)
def robust_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
                label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO: [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps), the de-biased
    loss of Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
    (arXiv 2403.00409), unbiased for the clean loss when labels flip with probability eps < 1/2.

    eps = label_smoothing, default 0.1, the value TRL's docs cite from the paper (eps = 0 is DPO). Sums over
    completion tokens; logged rewards are beta * summed log-ratios.
    """
    check_range("robust", beta=(beta, "> 0"), label_smoothing=(label_smoothing, "in [0, 0.5)"))  # a flip rate
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # beta * h
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              + label_smoothing * F.logsigmoid(-logits)) / (1 - 2 * label_smoothing)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("hinge", needs_reference=True)
def hinge_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Hinge: max(0, 1 - beta h), the SLiC calibration loss of Zhao et al. 2023, "SLiC-HF: Sequence
    Likelihood Calibration with Human Feedback" (arXiv 2305.10425), on the reference-normalised
    likelihoods as in Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"
    (RSO, arXiv 2309.06657), with margin 1/beta. Sums over completion tokens; logged rewards are
    beta * summed log-ratios.
    """
    check_range("hinge", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("orpo", needs_reference=False)
def orpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1) -> LossOutput:
    """ORPO: NLL(y_c) - lambda * log sigma(log odds(y_c) - log odds(y_r)), Eqs. 6-7 of Hong et al. 2024,
    "ORPO: Monolithic Preference Optimization without Reference Model"; lambda = beta (TRL's name).

    log odds(y) = a - log(1 - exp(a)), a = per-token mean log-prob of the policy (the length-normalised
    likelihood; TRL derives this form from Eqs. 4 and 7). The NLL is a token mean over the chosen
    completion tokens of the micro-batch; TRL's ORPO trainer also counts the prompt tokens in it, which
    PairLogps does not carry. Logged rewards are beta * a, as TRL.
    """
    check_range("orpo", beta=(beta, ">= 0"))
    chosen_mean, rejected_mean = _mean_logps(policy)  # (B,) per-token mean log-probs, < 0
    odds_ratio = _scored(policy, -F.logsigmoid(_log_odds(chosen_mean) - _log_odds(rejected_mean)))
    losses = _chosen_nll(policy) + beta * odds_ratio
    return LossOutput(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


@register_loss("sft", needs_reference=False, data="any")
def sft_loss(policy: PairLogps | UnpairedLogps, reference: None = None) -> LossOutput:
    """SFT: NLL of the chosen completions (pairs) or of the desirable ones (prompt/completion rows), the token
    mean over the global batch, -sum(logps) / sum(tokens), as TRL's loss_type="sft" (per example: its summed
    NLL over the global batch's mean tokens per example, see _chosen_nll). Logged rewards are the policy's
    per-token mean log-probs (no beta).
    """
    if isinstance(policy, UnpairedLogps):
        desirable, tokens = policy.desirable, policy.tokens
        n = policy.token_normalizer if policy.token_normalizer is not None else (tokens * desirable).mean()
        nll = torch.where(desirable, -policy.logps, 0.0) / n.clamp(min=1e-6)  # (N,)
        return LossOutput(nll, *split_rewards(policy.logps / tokens.clamp(min=1), desirable))
    chosen_mean, rejected_mean = _mean_logps(policy)  # (B,) per-token mean log-probs
    return LossOutput(_chosen_nll(policy), chosen_mean.detach(), rejected_mean.detach())


@register_loss("sppo_hard", needs_reference=True)
def sppo_hard_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO, hard-label version: (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2 with r = summed log-ratio,
    Eq. 4.7 of Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"
    (arXiv 2405.00675) with the win probability set to 1 for the chosen and 0 for the rejected
    completion, as TRL's "sppo_hard". Logged rewards are beta * summed log-ratios.
    """
    check_range("sppo_hard", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("sppo", needs_reference=True, data="group")
def sppo_loss(policy: GroupLogps, reference: GroupLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675,
    Eq. 4.7; Algorithm 1): every sample y of a prompt x regresses its summed log-ratio to pi_t (the reference: the
    policy at the start of the iteration, refreshed each iteration) onto eta (P(y > pi_t | x) - 1/2), eta = 1/beta:

        (log pi(y|x) / pi_t(y|x) - (P_hat(y > pi_t | x) - 1/2) / beta)^2

    P_hat is the sample's mean win probability against the other samples of its prompt (the method online
    trainer's estimate, from a judge or Bradley-Terry on the scores). With P_hat 1 and 0 it is sppo_hard's.
    Logged "chosen" rewards are beta times the log-ratio (the loss's estimate of P_hat - 1/2); no rejected.
    """
    check_range("sppo", beta=(beta, "> 0"))
    logratios = policy.logps - reference.logps
    losses = (logratios - (policy.win_rate - 0.5) / beta) ** 2
    return LossOutput(losses, beta * logratios.detach(), torch.full_like(logratios, math.nan))


@register_loss("nca_pair", needs_reference=True)
def nca_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """NCA for a pair: -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r), r = beta * summed
    log-ratio, the pairwise NCA loss of Chen et al. 2024, "Noise Contrastive Alignment of Language
    Models with Explicit Rewards" (arXiv 2402.05369), as TRL's "nca_pair". Logged rewards are r.
    """
    check_range("nca_pair", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
              - 0.5 * F.logsigmoid(-rejected_rewards))
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


@register_loss("apo_zero", needs_reference=True)
def apo_zero_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: 1 - sigma(r_c) + sigma(r_r), r = beta * summed log-ratio, Eq. 7 of D'Oosterlinck et al.
    2024, "Anchored Preference Optimization and Contrastive Revisions" (arXiv 2408.06266): raise the
    chosen and lower the rejected likelihood, for chosen outputs better than the model's.
    Logged rewards are r.
    """
    check_range("apo_zero", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


@register_loss("apo_down", needs_reference=True)
def apo_down_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down: sigma(r_c) + 1 - sigma(r_c - r_r), r = beta * summed log-ratio, Eq. 8 of D'Oosterlinck
    et al. 2024, "Anchored Preference Optimization and Contrastive Revisions" (arXiv 2408.06266): lower
    both likelihoods, the rejected more, for chosen outputs worse than the model's.
    Logged rewards are r.
    """
    check_range("apo_down", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(chosen_rewards - rejected_rewards)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


@register_loss("exo_pair", needs_reference=True)
def exo_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
                  label_smoothing: float = 1e-3) -> LossOutput:
    """EXO for a pair: KL(q || p) with q = (sigma(beta h), sigma(-beta h)) and target p = (1 - eps, eps),
    Eq. 16 of Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    (arXiv 2402.00856), K = 2. eps = label_smoothing must be in (0, 1); default 1e-3 as the paper.
    Sums over completion tokens; logged rewards are beta * summed log-ratios.
    """
    check_range("exo_pair", beta=(beta, "> 0"), label_smoothing=(label_smoothing, "in (0, 1)"))  # target eps
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # beta * h
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(label_smoothing)))
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("discopop", needs_reference=True)
def discopop_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
                  tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): (1 - m) * -log sigma(beta h) + m * exp(-beta h) with
    m = sigma(beta h / tau), Eq. 5 of Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for Large Language Models" (arXiv 2406.08414); tau is TRL's discopop_tau. Sums over
    completion tokens; logged rewards are beta * summed log-ratios.
    """
    check_range("discopop", beta=(beta, "> 0"), tau=(tau, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # beta * h
    # exp(-beta h) * m as one exponent: where exp(-beta h) overflows, m underflows and their product is finite
    losses = -F.logsigmoid(logits) * torch.sigmoid(-logits / tau) + torch.exp(F.logsigmoid(logits / tau) - logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("sigmoid_norm", needs_reference=True)
def sigmoid_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
                      f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 1.0) -> LossOutput:
    """Length-normalised DPO: -log sigma(beta * (u_c / |y_c| - u_r / |y_r|)), each completion's summed log-ratio
    (or f' of it, f_divergence_type) divided by its token count: the per-token implicit reward of Meng et al.
    2024 (SimPO, Sec. 2.2, the length-normalised reward) kept with a reference, TRL's loss_type "sigmoid_norm".
    Logged rewards are beta * summed log-ratios.
    """
    check_range("sigmoid_norm", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    chosen_scores, rejected_scores = _scores(chosen_logratios, rejected_logratios, f_divergence_type,
                                             f_alpha_divergence_coef)
    delta = chosen_scores / policy.chosen_tokens.clamp(min=1) - rejected_scores / policy.rejected_tokens.clamp(min=1)
    losses = _scored(policy, -F.logsigmoid(beta * delta))
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("bco_pair", needs_reference=True)
def bco_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """BCO on pairs: -log sigma(beta u_c) - log sigma(-beta u_r), the binary classifier of Jung et al. 2024,
    "Binary Classifier Optimization for Large Language Model Alignment" (Eq. 3) with its reward shift delta = 0,
    each completion classified on its own (TRL's loss_type "bco_pair"; prefopt's `bco` is the unpaired form with
    the running-mean shift). Sums over completion tokens; logged rewards are beta * summed log-ratios.
    """
    check_range("bco_pair", beta=(beta, "> 0"))
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _aot(policy: PairLogps, reference: PairLogps, beta: float, label_smoothing: float, paired: bool) -> LossOutput:
    chosen_logratios, rejected_logratios = _logratios(policy, reference)  # (B,)
    if paired:  # the policy's chosen-vs-rejected margins against the reference's, each sorted over the batch
        delta = (torch.sort(policy.chosen - policy.rejected).values
                 - torch.sort(reference.chosen - reference.rejected).values)
    else:  # the chosen log-ratios against the rejected ones, each sorted over the batch
        delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@register_loss("aot", needs_reference=True)
def aot_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> LossOutput:
    """AOT, paired: distributional preference alignment by optimal transport, Melnyk et al. 2024, "Distributional
    Preference Alignment of LLMs via Optimal Transport" (Eq. 10 with the logistic loss): the batch's sorted
    policy margins log pi(y_c) - log pi(y_r) against the sorted reference margins, -log sigma(beta delta)
    (label_smoothing as conservative DPO). The sort couples the rows of a micro-batch, as in TRL (which sorts
    each device's batch): the loss depends on how a global batch is cut, unlike prefopt's other losses; keep
    one micro-batch per step to make it the global batch's. Logged rewards are beta * summed log-ratios.
    """
    check_range("aot", beta=(beta, "> 0"), label_smoothing=(label_smoothing, "in [0, 0.5]"))
    return _aot(policy, reference, beta, label_smoothing, paired=True)


@register_loss("aot_unpaired", needs_reference=True)
def aot_unpaired_loss(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, Eq. 9): the batch's sorted chosen log-ratios against its sorted rejected
    log-ratios, -log sigma(beta delta): first-order stochastic dominance of the chosen rewards' distribution
    over the rejected ones'. Sorts within the micro-batch, as aot. Logged rewards are beta * summed log-ratios.
    """
    check_range("aot_unpaired", beta=(beta, "> 0"), label_smoothing=(label_smoothing, "in [0, 0.5]"))
    return _aot(policy, reference, beta, label_smoothing, paired=False)
