"""TRL's own loss code as an independent oracle, fed the same per-token log-probs.

TRL 1.16 computes DPO losses inside `DPOTrainer._compute_loss`, reading the
model's per-token log-probs. We call that method on a minimal stand-in for the
trainer whose "model" returns the log-probs we choose, with the reference
log-probs supplied as precomputed inputs. Nothing of prefopt is involved.
"""

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_dpo_loss(policy_token_logps, completion_mask, ref_chosen, ref_rejected, *, loss_type="sigmoid",
                 beta=0.1, label_smoothing=0.0, loss_weights=None, f_divergence_type="reverse_kl",
                 f_alpha_divergence_coef=1.0, ld_alpha=None, log_sum_sq_probs=None, **args) -> torch.Tensor:
    """policy_token_logps: (2B, T-1), chosen rows first, log p of token t+1 at position t.
    completion_mask: (2B, T), 1 on completion tokens. Returns TRL's scalar loss."""
    from trl import DPOTrainer

    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    shift_mask = completion_mask[:, 1:].to(policy_token_logps.dtype)
    outputs = SimpleNamespace(
        log_probs=policy_token_logps * shift_mask,  # TRL's fused head returns 0 where labels are -100
        entropy=torch.zeros_like(policy_token_logps),
        mean_logits=torch.zeros_like(policy_token_logps),
        is_top1=torch.zeros_like(policy_token_logps, dtype=torch.bool),
        log_sum_sq_probs=log_sum_sq_probs,
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=log_sum_sq_probs is not None, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(**args),
    )
    n, t = completion_mask.shape
    inputs = {"input_ids": torch.zeros(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)


def trl_kto_loss(token_logps, completion_mask, labels, kl_logps, ref_logps, ref_kl_logps, *, beta=0.1,
                 desirable_weight=1.0, undesirable_weight=1.0) -> torch.Tensor:
    """TRL's KTOTrainer._compute_loss ("kto", KL on, reference log-probs precomputed) on a stand-in.

    token_logps: (N, T-1) per-token log-probs, completion_mask: (N, T); labels: (N,) bool;
    kl_logps: (N,) the policy's summed log-probs of the mismatched KL rows (TRL computes them with
    a second forward, here returned by the stand-in); ref_logps, ref_kl_logps: (N,)."""
    from trl import KTOTrainer

    shift_mask = completion_mask[:, 1:].to(token_logps.dtype)
    outputs = SimpleNamespace(log_probs=token_logps * shift_mask, entropy=torch.zeros_like(token_logps),
                              mean_logits=torch.zeros_like(token_logps))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: kl_logps,
    )
    n, t = completion_mask.shape
    inputs = {"input_ids": torch.zeros(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": completion_mask, "label": labels, "ref_logps": ref_logps,
              "ref_KL_logps": ref_kl_logps}
    return KTOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)


def trl_reward_loss(chosen, rejected, margin=None, center_coef=None) -> torch.Tensor:
    """TRL's RewardTrainer.compute_loss on a stand-in whose model returns the given rewards as logits."""
    from trl import RewardTrainer

    logits = torch.cat([chosen, rejected])[:, None]  # (2B, 1), chosen first as TRL's collator lays them out
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(),
                           args=SimpleNamespace(center_rewards_coefficient=center_coef),
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(len(logits), 3, dtype=torch.long),
              "attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, lambda **kwargs: SimpleNamespace(logits=logits), inputs)
