"""Canonical examples -> token ids, split where inference splits them.

The model at inference reads the prompt's own tokens and continues them. So the
prompt is tokenized alone, each completion is tokenized together with its prompt
(the whole text, or the whole rendered conversation), and the completion's ids
are the joint ids after the prompt's. Tokenizing the completion alone would be
wrong for SentencePiece-style tokenizers (Llama-2, Mistral: a Metaspace prefix
puts "▁" before any text encoded on its own, so "Paris" after "Answer:\\n" would
train as "▁Paris" where inference sees "Pa", "ris").

The boundary rule: when the prompt's own ids are not a prefix of the joint ids
(BPE merges across the boundary, e.g. a prompt ending mid-word or with a space;
or a chat template that renders the prompt alone differently), the prompt keeps
its ids up to where they diverge, and the completion is the joint ids from
there, so the text is exact and the merged token is scored as part of the
completion. This is TRL's rule too; such rows are counted in the report.

Plain-text prompts get the tokenizer's own special tokens (a BOS, if it adds
one); chat-rendered text already holds the template's. Plain-text completions
end with EOS (appended when missing); chat completions end as the template ends
a turn.

An example with `spans` (SFT's assistant-only loss) trains only the tokens that
overlap those character ranges of its whole text (transformers' rule for
{% generation %} masks): the tokens before the first become the prompt, and the
completion gets `completion_mask`, 1 on each token that trains, where some do
not.

Truncation (`max_length` counts prompt + completion tokens):

- `max_prompt_length` (optional): a longer prompt keeps its head (its leading
  special tokens: BOS, a template's start token) and its last tokens;
- `keep_start` (the default, as TRL): a completion that does not fit is cut at
  its end; a prompt that alone leaves no room for a completion token is a bad
  row, reported, never trained on without its head;
- `keep_end`: the prompt is cut instead (head kept, then its last tokens), so
  that the longest completion fits; completions are cut only if even the head
  and one prompt token leave no room.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from prefopt.errors import DataError


@dataclass
class TruncationReport:
    prompts_cut: int = 0  # prompts that lost tokens (their head kept)
    completions_cut: int = 0  # completions cut at their end to fit max_length
    boundary_merged: int = 0  # rows whose prompt tokens merge with the completion's (the boundary rule)

    def __add__(self, other: TruncationReport) -> TruncationReport:
        return TruncationReport(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __str__(self) -> str:
        text = f"{self.prompts_cut} prompts and {self.completions_cut} completions truncated"
        return text + (f", {self.boundary_merged} prompts whose last tokens merge into the completion"
                       if self.boundary_merged else "")


def tokenize_examples(examples: list[dict], tokenizer, max_length: int, max_prompt_length: int | None = None,
                      completion_keys: tuple[str, ...] = ("chosen", "rejected"), truncation: str = "keep_start",
                      ) -> tuple[list[dict], TruncationReport]:
    """Canonical examples -> [{prompt_ids, chosen_ids, rejected_ids}] (or one `<key>_ids` per completion
    key, plus any other field such as `label`) and what was truncated. A row that cannot fit is
    {"bad": reason} instead (see the module docstring for the rules)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) and save it with the model")
    plain = [not ex["chat"] for ex in examples]
    prompts = _encode(tokenizer, [ex["prompt"] for ex in examples], plain)
    joints = {key: _encode(tokenizer, [ex.get(f"full_{key}", ex["prompt"] + ex[key]) for ex in examples], plain)
              for key in completion_keys}
    special = set(tokenizer.all_special_ids)
    report, out = TruncationReport(), []
    for i, (ex, prompt_ids) in enumerate(zip(examples, prompts)):
        keep = min((_common_prefix(prompt_ids, joints[key][i]) for key in completion_keys), default=len(prompt_ids))
        report.boundary_merged += keep < len(prompt_ids)
        completions = {key: joints[key][i][keep:] for key in completion_keys}
        if plain[i]:
            completions = {key: _with_eos(ids, eos) for key, ids in completions.items()}
        head = next((n for n, t in enumerate(prompt_ids) if t not in special), len(prompt_ids))
        prompt_ids = prompt_ids[:keep]
        mask = None
        if ex.get("spans") is not None:  # SFT, assistant turns only: one completion
            (key,) = completion_keys
            joint = joints[key][i]
            mask = span_mask(tokenizer, ex.get(f"full_{key}", ex["prompt"] + ex[key]), joint, ex["spans"])[keep:]
            if 1 not in mask:
                out.append({"bad": "has no assistant tokens to train (data.assistant_only_loss): no assistant "
                                   "message, or a chat template whose {% generation %} marks nothing"})
                continue
            first = mask.index(1)  # the untrained tokens before the first trained one are context: the prompt
            prompt_ids, completions[key], mask = prompt_ids + joint[keep:keep + first], joint[keep + first:], mask[first:]
        row = {k: v for k, v in ex.items() if k not in ("prompt", "chat", "spans", *completion_keys)
               and not k.startswith("full_")}
        bad = _truncate(prompt_ids, min(head, keep), completions, max_length, max_prompt_length, truncation,
                        report, row)
        if not bad and mask is not None and 0 in mask[: len(row["completion_ids"])]:
            row["completion_mask"] = mask[: len(row["completion_ids"])]
        out.append({"bad": bad} if bad else row)
    return out, report


def span_mask(tokenizer, text: str, ids: list[int], spans: list[list[int]]) -> list[int]:
    """1 on each token of `text` that overlaps a character span, as transformers builds assistant masks."""
    if not tokenizer.is_fast:
        raise DataError("data.assistant_only_loss needs a fast tokenizer (character offsets); "
                        f"{tokenizer.name_or_path!r} loads a slow one")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        raise DataError(f"the tokenizer of {tokenizer.name_or_path!r} tokenizes the same text two ways")
    mask, span = [0] * len(ids), 0
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[t] = int(end > spans[span][0])
    return mask


def _truncate(prompt: list[int], head: int, completions: dict[str, list[int]], max_length: int,
              max_prompt_length: int | None, truncation: str, report: TruncationReport, row: dict) -> str | None:
    """Fit prompt + each completion into max_length (rules in the module docstring), writing the ids into row;
    returns why a row cannot fit, or None."""
    longest = max((len(ids) for ids in completions.values()), default=1)  # a prompt alone needs room for one token
    budget = len(prompt)
    if max_prompt_length is not None:
        budget = min(budget, max_prompt_length)
    if truncation == "keep_end":
        budget = min(budget, max(max_length - longest, head + 1))
    if budget < len(prompt):
        if budget <= head:
            return (f"its prompt's leading special tokens ({head}) alone fill the prompt budget of {budget}; "
                    "raise data.max_prompt_length or data.max_length")
        prompt = prompt[:head] + prompt[len(prompt) - (budget - head):]
        report.prompts_cut += 1
    room = max_length - len(prompt)
    if room < 1:
        return (f"its prompt is {len(prompt)} tokens, leaving no room for a completion under data.max_length="
                f"{max_length}; raise data.max_length, set data.max_prompt_length, or data.truncation: keep_end "
                "(cuts the prompt, keeping its head)")
    row["prompt_ids"] = prompt
    for key, ids in completions.items():
        report.completions_cut += len(ids) > room
        row[f"{key}_ids"] = ids[:room]
    return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
