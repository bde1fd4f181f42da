"""Per-token rewards from reward terms: a function may return, for a completion, a list aligned to its tokens.
A sequence-level estimator trains on their sum (the same as a term returning the sum), a token-level one on each
token's own reward."""

import pytest
import torch
from conftest import read_metrics, write_recipe
from test_ppo import ppo_sections

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError
from prefopt.trainers import PPOTrainer


def per_token(prompts, completions, completion_ids, **kwargs):
    """0.1 for each even token id, -0.05 for each odd one."""
    return [[0.1 if t % 2 == 0 else -0.05 for t in ids] for ids in completion_ids]


def summed(prompts, completions, completion_ids, **kwargs):
    return [sum(row) for row in per_token(prompts, completions, completion_ids)]


def wrong_length(prompts, completions, completion_ids, **kwargs):
    return [[0.0] * (len(ids) + 1) for ids in completion_ids]


def test_a_token_level_estimator_sees_each_tokens_reward(sort_task, tmp_path):
    """reinforce_pp with gamma 0 and no scale: each token's advantage is its own reward, the term's value the sum."""
    sections = ppo_sections(advantage="reinforce_pp", num_mini_batches=1, gamma=0.0, advantage_scale="none",
                            kl_coef=0.0)
    sections["rewards"] = {"function": "test_token_rewards:per_token"}
    trainer = PPOTrainer(recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)))
    try:
        rollout, _ = trainer.make_rollout(0)
    finally:
        trainer.close()
    ids = rollout.input_ids[:, -rollout.mask.shape[1]:]
    expected = torch.where(ids % 2 == 0, 0.1, -0.05) * rollout.mask
    assert torch.allclose(rollout.advantages, expected, atol=1e-6)
    assert rollout.stats["rollout/score"] == pytest.approx(expected.sum(1).mean().item(), abs=1e-5)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_a_sequence_level_estimator_trains_on_their_sum(sort_task, tmp_path, advantage):
    """The same run with the per-token term and with a term returning each completion's sum: the same losses (to
    float rounding: the sums are added in another order, and a group whose two returns tie up to rounding gets a
    tiny advantage divided by a tiny std)."""
    records = {}
    for name in ("per_token", "summed"):
        sections = ppo_sections(advantage=advantage, num_mini_batches=1)
        sections["rewards"] = {"function": f"test_token_rewards:{name}"}
        sections["train"] = {**sections["train"], "max_steps": 3}
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, **sections))
        records[name] = read_metrics(tmp_path / name)
    for a, b in zip(records["per_token"], records["summed"], strict=True):
        for key in ("loss", "grad_norm", "rollout/score"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key


def test_per_token_rewards_of_the_wrong_length_are_refused(sort_task, tmp_path):
    sections = ppo_sections(advantage="grpo", num_mini_batches=1)
    sections["rewards"] = {"function": "test_token_rewards:wrong_length"}
    with pytest.raises(PrefoptError, match=r"gave \d+ per-token rewards for a completion of \d+ tokens"):
        train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


@pytest.mark.parametrize("gamma,expected", [
    (1.0, [[0.4, 0.4, 0.0], [-0.1, -0.3, -0.5]]),
    (0.5, [[0.2, 0.4, 0.0], [0.175, -0.05, -0.5]]),
])
def test_primes_advantage_by_hand(gamma, expected):
    """One group of two: process rewards [0.2, -0.4] and [0.1, 0.1, 0.4] (per-token means -0.1 and 0.2, so each
    token less the other's: 0.0, -0.6 and 0.2, 0.2, 0.5), outcomes 1 and 0 at the last tokens (leave-one-out: 1
    and -1 there), then returns-to-go."""
    from prefopt.losses.ppo import prime_advantages

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    process = torch.tensor([[0.2, -0.4, 0.0], [0.1, 0.1, 0.4]])
    rewards = process + torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    advantages, _ = prime_advantages(rewards, mask, process=process, group_size=2, gamma=gamma)
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-6)
