"""Where reference log-probs come from (recipe `reference.kind`):

- copy: a frozen model of its own (PreferenceTrainer keeps it; TR-DPO can mix the policy into it);
- adapter_off: the LoRA policy itself with its adapter disabled, one set of base weights in memory;
- precomputed: computed once before training, cached on disk under a fingerprint of the reference
  weights, the tokenized data and the precision, reused while all three stay the same;
- none: reference-free losses.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # weights, their index, config and adapter config


@contextmanager
def adapter_disabled(model, peft_model):
    """Run `model` (possibly wrapped for DDP) as its base: adapter off, evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        model.train(was_training)


def reference_logps(kind: str, model, reference, accelerator, logps):
    """The reference's log-probs, wherever reference.kind (`kind`) says they come from, without gradients and
    in the run's precision: `logps(reference)` for a frozen copy, `logps(model)` with the LoRA adapter disabled for
    adapter_off, None for none. (precomputed values travel in the batch: the caller reads them there.)"""
    if kind == "none":
        return None
    with torch.no_grad(), accelerator.autocast():
        if kind == "adapter_off":
            unwrapped = accelerator.unwrap_model(model)
            with adapter_disabled(model, getattr(unwrapped, "policy", unwrapped)):  # the policy of a value head
                return logps(model)
        return logps(reference)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float, accelerator) -> None:
    """TR-DPO soft update (Gorbatovski et al. 2024, Eq. 4): reference <- alpha * policy + (1 - alpha) * reference.
    Pair by pair: whole, or shards laid out alike (FSDP2), or gathered for the update (ZeRO-3)."""
    from prefopt import distributed

    for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
        with (distributed.gathered([param], accelerator),
              distributed.gathered([ref_param], accelerator, modifier_rank=0)):
            ref_param.data.lerp_(param.data.to(ref_param.dtype), alpha)


def source_dirs(name_or_path: str) -> Path:
    """The directory a model was loaded from: a local directory, or the hub snapshot in the local cache."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path))


def cache_key(sources: list[str], examples: list[dict], precision: str) -> str:
    """Hash of the reference's files (content), the tokenized examples and the precision."""
    digest = hashlib.blake2b(digest_size=16)
    for source in sources:
        for path in sorted(source_dirs(source).rglob("*")):
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                digest.update(path.name.encode())
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
    known = examples.content_key() if hasattr(examples, "content_key") else None
    if known is not None:  # Arrow rows: their cache's fingerprint and index, no row read
        digest.update(known)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "completion_mask")
    for ex in examples if known is None else ():
        digest.update(json.dumps([ex.get(k) for k in keys]).encode())
    digest.update(precision.encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_logps(model, examples: list[dict], chunks, collate, logps, accelerator) -> list[list[float]]:
    """Each example's reference log-probs: [chosen, rejected] for a pair, [logps] for a row.

    `chunks` is this process's share of the examples as `Trainer.eval_chunks` yields it (every process runs as
    many batches, since a sharded model gathers in lockstep); the results are gathered, so every process gets
    all of them.
    """
    from accelerate.utils import gather_object

    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))  # eval_chunks' share
    values = []
    for chunk, counts in chunks:
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk).items()}
        with accelerator.autocast():
            out = logps(model, batch)
        if counts:
            rows = torch.stack([out.chosen, out.rejected], 1) if hasattr(out, "chosen") else out.logps[:, None]
            values.extend(rows.float().tolist())
    gathered = gather_object(list(zip(mine, values))) if accelerator.num_processes > 1 else list(zip(mine, values))
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(examples))]


def load_cached(path: Path, n: int) -> list[list[float]] | None:
    if not path.exists():
        return None
    try:
        values = torch.load(path, weights_only=True)  # tensors only: a planted payload is refused, never run
    except Exception as exc:
        print(f"[prefopt] ignoring the unreadable reference cache {path} ({type(exc).__name__}); computing it again")
        return None
    return values.tolist() if len(values) == n else None


def save_cached(path: Path, values: list[list[float]]) -> None:
    """Atomically: a crash never leaves a half-written cache that a later run would trust; a failed write (a full
    disk) is one message and leaves no temporary file."""
    from prefopt.run.checkpoints import writing

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with writing("the reference log-probs cache", path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.tensor(values, dtype=torch.float64), tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def attach(examples: list[dict], values: list[list[float]]) -> None:
    """Store each example's reference log-probs on it, for the collators to batch."""
    from prefopt.data import Rows

    if isinstance(examples, Rows):  # read from Arrow: attached by position, all pairs or all rows
        columns = zip(*values, strict=True)
        for name, column in zip(("ref_chosen", "ref_rejected") if "chosen_ids" in examples.columns else
                                ("ref_logps",), columns, strict=True):
            examples.attach(name, list(column))
        return
    for ex, value in zip(examples, values, strict=True):
        if "chosen_ids" in ex:
            ex["ref_chosen"], ex["ref_rejected"] = value
        else:
            (ex["ref_logps"],) = value
