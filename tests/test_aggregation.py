"""Aggregation follows the global batch: token-mean terms (SFT, RPO's and ORPO's NLL, SimPO's sft_weight) are
normalised by the token count of the whole global batch, so micro-batch size, accumulation and length grouping
leave the loss and the gradient unchanged (two processes: test_distributed.py)."""

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import train_recipe
from prefopt.trainers.preference import PreferenceTrainer

LOSSES = {"sft": {"name": "sft"}, "rpo": {"name": "rpo", "beta": 0.1, "alpha": 1.0},
          "orpo": {"name": "orpo", "beta": 0.1}, "simpo_sft": {"name": "simpo", "sft_weight": 1.0}}
CUTS = {"8x1": {"micro_batch_size": 8}, "2x4": {"micro_batch_size": 2},
        "2x4-ungrouped": {"micro_batch_size": 2, "group_by_length": False}}


def trajectory(sort_task, tmp_path, loss, name, **train):
    out = tmp_path / f"{loss['name']}-{name}"
    train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, out, loss=loss,
                              optim={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
                              train={"batch_size": 8, "max_steps": 5, **train}))
    return [value for r in read_metrics(out) for value in (r["loss"], r["grad_norm"])]


@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
def test_micro_batches_and_grouping_leave_the_trajectory_unchanged(sort_task, tmp_path, loss):
    runs = {name: trajectory(sort_task, tmp_path, LOSSES[loss], name, **cut) for name, cut in CUTS.items()}
    for name, values in runs.items():
        assert values == pytest.approx(runs["8x1"], abs=1e-5, rel=2e-6), name  # fp32 summation order


def test_a_per_micro_batch_mean_fails_the_check(sort_task, tmp_path, monkeypatch):
    """The check above can fail: without the global normaliser each micro-batch divides by its own tokens."""
    whole = trajectory(sort_task, tmp_path, LOSSES["sft"], "8x1", micro_batch_size=8)
    monkeypatch.setattr(PreferenceTrainer, "global_batch_values", lambda self, examples: {})
    cut = trajectory(sort_task, tmp_path, LOSSES["sft"], "2x4", micro_batch_size=2)
    assert max(abs(a - b) for a, b in zip(whole, cut)) > 1e-4
