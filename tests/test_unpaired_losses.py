"""KTO, BCO and SFT on unpaired rows: against TRL where it has them, and by hand."""

import math

import pytest
import torch
from test_dpo_loss import as_pairs, random_batch
from trl_oracle import trl_dpo_loss, trl_kto_loss

from prefopt.losses import LOSSES, RunningMean, UnpairedLogps
from prefopt.losses.preference import sft_loss
from prefopt.losses.unpaired import bco_loss, kto_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def rows(logps, tokens, desirable, kl=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return UnpairedLogps(t(logps), t(tokens), torch.tensor(desirable), None if kl is None else t(kl))


def test_kto_hand_derived():
    """r = (1, -1) for a desirable and an undesirable row; KL rows' log-ratios (0.5, 0.5), so z0 = 0.5.
    beta = 1: desirable 1 - sigma(1 - 0.5) = 0.3775406688, undesirable 1 - sigma(0.5 - (-1)) = 0.1824255238.
    With weights (2, 0.5): 0.7550813376 and 0.0912127619. A negative KL estimate is clamped to z0 = 0."""
    policy = rows([-1.0, -4.0], [2, 2], [True, False], kl=[-2.0, -3.0])
    reference = rows([-2.0, -3.0], [2, 2], [True, False], kl=[-2.5, -3.5])
    out = kto_loss(policy, reference, beta=1.0)
    assert out.losses.tolist() == pytest.approx([1 - sig(0.5), 1 - sig(1.5)], abs=1e-12)
    assert out.losses.tolist() == pytest.approx([0.3775406688, 0.1824255238], abs=1e-10)
    weighted = kto_loss(policy, reference, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.losses.tolist() == pytest.approx([0.7550813376, 0.0912127619], abs=1e-10)
    assert out.chosen_rewards[0].item() == 1.0 and math.isnan(out.chosen_rewards[1].item())
    assert out.rejected_rewards[1].item() == -1.0 and math.isnan(out.rejected_rewards[0].item())
    negative_kl = rows([-1.0, -4.0], [2, 2], [True, False], kl=[-3.0, -4.0])
    clamped = kto_loss(negative_kl, reference, beta=1.0)
    assert clamped.losses.tolist() == pytest.approx([1 - sig(1.0), 1 - sig(1.0)], abs=1e-12)


@pytest.mark.parametrize("beta,weights", [(0.1, (1.0, 1.0)), (0.5, (1.33, 0.8))])
def test_kto_matches_trl(beta, weights):
    g = torch.Generator().manual_seed(1)
    token_logps, mask, ref_chosen, ref_rejected = random_batch(b=5, seed=3)  # 10 rows
    n = mask.shape[0]
    labels = torch.rand(n, generator=g) > 0.4
    kl_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref_kl = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref_logps = torch.cat([ref_chosen, ref_rejected])
    shift = mask[:, 1:].to(token_logps.dtype)
    sums, counts = (token_logps * shift).sum(-1), shift.sum(-1)
    ours = kto_loss(UnpairedLogps(sums, counts, labels, kl_logps), UnpairedLogps(ref_logps, counts, labels, ref_kl),
                    beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]).losses.mean()
    theirs = trl_kto_loss(token_logps, mask, labels, kl_logps, ref_logps, ref_kl, beta=beta,
                          desirable_weight=weights[0], undesirable_weight=weights[1])
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_bco_with_no_shift_matches_trl_bco_pair():
    """TRL 1.16 keeps BCO only as DPO's paired "bco_pair", -log sigma(r_c) - log sigma(-r_r) with no reward
    shift. A pair is two of our rows, so with delta = 0 (a frozen, empty running mean) our row mean is half
    of TRL's pair mean."""
    batch = random_batch()
    policy, reference = as_pairs(*batch)
    b = len(policy.chosen)
    desirable = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)])
    counts = torch.cat([policy.chosen_tokens, policy.rejected_tokens])
    shift = RunningMean()
    shift.frozen = True
    ours = bco_loss(UnpairedLogps(torch.cat([policy.chosen, policy.rejected]), counts, desirable),
                    UnpairedLogps(torch.cat([reference.chosen, reference.rejected]), counts, desirable),
                    shift, beta=0.2).losses.mean()
    theirs = trl_dpo_loss(*batch, loss_type="bco_pair", beta=0.2)
    assert ours.item() == pytest.approx(theirs.item() / 2, abs=1e-10)


def test_bco_running_reward_shift_by_hand():
    """beta = 1. Batch 1 rewards (1, -1, 2) -> mean 2/3, delta = 2/3; batch 2 rewards (0, 1) -> mean 1/2,
    delta = (2/3 + 1/2) / 2 = 7/12. Losses of batch 2: desirable -log sigma(0 - 7/12) = 1.0333...,
    undesirable -log sigma(-(1 - 7/12)) = 0.9186...; frozen, delta stays 7/12 whatever the batch."""
    shift = RunningMean()
    zero = [0.0, 0.0, 0.0]
    bco_loss(rows([1.0, -1.0, 2.0], [1, 1, 1], [True, False, True]), rows(zero, [1, 1, 1], [True, False, True]),
             shift, beta=1.0)
    assert shift.total / shift.count == pytest.approx(2 / 3)
    out = bco_loss(rows([0.0, 1.0], [1, 1], [True, False]), rows([0.0, 0.0], [1, 1], [True, False]), shift,
                   beta=1.0)
    delta = 7 / 12
    assert out.losses.tolist() == pytest.approx([-math.log(sig(-delta)), -math.log(sig(-(1 - delta)))], abs=1e-12)
    shift.frozen = True
    bco_loss(rows([5.0, 5.0], [1, 1], [True, False]), rows([0.0, 0.0], [1, 1], [True, False]), shift, beta=1.0)
    assert shift.total / shift.count == pytest.approx(delta)
    restored = RunningMean()
    restored.load_state_dict(shift.state_dict())
    assert restored.update(torch.tensor(0.0)) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_sft_on_rows_is_the_desirable_token_mean():
    """Rows: desirable logps -6 over 3 tokens and -2 over 1 token, one undesirable (-50 over 5, ignored):
    NLL = (6 + 2) / (3 + 1) = 2."""
    out = sft_loss(rows([-6.0, -50.0, -2.0], [3, 5, 1], [True, False, True]))
    assert out.losses.mean().item() == pytest.approx(2.0)


def test_registry_says_what_each_takes():
    assert (LOSSES["kto"].data, LOSSES["kto"].kl, LOSSES["kto"].needs_reference) == ("unpaired", True, True)
    assert (LOSSES["bco"].data, LOSSES["bco"].state) == ("unpaired", RunningMean)
    assert LOSSES["sft"].data == "any" and LOSSES["dpo"].data == "paired"
    assert set(LOSSES["bco"].hyperparameters()) == {"beta"}  # the running state is not a recipe key
