"""Finite everywhere: the numerically stable ORPO and DiscoPOP equal the textbook formulas wherever those are
finite, and stay finite (loss and gradient, fp32) where those give inf or NaN; a completion with no scored token
contributes nothing; a non-finite loss or gradient never reaches the weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, write_recipe

from prefopt.losses import PairLogps
from prefopt.losses.preference import discopop_loss, ipo_loss, orpo_loss, simpo_loss


def textbook_orpo(policy, beta):
    """Eqs. 6-7 of Hong et al. 2024 as first written: log odds = a - log(1 - e^a), the NLL a token mean."""
    a_c, a_r = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    odds = (a_c - torch.log(-torch.expm1(a_c))) - (a_r - torch.log(-torch.expm1(a_r)))
    return -policy.chosen.sum() / policy.chosen_tokens.sum() - beta * F.logsigmoid(odds)


def textbook_discopop(h, tau):
    mix = torch.sigmoid(h / tau)
    return -F.logsigmoid(h) * (1 - mix) + torch.exp(-h) * mix


def pairs(chosen, rejected, chosen_tokens, rejected_tokens, grad=True):
    t = lambda v: torch.tensor(v, dtype=torch.float32, requires_grad=grad)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), torch.tensor(chosen_tokens), torch.tensor(rejected_tokens))


def test_stable_forms_equal_the_textbook_where_it_is_finite():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(64, generator=g) * 40 - 0.01, -torch.rand(64, generator=g) * 40 - 0.01
    tokens_c, tokens_r = torch.randint(1, 20, (64,), generator=g).float(), torch.randint(1, 20, (64,), generator=g).float()
    policy = PairLogps(chosen.double(), rejected.double(), tokens_c.double(), tokens_r.double())
    ours = orpo_loss(policy, None, beta=0.3).losses
    assert ours.mean().item() == pytest.approx(textbook_orpo(policy, 0.3).mean().item(), rel=1e-6)
    reference = PairLogps(torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64),
                          policy.chosen_tokens, policy.rejected_tokens)
    for beta in (0.1, 1.0, 3.0):
        h = beta * (policy.chosen - policy.rejected)
        expected = textbook_discopop(h, 0.05)
        finite = torch.isfinite(expected)
        got = discopop_loss(policy, reference, beta=beta, tau=0.05).losses
        assert finite.sum() > 32 and torch.allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["orpo_certain", "discopop_far", "no_scored_token"])
def test_edge_cases_give_finite_losses_and_gradients(case):
    """fp32: a chosen mean log-prob of exactly 0 (ORPO's log(1 - e^0) = -inf), beta h = -100 < -88.7 (DiscoPOP's
    exp overflows to inf, times sigma(h / tau) = 0: NaN), and a completion with no scored token (0 / 0)."""
    if case == "orpo_certain":
        policy = pairs([0.0, -1.0], [-2.0, -3.0], [3.0, 2.0], [2.0, 2.0])
        textbook_orpo(policy, 0.1).mean().backward()  # a finite loss, but a NaN gradient
        assert torch.isnan(policy.chosen.grad).any()
        losses = {"orpo": orpo_loss(policy, None, beta=0.1).losses}
    elif case == "discopop_far":
        policy = pairs([-1000.0, -1.0], [0.0, -2.0], [1.0, 1.0], [1.0, 1.0])
        zero = PairLogps(torch.zeros(2), torch.zeros(2), policy.chosen_tokens, policy.rejected_tokens)
        assert torch.isnan(textbook_discopop(0.1 * (policy.chosen - policy.rejected), 0.05)).any()
        losses = {"discopop": discopop_loss(policy, zero, beta=0.1).losses}
        assert losses["discopop"][0].item() == pytest.approx(100.0, rel=1e-4)  # -log sigma(-100), mix 0
    else:
        policy = pairs([0.0, -1.0], [-2.0, -3.0], [0.0, 2.0], [2.0, 2.0])
        zero = PairLogps(torch.zeros(2), torch.zeros(2), policy.chosen_tokens, policy.rejected_tokens)
        losses = {"ipo": ipo_loss(policy, zero).losses, "simpo": simpo_loss(policy, None).losses,
                  "orpo": orpo_loss(policy, None).losses}
        for name in ("ipo", "simpo"):
            assert losses[name][0].item() == 0.0  # the pair contributes nothing
    for name, value in losses.items():
        policy.chosen.grad = policy.rejected.grad = None
        value.mean().backward()
        assert torch.isfinite(value).all(), name
        assert torch.isfinite(policy.chosen.grad).all() and torch.isfinite(policy.rejected.grad).all(), name


def test_a_huge_learning_rate_stops_with_the_step_and_keeps_the_last_good_checkpoint(sort_task, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefopt.cli import train_recipe
    from prefopt.errors import TrainingError

    # lr 1e4 saturates this tiny model (gradients underflow to 0, the loss stays finite); 1e30 makes the weights
    # ~1e30 after step 1, finite, and their squares in RMSNorm overflow at step 2
    sections = {"optim": {"lr": 1.0e30, "schedule": "constant", "warmup_steps": 0},
                "train": {"max_steps": 8, "save_every": 1, "keep_checkpoints": 2}}
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
    with pytest.raises(TrainingError, match=r"step (\d+): non-finite .* last good checkpoint is .*step-\d+") as err:
        train_recipe(path)
    step = int(err.value.args[0].split()[1].rstrip(":"))
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    assert checkpoints and int(checkpoints[-1].name[5:]) == step - 1
    assert not (tmp_path / "run" / "final").exists()
    from safetensors.torch import load_file

    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # skip: the bad steps are skipped and logged, and the run ends with finite weights (or stops after the bound)
    skip = write_recipe(tmp_path / "s.yaml", sort_task, tmp_path / "skip", **{
        **sections, "train": {**sections["train"], "on_nonfinite": "skip", "max_skipped_steps": 100}})
    train_recipe(skip)
    records = read_metrics(tmp_path / "skip")
    skipped = [r["step"] for r in records if r.get("skipped_nonfinite")]
    assert skipped and skipped[0] == step and len(records) == 8
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "skip" / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())
    assert math.isfinite(records[-1]["grad_norm"]) or records[-1].get("skipped_nonfinite")
