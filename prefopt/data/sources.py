"""Load rows from hub datasets or local files, and name their columns."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path

from prefopt.errors import DataError
from prefopt.recipe import DataSource

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


MEMORY = "memory:"  # data.train: memory:<fingerprint>, a datasets.Dataset given to prefopt.train
_IN_MEMORY: dict[str, object] = {}  # those datasets, while prefopt.train runs (in_memory)


@contextmanager
def in_memory(**datasets_by_split):
    """Within the block, each given `datasets.Dataset` is a source named memory:<its fingerprint>; yields the
    data.<split> values to put in the recipe."""
    names = {split: f"{MEMORY}{ds._fingerprint}" for split, ds in datasets_by_split.items() if ds is not None}
    _IN_MEMORY.update({names[split]: ds for split, ds in datasets_by_split.items() if ds is not None})
    try:
        yield names
    finally:
        for name in names.values():
            _IN_MEMORY.pop(name, None)


def load_source(source: DataSource, where: str):
    """One source -> a `datasets.Dataset`, or a DataError saying what and where."""
    import datasets

    datasets.disable_progress_bars()
    if source.path.startswith(MEMORY):
        if source.path not in _IN_MEMORY:
            raise DataError(f"{where}: {source.path} names an in-memory dataset, given only to prefopt.train(..., "
                            "train_data=...); pass it again, or save it to a file")
        return _IN_MEMORY[source.path]
    if any(c in source.path for c in "*?["):  # shards: data/part-*.jsonl, read in name order as one source
        return _load_shards(source, where)
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    looks_local = suffix in LOCAL_FORMATS or source.path.startswith((".", "/", "~")) or path.exists()
    try:
        if looks_local:
            if not path.exists():
                raise DataError(f"{where}: file not found: {source.path} (paths are relative to the directory you "
                                "run from; a hub dataset is named like org/name)")
            if path.is_dir():
                if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                    dataset = datasets.load_from_disk(str(path))
                    return dataset[source.split] if isinstance(dataset, datasets.DatasetDict) else dataset
                return datasets.load_dataset(str(path), name=source.name, split=source.split)
            if suffix not in LOCAL_FORMATS:
                raise DataError(f"{where}: cannot read {source.path}: use one of {', '.join(LOCAL_FORMATS)}")
            check_local_file(path, where)
            return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split=source.split)
        return datasets.load_dataset(source.path, name=source.name, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the source instead of a deep traceback
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # prefopt.data.cache_disk says it
            raise
        if looks_local and path.is_file():
            not_utf8(source.path, where)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: could not load {source.path!r} (split {source.split!r}): {first_line}") from None


def _load_shards(source: DataSource, where: str):
    """The files a glob names, sorted, as one `datasets.Dataset`: one format, each file checked (a malformed line
    is named by its shard and line)."""
    import glob

    import datasets

    shards = sorted(Path(p) for p in glob.glob(str(Path(source.path).expanduser())))
    if not shards:
        raise DataError(f"{where}: no file matches {source.path} (paths are relative to the directory you run from)")
    suffixes = {p.suffix.lower() for p in shards}
    if len(suffixes) > 1 or not suffixes <= set(LOCAL_FORMATS):
        raise DataError(f"{where}: {source.path} matches files of the formats {', '.join(sorted(suffixes))}; shards "
                        f"share one format of {', '.join(LOCAL_FORMATS)}: narrow the pattern")
    for shard in shards:
        check_local_file(shard, where)
    return datasets.load_dataset(LOCAL_FORMATS[suffixes.pop()], data_files=[str(p) for p in shards], split="train")


def check_local_file(path: Path, where: str) -> None:
    """What Arrow would read wrongly or crash on, refused with the line named, before it reads the file: a JSON
    Lines file with a line that is not JSON or not an object (`null` crashes the reader), or whose column holds
    text in some rows and lists in others (the reader would then decode text that looks like JSON: " 4" or
    "[1, 2]"); a CSV file with a repeated header column (one would silently win). A file that passed is marked
    in the datasets cache by its path, size and modification time, and not read again (a warm start of a large
    set then costs no pass over its text)."""
    import hashlib

    import datasets

    stat = path.resolve().stat()
    key = hashlib.blake2b(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=16).hexdigest()
    marker = Path(datasets.config.HF_DATASETS_CACHE) / "prefopt-checked" / key
    if marker.exists():
        return
    _check_text(path, where)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: checked again next time
        pass


def _check_text(path: Path, where: str) -> None:
    import csv
    import json

    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{where}: {path} has the column(s) {', '.join(map(repr, repeated))} more than once in "
                            "its header; rename them so that each column has one name")
        return
    if path.suffix.lower() != ".jsonl":
        return
    kinds: dict[str, dict[str, int]] = {}  # column -> {"text" | "list": the first line holding it}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: {path} line {number} is not valid UTF-8 (byte {exc.start} of the line); "
                                "save the file as UTF-8") from None
            except ValueError as exc:
                raise DataError(f"{where}: {path} line {number} is not valid JSON ({exc}); fix or remove it") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: {path} line {number} holds {raw.decode('utf-8', 'replace').strip()[:40]!r}, not a row (a JSON object "
                                "{\"prompt\": ...}); fix or remove it")
            for column, value in row.items():
                kind = "text" if isinstance(value, str) else "list" if isinstance(value, (list, dict)) else None
                if kind:
                    kinds.setdefault(column, {}).setdefault(kind, number)
    for column, seen in kinds.items():
        if len(seen) == 2:
            raise DataError(f"{where}: {path} column {column!r} holds text on line {seen['text']} and a list (messages) "
                            f"on line {seen['list']}; one column is one format: give each format a file of its own "
                            "(a mixture of two sources), so that no text is read as JSON")


def not_utf8(path: str, where: str) -> None:
    """A DataError naming the first line of a local file that is not UTF-8, if there is one."""
    file = Path(path).expanduser()
    if not file.is_file():
        return
    with open(file, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: {path} line {number} is not valid UTF-8 (byte {exc.start} of the line); "
                                "save the file as UTF-8") from None


TEXT_ROLES = ("prompt", "chosen", "rejected", "completion", "label", "margin", "text", "messages", "tools")


def map_columns(dataset, columns: dict[str, str | None], origin: str):
    """Rename the dataset's columns to prefopt's names (`data.columns`, e.g. {prompt: question}); a role mapped
    to null says the data has no such column (`prompt: null`: the prompt is the chosen/rejected shared prefix)."""
    for role, column in columns.items():
        if role not in TEXT_ROLES:
            raise DataError(f"data.columns: unknown role {role!r}; roles are {', '.join(TEXT_ROLES)}")
        if column is None:
            if role in dataset.column_names:
                dataset = dataset.remove_columns(role)
            continue
        if column not in dataset.column_names:
            raise DataError(f"{origin}: data.columns maps {role} to {column!r}, which is not a column; its columns "
                            f"are {', '.join(dataset.column_names)}")
        if column != role:
            if role in dataset.column_names:
                dataset = dataset.remove_columns(role)
            dataset = dataset.rename_column(column, role)
    if "conversations" in dataset.column_names and "messages" not in dataset.column_names:  # ShareGPT's name
        dataset = dataset.rename_column("conversations", "messages")
    return dataset


def text_columns(dataset) -> list[str]:
    """Columns holding strings or message lists (what could be a prompt or a completion)."""
    from datasets import List, Value

    def is_text(feature) -> bool:
        if isinstance(feature, Value):
            return feature.dtype in ("string", "large_string")
        inner = getattr(feature, "feature", None)
        return isinstance(feature, (List, list)) and isinstance(inner if inner is not None else feature[0], dict)

    return [name for name, feature in dataset.features.items() if is_text(feature)]


def row_format(dataset, origin: str, columns: dict[str, str | None], log, ignore: list[str] = ()) -> str:
    """"paired" (prompt/chosen/rejected), "unpaired" (prompt/completion/label), "prompts" (prompt alone, for
    online methods) or "lm" (`messages` conversations or `text`, for SFT), from a source's columns; text columns
    nothing reads are named in the log."""
    names = dataset.column_names
    if "chosen" in names or "rejected" in names:
        required = ("chosen", "rejected")
    elif "completion" in names:
        required = ("prompt", "completion")
    elif "prompt" in names:
        required = ("prompt",)
    elif "messages" in names or "text" in names:
        required = ("messages",) if "messages" in names else ("text",)
    else:
        required = ("chosen", "rejected")
    missing = [c for c in required if c not in names]
    hint = ("Preference rows need prompt/chosen/rejected (strings or message lists), or chosen/rejected "
            "conversations sharing a prompt; unpaired rows need prompt/completion and an optional boolean label; "
            "SFT rows may also be `messages` conversations or `text`; data.columns maps other names onto these, "
            "e.g. data.columns: {prompt: question}")
    if missing:
        raise DataError(f"{origin}: missing column {', '.join(map(repr, missing))}; its columns are "
                        f"{', '.join(names)}. {hint}")
    unused = [c for c in text_columns(dataset) if c not in TEXT_ROLES and c not in ignore]
    if required == ("chosen", "rejected") and "prompt" not in names and unused and "prompt" not in columns:
        raise DataError(f"{origin}: no 'prompt' column, but text column(s) {', '.join(map(repr, unused))} may hold "
                        f"it. Map the prompt with data.columns: {{prompt: {unused[0]}}}, or set data.columns: "
                        "{prompt: null} if chosen and rejected hold the whole texts (their shared prefix is the "
                        "prompt)")
    if unused:
        log(f"[prefopt] {origin}: column(s) {', '.join(map(repr, unused))} are not read (data.columns maps a "
            "column onto prompt/chosen/rejected/completion)")
    return {"chosen": "paired", "prompt": "unpaired" if "completion" in names else "prompts", "messages": "lm",
            "text": "lm"}[required[0]]
