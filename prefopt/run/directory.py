"""Runs that cannot be mixed up or lost: the recipe's fingerprint, the resume check, archiving an old run, and
the lock that keeps a second process out of a live run's directory.

A checkpoint records the fingerprint of the resolved recipe and the recipe itself. Re-running the same recipe
resumes; a recipe that differs in anything but RESUMABLE (what a resume may change: how long to train, how
often to log, evaluate and save) stops before anything loads, naming the changed keys and the ways out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from prefopt.errors import RecipeError
from prefopt.recipe import RESUMABLE, fingerprint, flatten, identity  # noqa: F401 (re-exported)

RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "final", "recipe.yaml", "run.json", "tensorboard",
             "mlruns")  # what archiving moves
LOCK = ".lock"


def source_commit() -> str | None:
    """The git commit of prefopt's own source, when it runs from a checkout (None from an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def check_resume(recipe, restart: bool = False, main: bool = True, log=print) -> None:
    """Before anything loads: archive the old run (restart, or train.resume: false; the main process), or refuse
    to resume a checkpoint of another recipe (every process, so that all stop)."""
    from prefopt.run.checkpoints import complete_checkpoints, read_state
    from prefopt.run.integrity import changed_inputs, input_fingerprint

    out = Path(recipe.output_dir)
    if restart or not recipe.train.resume:
        archived = archive(out) if main else None
        if archived:
            log(f"[prefopt] the previous run in {out} was moved to {archived}; starting over")
        return
    checkpoints = complete_checkpoints(out / "checkpoints")
    if not checkpoints:
        return
    step, path = checkpoints[-1]
    state = read_state(path) or {}
    changed_files = changed_inputs(state["inputs"], input_fingerprint(recipe)) if "inputs" in state else []
    if changed_files:
        raise RecipeError(
            f"{out} holds a run that read other inputs (its checkpoint {path.name}): {'; '.join(changed_files)}. "
            "Resuming would train on different data or weights than the run started with. Put the original files "
            "back, or run again with --restart (or train.resume=false) to move the old run to "
            f"{out / 'archive'} and start over, or set output_dir to a new directory")
    saved = state.get("recipe") or {}
    now = identity(recipe)
    # a key only one side has is a key this version of prefopt added or dropped, not a change of the run
    changed = [f"{key}: {saved[key]!r} -> {now[key]!r}" for key in sorted(set(saved) & set(now))
               if saved[key] != now[key]]
    if not changed:
        return
    raise RecipeError(
        f"{out} holds a run of another recipe (its checkpoint {path.name}); resuming it would mix the two runs. "
        f"Changed: {'; '.join(changed)}. Run again with --restart (or train.resume=false) to move the old run to "
        f"{out / 'archive'} and start over, or set output_dir to a new directory. A resume may change only: "
        f"{', '.join(RESUMABLE)}")


def verify_run(out: Path) -> tuple[str, int]:
    """`prefopt verify RUN`: each checkpoint (complete or not) and final/, checked offline against the checksums
    their state recorded; (the report, how many are bad)."""
    from prefopt.run.checkpoints import complete_checkpoints, incomplete_checkpoints, verify
    from prefopt.run.integrity import FINAL_CHECKSUMS

    if not out.is_dir():
        raise RecipeError(f"{out} is not a run directory")
    lines, bad = [], 0
    for path, why in incomplete_checkpoints(out / "checkpoints"):
        lines.append(f"BAD  {path}: not a complete checkpoint ({why})")
        bad += 1
    parts = [path for _, path in complete_checkpoints(out / "checkpoints")]
    for path in parts + ([out / "final"] if (out / "final").is_dir() else []):
        problems = verify(path)
        unchecked = path.name == "final" and not (path / FINAL_CHECKSUMS).exists()
        bad += bool(problems)
        lines.append(f"BAD  {path}: {'; '.join(problems)}" if problems else
                     f"ok   {path}" + (" (written without checksums: not checked)" if unchecked else ""))
    if not lines:
        lines.append(f"{out} holds no checkpoint and no final/")
    return "\n".join(lines + [f"{bad} bad" if bad else "every checkpoint and final/ match their checksums"]), bad


def check_writable(out: Path) -> None:
    """output_dir is a directory this process can write, and holds nothing but a run's files (a run writes,
    moves and deletes only those: never a file it did not write), checked before anything loads."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir: {out} is a file; give a directory")
    if out.resolve() == Path.cwd().resolve():
        raise RecipeError(f"output_dir: {out} is the current directory; give a directory of its own, e.g. runs/my-run")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    foreign = sorted(name for name in names - set(RUN_FILES) if not name.startswith("."))
    if foreign and not names & {"run.json", "checkpoints", "metrics.jsonl", LOCK}:  # not a run's directory
        raise RecipeError(f"output_dir: {out} holds files that are not a prefopt run's ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); a run would overwrite or move files of the same "
                          "name. Give a new or empty directory")
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"output_dir: cannot write to {out} ({exc.strerror}); give a writable directory") from None


def archive(out: Path) -> Path | None:
    """Move a run's files (checkpoints, metrics, final/, ...) to out/archive/<UTC time>; None if there were none."""
    present = [out / name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    target = out / "archive" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = target.with_name(f"{target.name}-{time.time_ns() % 10**6:06d}")
    target.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(target / path.name))
    return target


class RunLock:
    """output_dir/.lock, held by the process that writes the run (the main process of a launch). A lock whose
    process is gone (a killed run) is taken over; a live one stops the second run with the holder's pid."""

    def __init__(self, out: Path):
        self.path, self.held = Path(out) / LOCK, False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and _alive(holder):
                    raise RecipeError(
                        f"output_dir: {self.path.parent} is being written by a live run (process {holder['pid']} on "
                        f"{holder['host']}, started {holder.get('started', '?')}); wait for it, stop it, or use "
                        f"another output_dir. If that process is gone, delete {self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RecipeError(f"output_dir: could not take the lock {self.path}; another run is starting there")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a run killed while writing it

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so never taken over silently
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def stop_signals(on_signal):
    """Within the block, SIGTERM and SIGINT (what SLURM, Kubernetes and Ctrl-C send) call on_signal(signum), so
    that the run can checkpoint and stop at the end of its step; a second signal exits at once. Off the main
    thread (where signals cannot be handled) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received:
            os._exit(128 + signum)
        received.append(signum)
        on_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
