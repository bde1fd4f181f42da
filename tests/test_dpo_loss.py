"""DPO against hand-derived values and against TRL's own sigmoid loss on the same log-probs."""

import math

import pytest
import torch
from trl_oracle import trl_dpo_loss

from prefopt.losses import LOSSES, PairLogps
from prefopt.losses.preference import dpo_loss


def pair(chosen, rejected, chosen_tokens=(1.0,), rejected_tokens=(1.0,)):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens))


def test_dpo_hand_derived():
    """policy logps (chosen, rejected) = (-1, -3), reference (-2, -2), beta = 0.5:
    h = (-1 - -2) - (-3 - -2) = 2, beta*h = 1,
    loss = -log sigma(1) = log(1 + e^-1) = 0.3132616875182228,
    rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5.
    With label smoothing 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    = 0.9 * 0.3132616875182228 + 0.1 * 1.3132616875182228 = 0.4132616875182228.
    """
    out = dpo_loss(pair([-1.0], [-3.0]), pair([-2.0], [-2.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.3132616875182228, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)
    smoothed = dpo_loss(pair([-1.0], [-3.0]), pair([-2.0], [-2.0]), beta=0.5, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.4132616875182228, abs=1e-12)


def test_dpo_equal_policy_and_reference_is_log_2():
    """h = 0 whatever the log-probs: loss = -log sigma(0) = ln 2, also with label smoothing."""
    logps = pair([-5.0, -0.1, -30.0], [-7.0, -2.0, -1.0])
    for eps in (0.0, 0.2):
        out = dpo_loss(logps, logps, beta=0.1, label_smoothing=eps)
        assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64), atol=1e-12)


def random_batch(b=6, t=12, seed=0):
    """Per-token log-probs (2B, T-1), completion masks (2B, T) and reference sums (B,)."""
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 3
    completion_mask = torch.zeros(2 * b, t, dtype=torch.long)
    for row in range(2 * b):  # prompt of 2..5 tokens, completion to a random end
        start = int(torch.randint(2, 6, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        completion_mask[row, start:end] = 1
    ref_chosen = -torch.rand(b, generator=g, dtype=torch.float64) * 20
    ref_rejected = -torch.rand(b, generator=g, dtype=torch.float64) * 20
    return token_logps, completion_mask, ref_chosen, ref_rejected


def as_pairs(token_logps, completion_mask, ref_chosen, ref_rejected):
    b = len(ref_chosen)
    shift = completion_mask[:, 1:].to(token_logps.dtype)
    sums, counts = (token_logps * shift).sum(-1), shift.sum(-1)
    return (PairLogps(sums[:b], sums[b:], counts[:b], counts[b:]),
            PairLogps(ref_chosen, ref_rejected, counts[:b], counts[b:]))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_matches_trl_sigmoid(beta):
    """TRL's loss_type="sigmoid" on the same per-token log-probs; each side sums them its own way."""
    batch = random_batch()
    policy, reference = as_pairs(*batch)
    ours = dpo_loss(policy, reference, beta=beta).losses.mean()
    theirs = trl_dpo_loss(*batch, loss_type="sigmoid", beta=beta)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-10)


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.15), (2.0, 0.3)])
def test_dpo_label_smoothing_matches_trl(beta, label_smoothing):
    """TRL 1.16's "sigmoid" ignores label_smoothing; its conservative form -(1-eps) log sigma(beta d)
    - eps log sigma(-beta d) lives in loss_type="aot", where d is the difference of the batch-sorted
    log-ratios. For a batch of one pair d = h, so aot is exactly cDPO: we compare pair by pair."""
    token_logps, mask, ref_chosen, ref_rejected = random_batch()
    policy, reference = as_pairs(token_logps, mask, ref_chosen, ref_rejected)
    ours = dpo_loss(policy, reference, beta=beta, label_smoothing=label_smoothing).losses
    b = len(ref_chosen)
    for i in range(b):
        rows = [i, b + i]  # the pair's chosen and rejected rows
        theirs = trl_dpo_loss(token_logps[rows], mask[rows], ref_chosen[i : i + 1], ref_rejected[i : i + 1],
                              loss_type="aot", beta=beta, label_smoothing=label_smoothing)
        assert ours[i].item() == pytest.approx(theirs.item(), abs=1e-10)


def test_dpo_is_registered_with_a_reference():
    spec = LOSSES["dpo"]
    assert spec.fn is dpo_loss and spec.needs_reference
    assert set(spec.hyperparameters()) == {"beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"}
