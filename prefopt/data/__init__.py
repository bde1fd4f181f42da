"""Data: rows -> canonical examples -> token ids -> batches."""

from __future__ import annotations

from prefopt.data.formats import BadRow, canonical_pair, canonical_prompt, canonical_unpaired
from prefopt.data.sources import load_rows
from prefopt.data.tokenize import tokenize_examples
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource

SHOWN_BAD_ROWS = 5


def load_examples(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str,
                  pairs_only: bool = True, log=print) -> list[dict]:
    """Sources -> tokenized examples, with unusable rows reported (and dropped or fatal).

    Paired rows become {prompt_ids, chosen_ids, rejected_ids}; unpaired rows
    {prompt_ids, completion_ids, label}. With pairs_only, unpaired rows are an error.
    """
    rows = load_rows(sources, seed, where)
    prompts_origin = next((origin for origin, fmt, _, _ in rows if fmt == "prompts"), None)
    if prompts_origin:
        raise DataError(f"{prompts_origin} holds prompts alone; offline methods need completions (prompt/chosen/"
                        "rejected or prompt/completion), online methods (a ppo: section) take prompts")
    unpaired_origin = next((origin for origin, fmt, _, _ in rows if fmt == "unpaired"), None)
    if pairs_only and unpaired_origin:
        raise DataError(f"{unpaired_origin} holds unpaired rows (prompt/completion/label), but the loss trains on "
                        "pairs (prompt/chosen/rejected): use an unpaired loss (kto, bco, sft) or paired data")
    examples = {"paired": [], "unpaired": []}
    bad = []
    for origin, fmt, index, row in rows:
        try:
            examples[fmt].append((canonical_pair if fmt == "paired" else canonical_unpaired)(row, tokenizer))
        except BadRow as reason:
            bad.append(f"{origin} row {index}: {reason}")
    if bad:
        shown = "\n  ".join(bad[:SHOWN_BAD_ROWS]) + (f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more"
                                                    if len(bad) > SHOWN_BAD_ROWS else "")
        if cfg.on_bad_row == "error":
            raise DataError(f"{len(bad)} of {len(rows)} rows in {where} cannot be used:\n  {shown}\n"
                            "Fix these rows, or set data.on_bad_row=drop to drop them with a count.")
        log(f"[prefopt] dropped {len(bad)} of {len(rows)} rows in {where}:\n  {shown}")
    if not examples["paired"] and not examples["unpaired"]:
        raise DataError(f"{where}: no usable rows")
    out = []
    for fmt, keys in (("paired", ("chosen", "rejected")), ("unpaired", ("completion",))):
        if examples[fmt]:
            tokenized, report = tokenize_examples(examples[fmt], tokenizer, cfg.max_length, cfg.max_prompt_length,
                                                  keys)
            log(f"[prefopt] {where}: {len(tokenized)} {fmt} examples ({report})")
            out.extend(tokenized)
    return out


def as_rows(examples: list[dict]) -> list[dict]:
    """Pairs -> two unpaired rows each (chosen: desirable, rejected: undesirable); rows stay as they are."""
    rows = []
    for ex in examples:
        if "chosen_ids" in ex:
            rows.append({"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"], "label": True})
            rows.append({"prompt_ids": ex["prompt_ids"], "completion_ids": ex["rejected_ids"], "label": False})
        else:
            rows.append(ex)
    return rows


def load_prompts(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str,
                 log=print) -> list[dict]:
    """Prompts for online methods: {prompt (as given: text or messages), prompt_ids}, from any source with a
    `prompt` column (preference sets included). Prompts longer than max_prompt_length keep their end."""
    rows = load_rows(sources, seed, where)
    kept, examples, bad = [], [], []
    for origin, _, index, row in rows:
        try:
            examples.append(canonical_prompt(row, tokenizer))
            kept.append(row["prompt"])
        except BadRow as reason:
            bad.append(f"{origin} row {index}: {reason}")
    if bad:
        if cfg.on_bad_row == "error":
            raise DataError(f"{len(bad)} of {len(rows)} prompts in {where} cannot be used:\n  " + "\n  ".join(
                bad[:SHOWN_BAD_ROWS]) + "\nFix them, or set data.on_bad_row=drop to drop them with a count.")
        log(f"[prefopt] dropped {len(bad)} of {len(rows)} prompts in {where}")
    if not examples:
        raise DataError(f"{where}: no usable prompts")
    tokenized, report = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length, ())
    log(f"[prefopt] {where}: {len(tokenized)} prompts ({report.prompts_cut} truncated)")
    return [{"prompt": prompt, "prompt_ids": ex["prompt_ids"]} for prompt, ex in zip(kept, tokenized)]
