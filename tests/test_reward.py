"""Reward models: the loss against TRL and by hand, training to high held-out accuracy, saved models
that score as in training, ensembles, and pair labelling."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, write_recipe
from trl_oracle import trl_reward_loss

from prefopt.cli import main, train_recipe
from prefopt.data.synthetic import sort_score
from prefopt.labeling import best_vs_worst, label_file
from prefopt.losses import PairRewards
from prefopt.losses.reward import bradley_terry_loss
from prefopt.scoring import RewardScorer, evaluate_reward_model


def test_bradley_terry_hand_derived():
    """r_c = 2, r_r = 1, margin 0.5: -log sigma(0.5) = 0.4740769842; centering 0.1 * (2 + 1)^2 = 0.9."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    plain = bradley_terry_loss(PairRewards(t([2.0]), t([1.0])))
    assert plain.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    out = bradley_terry_loss(PairRewards(t([2.0]), t([1.0]), t([0.5])), center_coef=0.1)
    assert out.losses.item() == pytest.approx(0.4740769842 + 0.9, abs=1e-9)


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_bradley_terry_matches_trl(margin, center):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    m = torch.rand(7, generator=g, dtype=torch.float64) if margin else None
    ours = bradley_terry_loss(PairRewards(chosen, rejected, m), center_coef=center or 0.0).losses.mean()
    assert ours.item() == pytest.approx(trl_reward_loss(chosen, rejected, m, center).item(), abs=1e-10)


@pytest.fixture(scope="module")
def reward_runs(sort_task, tmp_path_factory):
    """Two small reward models on the session's task (different seeds: an ensemble's members)."""
    root = tmp_path_factory.mktemp("rm")
    runs = []
    for seed in (0, 1):
        out = root / f"rm{seed}"
        train_recipe(write_recipe(root / f"r{seed}.yaml", sort_task, out, seed=seed,
                                  loss={"name": "bradley_terry", "center_coef": 0.01},
                                  train={"max_steps": 40, "batch_size": 16, "micro_batch_size": 16}))
        runs.append(out)
    return runs


def test_saved_reward_model_scores_as_in_training(sort_task, reward_runs):
    from transformers import AutoModelForSequenceClassification

    run = reward_runs[0]
    last = read_metrics(run, "eval")[-1]
    assert last["rewards/accuracy"] > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    report = evaluate_reward_model(run, str(sort_task / "eval.jsonl"))
    assert report["pairs"] == 48
    for key in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/std", "rewards/ties"):
        assert report[key] == pytest.approx(last[key], abs=1e-5), key  # one name per quantity, trained or evaluated
    stats = json.loads((run / "final" / "reward_normalization.json").read_text())
    assert stats["mean"] == pytest.approx(report["rewards/mean"], abs=1e-5) and stats["completions"] == 96


def test_ensemble_aggregates_on_a_fixed_batch(sort_task, reward_runs):
    """Fixed member scores [[1, 2, 3], [3, 2, -1]]: mean [2, 2, 1]; worst case [1, 2, -1]; population std
    [1, 0, 2], so mean - 0.5 std = [1.5, 2, 0]. Then the same on two real reward models."""
    scores = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, -1.0]])
    expected = {"mean": [2.0, 2.0, 1.0], "min": [1.0, 2.0, -1.0], "mean_minus_std": [1.5, 2.0, 0.0]}
    for aggregate, values in expected.items():
        assert RewardScorer(lambda p, c: [0.0] * len(p), aggregate, std_coef=0.5).combine(scores).tolist() == values
    rows = [json.loads(line) for line in (sort_task / "eval.jsonl").read_text().splitlines()[:6]]
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    members = torch.stack([RewardScorer(run)(prompts, completions) for run in reward_runs])  # (2, 6)
    assert not torch.allclose(members[0], members[1])
    for aggregate, std_coef in (("mean", 1.0), ("min", 1.0), ("mean_minus_std", 0.7)):
        ensemble = RewardScorer(reward_runs, aggregate, std_coef=std_coef)(prompts, completions)
        by_hand = {"mean": members.mean(0), "min": members.min(0).values,
                   "mean_minus_std": members.mean(0) - 0.7 * (members - members.mean(0)).pow(2).mean(0).sqrt()}
        assert torch.allclose(ensemble, by_hand[aggregate], atol=1e-5), aggregate
    normalized = RewardScorer(reward_runs[0], normalize=True)(prompts, completions)
    stats = json.loads((reward_runs[0] / "final" / "reward_normalization.json").read_text())
    assert torch.allclose(normalized, (members[0] - stats["mean"]) / stats["std"], atol=1e-5)


def test_labelling_best_vs_worst_with_a_verifier(sort_task, tmp_path):
    rows = [json.loads(line) for line in (sort_task / "eval.jsonl").read_text().splitlines()[:5]]
    inputs = tmp_path / "rows.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]]}) + "\n"
                              for r in rows) + json.dumps({"prompt": "sort: 2 1 =>", "completions": [" 2 1", " 1"]}) + "\n")
    args = SimpleNamespace(input=str(inputs), out=str(tmp_path / "pairs.jsonl"), reward=[], aggregate="mean",
                           verifier="prefopt.data.synthetic:sort_scores", std_coef=1.0, policy=None)
    summary = label_file(args)
    assert "wrote 5 pairs" in summary and "1 prompts skipped" in summary
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [r["chosen"] for r in rows]
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
    scorer = RewardScorer(lambda prompts, completions: [sort_score(p, c) for p, c in zip(prompts, completions)])
    assert best_vs_worst(["sort: 3 1 =>"], [[" 3 1", " 1 3"]], scorer)[0][0]["chosen"] == " 1 3"


def test_lora_reward_model_trains_its_head_and_merges(sort_task, tmp_path):
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, model={"lora": {"r": 4, "alpha": 8}},
                              loss={"name": "bradley_terry"}, optim={"lr": 1e-2}, train={"max_steps": 3}))
    assert main(["merge", str(out)]) == 0
    lora, merged = evaluate_reward_model(out, str(sort_task / "eval.jsonl")), evaluate_reward_model(
        out / "merged", str(sort_task / "eval.jsonl"))
    assert merged["rewards/margin"] == pytest.approx(lora["rewards/margin"], abs=1e-5)
    assert (out / "merged" / "reward_normalization.json").exists()


def test_scorer_scores_empty_completions(reward_runs):
    """A sampled completion can be EOS alone, which decodes to "": it is scored (prompt + EOS), not refused."""
    scores = RewardScorer(reward_runs[0])(["sort: 2 1 =>", "sort: 2 1 =>"], ["", " 1 2"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
