"""method online: preference losses on the policy's own samples (online and iterative DPO, SPPO): pairs and win
rates by hand, the SPPO loss by hand, runs, resume, and recipe errors (two processes: test_distributed; the
vLLM engine: test_vllm)."""

import math

import pytest
import torch
from conftest import assert_resume_matches, read_metrics, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import RecipeError
from prefopt.losses import GroupLogps, PairLogps, get_loss
from prefopt.online.pairs import bradley_terry, make_pairs, win_rates


def length_score(prompts, completions):
    """A score the tiny random model's samples differ in: longer completions score higher."""
    return [len(c) / 10 for c in completions]


def prefer_longer(prompts, a, b):
    """A pairwise judge: P(a beats b) from the lengths."""
    return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


def online_sections(loss=None, **pairs):
    return dict(method="online", data={"eval": None}, loss=loss or {"name": "dpo", "beta": 0.1},
                rewards={"function": "test_online:length_score"},
                rollout={"samples_per_prompt": 4, "max_new_tokens": 8}, pairs=pairs,
                train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "log_every": 1})


def test_pairs_by_hand():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0],    # best 1, worst 3
                           [2.0, 2.0, 2.0, 2.0],    # a tie: no pair
                           [0.0, 1.0, 1.0, 0.5]])   # best: the first of the equals (1), worst 0
    chosen, rejected, valid, ties = make_pairs(scores, "best_worst")
    assert chosen.flatten().tolist() == [1, 0, 1] and rejected.flatten().tolist() == [3, 0, 0]
    assert valid.flatten().tolist() == [True, False, True] and ties == 1
    # a gap must exceed min_gap: the third group's gap is 1
    assert make_pairs(scores, "best_worst", min_gap=1.0)[2].flatten().tolist() == [True, False, False]
    # every pair (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) of the first group, gaps 2 1 1 1 3 2, above 1.5
    chosen, rejected, valid, ties = make_pairs(scores[:1], "all", min_gap=1.5)
    assert chosen[0].tolist() == [1, 2, 0, 1, 1, 2] and rejected[0].tolist() == [0, 0, 3, 2, 3, 3]
    assert valid[0].tolist() == [True, False, False, False, True, True] and ties == 3
    assert make_pairs(scores[1:2], "all")[3] == 6  # equal scores: every slot a tie


def test_win_rates_by_hand():
    scores = torch.tensor([[0.0, math.log(3.0), 0.0]])
    preference = bradley_terry(scores)  # P(1 > 0) = sigmoid(ln 3) = 3/4
    assert preference[0, 1, 0].item() == pytest.approx(0.75) and preference[0, 0, 2].item() == pytest.approx(0.5)
    # sample 0: (P(0>1) + P(0>2)) / 2 = (1/4 + 1/2) / 2; sample 1: (3/4 + 3/4) / 2
    assert win_rates(preference)[0].tolist() == pytest.approx([0.375, 0.75, 0.375])


def test_sppo_loss_by_hand():
    """(log-ratio - (P - 1/2) / beta)^2 per sample; with win rates 1 and 0 it is sppo_hard on the pair."""
    sppo = get_loss("sppo").fn
    policy, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # log-ratios 0.5, -1
    out = sppo(GroupLogps(policy, torch.ones(2), torch.tensor([0.75, 0.25])), GroupLogps(reference, torch.ones(2),
               torch.tensor([0.75, 0.25])), beta=0.5)  # targets (0.25) / 0.5 = 0.5 and -0.5
    assert out.losses.tolist() == pytest.approx([0.0, 0.25])
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    hard = get_loss("sppo_hard").fn(PairLogps(policy[:1], policy[1:], torch.ones(1), torch.ones(1)),
                                    PairLogps(reference[:1], reference[1:], torch.ones(1), torch.ones(1)), beta=0.5)
    group = sppo(GroupLogps(policy, torch.ones(2), torch.tensor([1.0, 0.0])),
                 GroupLogps(reference, torch.ones(2), torch.tensor([1.0, 0.0])), beta=0.5)
    assert group.losses.sum().item() == pytest.approx(hard.losses.item())


@pytest.mark.parametrize("case", ["dpo", "dpo-all-pairs", "ipo-judge", "sppo", "iterative"])
def test_online_runs_train_on_their_own_samples(sort_task, tmp_path, case):
    sections = {"dpo": online_sections(), "dpo-all-pairs": online_sections(select="all", min_gap=0.05),
                "ipo-judge": online_sections({"name": "ipo", "beta": 0.1}, judge="test_online:prefer_longer"),
                "sppo": online_sections({"name": "sppo", "beta": 1.0}),
                "iterative": {**online_sections(), "reference": {"kind": "copy", "sync_every": 2, "sync_alpha": 1.0}}
                }[case]
    if case == "dpo-all-pairs":  # 6 pair slots per prompt
        sections["train"] = {**sections["train"], "batch_size": 12, "micro_batch_size": 6}
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, **sections))
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    slots = 12 if case == "dpo-all-pairs" else 8
    if case != "sppo":
        assert all(r["pairs/real"] + r["pairs/ties"] == slots for r in train)
        assert sum(r["pairs/real"] for r in train) > 0 and "rewards/accuracy" in train[0]
    else:
        assert 0 <= train[0]["sppo/win_rate"] <= 1
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 4] and "score" in evals[0] and evals[0]["kl"] == pytest.approx(0, abs=1e-4)
    assert (out / "samples.jsonl").exists() and (out / "final" / "README.md").exists()
    if case == "dpo":  # the plot draws reward against KL; prefopt eval scores the final policy through the sampler
        from prefopt.evaluation import evaluate_run
        from prefopt.plotting import plot_runs

        fig = plot_runs([out])
        assert "over-optimisation frontier" in [ax.get_title() for ax in fig.axes if ax.get_visible()]
        report = evaluate_run(out, str(sort_task / "eval.jsonl"))
        assert report["prompts"] == 48 and report["score"] == pytest.approx(evals[-1]["score"])
        assert report["kl"] == pytest.approx(evals[-1]["kl"], abs=1e-5)


def test_online_dpo_resumes_exactly(sort_task, tmp_path):
    """Stopped at step 2 and resumed: the same prompts and samples (drawn by (seed, step, global row)), so the
    same losses; iterative rounds restore the refreshed reference."""
    sections = online_sections()
    sections["reference"] = {"kind": "copy", "sync_every": 3, "sync_alpha": 1.0}
    sections["train"] = {**sections["train"], "save_every": 2}
    assert_resume_matches(sort_task, tmp_path, **sections)


@pytest.mark.parametrize("sections, message", [
    (online_sections({"name": "kto"}), "method online trains pair losses .* or a group loss"),
    (online_sections([{"name": "sppo"}, {"name": "dpo"}]), "a group loss \\(sppo\\) trains alone"),
    ({**online_sections(), "rollout": {"samples_per_prompt": 1}}, "at least 2 samples per prompt"),
    ({**online_sections(), "rewards": []}, "give at least one term"),
    ({**online_sections(), "pairs": {"min_gap": -1}}, "pairs.min_gap: must be >= 0"),
])
def test_online_recipe_errors(sort_task, tmp_path, sections, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


def test_online_layout_errors(sort_task, tmp_path):
    sections = online_sections(select="all")  # 6 slots per prompt: 8 is not a multiple
    with pytest.raises(RecipeError, match=r"train.batch_size \(8\) must be a multiple of the 6 pairs"):
        train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    with pytest.raises(RecipeError, match="takes groups of the policy's own samples: use method: online"):
        recipe_lib.load(write_recipe(tmp_path / "p.yaml", sort_task, tmp_path / "p", loss={"name": "sppo"}))
