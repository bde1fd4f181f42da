"""Checkpoint files: what counts as complete, and writes that a crash cannot leave half-done."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
EXTRA_STATE_FILE = "prefopt_state.json"  # Trainer.checkpointed: schedule, KL controller, running means


def read_state(path: Path) -> dict | None:
    """A checkpoint's trainer state, or None if it is missing or unreadable (a checkpoint cut short)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints under root that were completely written, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith("step-") and (state := read_state(path)) is not None:
            found.append((state["step"], path))
    return sorted(found)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):x}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
