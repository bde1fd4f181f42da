"""What makes a run what it is: the resolved recipe flattened, less what a resume may change (RESUMABLE); its
fingerprint names the default output_dir, and a checkpoint stores its identity (prefopt.run.directory compares
them on resume)."""

from __future__ import annotations

import hashlib
import json

RESUMABLE = (
    "output_dir", "train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.progress_bar", "train.resume", "train.eval_batch_size",
    "train.on_nonfinite", "train.max_skipped_steps", "data.num_proc", "log.to", "log.project", "log.run_name",
    "log.quiet", "eval.generate", "eval.max_new_tokens", "eval.rewards", "optim.lr", "train.max_grad_norm",
    "data.on_bad_row",
)
# the remedies of a non-finite stop: they may change on resume, and each change is recorded in run.json
REMEDIES = ("optim.lr", "train.max_grad_norm", "data.on_bad_row")  # data.on_bad_row: a stream past a bad row


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and scalars are leaves."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity(recipe) -> dict[str, object]:
    """The keys that make a run what it is: the flattened resolved recipe without RESUMABLE, as JSON values (what a
    checkpoint stores, so that a saved identity and a new one compare as they are)."""
    return json.loads(json.dumps({k: v for k, v in flatten(recipe.to_dict()).items() if k not in RESUMABLE},
                                 default=str))


def fingerprint(recipe) -> str:
    return hashlib.sha256(json.dumps(identity(recipe), sort_keys=True).encode()).hexdigest()
