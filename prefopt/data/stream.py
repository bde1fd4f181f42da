"""Streaming (data.streaming: true): rows read from their shards as training goes, tokenized in a background
thread, never prepared whole, so a data set of any size starts at once and holds a few blocks in memory.

Order: each epoch visits the shards (files; a hub id or a dataset directory is one) in an order drawn from
(seed, epoch), each shard's rows in blocks of data.shuffle_buffer rows, each block permuted by (seed, epoch,
shard, block). A global batch is the next train.batch_size usable rows, so the order is a pure function of the
seed and the position, and the position (epoch, shard, block, row) is saved in each checkpoint: a resumed run
reads on from where it stopped, without reading the rows before it.

Processes read disjoint rows: row k of the stream is parsed and tokenized by process k mod N alone; each step
the processes exchange what they tokenized (gather_object), so that all of them hold the same global batch and
deal its micro-batches as a map-style run does: N processes equal one with N times the accumulation. A row that
cannot be used (a line that is not JSON, a missing column, a prompt too long, a shard that cannot be read) stops
the run, naming its shard and line, when training reaches it, or is dropped and counted (data.on_bad_row: drop).
"""

from __future__ import annotations

import copy
import itertools
import queue
import random
import threading
from dataclasses import dataclass

from prefopt.data.formats import BadRow
from prefopt.data.shards import find_shards, first_line, rename_row
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource

CHUNK = 256  # rows tokenized in one call by the background thread
AHEAD = 16  # chunks the background thread may hold ready


class StreamStop(DataError):
    """A row the run cannot use, reached in the stream under data.on_bad_row: error."""


@dataclass
class Item:
    ordinal: int  # the row's place in the stream, counted from the run's start
    position: tuple  # (epoch, shard, offset, line, row): where it lies
    after: tuple  # the position of the row after it
    raw: tuple | None = None  # (shard, line or row number, what Shard.parse reads): a row this process owns
    example: dict | None = None  # tokenized, by the process that owns the row
    bad: str = ""  # why the row cannot be used (named by shard and line)
    part: int = 0  # a pair split in two rows (split_pairs): which of them


class Stream:
    """The training rows of data.train as a stream of global batches (Trainer.batches asks for them in step
    order); a checkpointed object: its state is the position of the first row not yet trained."""

    def __init__(self, sources: list[DataSource], tokenizer, cfg: DataConfig, seed: int, where: str, takes: str,
                 rank: int = 0, world: int = 1, log=print):
        """`takes`: what the losses train on (load_examples), or "prompts": an online method's prompts, each with
        every column of its row (load_prompts)."""
        import datasets

        from prefopt.data import check_takes, source_settings
        from prefopt.data.sources import map_columns

        self.keep_columns = takes == "prompts"
        if self.keep_columns:  # as load_prompts: the completions of preference rows are not read
            cfg = DataConfig(**{**vars(cfg), "columns": {**cfg.columns, "chosen": None, "rejected": None,
                                                         "completion": None}})
        self.cfg, self.seed, self.where, self.log, self.rank, self.world = cfg, seed, where, log, rank, world
        self.shards = find_shards(sources, where)
        first = self._first_rows()
        origin = f"{where} ({self.shards[0].name})"
        sample = map_columns(datasets.Dataset.from_list([row for _, _, row in first]), cfg.columns, origin)
        self.settings = source_settings(sample, origin, cfg, log, self.keep_columns)
        if self.keep_columns and self.settings["fmt"] == "lm":
            raise DataError(f"{origin} holds SFT rows (`messages` or `text`) and no `prompt` column; online methods "
                            "sample completions of prompts: give a `prompt` column (text or messages)")
        if not self.keep_columns:
            check_takes(origin, self.settings["fmt"], takes)
        self.tokenizer = copy.deepcopy(tokenizer)  # the thread's own: a fast tokenizer is not shared across threads
        self.split_pairs = False  # pairs become a desirable and an undesirable row (KTO, BCO)
        self.position, self.ordinal, self.part, self.dropped, self.step = (0, 0, 0, 1, 0), 0, 0, 0, 0
        self.epoch = 0
        self.carry: list[Item] = []  # rows read and shared, not yet in a batch
        self.pending: list[Item] = []  # rows taken from the thread, not yet shared
        self.thread: threading.Thread | None = None
        self.ready: queue.Queue = queue.Queue(AHEAD)
        self.stopping = threading.Event()
        items = [Item(i, (), (), raw=(self.shards[0], number, raw)) for i, (number, raw, _) in enumerate(first)]
        self._tokenize(items)
        self.sample = [item.example for item in items if item.example is not None]  # for checks at the start
        if not self.sample:
            raise DataError(f"{where}: none of the first rows of {self.shards[0].name} can be used, e.g. "
                            f"{items[0].bad}")

    # ----- what the trainer reads ---------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        return list(self.sample[0]) if self.sample else []

    def batch(self, step: int, count: int) -> list[dict]:
        """The global batch of optimizer step `step` (1-based, asked in order): the next `count` usable rows,
        the same on every process."""
        if step != self.step + 1:
            raise RuntimeError(f"{self.where} streams batches in order: step {step} asked after step {self.step}")
        rows = self.take(count)
        self.step = step
        return rows

    def take(self, count: int) -> list[dict]:
        """The next `count` usable rows (every process calls it, in the same order)."""
        if self.thread is None:
            self._start()
        while sum(not item.bad for item in self.carry) < count:
            self.carry += self._exchange(count - sum(not item.bad for item in self.carry))
        rows, used = [], 0
        for item in self.carry:
            used += 1
            if item.bad:
                if self.cfg.on_bad_row == "error":
                    raise StreamStop(f"{self.where}: {item.bad}\nSet data.on_bad_row=drop (a resume may change it) to "
                                     "drop such rows with a count, or fix the shard and start over")
                self.dropped += 1
                if self.dropped <= 5:
                    self.log(f"[prefopt] {self.where}: dropped {item.bad}")
                continue
            rows.append(item.example)
            if len(rows) == count:
                break
        last, self.carry = self.carry[used - 1], self.carry[used:]
        self.epoch = last.position[0]
        if self.carry:
            first = self.carry[0]
            self.position, self.ordinal, self.part = first.position, first.ordinal, first.part
        else:
            self.position, self.ordinal, self.part = last.after, last.ordinal + 1, 0
        return rows

    def stats(self) -> dict[str, float]:
        """data/epoch: of the last row trained (from 0); data/dropped_rows: so far (data.on_bad_row: drop)."""
        return {"data/epoch": float(self.epoch), "data/dropped_rows": float(self.dropped)}

    def state_dict(self) -> dict:
        return {"position": list(self.position), "ordinal": self.ordinal, "part": self.part,
                "dropped": self.dropped, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.position, self.ordinal, self.part = tuple(state["position"]), state["ordinal"], state["part"]
        self.dropped, self.step, self.carry = state["dropped"], state["step"], []

    def close(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            while self.thread.is_alive():  # unblock a thread waiting on a full queue
                try:
                    self.ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.thread, self.ready, self.stopping = None, queue.Queue(AHEAD), threading.Event()
        self.pending = []

    # ----- reading ------------------------------------------------------------------------------

    def _first_rows(self) -> list[tuple]:
        """(number, raw, row) of the readable rows among the first 100 of the first shard (in name order): the
        format is read from them."""
        shard, rows = self.shards[0], []
        try:
            for number, raw in next(shard.blocks(0, 1, 100), (0, 0, []))[2]:
                try:
                    rows.append((number, raw, shard.parse(raw)))
                except BadRow:
                    pass
        except Exception as exc:
            raise DataError(f"{self.where}: cannot read {shard.name}: {first_line(exc)}") from None
        if not rows:
            raise DataError(f"{self.where}: {shard.name} holds no readable rows")
        return rows

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def _rows(self):
        """(position, after, shard, number, raw) of every row from self.position on, epoch after epoch; a shard
        that cannot be read is one bad row (raw None, its reason in number)."""
        epoch, first_shard, offset, line, row = self.position
        while True:
            order, seen, whole = self._order(epoch), False, (first_shard, offset, row) == (0, 0, 0)
            for k in range(first_shard, len(order)):
                shard = self.shards[order[k]]
                previous = None
                try:
                    for start, first, block, next_offset, next_line in shard.blocks(offset, line,
                                                                                     self.cfg.shuffle_buffer):
                        seen = True
                        permuted = list(range(len(block)))
                        random.Random(f"{self.seed}/{epoch}/{k}/{start}").shuffle(permuted)
                        for r in range(row, len(block)):
                            here = (epoch, k, start, first, r)
                            after = (epoch, k, start, first, r + 1) if r + 1 < len(block) else \
                                (epoch, k, next_offset, next_line, 0)
                            previous = after
                            yield here, after, shard, *block[permuted[r]]
                        row = 0
                except Exception as exc:  # a shard that cannot be read (a truncated parquet file, a failed stream)
                    seen = True
                    here = previous or (epoch, k, offset, line, row)
                    yield here, (epoch, k + 1, 0, 1, 0), shard, f"{shard.name}: cannot be read ({first_line(exc)})", None
                offset, line, row = 0, 1, 0
            if whole and not seen:
                raise DataError(f"{self.where}: the stream holds no rows")
            epoch, first_shard = epoch + 1, 0

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._work, args=(self.stopping, self.ready), daemon=True,
                                       name="prefopt-stream")
        self.thread.start()

    def _work(self, stopping: threading.Event, ready: queue.Queue) -> None:
        """The background thread: this process's rows parsed and tokenized, CHUNK at a time, into `ready`."""
        try:
            ordinals = itertools.count(self.ordinal)
            rows = self._rows()
            while not stopping.is_set():
                chunk = []
                for ordinal, (here, after, shard, number, raw) in zip(ordinals, itertools.islice(rows, CHUNK)):
                    mine = ordinal % self.world == self.rank
                    chunk.append(Item(ordinal, here, after, raw=(shard, number, raw) if mine and raw is not None
                                      else None, bad=number if raw is None and mine else ""))
                if not chunk:  # never: the stream goes on epoch after epoch
                    break
                self._tokenize(chunk)
                while not stopping.is_set():
                    try:
                        ready.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:  # raised where the trainer reads
            ready.put(exc)

    def _tokenize(self, items: list[Item]) -> None:
        """The rows these items own parsed and tokenized: each gets its example, or why it cannot be used."""
        from prefopt.data import REPORT, prepare_batch

        rows, at = [], []
        for item in items:
            if item.raw is None:
                continue
            shard, number, raw = item.raw
            try:
                rows.append(rename_row(shard.parse(raw), self.cfg.columns))
                at.append(item)
            except BadRow as reason:
                item.bad = f"{shard.where(number)}: {reason}"
        if not rows:
            return
        batch = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
        out = prepare_batch(batch, tokenizer=self.tokenizer, **self.settings)
        kept = [key for key in out if key not in (*REPORT, "bad")]
        for j, item in enumerate(at):
            shard, number, _ = item.raw
            if out["bad"][j]:
                item.bad = f"{shard.where(number)}: {out['bad'][j]}"
            else:  # prompts: every column of the row beside its ids, for the reward functions
                item.example = {**({k: v for k, v in rows[j].items() if v is not None} if self.keep_columns else {}),
                                **{key: out[key][j] for key in kept if out[key][j] is not None}}

    def _exchange(self, count: int) -> list[Item]:
        """The next `count` rows of the stream, each tokenized by its owner, then shared by all processes."""
        items = []
        while len(items) < count:
            if not self.pending:
                got = self.ready.get()
                if isinstance(got, BaseException):
                    raise got
                self.pending = got
            take = min(count - len(items), len(self.pending))
            items, self.pending = items + self.pending[:take], self.pending[take:]
        mine = [(item.ordinal, item.example, item.bad) for item in items if item.ordinal % self.world == self.rank]
        if self.world > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        found = {ordinal: (example, bad) for ordinal, example, bad in mine}
        out = []
        for item in items:
            (item.example, item.bad), item.raw = found[item.ordinal], None
            parts = [item.example]
            if self.split_pairs and item.example and "chosen_ids" in item.example:
                from prefopt.data import as_rows

                parts = as_rows([item.example])
            skip = self.part if item.ordinal == self.ordinal else 0  # resumed between a pair's two rows
            out += [Item(item.ordinal, item.position, item.after, example=example, bad=item.bad, part=p)
                    for p, example in enumerate(parts) if p >= skip]
        return out
