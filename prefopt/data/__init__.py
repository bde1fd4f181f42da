"""Data: rows -> canonical examples -> token ids -> batches."""

from __future__ import annotations

from prefopt.data.formats import BadRow, canonical_pair
from prefopt.data.sources import load_rows
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource

SHOWN_BAD_ROWS = 5


def load_pairs(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str,
               log=print) -> list[dict]:
    """Preference sources -> tokenized pairs, with unusable rows reported (and dropped or fatal)."""
    rows = load_rows(sources, seed, where, required=("chosen", "rejected"))
    examples, bad = [], []
    for origin, index, row in rows:
        try:
            examples.append(canonical_pair(row, tokenizer))
        except BadRow as reason:
            bad.append(f"{origin} row {index}: {reason}")
    if bad:
        shown = "\n  ".join(bad[:SHOWN_BAD_ROWS]) + (f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more"
                                                    if len(bad) > SHOWN_BAD_ROWS else "")
        if cfg.on_bad_row == "error":
            raise DataError(f"{len(bad)} of {len(rows)} rows in {where} cannot be used:\n  {shown}\n"
                            "Fix these rows, or set data.on_bad_row=drop to drop them with a count.")
        log(f"[prefopt] dropped {len(bad)} of {len(rows)} rows in {where}:\n  {shown}")
    if not examples:
        raise DataError(f"{where}: no usable rows")
    pairs, report = tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    log(f"[prefopt] {where}: {len(pairs)} pairs ({report})")
    return pairs
