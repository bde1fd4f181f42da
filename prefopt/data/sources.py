"""Load rows from hub datasets or local files, and mix sources by weight."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from prefopt.errors import DataError
from prefopt.recipe import DataSource

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(source: DataSource, where: str):
    """One source -> a `datasets.Dataset`, or a DataError saying what and where."""
    import datasets

    datasets.disable_progress_bars()
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
            return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split=source.split)
        return datasets.load_dataset(source.path, name=source.name, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the source instead of a deep traceback
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: could not load {source.path!r} (split {source.split!r}): {first_line}") from None


def row_format(columns: list[str], origin: str) -> str:
    """"paired" (prompt/chosen/rejected), "unpaired" (prompt/completion/label) or "prompts" (prompt alone,
    for online methods), from a source's columns."""
    if "chosen" in columns or "rejected" in columns:
        required = ("chosen", "rejected")
    elif "completion" in columns:
        required = ("prompt", "completion")
    elif "prompt" in columns:
        return "prompts"
    else:
        required = ("chosen", "rejected")
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{origin}: missing column {', '.join(map(repr, missing))}; its columns are "
                        f"{', '.join(columns)}. Preference rows need prompt/chosen/rejected (strings or message "
                        "lists), or chosen/rejected conversations sharing a prompt; unpaired rows need "
                        "prompt/completion and an optional boolean label")
    return "paired" if "chosen" in required else "unpaired"


def load_rows(sources: list[DataSource], seed: int, where: str) -> list[tuple[str, str, int, dict[str, Any]]]:
    """All sources -> [(origin, row format, row index in its source, row)], mixed by weight.

    `weight` scales the rows taken from a source: 1.0 all of them, 0.5 a random
    half, 2.0 every row twice. The format is "paired" or "unpaired" (row_format).
    """
    rng = random.Random(seed)
    out = []
    for i, source in enumerate(sources):
        origin = f"{where}[{i}] ({source.path})"
        dataset = load_source(source, origin)
        fmt = row_format(dataset.column_names, origin)
        if source.weight < 0:
            raise DataError(f"{origin}: weight must be >= 0, got {source.weight}")
        n = len(dataset)
        whole, fraction = divmod(source.weight, 1.0)
        index = list(range(n)) * int(whole) + sorted(rng.sample(range(n), round(fraction * n)))
        rows = dataset.to_list()
        out.extend((origin, fmt, j, rows[j]) for j in index)
    return out
