"""Data: rows -> canonical examples -> token ids -> batches.

Each source is prepared with `datasets.map` (batched tokenizer calls, and the datasets cache: a rerun, or a
second process, loads the tokenized rows instead of tokenizing again; the cache key covers the data, the
tokenizer and every setting below).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Sequence
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import pyarrow.compute as pc

from prefopt.data.formats import (
    BadRow,
    as_chatml,
    canonical_lm,
    canonical_pair,
    canonical_prompt,
    canonical_unpaired,
)
from prefopt.data.sources import load_source, map_columns, not_utf8, row_format
from prefopt.data.tokenize import TruncationReport, tokenize_examples
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource

SHOWN_BAD_ROWS = 5
CANONICAL = {"paired": canonical_pair, "unpaired": canonical_unpaired, "prompts": canonical_prompt, "lm": canonical_lm}
COMPLETIONS = {"paired": ("chosen", "rejected"), "unpaired": ("completion",), "prompts": (), "lm": ("completion",)}
SFT_FORMATS = ("unpaired", "lm")  # the formats data.assistant_only_loss and data.completion_only_loss shape
REPORT = ("prompts_cut", "completions_cut", "boundary_merged")


def prepare_batch(batch: dict[str, list], *, tokenizer, fmt: str, max_length: int, max_prompt_length: int | None,
                  truncation: str, extra_columns: tuple[str, ...] = (), chat_template_kwargs: dict | None = None,
                  assistant_only: bool = False, completion_only: bool = True) -> dict[str, list]:
    """A batch of one source's rows (datasets.map, batched) -> token ids, with `bad` (why a row cannot be
    used, or "") and, per row, what truncation did (the REPORT counts). chat_template_kwargs travel as an
    argument, not only on the tokenizer, so that they are part of the map's cache key."""
    tokenizer.prefopt_chat_template_kwargs = dict(chat_template_kwargs or {})
    rows = [as_chatml(dict(zip(batch, values))) for values in zip(*batch.values())]
    options = {"assistant_only": assistant_only, "completion_only": completion_only} if fmt in SFT_FORMATS else {}
    examples, bad = [], []
    for row in rows:
        try:
            example = CANONICAL[fmt](row, tokenizer, **options)
            for column in extra_columns:
                value = row[column]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise BadRow(f"data.extra_columns: {column!r} is {type(value).__name__} {value!r:.40}; expected "
                                 "a number")
                example[column] = value
            examples.append(example)
            bad.append("")
        except BadRow as reason:
            bad.append(str(reason))
    tokenized, report = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, COMPLETIONS[fmt],
                                          truncation)
    good = iter(tokenized)
    keys = ["prompt_ids", *(f"{k}_ids" for k in COMPLETIONS[fmt]), *{"paired": ["margin"]}.get(fmt, []),
            *(["label", "completion_mask"] if fmt in SFT_FORMATS else []), *extra_columns]
    out: dict[str, list] = {"bad": bad, **{key: [] for key in keys}}
    for i, reason in enumerate(bad):
        row = next(good) if not reason else {}
        bad[i] = row.get("bad", reason)
        for key in keys:
            out[key].append(row.get(key, [] if key.endswith("_ids") else None))  # None: not there
    for name in REPORT:  # the batch's counts, on its first row: they are summed
        out[name] = [getattr(report, name)] + [0] * (len(bad) - 1)
    return out


def load_examples(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str,
                  takes: str = "paired", log=print) -> list[dict]:
    """Sources -> tokenized examples, with unusable rows reported (and dropped or fatal).

    Paired rows become {prompt_ids, chosen_ids, rejected_ids} (and `margin` where the data has one);
    unpaired and SFT rows {prompt_ids, completion_ids, label} (and `completion_mask` where only some completion
    tokens train). `takes` is what the losses train on: "paired" refuses unpaired and SFT rows, "unpaired" (KTO,
    BCO) refuses SFT rows (messages/text), "any" (SFT) takes every format.
    """
    loaded = _load(sources, tokenizer, cfg, seed, where, log)
    for origin, fmt, _ in loaded:
        check_takes(origin, fmt, takes)
    return Rows.joined([rows for _, _, rows in loaded])


def check_takes(origin: str, fmt: str, takes: str) -> None:
    """A source's format refused where the losses cannot train on it (`takes`, as load_examples)."""
    if fmt == "prompts":
        raise DataError(f"{origin} holds prompts alone; offline methods need completions (prompt/chosen/"
                        "rejected or prompt/completion), online methods (a ppo: section) take prompts")
    if takes == "paired" and fmt == "unpaired":
        raise DataError(f"{origin} holds unpaired rows (prompt/completion/label), but the loss trains on "
                        "pairs (prompt/chosen/rejected): use an unpaired loss (kto, bco, sft) or paired data")
    if takes != "any" and fmt == "lm":
        raise DataError(f"{origin} holds SFT rows (`messages` or `text`), which train with the sft loss only "
                        "(method: sft); preference losses need prompt/chosen/rejected or prompt/completion/label")


def load_prompts(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str,
                 log=print, completions: bool = False) -> list[dict]:
    """Prompts for online methods: {prompt (as given: text or messages), prompt_ids, and every other column of the
    row, e.g. a ground-truth `answer` for a reward function}, from any source with a `prompt` column (preference
    sets included), truncated by the same rules as offline prompts. `completions`: each row's `completion` kept, as
    `data_completion` (GKD's data set completions)."""
    prompt_only = DataConfig(**{**vars(cfg), "columns": {**cfg.columns, "chosen": None, "rejected": None,
                                                            "completion": None}})
    held = {cfg.columns.get("completion") or "completion": "data_completion"} if completions else {}
    loaded = _load(sources, tokenizer, prompt_only, seed, where, log, keep_columns=True, rename=held)
    for origin, fmt, _ in loaded:
        if fmt == "lm":
            raise DataError(f"{origin} holds SFT rows (`messages` or `text`) and no `prompt` column; online methods "
                            "sample completions of prompts: give a `prompt` column (text or messages)")
    return Rows.joined([rows for _, _, rows in loaded])


def _load(sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str, log,
          keep_columns: bool = False, rename: dict[str, str] | None = None) -> list[tuple[str, str, list[dict]]]:
    """Every source -> (origin, format, tokenized rows), mixed by weight: 1.0 every row, 0.5 a random half,
    2.0 every row twice. Unusable rows stop the run or are dropped and counted (data.on_bad_row). `rename`:
    columns renamed before the roles are read (kept out of them)."""
    rng = random.Random(seed)
    out, bad, total, report = [], [], 0, TruncationReport()
    for i, source in enumerate(sources):
        origin = f"{where}[{i}] ({source.path})"
        if source.weight < 0:
            raise DataError(f"{origin}: weight must be >= 0, got {source.weight}")
        with cache_disk(origin):
            fmt, tokenized = _prepare(source, origin, tokenizer, cfg, log, keep_columns, rename)
        n = len(tokenized)
        whole, fraction = divmod(source.weight, 1.0)
        index = np.concatenate([np.tile(np.arange(n), int(whole)),
                                np.array(sorted(rng.sample(range(n), round(fraction * n))), dtype=np.int64)])
        table = tokenized.data.table  # the datasets cache's Arrow table, memory-mapped: never read whole
        for name in REPORT:  # each row counted once, whatever its weight
            setattr(report, name, getattr(report, name) + int(pc.sum(table.column(name)).as_py() or 0))
        unusable = pc.not_equal(table.column("bad"), "").to_numpy(zero_copy_only=False)
        for j in index[unusable[index]]:
            bad.append(f"{origin} row {j}: {table.column('bad')[int(j)].as_py()}")
        total += len(index)
        rows = Rows(table.select([c for c in table.column_names if c not in (*REPORT, "bad")]),
                    index[~unusable[index]], fingerprint=tokenized._fingerprint)
        out.append((origin, fmt, rows))
    if bad:
        shown = "\n  ".join(bad[:SHOWN_BAD_ROWS]) + (f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more"
                                                    if len(bad) > SHOWN_BAD_ROWS else "")
        if cfg.on_bad_row == "error":
            raise DataError(f"{len(bad)} of {total} rows in {where} cannot be used:\n  {shown}\n"
                            "Fix these rows, or set data.on_bad_row=drop to drop them with a count.")
        log(f"[prefopt] dropped {len(bad)} of {total} rows in {where}:\n  {shown}")
    kept = sum(len(rows) for _, _, rows in out)
    if not kept:
        raise DataError(f"{where}: no usable rows")
    log(f"[prefopt] {where}: {kept} examples ({report}; data.truncation: {cfg.truncation})")
    return out


def source_settings(dataset, origin: str, cfg: DataConfig, log, keep_columns: bool = False) -> dict:
    """prepare_batch's settings for a source (its columns named as prefopt's): its format, read from its columns,
    and data.* ."""
    missing = [c for c in cfg.extra_columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{origin}: data.extra_columns names {missing}, not columns of this data; its columns are "
                        f"{', '.join(dataset.column_names)}")
    fmt = row_format(dataset, origin, cfg.columns, log, ignore=dataset.column_names if keep_columns else cfg.extra_columns)
    return {"fmt": fmt, "max_length": cfg.max_length, "truncation": cfg.truncation,
            "max_prompt_length": cfg.max_prompt_length, "extra_columns": tuple(cfg.extra_columns),
            "chat_template_kwargs": dict(cfg.chat_template_kwargs),
            "assistant_only": cfg.assistant_only_loss, "completion_only": cfg.completion_only_loss is not False}


def _prepare(source: DataSource, origin: str, tokenizer, cfg: DataConfig, log, keep_columns: bool,
             rename: dict[str, str] | None):
    """One source -> (its format, its tokenized datasets.Dataset: the map's cache)."""
    dataset = load_source(source, origin)
    dataset = dataset.rename_columns({k: v for k, v in (rename or {}).items() if k in dataset.column_names})
    dataset = map_columns(dataset, cfg.columns, origin)
    settings = {"tokenizer": tokenizer, **source_settings(dataset, origin, cfg, log, keep_columns)}
    keep = dataset.column_names if keep_columns else []  # online: the row goes to the reward functions
    try:
        return settings["fmt"], dataset.map(
            prepare_batch, batched=True, batch_size=1000, fn_kwargs=settings,
            num_proc=cfg.num_proc if len(dataset) >= 10 * (cfg.num_proc or 1) else None,
            remove_columns=[c for c in dataset.column_names if c not in keep])
    except UnicodeDecodeError:  # datasets may read bytes that are not UTF-8 and fail only on the text
        not_utf8(source.path, origin)
        raise


@contextmanager
def cache_disk(origin: str):
    """A full disk while the datasets cache is written, said with its ways out."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        import datasets

        raise DataError(f"{origin}: the disk of the datasets cache ({datasets.config.HF_DATASETS_CACHE}) is full. "
                        "Preparing a data set writes about 3 bytes of Arrow for each byte of jsonl. Free disk, set "
                        "HF_DATASETS_CACHE to a larger disk, or set data.streaming: true (rows read as training "
                        "goes, nothing cached)") from None


def as_rows(examples):
    """Pairs -> two unpaired rows each (chosen: desirable, rejected: undesirable); rows stay as they are. Rows
    (the Arrow table) stay Rows: each pair's position twice, split when read."""
    if isinstance(examples, Rows):
        return examples.split_pairs()
    return [row for ex in examples for row in (pair_half(ex, 0), pair_half(ex, 1))
            if row is not None] if examples else []


def pair_half(example: dict, part: int) -> dict | None:
    """Half `part` of a pair as an unpaired row (0: chosen, desirable; 1: rejected); a row that is no pair is
    itself as part 0 and nothing as part 1."""
    if "chosen_ids" not in example:
        return None if part else example
    extra = {k: v for k, v in example.items() if not k.endswith("_ids")}  # e.g. data.extra_columns
    return {**extra, "prompt_ids": example["prompt_ids"], "completion_ids": example[("chosen_ids", "rejected_ids")[part]],
            "label": not part}


class Rows(Sequence):
    """Tokenized examples as they lie in the datasets cache (an Arrow table, memory-mapped, never read whole):
    row i is the dict of its values (None left out), read when asked; `take` reads many in one Arrow call, and
    `select` or a slice is another order over the same table (a source's weight repeats rows, nothing is
    copied). Memory is the index (8 bytes a row) and the pages read."""

    READ = 1024  # rows per Arrow call when iterating

    def __init__(self, table, index: np.ndarray, attached: dict[str, np.ndarray] | None = None,
                 parts: np.ndarray | None = None, fingerprint: str = ""):
        self.table, self.index = table, np.asarray(index, dtype=np.int64)
        self.fingerprint = fingerprint  # the table's content: the datasets cache's key (data, tokenizer, settings)
        self.attached = attached or {}  # values given per position after loading (reference log-probs)
        self.parts = parts  # after split_pairs: per position, -1 the row as it is, 0/1 a pair's chosen/rejected half

    def attach(self, name: str, values) -> None:
        """A value for each row (by position), read with it from now on."""
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for {len(self)} rows")
        self.attached[name] = np.asarray(values)

    @classmethod
    def joined(cls, parts: list[Rows]) -> Rows:
        """The rows of several sources in turn (columns a source lacks are None in its rows)."""
        import pyarrow as pa

        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [part.table.num_rows for part in parts])
        table = pa.concat_tables([part.table for part in parts], promote_options="permissive")
        return cls(table, np.concatenate([part.index + offset for part, offset in zip(parts, offsets)]),
                   fingerprint="+".join(part.fingerprint for part in parts))

    def split_pairs(self) -> Rows:
        """Each pair as two unpaired rows (as_rows), in place: its position twice, split when read."""
        if "chosen_ids" not in self.table.column_names:
            return self
        pair = pc.is_valid(self.table.column("chosen_ids")).to_numpy(zero_copy_only=False)[self.index]
        twice = np.repeat(np.arange(len(self)), np.where(pair, 2, 1))
        parts = np.where(pair[twice], 0, -1).astype(np.int8)
        parts[1:][(twice[1:] == twice[:-1])] = 1
        return Rows(self.table, self.index[twice], {k: v[twice] for k, v in self.attached.items()}, parts,
                    self.fingerprint)

    @property
    def columns(self) -> list[str]:
        return [*self.table.column_names, *self.attached]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.select(range(len(self))[key])
        if not -len(self) <= key < len(self):
            raise IndexError(f"row {key} of {len(self)}")
        return self.take([key])[0]

    def __iter__(self):
        for start in range(0, len(self), self.READ):
            yield from self.take(range(start, min(start + self.READ, len(self))))

    def content_key(self) -> bytes | None:
        """What identifies these rows' content without reading them: the tables' fingerprints and which of their
        rows (the index, and how pairs are split); None where a table has none."""
        if not self.fingerprint or self.attached:
            return None
        parts = b"" if self.parts is None else self.parts.tobytes()
        return self.fingerprint.encode() + self.index.tobytes() + parts

    def lacking(self, column: str) -> int:
        """Rows without a value for `column` (None, or a source without the column)."""
        if column in self.attached:
            return 0
        if column not in self.table.column_names:
            return len(self)
        return int(pc.is_null(self.table.column(column)).to_numpy(zero_copy_only=False)[self.index].sum())

    def select(self, positions) -> Rows:
        positions = np.asarray(positions, dtype=np.int64)
        return Rows(self.table, self.index[positions], {k: v[positions] for k, v in self.attached.items()},
                    None if self.parts is None else self.parts[positions], self.fingerprint)

    @cached_property
    def _batches(self) -> tuple[list, np.ndarray]:
        """The table's record batches (zero-copy views of its chunks) and the index of each one's first row."""
        batches = self.table.to_batches()
        return batches, np.cumsum([0] + [len(batch) for batch in batches])

    def take(self, positions) -> list[dict]:
        """Rows at these positions, in their order, each without its None values."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = [{key: value for key, value in row.items() if value is not None}
                for row in gather(*self._batches, self.index[positions])]
        if self.parts is not None:
            rows = [row if part < 0 else pair_half(row, part) for row, part in zip(rows, self.parts[positions].tolist())]
        for name, values in self.attached.items():
            for row, value in zip(rows, values[positions].tolist()):
                row[name] = value
        return rows


def gather(batches: list, starts: np.ndarray, at: np.ndarray) -> list[dict]:
    """A table's rows at these indices, as dicts, read from the record batches that hold them (`batches`, their
    first rows at `starts`). (Table.take would first concatenate each column's chunks, reading the whole
    memory-mapped table for a single row.)"""
    which = np.searchsorted(starts, at, side="right") - 1
    order = np.argsort(which, kind="stable")
    rows: list = [None] * len(at)
    for group in np.split(order, np.flatnonzero(np.diff(which[order])) + 1) if len(at) else ():
        batch = which[group[0]]
        for i, row in zip(group.tolist(), batches[batch].take(at[group] - starts[batch]).to_pylist()):
            rows[i] = row
    return rows


def has_key(examples, key: str) -> bool:
    """Whether some example has `key` (a Rows table: whether one of its sources gave the column)."""
    return key in examples.columns if hasattr(examples, "columns") else any(key in ex for ex in examples)


def lacking(examples, column: str) -> int:
    """How many examples lack `column`: counted by Arrow for Rows, else one look each."""
    return examples.lacking(column) if isinstance(examples, Rows) else sum(column not in ex for ex in examples)


def rows_at(examples, positions: list[int]) -> list[dict]:
    """examples[i] for each position: one Arrow call for Rows, else one lookup each."""
    return examples.take(positions) if isinstance(examples, Rows) else [examples[i] for i in positions]
