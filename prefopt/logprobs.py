"""Per-token and per-sequence log-probs of target tokens.

The vocabulary projection dominates memory: logits are (N, T, V) in the model's
dtype. We never make an fp32 copy of all of them; the log-softmax is taken one
sequence at a time in fp32 and only the target token's log-prob is kept.
"""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, in fp32.

    logits: (N, T, V) in any dtype; targets: (N, T) token ids. Returns (N, T).
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):  # one (T, V) fp32 slice at a time
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each sequence, and their counts.

    batch: input_ids, attention_mask, completion_mask, each (N, T), right-padded;
    completion_mask is 1 on completion tokens. Returns (N,) sums and (N,) counts.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # the logits at position t predict token t + 1
    logps = token_logps(logits[:, :-1], batch["input_ids"][:, 1:])  # (N, T-1)
    mask = batch["completion_mask"][:, 1:].to(logps.dtype)  # (N, T-1)
    return (logps * mask).sum(-1), mask.sum(-1)
