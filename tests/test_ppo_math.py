"""PPO maths: KL estimators, reward shaping, GAE, whitening, clipped losses, critic-free advantages and the
adaptive KL controller, by hand and against TRL 1.12's PPO code on the same tensors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt.losses.ppo import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    estimate_advantages,
    gae,
    kl_estimate,
    masked_whiten,
    overlong_penalty,
    shape_rewards,
)

TRL_112 = Path(sys.prefix) / "trl-1.12"  # installed by `make test`


def test_kl_estimators_by_hand():
    """log pi = -1, log pi_ref = -2: k1 = 1; r = e^-1, k3 = (e^-1 - 1) + 1 = e^-1 = 0.3678794412."""
    logps, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_estimate(logps, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logps, ref, "k3").item() == pytest.approx(math.exp(-1), abs=1e-7)
    assert kl_estimate(ref, ref, "k3").item() == 0.0


def test_shaped_rewards_put_the_score_on_the_last_token():
    """kl [[1, 2, 3], [4, 5, 6]], lengths 3 and 2, beta 0.1, scores (10, 20):
    [[-0.1, -0.2, -0.3 + 10], [-0.4, -0.5 + 20, 0]]."""
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = shape_rewards(torch.tensor([10.0, 20.0]), kl, mask, 0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.1, -0.2, 9.7], [-0.4, 19.5, 0.0]]))


def test_gae_by_hand():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.5:
    delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3];
    A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3 = 0.25, A_0 = 0.1 + 0.5 * 0.25 = 0.225; returns = A + V.
    A second row of length 2 ends at its own last token (its third value is ignored)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert returns[0].tolist() == pytest.approx([0.725, 0.85, 1.0])
    # row 2: delta = [0.6 - 0.5, 1 - 0.6] = [0.1, 0.4]; A = [0.1 + 0.2, 0.4, 0]
    assert advantages[1].tolist() == pytest.approx([0.3, 0.4, 0.0])


def test_the_score_lands_on_the_last_sampled_token_after_tool_tokens():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])  # a tool reply, then padding
    rewards = shape_rewards(torch.tensor([3.0, 4.0]), torch.zeros(2, 5), mask, 0.1)
    assert rewards.tolist() == [[0, 0, 0, 3.0, 0], [0, 4.0, 0, 0, 0]]


def test_gae_steps_over_inserted_tool_tokens():
    """A multi-turn completion: tokens the tool inserted (mask 0) are not steps; GAE on the model's tokens with
    the tool's in between equals GAE on those tokens alone, and is 0 on the tool's."""
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.9, 9.9, 0.7]])  # the tool tokens' values are ignored
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    alone, alone_returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3),
                               gamma=0.9, lam=0.5)
    assert advantages[0, [0, 1, 4]].tolist() == pytest.approx(alone[0].tolist())
    assert returns[0, [0, 1, 4]].tolist() == pytest.approx(alone_returns[0].tolist())
    assert advantages[0, 2:4].tolist() == [0.0, 0.0] and returns[0, 2:4].tolist() == [0.0, 0.0]


def test_group_advantages_by_hand():
    """Two prompts, k = 3: returns [1, 2, 3 | 0, 0, 3] (the score at each completion's last token).
    rloo: 1 - 2.5, 2 - 2, 3 - 1.5 | 0 - 1.5, 0 - 1.5, 3 - 0 = [-1.5, 0, 1.5, -1.5, -1.5, 3];
    grpo: group 1 mean 2, std 1 -> [-1, 0, 1] / (1 + 1e-4); group 2 mean 1, std sqrt(3) -> [-1, -1, 2] / (sqrt 3 + 1e-4);
    grpo with scale none (Dr. GRPO): [-1, 0, 1, -1, -1, 2]; reinforce: minus the batch mean 1.5.
    Every token of a completion carries its sequence's advantage; REINFORCE++ the return-to-go."""
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    mask = torch.tensor([[1.0, 1.0]] * 5 + [[1.0, 0.0]])
    rewards = torch.zeros(6, 2).index_put((torch.arange(6), mask.sum(1).long() - 1), scores)

    def sequence(estimator, scale):
        advantages, returns = estimate_advantages(rewards, mask, estimator, scale, group_size=3)
        assert torch.equal(advantages[:, 0] * mask[:, 1], advantages[:, 1]) and not returns.any()
        return advantages[:, 0].tolist()

    assert sequence("rloo", "none") == pytest.approx([-1.5, 0, 1.5, -1.5, -1.5, 3])
    s3 = math.sqrt(3) + 1e-4
    assert sequence("grpo", "group") == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001, -1 / s3, -1 / s3, 2 / s3], abs=1e-6)
    assert sequence("grpo", "none") == pytest.approx([-1, 0, 1, -1, -1, 2])
    assert sequence("reinforce", "none") == pytest.approx([-0.5, 0.5, 1.5, -1.5, -1.5, 1.5])
    whitened = estimate_advantages(rewards, mask, "grpo", "batch", group_size=3)[0]
    assert masked_whiten(estimate_advantages(rewards, mask, "grpo", "none", group_size=3)[0], mask).equal(whitened)
    kl_rewards = rewards - 0.5 * mask  # a KL penalty of 0.5 on every token: REINFORCE++'s return-to-go
    pp = estimate_advantages(kl_rewards, mask, "reinforce_pp", "none", gamma=1.0)[0]
    assert pp[0].tolist() == pytest.approx([1 - 1.0, 1 - 0.5]) and pp[5].tolist() == pytest.approx([2.5, 0])


def test_overlong_penalty_by_hand():
    """max_new_tokens 10, buffer 4, penalty 2: 0 up to 6 tokens, then -2 (len - 6) / 4: 8 -> -1, 10 -> -2."""
    lengths = torch.tensor([3, 6, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 2.0).tolist() == pytest.approx([0, 0, -1, -2])


def test_clipped_losses_by_hand():
    """One token, advantage 2, ratio e^0.5 = 1.6487 > 1.2: clipped, loss = -2 * 1.2 = -2.4, clipfrac 1,
    approx KL 0.5 * 0.25 = 0.125. Value: V 1.0, V_old 0.5, R 2: clip(V) = 0.7; max((1 - 2)^2, (0.7 - 2)^2)
    = 1.69, loss 0.845, clipfrac 1."""
    one = torch.ones(1, 1)
    loss, stats = clipped_policy_loss(0.5 * one, 0 * one, 2 * one, one, clip=0.2)
    assert loss.item() == pytest.approx(-2.4) and stats["clipfrac"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.125)
    value_loss, value_clipfrac = clipped_value_loss(one, 0.5 * one, 2 * one, one, clip=0.2)
    assert value_loss.item() == pytest.approx(0.845) and value_clipfrac.item() == 1.0


def test_value_inside_the_clip_band_is_not_counted_as_clipped():
    """V = 0.00289 within 0.2 of V_old = 0.01295: not clipped, loss 0.5 (V - R)^2. In float32, V_old + (V - V_old)
    rounds away from V, which made such a token count as clipped."""
    values, old, returns = (torch.tensor([[x]]) for x in (0.0028893572743982077, 0.012947547249495983,
                                                          -0.16210472583770752))
    assert (old + (values - old)).item() != values.item()  # the rounding this case is about
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(1, 1), clip=0.2)
    assert clipfrac.item() == 0.0 and loss.item() == 0.5 * ((values - returns) ** 2).item()


def test_adaptive_kl_controller_by_hand():
    """beta 0.1, target 6, horizon 100: KL 9 -> e = clip(0.5) = 0.2, 10 steps -> beta * (1 + 0.2 * 0.1) = 0.102;
    KL 5.4 -> e = -0.1 -> 0.102 * 0.99; no target: fixed."""
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert controller.update(9.0, 10) == pytest.approx(0.102)
    assert controller.update(5.4, 10) == pytest.approx(0.102 * 0.99)
    assert AdaptiveKLController(0.1).update(100.0, 10) == 0.1


def test_matches_trl_112_ppo_code(tmp_path):
    """Full-length completions (no padding), where TRL's conventions and ours are the same. TRL puts the
    score one past the last token and keeps one more value, so reward shaping is compared by hand only."""
    assert TRL_112.is_dir(), f"TRL 1.12 is missing at {TRL_112}: `make test` installs it"
    g = torch.Generator().manual_seed(0)
    b, t = 4, 6
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    inputs = {
        "logps": logps, "ref_logps": logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64),
        "new_logps": logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64),
        "rewards": torch.randn(b, t, generator=g, dtype=torch.float64),
        "values": torch.randn(b, t, generator=g, dtype=torch.float64),
        "new_values": torch.randn(b, t, generator=g, dtype=torch.float64),
        "returns": torch.randn(b, t, generator=g, dtype=torch.float64),
        "advantages": torch.randn(b, t, generator=g, dtype=torch.float64),
        "mask": torch.ones(b, t, dtype=torch.float64), "gamma": 0.99, "lam": 0.9, "clip": 0.2, "value_clip": 0.3,
    }
    torch.save(inputs, tmp_path / "in.pt")
    env = {**os.environ, "PYTHONPATH": str(TRL_112), "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "trl112_ppo_oracle.py"),
                             str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trl = torch.load(tmp_path / "out.pt")
    mask = inputs["mask"]
    close = lambda a, b: torch.allclose(torch.as_tensor(a, dtype=torch.float64), b.double(), atol=1e-6)  # noqa: E731
    for estimator in ("k1", "k3"):
        assert close(kl_estimate(inputs["logps"], inputs["ref_logps"], estimator), trl[f"kl_{estimator}"])
    advantages, returns = gae(inputs["rewards"], inputs["values"], mask, gamma=0.99, lam=0.9)
    assert close(advantages, trl["advantages"]) and close(returns, trl["returns"])
    assert close(masked_whiten(inputs["rewards"], mask), trl["whitened"])
    assert close(masked_whiten(inputs["rewards"], mask, shift_mean=False), trl["whitened_keep_mean"])
    policy_loss, stats = clipped_policy_loss(inputs["new_logps"], inputs["logps"], inputs["advantages"], mask, 0.2)
    assert close(policy_loss, trl["pg_loss"]) and close(stats["clipfrac"], trl["pg_clipfrac"])
    assert close(stats["approx_kl"], trl["approxkl"])
    value_loss, value_clipfrac = clipped_value_loss(inputs["new_values"], inputs["values"], inputs["returns"], mask,
                                                    0.3)
    assert close(value_loss, trl["vf_loss"]) and close(value_clipfrac, trl["vf_clipfrac"])
    assert 0 < stats["clipfrac"] < 1 and 0 < value_clipfrac < 1  # both branches of each max are exercised


def test_a_huge_log_ratio_where_the_clip_binds_gives_a_finite_loss_and_gradient():
    """exp(100) overflows; where the clip binds (A >= 0, or the dual clip) the gradient through the ratio is 0, so
    the loss and gradient are finite and equal to the values for any other ratio past the clip."""
    from prefopt.losses.ppo import policy_loss

    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    for advantage, dual in ((torch.tensor([1.0]), None), (torch.tensor([-1.0]), 3.0)):
        logps = torch.tensor([[100.0, 0.1]], requires_grad=True)
        loss = policy_loss(logps, old, advantage, mask, clip_low=0.2, clip_high=0.2, dual_clip=dual)
        loss.backward()
        moderate = torch.tensor([[5.0, 0.1]], requires_grad=True)  # exp(5) is also past both clips
        expected = policy_loss(moderate, old, advantage, mask, clip_low=0.2, clip_high=0.2, dual_clip=dual)
        expected.backward()
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item())
        assert torch.isfinite(logps.grad).all() and logps.grad[0].tolist() == pytest.approx(moderate.grad[0].tolist())
        assert logps.grad[0, 0] == 0  # the clipped token passes no gradient


def test_whitening_one_token_gives_zero_not_nan():
    from prefopt.losses.ppo import masked_whiten

    out = masked_whiten(torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert out.tolist() == [[0.0, 0.0]]


def test_gspo_clipfrac_is_the_share_of_sequence_ratios_clipped():
    """Token log-ratios +0.5 and -0.5 (both tokens past the 0.2 clip) average to a sequence ratio of 1: GSPO clips
    nothing, the token view clips both."""
    from prefopt.losses.ppo import clip_stats

    logps, old, mask = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2), torch.ones(1, 2)
    advantages = torch.tensor([1.0])
    assert clip_stats(logps, old, advantages, mask, ratio="sequence")["clipfrac"].item() == 0.0
    assert clip_stats(logps, old, advantages, mask, ratio="token")["clipfrac"].item() == 0.5


def test_importance_weight_modes_by_hand():
    """rho = pi_proximal / pi_behaviour = [0.5, 3, 1.2] on one sequence (a fourth position is padding): the
    sequence's product is 1.8, its geometric mean 1.8^(1/3) = 1.2164."""
    from prefopt.losses.ppo import importance_weights

    log_rho = torch.log(torch.tensor([[0.5, 3.0, 1.2, 7.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])

    def weights(mode, low=0.6, high=2.0):
        w, stats = importance_weights(mode, log_rho, mask, low, high)
        return w[0].tolist(), {k.split("/")[1]: round(v.item(), 4) for k, v in stats.items()}

    assert importance_weights("none", log_rho, mask, 0.6, 2.0) == (None, {})
    w, stats = weights("token_truncate")
    assert w == pytest.approx([0.5, 2.0, 1.2, 0.0]) and weights("truncate")[0] == w
    assert stats == {"is_weight_mean": 1.2333, "is_weight_max": 2.0, "is_corrected_fraction": 0.3333}
    assert weights("sequence_truncate")[0] == pytest.approx([1.8, 1.8, 1.8, 0.0])
    assert weights("sequence_truncate", high=1.5)[0] == pytest.approx([1.5, 1.5, 1.5, 0.0])
    assert weights("token_mask") == ([0.0, 0.0, 1.0, 0.0], {"is_weight_mean": 0.3333, "is_weight_max": 1.0,
                                                            "is_corrected_fraction": 0.6667})
    assert weights("sequence_mask")[0] == [1.0, 1.0, 1.0, 0.0] and weights("sequence_mask", high=1.5)[0] == [0.0] * 4
    assert weights("geometric_mask", high=1.25)[0] == [1.0, 1.0, 1.0, 0.0]
    assert weights("geometric_mask", high=1.2)[0] == [0.0] * 4


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate", "token_mask", "sequence_mask",
                                  "geometric_mask"])
def test_every_mode_is_the_plain_loss_where_the_policies_agree(mode):
    """rho = 1 (the engine samples what the trainer computes, lag 0): every mode weighs each token 1, and the
    loss is the uncorrected one."""
    from prefopt.losses.ppo import importance_weights, policy_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logps, old = torch.randn(2, 3), torch.randn(2, 3)
    advantages = torch.randn(2, 3)
    weights, stats = importance_weights(mode, torch.zeros(2, 3), mask, 0.5, 2.0)
    assert torch.equal(weights, mask) and stats["rollout/is_corrected_fraction"] == 0
    plain = policy_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    assert policy_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.2, weights=weights) == plain
