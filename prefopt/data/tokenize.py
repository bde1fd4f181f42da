"""Canonical examples -> token ids with an exact prompt/completion boundary.

Prompt and completions are tokenized separately and their ids concatenated:
joining the strings first would let BPE merge tokens across the boundary, and
the loss would then score a piece of the prompt or miss a piece of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.errors import DataError


@dataclass
class TruncationReport:
    prompts_cut: int = 0  # prompts longer than max_prompt_length, left-truncated
    completions_cut: int = 0  # completions cut to fit max_length

    def __str__(self) -> str:
        return f"{self.prompts_cut} prompts and {self.completions_cut} completions truncated"


def tokenize_examples(examples: list[dict], tokenizer, max_length: int, max_prompt_length: int,
                      completion_keys: tuple[str, ...] = ("chosen", "rejected")) -> tuple[list[dict], TruncationReport]:
    """Canonical examples -> [{prompt_ids, chosen_ids, rejected_ids}] (or one `<key>_ids` per completion
    key, plus any other field such as `label`) and what was truncated.

    Plain-text prompts get the tokenizer's own special tokens (a BOS, if it adds
    one); chat-rendered text already holds the template's. Plain-text
    completions end with EOS (appended when missing); chat completions end as
    the template renders the end of a turn. Prompts longer than
    max_prompt_length keep their last tokens (the question, not the preamble);
    completions are cut so that prompt + completion <= max_length.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) and save it with the model")
    chat = [ex["chat"] for ex in examples]
    prompts = _encode(tokenizer, [ex["prompt"] for ex in examples], [not c for c in chat])
    completions = {key: _encode(tokenizer, [ex[key] for ex in examples], [False] * len(examples))
                   for key in completion_keys}
    report = TruncationReport()
    out = []
    for i, (ex, prompt_ids) in enumerate(zip(examples, prompts)):
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            report.prompts_cut += 1
        room = max_length - len(prompt_ids)
        row = {k: v for k, v in ex.items() if k not in ("prompt", "chat", *completion_keys)}
        row["prompt_ids"] = prompt_ids
        for key in completion_keys:
            ids = completions[key][i] if chat[i] else _with_eos(completions[key][i], eos)
            report.completions_cut += len(ids) > room
            row[f"{key}_ids"] = ids[:room]
        out.append(row)
    return out, report


def _encode(tokenizer, texts: list[str], add_special: list[bool]) -> list[list[int]]:
    """Batch-tokenize, with or without the tokenizer's special tokens per text."""
    ids: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        index = [i for i, f in enumerate(add_special) if f == flag]
        if index:
            encoded = tokenizer([texts[i] for i in index], add_special_tokens=flag)["input_ids"]
            for i, row in zip(index, encoded):
                ids[i] = list(row)
    return ids


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]
