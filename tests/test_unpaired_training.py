"""Training on unpaired rows: KTO and BCO from pairs, SFT from prompt/completion rows, and the errors."""

import json
import math

import pytest
from conftest import assert_resume_matches, read_metrics, write_recipe
from test_loss_recipes import live_models

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import DataError, RecipeError
from prefopt.trainers import PreferenceTrainer


def test_kto_trains_on_pairs_split_into_rows(sort_task, tmp_path):
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, loss={"name": "kto", "beta": 0.1},
                              train={"max_steps": 3}))
    info = json.loads((out / "run.json").read_text())
    assert info["train_examples"] == 2 * 256 and info["eval_examples"] == 48  # rows to train, pairs to evaluate
    first, last = read_metrics(out, "eval")
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigma(0) for every row at policy == reference
    assert first["rewards/accuracy"] == 0.5 and "rewards/margin" in first
    assert last["loss"] < 0.5 and last["rewards/accuracy"] > 0.75
    assert "rewards/accuracy" not in read_metrics(out)[0]  # shuffled training rows carry no pairs


def test_sft_on_prompt_completion_rows(sort_task, tmp_path):
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, loss={"name": "sft"},
                              data={"train": str(sort_task / "sft.jsonl")}, train={"max_steps": 3}))
    assert json.loads((out / "run.json").read_text())["train_examples"] == 256
    train = read_metrics(out)
    assert train[-1]["loss"] < train[0]["loss"] and math.isnan(train[0].get("logps/per_token_rejected", math.nan))
    assert "logps/per_token_accuracy" in read_metrics(out, "eval")[0]  # the eval set is pairs


def test_pair_loss_on_unpaired_rows_fails_before_any_model_loads(sort_task, tmp_path):
    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                          data={"train": str(sort_task / "sft.jsonl")}))
    before = live_models()
    with pytest.raises(DataError, match=r"data.train\[0\] \(.*sft.jsonl\) holds unpaired rows .* use an unpaired "
                                        r"loss \(kto, bco, sft\)"):
        PreferenceTrainer(recipe)
    assert live_models() == before


@pytest.mark.parametrize("sections,message", [
    ({"loss": [{"name": "dpo"}, {"name": "kto"}]}, "mixes losses on pairs and on unpaired rows"),
    ({"loss": {"name": "kto"}, "train": {"batch_size": 8, "micro_batch_size": 1}},
     "train.micro_batch_size: must be at least 2 for a loss with a KL reference point"),
    ({"loss": {"name": "kto", "desirable_wieght": 2}}, "did you mean 'desirable_weight'"),
])
def test_unpaired_recipe_errors(sort_task, tmp_path, sections, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


def test_bco_reward_shift_is_restored_on_resume(sort_task, tmp_path):
    """4 steps straight, against 2 steps, then the same recipe continued to 4 from the step-2 checkpoint.
    The running reward shift enters every loss, so a shift not restored would change steps 3 and 4."""
    assert_resume_matches(sort_task, tmp_path, loss={"name": "bco", "beta": 0.5},
                          optim={"schedule": "constant", "warmup_steps": 0, "lr": 1e-3},
                          train={"micro_batch_size": 4})
