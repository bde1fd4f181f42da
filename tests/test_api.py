"""The Python API: prefopt.train on a path, a dict or a Recipe, with in-memory datasets; the README's example
runs as written; a per-example-weight DPO is a short subclass reading an extra column; prefopt eval on a
policy run reproduces the run's last eval."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, write_recipe

import prefopt
from prefopt.cli import main
from prefopt.losses.preference import dpo_loss
from prefopt.trainers import PreferenceTrainer
from prefopt.trainers.preference import pair_logps

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_example_runs(sort_task, tmp_path, monkeypatch):
    (block,) = re.findall(r"```python\n(import prefopt\n.*?)```", README.read_text(), re.S)
    monkeypatch.chdir(tmp_path)  # where the quickstart's assets and recipes are, as after `prefopt quickstart`
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart-assets").symlink_to(sort_task, target_is_directory=True)
    (tmp_path / "recipes").symlink_to(README.parent / "recipes", target_is_directory=True)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["evals"][-1]["rewards/accuracy"] >= 0.5 and namespace["evals"][0]["step"] == 0


class WeightedDPO(PreferenceTrainer):
    """DPO with a per-pair weight from the data's `weight` column (data.extra_columns: [weight])."""

    def compute_loss(self, batch):
        policy = pair_logps(self.model, batch, self.chunk_size)
        reference = self.reference_logps(batch, policy, self.logps_function())
        out = dpo_loss(policy, reference, beta=0.1)
        margin = out.chosen_rewards - out.rejected_rewards
        return (batch["weight"] * out.losses).mean(), {"rewards/margin": margin, "weight": batch["weight"]}


def test_a_weighted_dpo_from_an_in_memory_dataset(sort_task, tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (sort_task / "train.jsonl").read_text().splitlines()[:32]]
    data = Dataset.from_list([{**r, "weight": float(i % 2)} for i, r in enumerate(rows)])
    recipe = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                          data={"train": "unused.jsonl", "eval": None, "extra_columns": ["weight"]},
                          train={"max_steps": 2})
    evals = prefopt.train(recipe, train_data=data, trainer=WeightedDPO)
    assert evals == []  # no eval set
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and 0 < records[0]["weight"] < 1
    # step 1: policy == reference, so every pair's DPO loss is ln 2, weighted by the batch's weights
    assert records[0]["loss"] == pytest.approx(records[0]["weight"] * torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    with pytest.raises(Exception, match="in-memory dataset"):
        prefopt.train(prefopt.load_recipe(tmp_path / "run" / "recipe.yaml", output_dir=str(tmp_path / "b")))


def test_prefopt_eval_on_a_policy_run_repeats_its_last_eval(sort_task, tmp_path, capsys):
    out = tmp_path / "run"
    write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 3})
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(sort_task / "eval.jsonl"), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    last = read_metrics(out, "eval")[-1]
    assert report["pairs"] == 48
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert report[key] == pytest.approx(last[key], abs=1e-5), key
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "recipe.yaml").write_text("method: rl\n")
    assert main(["eval", str(tmp_path / "rl"), "--data", str(sort_task / "eval.jsonl")]) == 2
    assert "has no final/ yet: the run has not finished" in capsys.readouterr().err  # online runs: test_online
