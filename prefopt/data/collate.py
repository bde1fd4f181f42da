"""Tokenized pairs -> padded batches.

A preference batch of B pairs is one tensor batch of 2B sequences, chosen first
then rejected, so that both go through the model in one forward:

    input_ids       (2B, T)  prompt + completion ids, right-padded with pad_token_id
    attention_mask  (2B, T)  1 on real tokens
    completion_mask (2B, T)  1 on completion tokens (the ones the loss scores)
"""

from __future__ import annotations

import torch


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    return pad_sequences(prompts + prompts, completions, pad_token_id)


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
