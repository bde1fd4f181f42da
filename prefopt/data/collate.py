"""Tokenized pairs -> batches.

A preference batch of B pairs holds 2B sequences, chosen first then rejected, so
that both go through the model in one forward. Padded (the default layout):

    input_ids       (2B, T)  prompt + completion ids, right-padded with pad_token_id
    attention_mask  (2B, T)  1 on real tokens
    completion_mask (2B, T)  1 on completion tokens (the ones the loss scores)

Packed (`packing`): sequences are laid end to end in R rows as wide as the
longest one, with no padding between them; `position_ids` restart at 0 for each
sequence, which is how transformers tells packed sequences apart (a
block-diagonal causal mask under sdpa/eager, variable-length kernels under flash
attention). With `share_prompt`, the sequences that share a prompt become one
segment, prompt once then each completion, and a 4-D `attention_mask` lets each
completion see the prompt and itself only (Wang et al. 2024, prefix sharing):
the prompt's forward is computed once for chosen and rejected.

Every layout says which logits score which token, so one function reads them all:

    token_index       (K,)  flat position in (rows x width) whose logits predict...
    token_target      (K,)  ...this token id,
    token_sequence    (K,)  ...of this sequence (0 .. N-1)
    completion_tokens (N,)  completion length of each sequence
    num_tokens        ()    prompt + completion tokens of all sequences (the work, whatever the layout)

and, from the examples: ref_logps (2B,), precomputed reference log-probs when the
examples carry them; margin (B,), the data's per-pair margin when it has one.

A sequence's `masks` entry (SFT's assistant-only loss: 1 on each completion
token that trains) leaves its other completion tokens unscored: they are
context, like the prompt.
"""

from __future__ import annotations

import torch


def collate_pairs(examples: list[dict], pad_token_id: int, packing: bool = False,
                  share_prompt: bool = False, extra_columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = layout(prompts + prompts, completions, pad_token_id, packing, share_prompt)
    if any("margin" in ex for ex in examples):  # a pair without one (another source) has margin 0
        batch["margin"] = torch.tensor([ex.get("margin", 0.0) for ex in examples])  # (B,)
    for column in extra_columns:  # data.extra_columns, per pair
        batch[column] = torch.tensor([ex[column] for ex in examples])  # (B,)
    if "ref_chosen" in examples[0]:
        batch["ref_logps"] = torch.tensor([ex["ref_chosen"] for ex in examples] +
                                          [ex["ref_rejected"] for ex in examples])
    return batch


def layout(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, packing: bool = False,
           share_prompt: bool = False, masks: list[list[int] | None] | None = None) -> dict[str, torch.Tensor]:
    batch = (pack_sequences(prompts, completions, pad_token_id, share_prompt, masks) if packing
             else pad_sequences(prompts, completions, pad_token_id, masks))
    batch["num_tokens"] = torch.tensor(sum(len(p) + len(c) for p, c in zip(prompts, completions)))
    return batch


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                  masks: list[list[int] | None] | None = None) -> dict[str, torch.Tensor]:
    masks = masks or [None] * len(prompts)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, width = len(lengths), max(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, : lengths[i]] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : lengths[i]] = 1
        completion_mask[i, len(prompt) : lengths[i]] = 1 if masks[i] is None else torch.tensor(masks[i])
    rows, columns = completion_mask[:, 1:].nonzero(as_tuple=True)  # the logits at t predict token t + 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "token_index": rows * width + columns, "token_target": input_ids[rows, columns + 1],
            "token_sequence": rows, "completion_tokens": completion_mask[:, 1:].sum(1)}


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                   share_prompt: bool = False, masks: list[list[int] | None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Sequences end to end, no padding between them (see the module docstring); segments are placed
    longest first into the first row with room (first-fit decreasing), rows as wide as the longest."""
    masks = masks or [None] * len(prompts)
    groups: dict[tuple, list[int]] = {}  # a segment: one prompt and the sequences that continue it
    for i, prompt in enumerate(prompts):  # (a prompt of one token, a BOS, is not worth sharing)
        groups.setdefault(tuple(prompt) if share_prompt and len(prompt) > 1 else (i,), []).append(i)
    segments = list(groups.values())
    sizes = [len(prompts[members[0]]) + sum(len(completions[i]) for i in members) for members in segments]
    width = max(sizes)
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(segments)), key=lambda g: -sizes[g]):
        r = next((r for r, free in enumerate(room) if free >= sizes[g]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(g)
        room[r] -= sizes[g]
    ids, positions = [[] for _ in rows], [[] for _ in rows]
    segment_of, branch_of = [[] for _ in rows], [[] for _ in rows]  # branch 0: the prompt; b: completion b
    index, target, sequence = [], [], []
    for r, placed in enumerate(rows):
        for g in placed:
            prompt = prompts[segments[g][0]]
            start = len(ids[r])
            ids[r] += prompt
            positions[r] += range(len(prompt))
            segment_of[r] += [g] * len(prompt)
            branch_of[r] += [0] * len(prompt)
            for b, i in enumerate(segments[g], 1):
                completion, cursor = completions[i], len(ids[r])
                ids[r] += completion
                positions[r] += range(len(prompt), len(prompt) + len(completion))
                segment_of[r] += [g] * len(completion)
                branch_of[r] += [b] * len(completion)
                # completion token j is predicted by the logits of the token before it: the prompt's last for j = 0
                # (nothing, with no prompt: the first token of a sequence is not scored)
                sources = [start + len(prompt) - 1 if prompt else None, *range(cursor, cursor + len(completion) - 1)]
                trains = masks[i] or [1] * len(completion)
                scored = [(t, token) for t, token, m in zip(sources, completion, trains) if t is not None and m]
                index += [r * width + t for t, _ in scored]
                target += [token for _, token in scored]
                sequence += [i] * len(scored)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    branch = torch.zeros((n, width), dtype=torch.long)
    for r in range(n):
        length = len(ids[r])
        input_ids[r, :length], position_ids[r, :length] = torch.tensor(ids[r]), torch.tensor(positions[r])
        segment[r, :length], branch[r, :length] = torch.tensor(segment_of[r]), torch.tensor(branch_of[r])
        position_ids[r, length:] = torch.arange(width - length)  # the padding at a row's end: one more "sequence"
    sequence = torch.tensor(sequence, dtype=torch.long)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "token_index": torch.tensor(index, dtype=torch.long),
             "token_target": torch.tensor(target, dtype=torch.long), "token_sequence": sequence,
             "completion_tokens": torch.bincount(sequence, minlength=len(prompts))}
    if share_prompt:  # query q sees key k: same segment, k not after q, and k in the prompt or q's own completion
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = segment[:, :, None] == segment[:, None, :]
        visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
        batch["attention_mask"] = (same & visible & causal)[:, None]  # (R, 1, width, width)
    return batch


def collate_rows(examples: list[dict], pad_token_id: int, kl: bool, packing: bool = False,
                 share_prompt: bool = False, extra_columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Unpaired rows -> a batch of N sequences plus `label` (N,) bool (True: desirable).

    Pairs are laid out as their chosen rows then their rejected rows, and the
    batch gets `pairs` (a 0-d tensor) so that pairwise accuracy can be read. With
    `kl`, N mismatched sequences follow (prompt i with completion i - 1, cycled
    within the batch, as the KTO paper and TRL estimate the KL reference point).
    """
    if "chosen_ids" in examples[0]:
        examples = ([{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"], "label": True,
                      "ref_logps": ex.get("ref_chosen"), **{c: ex[c] for c in extra_columns}} for ex in examples] +
                    [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["rejected_ids"], "label": False,
                      "ref_logps": ex.get("ref_rejected"), **{c: ex[c] for c in extra_columns}} for ex in examples])
        extra = {"pairs": torch.ones((), dtype=torch.bool)}
    else:
        extra = {}
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["completion_ids"] for ex in examples]
    masks = [ex.get("completion_mask") for ex in examples]
    if kl:
        prompts, completions = prompts + prompts, completions + completions[-1:] + completions[:-1]
        masks = masks + masks[-1:] + masks[:-1]
    batch = layout(prompts, completions, pad_token_id, packing, share_prompt, masks)
    batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    for column in extra_columns:  # data.extra_columns, per row
        batch[column] = torch.tensor([ex[column] for ex in examples])  # (N,)
    if examples[0].get("ref_logps") is not None:  # precomputed reference log-probs, (N,)
        batch["ref_logps"] = torch.tensor([ex["ref_logps"] for ex in examples])
    return {**batch, **extra}
