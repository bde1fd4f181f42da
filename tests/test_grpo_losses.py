"""The GRPO family's policy loss (prefopt.losses.ppo.policy_loss) against TRL 1.16's own GRPOTrainer._compute_loss
on the same per-token log-probs: grpo (sequence_mean), bnpo and dapo (token_mean, dapo with clip-higher),
dr_grpo (constant) and GSPO (ratio: sequence); loss and gradient to 1e-6. And hand-derived cases for the
dual clip and for a normaliser given by the trainer."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl_oracle import _Accelerator

from prefopt.losses.ppo import policy_loss

B, T, MAX_NEW = 4, 6, 8


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios around 1, some clipped
    lengths = torch.tensor([6, 3, 5, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, advantages, mask


def trl_loss(logps, old, advantages, mask, loss_type, level="token", epsilon=0.2, epsilon_high=0.2):
    from trl import GRPOTrainer

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=0.0,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW, _entropy_bonus_enabled=False,
        entropy_coef=0.0, use_adaptive_entropy=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    stub.accelerator.num_processes = 1
    stub.accelerator.reduce = lambda x, reduction="sum": x
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


CASES = {  # name: (TRL loss_type, importance level, epsilon_high, prefopt keywords)
    "grpo": ("grpo", "token", 0.2, {"aggregation": "sequence_mean"}),
    "bnpo": ("bnpo", "token", 0.2, {"aggregation": "token_mean"}),
    "dr_grpo": ("dr_grpo", "token", 0.2, {"aggregation": "constant", "max_new_tokens": MAX_NEW}),
    "dapo": ("dapo", "token", 0.28, {"aggregation": "token_mean", "clip_high": 0.28}),
    "gspo": ("grpo", "sequence", 0.2, {"aggregation": "sequence_mean", "ratio": "sequence"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_policy_loss_matches_trl(name):
    loss_type, level, epsilon_high, keywords = CASES[name]
    for seed in range(3):
        logps, old, advantages, mask = batch(seed)
        ours_in, theirs_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        ours = policy_loss(ours_in, old, advantages, mask, **keywords)
        theirs = trl_loss(theirs_in, old, advantages, mask, loss_type, level, epsilon_high=epsilon_high)
        ours.backward()
        theirs.backward()
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6), (name, seed)
        assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-6), (name, seed)
        assert ours_in.grad.abs().sum() > 0


def test_a_global_normaliser_makes_micro_batches_add_up():
    """Two micro-batches of 2, each given the whole batch's count per micro-batch share, average to the loss
    of the whole batch; their own counts (TRL's bnpo per micro-batch) do not."""
    logps, old, advantages, mask = batch(1)
    for aggregation, count in (("token_mean", mask.sum()), ("sequence_mean", B), ("constant", B)):
        kw = {"aggregation": aggregation, "max_new_tokens": MAX_NEW}
        whole = policy_loss(logps, old, advantages, mask, **kw)
        halves = [policy_loss(logps[i:i + 2], old[i:i + 2], advantages[i:i + 2], mask[i:i + 2],
                              normalizer=count / 2, **kw) for i in (0, 2)]
        assert (sum(halves) / 2).item() == pytest.approx(whole.item(), abs=1e-12), aggregation
    own = [policy_loss(logps[i:i + 2], old[i:i + 2], advantages[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    assert abs((sum(own) / 2).item() - policy_loss(logps, old, advantages, mask).item()) > 1e-3


def test_dual_clip_bounds_a_negative_advantage_by_hand():
    """One token, A = -1, r = e^2 = 7.389: plain PPO loss max(-A r, -A clip(r)) = 7.389; dual clip c = 3 bounds
    it at -c A = 3. A positive advantage is unchanged (its clipped term already bounds it: -1.2)."""
    logps, old, mask = torch.tensor([[2.0], [2.0]]), torch.zeros(2, 1), torch.ones(2, 1)
    advantages = torch.tensor([-1.0, 1.0])
    plain = policy_loss(logps[:1], old[:1], advantages[:1], mask[:1])
    assert plain.item() == pytest.approx(torch.e ** 2, rel=1e-6)
    dual = policy_loss(logps, old, advantages, mask, dual_clip=3.0, aggregation="sequence_mean")
    assert dual.item() == pytest.approx((3.0 + -1.2) / 2, rel=1e-6)
