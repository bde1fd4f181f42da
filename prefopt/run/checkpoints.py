"""Checkpoints: what counts as complete, writes that a crash cannot leave half-done, and a trainer's
checkpoints and final/ saved and resumed (Trainer.save_checkpoint, save_final and _resume call these)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from prefopt import distributed
from prefopt.errors import DataError, TrainingError
from prefopt.recipe import REMEDIES, fingerprint, flatten, identity
from prefopt.run.integrity import FINAL_CHECKSUMS, checksums, mismatches

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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary file


@contextmanager
def writing(what: str, where: Path, cleanup: Path | None = None):
    """A failed write (a full disk, an I/O error) as one paragraph: what was being written, where, and for a full
    disk the free space there; `cleanup` (the temporary directory) is removed to give the space back."""
    from safetensors import SafetensorError  # a full disk inside safetensors' writer is not an OSError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, TrainingError):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        full = (getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "unexpected pos" in text
                or "StorageFull" in str(exc))
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


# ----- a trainer's checkpoints and final model ----------------------------------------------------------


def save(trainer, step: int) -> Path:
    """Write checkpoints/step-N atomically: into a temporary directory, renamed when complete."""
    acc = trainer.accelerator
    check_finite_weights(trainer, f"checkpoint step-{step}")
    root = trainer.output_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    with writing(f"checkpoint step-{step}", root, cleanup=tmp):
        acc.save_state(str(tmp))
    acc.wait_for_everyone()
    extra = {name: obj.state_dict() for name, obj in trainer.checkpointed.items()}  # every process: may gather
    if acc.is_main_process:
        _write(trainer, step, tmp, final, extra)
    acc.wait_for_everyone()
    return final


def stopped_at_bad_row(trainer, stop: Exception, step: int) -> DataError:
    """A stream's bad row reached at `step` (StreamStop), with where the steps trained before it are kept (a
    checkpoint written now where the last one is older)."""
    kept = "nothing was trained before it"
    if step > 1:
        path = trainer.output_dir / "checkpoints" / f"step-{step - 1}"
        if not any(done == step - 1 for done, _ in complete_checkpoints(path.parent)):
            path = trainer.save_checkpoint(step - 1)
        kept = f"the {step - 1} steps trained before it are in {path}, where the same command resumes"
    return DataError(f"{stop}\nThe run stopped before step {step}; {kept}")


def _write(trainer, step: int, tmp: Path, final: Path, extra: dict) -> None:
    """The main process's part: prefopt's own state, then the state file, then the rename; then pruning."""
    root = final.parent
    with writing(f"checkpoint step-{step}", root, cleanup=tmp):
        from safetensors.torch import save_file

        tensors = {name: value for name, value in extra.items()
                   if value and all(isinstance(v, torch.Tensor) for v in value.values())}
        for name, weights in tensors.items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
                      str(tmp / f"{name}.safetensors"))
        write_atomic(tmp / EXTRA_STATE_FILE, json.dumps({k: v for k, v in extra.items() if k not in tensors}))
        fsync_tree(tmp)  # every file on disk before the state file that makes the checkpoint complete
        state = {"step": step, "world_size": trainer.world_size, "seed": trainer.recipe.seed,
                 "fingerprint": fingerprint(trainer.recipe), "recipe": identity(trainer.recipe),
                 "settings": {key: flatten(trainer.recipe.to_dict())[key] for key in REMEDIES},
                 "inputs": trainer.inputs, "files": checksums(tmp, skip=(STATE_FILE,))}
        write_atomic(tmp / STATE_FILE, json.dumps(state) + "\n")
        fsync_dir(tmp)
        if final.exists():
            discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
    _prune(trainer, root)


def _prune(trainer, root: Path) -> None:
    """Keep the newest train.keep_checkpoints. Each goes out of the complete set (renamed) before its files are
    deleted, so a kill mid-way never leaves a half-deleted checkpoint that counts as complete. Checkpoints hold
    finite weights only (check_finite_weights), so the newest finite one is always kept."""
    keep = trainer.recipe.train.keep_checkpoints
    if keep is not None:
        for _, old in complete_checkpoints(root)[:-keep]:
            discard(old)


@torch.no_grad()
def check_finite_weights(trainer, what: str) -> None:
    """Refuse to write `what` from weights that are not all finite (on any process's shards)."""
    bad = sum(int(not torch.isfinite(p).all()) for p in trainer.model.parameters() if p.numel())
    if trainer.accelerator.reduce(torch.tensor(float(bad), device=trainer.accelerator.device), "sum"):
        good = last_good(trainer.output_dir / "checkpoints")
        raise TrainingError(f"the weights hold non-finite values, so {what} was not written"
                            + (f"; the last good checkpoint is {good}" if good else "")
                            + ". Lower optim.lr or train.max_grad_norm")


def incomplete_checkpoints(root: Path) -> list[tuple[Path, str]]:
    """(path, why) of each step-N directory under root that is not a complete checkpoint: its state file is
    missing, empty or unreadable."""
    out = []
    for path in sorted(root.glob("step-*")) if root.is_dir() else []:
        if path.is_dir() and read_state(path) is None:
            state = path / STATE_FILE
            why = ("missing" if not state.exists() else "empty" if state.stat().st_size == 0 else "unreadable")
            out.append((path, f"its {STATE_FILE} is {why}"))
    return out


def verify(path: Path) -> list[str]:
    """What is wrong with a complete checkpoint, or final/: each file that is missing or does not match the
    checksum its state recorded (nothing for one written before checksums were recorded)."""
    if path.name == "final":
        record = path / FINAL_CHECKSUMS
        try:
            expected = json.loads(record.read_text())["files"] if record.exists() else {}
        except (OSError, ValueError, KeyError, TypeError):
            return [f"{FINAL_CHECKSUMS} is unreadable"]
    else:
        expected = (read_state(path) or {}).get("files") or {}
    return mismatches(path, expected)


def last_good(root: Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums."""
    return next((path for _, path in reversed(complete_checkpoints(root)) if not verify(path)), None)


def resume(trainer) -> int:
    """Load the newest checkpoint whose files match their checksums and that loads whole (on every process),
    falling back past corrupt or unreadable ones, each named."""
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    for path, why in incomplete_checkpoints(root):
        acc.print(f"[prefopt] {path} is not a complete checkpoint ({why}); skipped")
    checkpoints = complete_checkpoints(root)
    for step, path in reversed(checkpoints):
        failure = "; ".join(verify(path)) if acc.is_main_process else ""  # every process agrees before loading
        if not acc.reduce(torch.tensor(float(bool(failure)), device=acc.device), "sum"):
            try:
                _load(trainer, path)
            except Exception as exc:  # a truncated or missing file, a planted payload: say which, go back one
                failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not acc.reduce(torch.tensor(float(bool(failure)), device=acc.device), "sum"):
                trainer.resumed_settings = (read_state(path) or {}).get("settings") or {}
                return step
        acc.print(f"[prefopt] checkpoint {path} cannot be loaded ({failure or 'on another process'}); "
                  "falling back to the previous one")
    if checkpoints:
        raise TrainingError(f"no checkpoint in {trainer.output_dir / 'checkpoints'} can be loaded (see above); run "
                            "again with --restart to move them to the archive and start over")
    return 0


def apply_remedies(trainer) -> dict[str, list]:
    """The remedies (optim.lr, train.max_grad_norm) changed since the checkpoint resumed, {key: [old, new]},
    said and applied: a new peak lr rescales the schedule from this step on."""
    now = flatten(trainer.recipe.to_dict())
    saved = getattr(trainer, "resumed_settings", {})
    changed = {key: [saved[key], now[key]] for key in REMEDIES if key in saved and saved[key] != now[key]}
    if "optim.lr" in changed:  # the scheduler's saved base lr is the old one
        trainer.scheduler.base_lrs = [trainer.recipe.optim.lr for _ in trainer.scheduler.base_lrs]
        factor = trainer._lr_factor(trainer.scheduler.last_epoch)
        for group in trainer.scheduler.optimizer.param_groups:
            group["lr"] = trainer.recipe.optim.lr * factor
        trainer.scheduler._last_lr = [group["lr"] for group in trainer.scheduler.optimizer.param_groups]
    if changed:
        said = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        trainer.accelerator.print(f"[prefopt] changed on resume: {said} (recorded in run.json)")
    return changed


def _load(trainer, path: Path) -> None:
    from accelerate.utils import load
    from safetensors.torch import load_file

    # Accelerate skips a missing or unreadable RNG file without a word (and the run then draws other samples);
    # a process the checkpoint did not have (resumed on more processes) starts from the seed, as it says
    rank, saved_world = trainer.accelerator.process_index, (read_state(path) or {}).get("world_size", 1)
    if rank < saved_world:
        load(path / f"random_states_{rank}.pkl")  # weights_only, numpy's state allowed
    else:
        print(f"[prefopt] process {rank}: {path} was written by {saved_world} process(es); its random state "
              "starts from the seed")
    trainer.accelerator.load_state(str(path), **({"strict": False} if trainer.partial_checkpoints else {}))
    saved = json.loads((path / EXTRA_STATE_FILE).read_text())
    for name, obj in trainer.checkpointed.items():
        tensors = path / f"{name}.safetensors"
        if name not in saved and not tensors.exists():
            raise FileNotFoundError(f"{path} holds no state for {name}")
        obj.load_state_dict(load_file(str(tensors)) if name not in saved else saved[name])


def save_final(trainer, extra_files: dict[str, str] | None = None) -> Path:
    """The trained model in Hugging Face format in output_dir/final (with `extra_files`, name -> text),
    written atomically."""
    acc = trainer.accelerator
    check_finite_weights(trainer, "final/")
    final, tmp = trainer.output_dir / "final", trainer.output_dir / ".tmp-final"
    # sharded weights gathered, on every process
    state_dict = acc.get_state_dict(trainer.model) if distributed.shards_parameters(acc) else None
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("final/", trainer.output_dir, cleanup=tmp):
            acc.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state_dict)
            trainer.tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            fsync_tree(tmp)
            write_atomic(tmp / FINAL_CHECKSUMS, json.dumps({"files": checksums(tmp, skip=(FINAL_CHECKSUMS,))}))
            if final.exists():
                discard(final)
            os.replace(tmp, final)
        for name, obj in trainer.checkpointed.items():  # a model trained beside the policy (an online PRM)
            if hasattr(obj, "save_pretrained"):
                done, tmp = trainer.output_dir / name, trainer.output_dir / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                with writing(f"{name}/", trainer.output_dir, cleanup=tmp):
                    obj.save_pretrained(tmp)
                    fsync_tree(tmp)
                    if done.exists():
                        discard(done)
                    os.replace(tmp, done)
    acc.wait_for_everyone()
    return final
