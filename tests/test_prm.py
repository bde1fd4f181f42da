"""Implicit process rewards (Yuan et al. 2024): the implicit_prm_ce loss on outcome labels, and a trained PRM as a
reward term giving each completion token beta * (log pi - log pi_ref)."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
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
    """An implicit PRM trained (method reward, reward.kind implicit_prm: 2 steps of implicit_prm_ce on labelled
    rows) from the task's model; the term's per-token rewards against the two models' log-probs computed apart."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (sort_task / "sft.jsonl").read_text().splitlines()[:32]]
    data = Dataset.from_list([{**row, "label": i % 2 == 0} for i, row in enumerate(rows)])
    import prefopt

    prefopt.train(write_recipe(tmp_path / "prm.yaml", sort_task, tmp_path / "prm", method="reward",
                               reward={"kind": "implicit_prm"}, loss={"name": "implicit_prm_ce", "beta": 0.5},
                               data={"train": "unused.jsonl", "eval": None}, train={"max_steps": 2},
                               optim={"lr": 1e-2}), train_data=data)
    prm = str(tmp_path / "prm" / "final")
    saved = yaml.safe_load((tmp_path / "prm" / "recipe.yaml").read_text())
    assert (saved["method"], saved["reward"], saved["reference"]["kind"]) == ("reward", {"kind": "implicit_prm"}, "copy")
    assert "AutoModelForCausalLM" in (tmp_path / "prm" / "final" / "README.md").read_text()
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


def long_enough(completions, **kwargs):
    """An outcome label the tiny policy can earn: 1 for a completion longer than 8 characters, else 0."""
    return [float(len(c) > 8) for c in completions]


def fixed_labels(completions, **kwargs):
    return [1.0, 0.0, None][: len(completions)]


def prm_term(prm, reference, **config):
    return {"implicit_prm": {"model": str(prm), "reference": str(reference), "beta": 0.5, "online_update": True,
                             "lr": 1e-2, **config}}


@pytest.fixture(scope="module")
def prm_model(sort_task, tmp_path_factory):
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tiny_model

    return build_tiny_model(AutoTokenizer.from_pretrained(sort_task / "model"), tmp_path_factory.mktemp("prm"), seed=7)


@pytest.mark.parametrize("update", ["before", "after"])
def test_primes_online_update_is_one_adamw_step_of_the_cross_entropy_by_hand(sort_task, prm_model, update):
    """Three completions labelled 1, 0 and None (skipped): the PRM after a training call equals a copy stepped by
    hand (plain forwards of each completion alone, -[y log sigma(r) + (1-y) log(1 - sigma(r))] averaged over the
    two labelled, clipped at 10, AdamW at lr 1e-2); the rewards come from the updated PRM (before) or the old one
    (after); a held-out call (learn false) leaves it alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.recipe_online import RewardTerm

    terms = RewardTerms([RewardTerm(function="test_prm:fixed_labels"),
                         RewardTerm(**{k: ImplicitPRMConfig(**v) for k, v in prm_term(
                             prm_model, sort_task / "model", update=update).items()})])
    tokenizer = AutoTokenizer.from_pretrained(sort_task / "model")
    texts = [("sort: 3 1 2 =>", " 1 2 3"), ("sort: 5 4 =>", " 4"), ("sort: 2 9 1 =>", " 9 9 1 2")]
    prompts = [tokenizer(p)["input_ids"] for p, _ in texts]
    completions = [tokenizer(c)["input_ids"] for _, c in texts]
    rows = [{"prompt": p, "prompt_ids": ids} for (p, _), ids in zip(texts, prompts)]
    call = lambda learn: terms([p for p, _ in texts], [c for _, c in texts], rows, completions, learn=learn)  # noqa: E731

    def logps(model, j):
        ids = torch.tensor([prompts[j] + completions[j]])
        n = len(completions[j])
        return torch.log_softmax(model(ids).logits[0, -n - 1 : -1], -1).gather(1, ids[0, -n:, None])[:, 0]

    by_hand = AutoModelForCausalLM.from_pretrained(prm_model)
    reference = AutoModelForCausalLM.from_pretrained(sort_task / "model")
    before = [0.5 * (logps(by_hand, j) - logps(reference, j)).detach() for j in range(3)]
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-2)
    r = torch.stack([0.5 * (logps(by_hand, j) - logps(reference, j).detach()).sum() for j in (0, 1)])
    F.binary_cross_entropy_with_logits(r, torch.tensor([1.0, 0.0])).backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 10.0)
    optimizer.step()
    after = [0.5 * (logps(by_hand, j) - logps(reference, j)).detach() for j in range(3)]

    initial = AutoModelForCausalLM.from_pretrained(prm_model).state_dict()
    scores = call(learn=True)
    prm = terms.terms[1][2].fn.models[0]
    for (name, value), expected in zip(prm.state_dict().items(), by_hand.state_dict().values()):
        # Adam divides by sqrt(v) + 1e-8: an entry whose gradient is ~1e-9 moves by a share of lr that float noise
        # decides, so each tensor's update is compared whole (its relative error), not entry by entry
        step, hand = value - initial[name], expected - initial[name]
        assert (step - hand).norm() <= 1e-3 * hand.norm() + 1e-7, (name, (step - hand).norm(), hand.norm())
    for j, expected in enumerate(after if update == "before" else before):
        assert torch.allclose(torch.tensor(scores.token[j]), expected, atol=1e-5)
    assert "rewards/implicit_prm/prm_loss" in scores.metrics
    weights = {k: v.clone() for k, v in prm.state_dict().items()}
    call(learn=False)
    assert all(torch.equal(v, weights[k]) for k, v in prm.state_dict().items())


def test_primes_labels_must_be_outcome_labels(sort_task, prm_model):
    from prefopt.errors import PrefoptError

    terms = RewardTerms([RewardTerm(function="test_ppo:length_score"),
                         RewardTerm(implicit_prm=ImplicitPRMConfig(**prm_term(prm_model, sort_task / "model")
                                                                   ["implicit_prm"]))])
    with pytest.raises(PrefoptError, match=r"labels in \[0, 1\].*gave 1.2"):
        terms(["a"], ["x" * 12], [{"prompt": "a", "prompt_ids": [3]}], [[4, 5]], learn=True)


def test_a_prime_run_resumes_exactly_and_saves_its_prm(sort_task, prm_model, tmp_path):
    """GRPO with an online PRM beside its outcome term, stopped at step 2 and continued: the same losses and PRM
    losses as straight through (the PRM's weights and AdamW state come back from the checkpoint); the updated PRM
    is written beside the policy."""
    from conftest import assert_resume_matches

    sections = ppo_sections(advantage="grpo", num_mini_batches=1)
    sections["rewards"] = [{"function": "test_prm:long_enough", "name": "outcome"},
                           {**prm_term(prm_model, sort_task / "model", label="outcome"), "weight": 0.5}]
    assert_resume_matches(sort_task, tmp_path, **sections)
    records = read_metrics(tmp_path / "b")
    assert all(r["rewards/implicit_prm/prm_loss"] > 0 for r in records)
    assert (tmp_path / "a" / "prm_implicit_prm" / "config.json").exists()


def test_an_implicit_prm_takes_its_losses_and_a_classifier_no_reference(sort_task, tmp_path):
    from prefopt import recipe as recipe_lib
    from prefopt.errors import RecipeError

    with pytest.raises(RecipeError, match="implicit_prm_ce, or on pairs with dpo"):
        recipe_lib.load(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", method="reward",
                                     reward={"kind": "implicit_prm"}, loss={"name": "bradley_terry"}))
    with pytest.raises(RecipeError, match="classifier reward model has no reference"):
        recipe_lib.load(write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", method="reward",
                                     reference={"kind": "copy"}, loss={"name": "bradley_terry"}))
