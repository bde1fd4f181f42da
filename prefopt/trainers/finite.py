"""A step whose loss or gradient norm is not finite: its update skipped (train.on_nonfinite: skip, counted) or the
run stopped naming the step and the last good checkpoint."""

from __future__ import annotations

import torch

from prefopt.errors import TrainingError
from prefopt.run.checkpoints import last_good


def nonfinite_update(trainer, step: int, loss_finite: torch.Tensor, grad_norm) -> bool:
    """Whether this step's update must be skipped: a loss (on any process) or the gradient norm is not finite.
    train.on_nonfinite: stop raises, naming the step, the metric and the last good checkpoint; skip skips
    (logged) up to train.max_skipped_steps times. The update never reaches the weights, except under DeepSpeed,
    whose engine steps inside backward: there the run stops before anything is saved."""
    acc, train = trainer.accelerator, trainer.recipe.train
    grad_norm = torch.tensor(float(grad_norm), device=acc.device)  # FSDP2 gives a DTensor: a plain value
    flags = acc.reduce(torch.stack([(~loss_finite).float(), (~torch.isfinite(grad_norm)).float()]), "sum")
    if not flags.any():
        return False
    metric = "loss" if flags[0] else f"gradient norm ({float(grad_norm)})"
    trainer.skipped_steps += 1
    applied = acc.distributed_type == "DEEPSPEED"
    if train.on_nonfinite == "skip" and not applied and trainer.skipped_steps <= train.max_skipped_steps:
        acc.print(f"[prefopt] step {step}: non-finite {metric}; update skipped ({trainer.skipped_steps} of at most "
                  f"{train.max_skipped_steps}, train.max_skipped_steps)")
        return True
    good = last_good(trainer.output_dir / "checkpoints")
    last = f"the last good checkpoint is {good}" if good else "no good checkpoint was written before it"
    why = (f"{trainer.skipped_steps - 1} steps were skipped already (train.max_skipped_steps: "
           f"{train.max_skipped_steps})" if train.on_nonfinite == "skip" and not applied
           else "DeepSpeed applied the update inside backward" if applied else "train.on_nonfinite: stop")
    raise TrainingError(f"step {step}: non-finite {metric}, so the run stopped ({why}); nothing from this step "
                        f"was saved and {last}. Lower optim.lr or train.max_grad_norm, check the data near this "
                        "step, or set train.on_nonfinite: skip to skip such steps")
