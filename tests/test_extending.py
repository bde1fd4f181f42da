"""The worked examples of docs/extending.md, run as they are written there: each code block becomes a module, and
its trainer trains a few steps of the sorting task; the run's recipe.yaml names the class by its import path."""

import importlib
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, write_recipe
from test_online import online_sections
from test_ppo import ppo_sections

import prefopt

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = dict(re.findall(r"```python\n# example: (\w+)\n(.*?)```", DOC.read_text(), re.S))


@pytest.fixture
def examples(tmp_path, monkeypatch):
    folder = tmp_path / "examples"
    folder.mkdir()
    for name, code in BLOCKS.items():
        (folder / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    return {name: importlib.import_module(name) for name in BLOCKS}


def test_every_trainer_kind_has_a_worked_example():
    assert set(BLOCKS) == {"confidence_dpo", "quality_sft", "margin_rm", "clipped_grpo", "normalised_online_dpo"}


def run(path: Path, trainer, **kwargs) -> list[dict]:
    prefopt.train(path, trainer=trainer, **kwargs)
    out = Path(yaml.safe_load(path.read_text())["output_dir"])
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"] == f"{trainer.__module__}:{trainer.__name__}"
    return read_metrics(out)


def test_confidence_weighted_dpo(examples, sort_task, tmp_path):
    records = run(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 2}),
                  examples["confidence_dpo"].ConfidenceWeightedDPO)
    assert 0 < records[0]["pair_weight"] < 1
    assert records[0]["loss"] == pytest.approx(math.log(2) * records[0]["pair_weight"], abs=1e-5)


def test_quality_weighted_sft_with_unit_weights_is_sft(examples, sort_task, tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (sort_task / "sft.jsonl").read_text().splitlines()[:64]]
    data = Dataset.from_list([{**row, "quality": 1.0} for row in rows])
    sections = dict(method="sft", loss={"name": "sft"}, data={"train": "unused.jsonl", "eval": None,
                                                              "extra_columns": ["quality"]},
                    train={"max_steps": 3, "micro_batch_size": 4})
    weighted = run(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections),
                   examples["quality_sft"].QualityWeightedSFT, train_data=data)
    prefopt.train(write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections), train_data=data)
    plain = read_metrics(tmp_path / "b")
    for a, b in zip(weighted, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5)
        assert a["logps/per_token"] == pytest.approx(b["logps/per_token"], abs=1e-6)


def test_margin_reward_model(examples, sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss={"name": "bradley_terry"},
                        train={"max_steps": 6}, optim={"lr": 3e-3})
    records = run(path, examples["margin_rm"].MarginRewardModel)
    assert records[-1]["loss"] < records[0]["loss"] and "rewards/accuracy" in records[0]


def test_clipped_advantage_grpo(examples, sort_task, tmp_path):
    sections = ppo_sections(advantage="grpo", num_mini_batches=1)
    records = run(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections),
                  examples["clipped_grpo"].ClippedAdvantageGRPO)
    assert all(r["advantages/max_abs"] <= 0.5 for r in records)
    assert any(r["advantages/max_abs"] == pytest.approx(0.5) for r in records)  # the clip bit


def test_length_normalised_online_dpo(examples, sort_task, tmp_path):
    records = run(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **online_sections()),
                  examples["normalised_online_dpo"].LengthNormalisedOnlineDPO)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its reference at step 1
