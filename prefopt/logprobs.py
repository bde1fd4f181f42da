"""Per-token and per-sequence log-probs of target tokens.

The vocabulary projection dominates memory: logits are (N, T, V). Two ways to
the log-probs of the completion tokens, the same numbers either way:

- full logits (`chunk_size=0`): the model returns (N, T, V) logits in its dtype;
  the log-softmax is taken in fp32 for the scored positions only, a chunk at a time;
- chunked LM head (`chunk_size>0`): the model returns its final hidden states
  instead (the LM head is bypassed for the forward), and the head and the fp32
  log-softmax run on `chunk_size` scored positions at a time, recomputed in the
  backward pass, so neither (N, T, V) logits nor prompt-position logits ever exist.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

# config attributes of models that transform the LM head's output (softcapping, scaling): they take full logits
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, in fp32.

    logits: (N, T, V) in any dtype; targets: (N, T) token ids. Returns (N, T).
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):  # one (T, V) fp32 slice at a time
        rows.append(_logps(row_logits, row_targets))
    return torch.stack(rows)


def _logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _logps(head(hidden), targets)


def _unwrap(model):
    while hasattr(model, "module"):  # DistributedDataParallel and friends
        model = model.module
    return model


def plain_head(config) -> bool:
    """Whether a model's logits are its output embedding applied to the last hidden state, and nothing more."""
    config = config.get_text_config()
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS)


@contextmanager
def hidden_states_as_logits(model):
    """Within the block, the model's forward returns its final hidden states as `logits`; yields the LM head."""
    head = _unwrap(model).get_output_embeddings()
    head.forward = lambda hidden: hidden  # an instance attribute: the class's forward is back on exit
    try:
        yield head
    finally:
        del head.forward


def completion_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each sequence, and their counts: (N,) each.

    batch: any layout of prefopt.data.collate (padded or packed), which names the positions whose logits score
    each completion token (token_index, token_target, token_sequence) and the counts (completion_tokens).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    mask = inputs["attention_mask"]
    if mask is not None and mask.dim() == 4 and _unwrap(model).config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype  # eager attention adds the mask to its scores
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    index, targets = batch["token_index"], batch["token_target"]
    size = chunk_size or 1024
    if chunk_size:
        with hidden_states_as_logits(model) as head:
            states = model(**inputs).logits.flatten(0, 1)  # (R x T, hidden)
        pieces = [checkpoint(_head_logps, head, states[index[i : i + size]], targets[i : i + size],
                             use_reentrant=False) if torch.is_grad_enabled() else
                  _head_logps(head, states[index[i : i + size]], targets[i : i + size])
                  for i in range(0, len(index), size)]
    else:
        states = model(**inputs).logits.flatten(0, 1)  # (R x T, V)
        pieces = [_logps(states[index[i : i + size]], targets[i : i + size]) for i in range(0, len(index), size)]
    logps = torch.cat(pieces) if pieces else states[:0, 0].float()  # no token scored: still a graph to backprop
    counts = batch["completion_tokens"]
    sums = logps.new_zeros(len(counts)).index_add(0, batch["token_sequence"], logps)
    return sums, counts.to(sums.dtype)


def _head_logps_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                        entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = torch.softmax(logits, -1)
        entropy = logz - torch.einsum("nv,nv->n", probs, logits)  # H = log Z - E_p[logits], no (n, V) product
    return logps, entropy


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, *,
                   temperature: float = 1.0, chunk_size: int = 0, entropy_grad: bool = False,
                   **forward) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Log-probs and entropies (N, W) of the last W = mask.shape[1] tokens of left-padded rows (the completions),
    under the logits divided by `temperature`, at the positions where mask is 1 (0 elsewhere), and the model's output.

    Only those positions reach the LM head and the fp32 log-softmax, `chunk_size` at a time (0: the model's full
    logits, sliced), recomputed in the backward pass: the (N, L, V) logits never exist with a chunk size. The
    entropy carries a gradient only with `entropy_grad` (an entropy bonus); else it is a detached metric.
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False, **forward}
    width = mask.shape[1]
    if chunk_size:
        with hidden_states_as_logits(model) as head:
            out = model(**inputs)
    else:
        head, out = (lambda x: x), model(**inputs)
    where = mask.bool()
    states = out.logits[:, -width - 1 : -1][where]  # (M, hidden or V): the scored positions only
    targets = input_ids[:, -width:][where]
    size = chunk_size or 1024
    pieces = []
    for i in range(0, len(targets), size):
        args = (head, states[i : i + size], targets[i : i + size], temperature, entropy_grad)
        pieces.append(checkpoint(_head_logps_entropy, *args, use_reentrant=False)
                      if chunk_size and torch.is_grad_enabled() else _head_logps_entropy(*args))
    logps = mask.new_zeros(mask.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if pieces:
        logps = logps.masked_scatter(where, torch.cat([p[0] for p in pieces]))
        entropy = entropy.masked_scatter(where, torch.cat([p[1] for p in pieces]))
    else:  # no token scored: still a graph to backprop
        logps = logps + out.logits[:0].sum()
    return logps, entropy, out
