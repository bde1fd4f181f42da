"""Diagnostics that the preference-learning literature says a run should watch (docs/diagnostics.md), as
per-example metrics of each pair batch:

- diag/chosen_logp_change, diag/rejected_logp_change: log pi(y) - log pi_ref(y), summed over the completion.
  Both falling while the margin grows is likelihood displacement (Razin et al. 2024, "Unintentional
  Unalignment"; Pal et al. 2024, "Smaug").
- diag/chosen_logp_fell: the share of pairs whose chosen log-prob fell below the reference's.
- diag/policy_ranking_accuracy: pi(y_c) > pi(y_r) on summed log-probs (ties count half), beside
  diag/reference_ranking_accuracy and rewards/accuracy, the implicit reward's: a policy can order the implicit
  reward right and its own likelihoods wrong (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
  Preference Rankings").
- diag/length_margin_corr: Pearson correlation, over the examples averaged, of the reward margin with the
  chosen-minus-rejected length in tokens: length exploitation (Park et al. 2024, "Disentangling Length from
  Quality in Direct Preference Optimization").
"""

from __future__ import annotations

import torch


def ranked(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """1 where better > worse, 0.5 for a tie, 0 else: (B,)."""
    return (better > worse).float() + 0.5 * (better == worse).float()


def pair_diagnostics(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                     ref_rejected: torch.Tensor | None, margin: torch.Tensor, length_gap: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The diagnostics of B pairs from the policy's (and, where there is one, the reference's) summed log-probs,
    the loss's reward margin and chosen-minus-rejected tokens; `corr:` keys are MetricMeans correlations."""
    chosen, rejected, margin = chosen.detach().float(), rejected.detach().float(), margin.detach().float()
    out = {"diag/policy_ranking_accuracy": ranked(chosen, rejected),
           "corr:diag/length_margin_corr": torch.stack([length_gap.float(), margin], 1)}
    if ref_chosen is not None:
        ref_chosen, ref_rejected = ref_chosen.detach().float(), ref_rejected.detach().float()
        out.update({"diag/chosen_logp_change": chosen - ref_chosen, "diag/rejected_logp_change": rejected - ref_rejected,
                    "diag/chosen_logp_fell": (chosen < ref_chosen).float(),
                    "diag/reference_ranking_accuracy": ranked(ref_chosen, ref_rejected)})
    return out
