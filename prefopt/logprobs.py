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


def custom_masks(config, attn_implementation: str | None) -> bool:
    """Whether a model takes a custom 4-D attention mask (prefix sharing): sdpa or eager attention, no sliding
    window."""
    text = config.get_text_config()
    sliding = any("sliding" in kind for kind in getattr(text, "layer_types", None) or []) or (
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True))
    return attn_implementation in (None, "sdpa", "eager") and not sliding


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


def _layout_inputs(model, batch: dict[str, torch.Tensor]) -> dict:
    """A prefopt.data.collate layout as the model's keyword arguments."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    mask = inputs["attention_mask"]
    if mask is not None and mask.dim() == 4 and _unwrap(model).config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype  # eager attention adds the mask to its scores
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return inputs


def completion_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 0,
                     token_weights: torch.Tensor | None = None, wpo: bool = False):
    """Summed log-probs of the completion tokens of each sequence, and their counts: (N,) each.

    batch: any layout of prefopt.data.collate (padded or packed), which names the positions whose logits score
    each completion token (token_index, token_target, token_sequence) and the counts (completion_tokens).
    token_weights (K,), aligned with token_target, weigh each token's log-prob in the sum (LD-DPO's tail).
    wpo: also each sequence's mean over its tokens of log p - log sum_v p_v^2, detached (WPO's weight, a third
    value).
    """
    inputs = _layout_inputs(model, batch)
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
    aligned = None
    if wpo:  # one more pass of the head over the scored positions, without gradients
        with torch.no_grad():
            squares = [_log_sum_squares(head(states[index[i : i + size]]) if chunk_size else states[index[i : i + size]])
                       for i in range(0, len(index), size)]
            aligned = logps.detach() - (torch.cat(squares) if squares else logps.detach())
    if token_weights is not None:
        logps = logps * token_weights.to(logps)
    sums = logps.new_zeros(len(counts)).index_add(0, batch["token_sequence"], logps)
    if aligned is None:
        return sums, counts.to(sums.dtype)
    means = aligned.new_zeros(len(counts)).index_add(0, batch["token_sequence"], aligned) / counts.clamp(min=1)
    return sums, counts.to(sums.dtype), means


def _log_sum_squares(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of each row of logits (N, V) -> (N,), in fp32: logsumexp(2 z) - 2 logsumexp(z)."""
    logits = logits.float()
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def wpo_weights(chosen_aligned: torch.Tensor, rejected_aligned: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2
    with the aligned probabilities of TRL's use_weighting): exp of each completion's mean over its tokens of
    log p - log sum_v p_v^2, the chosen's times the rejected's, (B,)."""
    return torch.exp(chosen_aligned) * torch.exp(rejected_aligned)


def length_desensitized(sequence: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al. 2024, "LD-DPO: Length Desensitization in Direct Preference
    Optimization", Eq. 9; TRL's ld_alpha): 1 on the first min(|y_c|, |y_r|) scored tokens of each completion of
    a pair, alpha on the longer one's tail, so that log pi = shared + alpha * tail. sequence (K,): the sequence of
    each scored token, each sequence's tokens in order; counts (2B,): scored tokens per sequence, chosen first."""
    b = len(counts) // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)  # (2B,)
    order = torch.sort(sequence, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts  # each sequence's first token in the sorted order
    position = torch.empty_like(sequence)
    position[order] = torch.arange(len(sequence), device=sequence.device) - starts[sequence[order]]
    return torch.where(position < shared[sequence], 1.0, alpha)


def _head_logps_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                        entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = torch.softmax(logits, -1)
        entropy = logz - torch.einsum("nv,nv->n", probs, logits)  # H = log Z - E_p[logits], no (n, V) product
    return logps, entropy


def _scored_logps(model, inputs: dict, positions, targets: torch.Tensor, temperature: float, chunk_size: int,
                  entropy_grad: bool):
    """The model's output, and the fp32 log-probs and entropies (K,) of `targets` from the logits at `positions`
    (an index into the flattened (rows x width) positions, or a boolean (rows, width) mask): the LM head and the
    log-softmax run on those positions only, `chunk_size` at a time (recomputed in the backward pass), or on the
    model's full logits with chunk_size 0. Returns (out, logps, entropy); empty (None, None) when nothing is scored."""
    if chunk_size:
        with hidden_states_as_logits(model) as head:
            out = model(**inputs)
    else:
        head, out = (lambda x: x), model(**inputs)
    states = out.logits[positions] if positions.dtype == torch.bool else out.logits.flatten(0, 1)[positions]
    size = chunk_size or 1024
    pieces = []
    for i in range(0, len(targets), size):
        args = (head, states[i : i + size], targets[i : i + size], temperature, entropy_grad)
        pieces.append(checkpoint(_head_logps_entropy, *args, use_reentrant=False)
                      if chunk_size and torch.is_grad_enabled() else _head_logps_entropy(*args))
    if not pieces:
        return out, None, None
    return out, torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


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
    where = torch.zeros(input_ids.shape, dtype=torch.bool, device=mask.device)
    where[:, -width - 1 : -1] = mask.bool()  # the logits at t predict token t + 1
    out, scored, scored_entropy = _scored_logps(model, inputs, where, input_ids[:, -width:][mask.bool()],
                                                temperature, chunk_size, entropy_grad)
    logps = mask.new_zeros(mask.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if scored is None:  # no token scored: still a graph to backprop
        logps = logps + out.logits[:0].sum()
    else:
        logps = logps.masked_scatter(mask.bool(), scored)
        entropy = entropy.masked_scatter(mask.bool(), scored_entropy)
    return logps, entropy, out


def shared_prompt_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, *,
                        pad_token_id: int, temperature: float = 1.0, chunk_size: int = 0,
                        entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """response_logps's log-probs and entropies (N, W), computed with each distinct prompt once: the rows (left-
    padded prompt, right-padded completion of W tokens) are packed so that the completions of one prompt follow
    it in one segment, each seeing the prompt and itself only (the offline trainer's share_prompt layout), so a
    group of k samples runs its prompt through the model once, not k times. `mask` (N, W): the tokens to score."""
    from prefopt.data.collate import pack_sequences

    width = mask.shape[1]
    prompt_part = attention_mask[:, :-width].bool()
    prompts = [row[keep].tolist() for row, keep in zip(input_ids[:, :-width], prompt_part)]
    lengths = attention_mask[:, -width:].sum(1).tolist()  # each completion's sampled tokens
    completions = [row[:n].tolist() for row, n in zip(input_ids[:, -width:], lengths)]
    batch = {k: v.to(input_ids.device) for k, v in pack_sequences(prompts, completions, pad_token_id, True).items()}
    index, targets, sequence = batch["token_index"], batch["token_target"], batch["token_sequence"]
    out, scored, scored_entropy = _scored_logps(model, _layout_inputs(model, batch), index, targets, temperature,
                                                chunk_size, entropy_grad)
    logps = mask.new_zeros(mask.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if scored is None:
        return logps + out.logits[:0].sum(), entropy
    # each sequence's tokens are scored in order (the sequences themselves in packing order): the t-th scored
    # token of sequence i goes to (i, t)
    first = torch.zeros(len(mask) + 1, dtype=torch.long, device=index.device)
    first[1:] = torch.bincount(sequence, minlength=len(mask)).cumsum(0)
    order = torch.sort(sequence, stable=True).indices
    column = torch.empty_like(sequence)
    column[order] = torch.arange(len(sequence), device=index.device) - first[sequence[order]]
    logps = logps.index_put((sequence, column), scored)
    entropy = entropy.index_put((sequence, column), scored_entropy)
    return logps * mask, entropy * mask
