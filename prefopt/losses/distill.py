"""Distillation divergences over the whole next-token distribution (method distill, `distill.loss: jsd`).

The sampled-token reverse KL (`distill.loss: reverse_kl`, the default) needs only each model's log-prob of the
sampled token and trains through the PPO update (prefopt/trainers/ppo.py); these need both models' logits at
every completion position."""

from __future__ import annotations

import torch


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Per position (..., ) the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
    Distillation of Language Models", Eq. 1), as TRL's GKDTrainer.generalized_jsd_loss and DistillationTrainer
    define beta: JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S; beta 0 is
    the forward KL(p_T || p_S), beta 1 the reverse KL(p_S || p_T). Both distributions at `temperature`; with
    `top_k`, both restricted to the teacher's k likeliest tokens and renormalised there (where the full
    vocabulary is too dear to compare; k = V is the full divergence)."""
    student, teacher = student_logits.float() / temperature, teacher_logits.float() / temperature
    if top_k is not None and top_k < student.shape[-1]:
        kept = teacher.topk(top_k, dim=-1).indices
        student, teacher = student.gather(-1, kept), teacher.gather(-1, kept)
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    if beta == 0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    mixture = torch.logsumexp(torch.stack([log_s + torch.log1p(torch.tensor(-beta)),
                                           log_t + torch.log(torch.tensor(beta))]), 0)
    kl_teacher = (log_t.exp() * (log_t - mixture)).sum(-1)
    kl_student = (log_s.exp() * (log_s - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width, V) logits that predict the last `width` tokens of left-padded rows (the completions)."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, -width - 1 : -1]
