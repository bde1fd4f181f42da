"""Implicit process rewards (Yuan et al. 2024): the implicit_prm_ce loss on outcome labels, and a trained PRM as a
reward term giving each completion token beta * (log pi - log pi_ref)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, write_recipe
from test_ppo import ppo_sections

from prefopt.cli import train_recipe
from prefopt.losses import UnpairedLogps, get_loss
from prefopt.recipe_online import ImplicitPRMConfig, RewardTerm
from prefopt.rewards import RewardTerms


def test_the_cross_entropy_on_outcome_labels_by_hand():
    policy = UnpairedLogps(torch.tensor([-3.0, -5.0]), torch.tensor([3, 4]), torch.tensor([True, False]))
    reference = UnpairedLogps(torch.tensor([-4.0, -4.0]), torch.tensor([3, 4]), torch.tensor([True, False]))
    out = get_loss("implicit_prm_ce").fn(policy, reference, beta=0.5)
    r = torch.tensor([0.5 * 1.0, 0.5 * -1.0])  # beta x summed log-ratio
    assert torch.allclose(out.losses, torch.stack([-F.logsigmoid(r[0]), -F.logsigmoid(-r[1])]))


def test_a_trained_implicit_prm_gives_each_token_beta_times_its_log_ratio(sort_task, tmp_path):
    """An implicit PRM trained (2 steps of implicit_prm_ce on labelled rows) from the task's model; the term's
    per-token rewards against the two models' log-probs computed apart."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (sort_task / "sft.jsonl").read_text().splitlines()[:32]]
    data = Dataset.from_list([{**row, "label": i % 2 == 0} for i, row in enumerate(rows)])
    import prefopt

    prefopt.train(write_recipe(tmp_path / "prm.yaml", sort_task, tmp_path / "prm",
                               loss={"name": "implicit_prm_ce", "beta": 0.5},
                               data={"train": "unused.jsonl", "eval": None}, train={"max_steps": 2},
                               optim={"lr": 1e-2}), train_data=data)
    prm = str(tmp_path / "prm" / "final")
    terms = RewardTerms([RewardTerm(implicit_prm=ImplicitPRMConfig(model=prm, reference=str(sort_task / "model"),
                                                                   beta=0.5))])
    tokenizer = AutoTokenizer.from_pretrained(sort_task / "model")
    prompt, completion = tokenizer("sort: 3 1 2 =>")["input_ids"], tokenizer(" 1 2 3")["input_ids"]
    scores = terms(["sort: 3 1 2 =>"], [" 1 2 3"], [{"prompt": "sort: 3 1 2 =>", "prompt_ids": prompt}],
                   [completion])
    ids = torch.tensor([prompt + completion])
    logps = [torch.log_softmax(AutoModelForCausalLM.from_pretrained(path)(ids).logits[0, -len(completion) - 1:-1],
                               -1).gather(1, ids[0, -len(completion):, None])[:, 0] for path in (prm, sort_task / "model")]
    expected = 0.5 * (logps[0] - logps[1])
    assert torch.allclose(torch.tensor(scores.token[0]), expected, atol=1e-5)
    assert scores.total[0].item() == pytest.approx(expected.sum().item(), abs=1e-5)
    assert expected.abs().max() > 1e-3  # the PRM moved

    sections = ppo_sections(advantage="reinforce_pp", num_mini_batches=1, gamma=0.0, kl_coef=0.0)
    sections["rewards"] = [{"function": "test_ppo:length_score"},
                           {"implicit_prm": {"model": prm, "reference": str(sort_task / "model"), "beta": 0.5}}]
    sections["train"] = {**sections["train"], "max_steps": 2}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    assert "rewards/implicit_prm/mean" in read_metrics(tmp_path / "run")[0]
