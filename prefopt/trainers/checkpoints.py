"""Checkpoint files: what counts as complete, and writes that a crash cannot leave half-done."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager
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


@contextmanager
def writing(what: str, where: Path, cleanup: Path | None = None):
    """A failed write (a full disk, an I/O error) as one paragraph: what was being written, where, and for a full
    disk the free space there; `cleanup` (the temporary directory) is removed to give the space back."""
    from prefopt.errors import TrainingError

    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, TrainingError):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "unexpected pos" in text
        existing = next(p for p in (where, *where.parents) if p.exists())
        reason = (f"the disk is full ({shutil.disk_usage(existing).free / 2**20:.1f} MiB free at {existing})" if full
                  else text)
        raise TrainingError(f"writing {what} to {where} failed: {reason}. The previous checkpoints and final/ are "
                            "intact (every write goes to a temporary name first); free space or set output_dir "
                            "elsewhere, then run the same command to resume") from None


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory: a power loss cannot leave them empty once renamed."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


def discard(path: Path) -> None:
    """Delete a checkpoint (or final/) so that no kill leaves it half-deleted under its name: renamed out of
    the complete set first (.deleting-*, which remove_leftovers clears at the next start)."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def remove_leftovers(output_dir: Path) -> None:
    """Directories a crashed write left (.tmp-*, .deleting-*): never complete, removed at the next start."""
    for parent in (output_dir, output_dir / "checkpoints"):
        if parent.is_dir():
            for path in parent.iterdir():
                if path.name.startswith((".tmp-", ".deleting-")) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
