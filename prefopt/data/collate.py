"""Tokenized pairs -> padded batches.

A preference batch of B pairs is one tensor batch of 2B sequences, chosen first
then rejected, so that both go through the model in one forward:

    input_ids       (2B, T)  prompt + completion ids, right-padded with pad_token_id
    attention_mask  (2B, T)  1 on real tokens
    completion_mask (2B, T)  1 on completion tokens (the ones the loss scores)
    ref_logps       (2B,)    precomputed reference log-probs, when the examples carry them
    margin          (B,)     the data's per-pair margin, when it has one
"""

from __future__ import annotations

import torch


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = pad_sequences(prompts + prompts, completions, pad_token_id)
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex.get("margin", 0.0) for ex in examples])  # (B,)
    if "ref_chosen" in examples[0]:
        batch["ref_logps"] = torch.tensor([ex["ref_chosen"] for ex in examples] +
                                          [ex["ref_rejected"] for ex in examples])
    return batch


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, width = len(lengths), max(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, : lengths[i]] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : lengths[i]] = 1
        completion_mask[i, len(prompt) : lengths[i]] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_rows(examples: list[dict], pad_token_id: int, kl: bool) -> dict[str, torch.Tensor]:
    """Unpaired rows -> a batch of N sequences plus `label` (N,) bool (True: desirable).

    Pairs are laid out as their chosen rows then their rejected rows, and the
    batch gets `pairs` (a 0-d tensor) so that pairwise accuracy can be read. With
    `kl`, N mismatched sequences follow (prompt i with completion i - 1, cycled
    within the batch, as the KTO paper and TRL estimate the KL reference point).
    """
    if "chosen_ids" in examples[0]:
        examples = ([{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"], "label": True,
                      "ref_logps": ex.get("ref_chosen")} for ex in examples] +
                    [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["rejected_ids"], "label": False,
                      "ref_logps": ex.get("ref_rejected")} for ex in examples])
        extra = {"pairs": torch.ones((), dtype=torch.bool)}
    else:
        extra = {}
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["completion_ids"] for ex in examples]
    if kl:
        prompts, completions = prompts + prompts, completions + completions[-1:] + completions[:-1]
    batch = pad_sequences(prompts, completions, pad_token_id)
    batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    if examples[0].get("ref_logps") is not None:  # precomputed reference log-probs, (N,)
        batch["ref_logps"] = torch.tensor([ex["ref_logps"] for ex in examples])
    return {**batch, **extra}
