"""A checkpoint proves itself: the checksum of every file it holds is in its completing state file (and final/'s
in final/prefopt_checksums.json), verified before a resume trusts it and by `prefopt verify RUN`. And a run knows
what it read: the content of its data files and of its models' files, so that one rewritten at the same path
refuses to resume as a changed recipe does.

BLAKE2b from the standard library, 1 MiB at a time (docs/reliability.md measures the cost).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20
FINAL_CHECKSUMS = "prefopt_checksums.json"  # final/'s, written last


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to root: digest} of every file under root, but `skip` (names)."""
    return {str(path.relative_to(root)): file_digest(path) for path in sorted(root.rglob("*"))
            if path.is_file() and path.name not in skip}


def mismatches(root: Path, expected: dict[str, str]) -> list[str]:
    """What differs from `expected`: a missing file, or one whose content changed (named, relative to root)."""
    out = []
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif file_digest(path) != digest:
            out.append(f"{name} does not match its checksum")
    return out


# ----- what a run reads -------------------------------------------------------------------------------

MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".py", ".tiktoken")


def input_paths(recipe) -> list[tuple[str, Path]]:
    """(recipe key, local file or directory) of everything the run reads from disk: data sources and models
    (hub ids, which the cache pins by revision, are not local paths and are skipped)."""
    import glob

    found = [(f"data.{split}", Path(path)) for split in ("train", "eval")
             for source in (getattr(recipe.data, split) or [])
             for path in (sorted(glob.glob(source.path)) if any(c in source.path for c in "*?[") else [source.path])]
    models = [("model.name_or_path", recipe.model.name_or_path), ("model.adapter", recipe.model.adapter)]
    reference = getattr(recipe, "reference", None)
    if reference is not None:
        models.append(("reference.name_or_path", reference.name_or_path))
    for i, term in enumerate(getattr(recipe, "rewards", []) or []):
        models += [(f"rewards[{i}].models", path) for path in term.models]
    found += [(key, Path(value)) for key, value in models if value]
    return [(key, path) for key, path in found if path.exists()]


def input_fingerprint(recipe) -> dict[str, dict]:
    """{path: {"key", "size", "mtime", "digest"}} of every file the run reads (a directory: its data and model
    files), for the checkpoint; compared on resume by content (size and digest), mtime kept for the message."""
    out = {}
    for key, root in input_paths(recipe):
        files = [root] if root.is_file() else [p for p in sorted(root.rglob("*")) if p.is_file()
                                                and p.suffix in MODEL_FILES + (".jsonl", ".parquet", ".csv", ".arrow")
                                                and "archive" not in p.parts and not p.name.startswith(".")]
        for path in files:
            stat = os.stat(path)
            out[str(path.resolve())] = {"key": key, "size": stat.st_size, "mtime": stat.st_mtime,
                                        "digest": remembered_digest(path, stat)}
    return out


DIGESTS = Path.home() / ".cache" / "prefopt" / "digests"


def remembered_digest(path: Path, stat: os.stat_result) -> str:
    """file_digest, remembered by path, size and modification time (ns): a warm start of a run over a large data
    set reads none of it to know it is unchanged (a file rewritten gets a new modification time)."""
    key = hashlib.blake2b(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=16).hexdigest()
    memo = DIGESTS / key
    try:
        return memo.read_text()
    except OSError:
        pass
    digest = file_digest(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only home: computed again next time
        pass
    return digest


def changed_inputs(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """The inputs whose content changed since the checkpoint, or that appeared or went away."""
    out = []
    for path in sorted(set(saved) | set(now)):
        before, after = saved.get(path), now.get(path)
        if before is None or after is None:
            out.append(f"{path} ({(before or after)['key']}) {'appeared' if before is None else 'is gone'}")
        elif (before["size"], before["digest"]) != (after["size"], after["digest"]):
            out.append(f"{path} ({after['key']}) was rewritten ({before['size']} -> {after['size']} bytes)")
    return out
