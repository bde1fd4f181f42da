"""A stream's shards (prefopt.data.stream): where its rows lie and how each kind is read, a block of rows at a time
from a position, and one row parsed."""

from __future__ import annotations

import glob
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from prefopt.data.formats import BadRow
from prefopt.errors import DataError
from prefopt.recipe import DataSource


@dataclass
class Shard:
    name: str  # a path, or a dataset id
    kind: str  # jsonl | parquet | datasets
    source: DataSource

    def blocks(self, offset: int, line: int, size: int):
        """(offset, first line, rows, next offset, next line) from `offset` on, `size` rows a block; a row is
        (line or row number, what parse() reads). Offsets: bytes (jsonl) or rows."""
        if self.kind == "jsonl":
            with open(self.name, "rb") as f:
                f.seek(offset)
                while True:
                    start, first, rows = offset, line, []
                    while len(rows) < size and (raw := f.readline()):
                        if raw.strip():
                            rows.append((line, raw))
                        line += 1
                    offset = f.tell()
                    if not rows:
                        return
                    yield start, first, rows, offset, line
        elif self.kind == "parquet":  # blocks cut in each row group from its start, wherever reading starts
            import pyarrow.parquet as pq

            shard, start = pq.ParquetFile(self.name, memory_map=True), 0
            for group in range(shard.num_row_groups):
                n = shard.metadata.row_group(group).num_rows
                if start + n > offset:
                    table = shard.read_row_group(group)
                    for first in range(max(offset, start), start + n, size):
                        block = table.slice(first - start, size)
                        yield first, first, [(first + i, (block, i)) for i in range(block.num_rows)], \
                            first + block.num_rows, 0
                start += n
        else:
            import datasets

            source = self.source
            stream = datasets.load_dataset(self.name, name=source.name, split=source.split, streaming=True)
            rows = iter(stream.skip(offset) if offset else stream)
            while block := list(itertools.islice(rows, size)):
                yield offset, offset, [(offset + i, row) for i, row in enumerate(block)], offset + len(block), 0
                offset += len(block)

    def parse(self, raw) -> dict:
        if self.kind == "jsonl":
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BadRow(f"not valid UTF-8 (byte {exc.start} of the line)") from None
            except ValueError as exc:
                raise BadRow(f"not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise BadRow(f"holds {raw.decode('utf-8', 'replace').strip()[:40]!r}, not a row (a JSON object)")
            return row
        if self.kind == "parquet":
            block, i = raw
            return block.slice(i, 1).to_pylist()[0]
        return dict(raw)

    def where(self, number: int) -> str:
        return f"{self.name} {'line' if self.kind == 'jsonl' else 'row'} {number}"


def find_shards(sources: list[DataSource], where: str) -> list[Shard]:
    """Every source's shards, in order: local .jsonl and .parquet files (a glob names many, in name order) are
    read by prefopt; anything else (a hub id, a dataset directory, csv) through datasets' streaming."""
    shards = []
    for i, source in enumerate(sources):
        origin = f"{where}[{i}] ({source.path})"
        if source.weight != 1.0:
            raise DataError(f"{origin}: weight {source.weight} with data.streaming: a stream reads each source once "
                            "per epoch; give the weight 1 (repeat or cut the shards instead)")
        paths = sorted(glob.glob(str(Path(source.path).expanduser()))) if any(c in source.path for c in "*?[") \
            else [source.path]
        if not paths:
            raise DataError(f"{origin}: no file matches {source.path} (paths are relative to the directory you run "
                            "from)")
        for path in paths:
            suffix = Path(path).suffix.lower()
            if suffix in (".jsonl", ".parquet") and not Path(path).expanduser().is_file():
                raise DataError(f"{origin}: file not found: {path}")
            shards.append(Shard(str(Path(path).expanduser()) if suffix in (".jsonl", ".parquet") else path,
                                suffix[1:] if suffix in (".jsonl", ".parquet") else "datasets", source))
    return shards


def rename_row(row: dict, columns: dict[str, str | None]) -> dict:
    """One row's columns renamed to prefopt's names, as sources.map_columns renames a data set's."""
    for role, column in columns.items():
        if column is None:
            row.pop(role, None)
        elif column != role and column in row:
            row[role] = row.pop(column)
    if "conversations" in row and "messages" not in row:
        row["messages"] = row.pop("conversations")
    return row


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
