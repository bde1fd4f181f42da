"""The DPO family beyond DPO, against hand-derived values and against TRL's own loss code.

Losses TRL's DPOTrainer has are compared with `DPOTrainer._compute_loss` (trl_oracle); SimPO with the
experimental CPOTrainer and ORPO with the experimental ORPOTrainer, each called on a stand-in object
whose "model" returns logits we choose. Both sides see the same log-probs and sum them their own way.
"""

import dataclasses
import math
import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from test_dpo_loss import as_pairs, pair, random_batch
from trl_oracle import _Accelerator, trl_dpo_loss

from prefopt.losses import LOSSES, PairLogps
from prefopt.losses.preference import ipo_loss, orpo_loss, robust_loss, rpo_loss, sft_loss, simpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import

# (our loss, its hyper-parameters, TRL's loss_type, TRL's settings: beta, label_smoothing, loss_weights, args)
TRL_DPO_CASES = [
    ("ipo", {"beta": 0.1}, "ipo", {"beta": 0.1}),
    ("ipo", {"beta": 1.0}, "ipo", {"beta": 1.0}),
    ("hinge", {"beta": 0.1}, "hinge", {"beta": 0.1}),
    ("hinge", {"beta": 0.5}, "hinge", {"beta": 0.5}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.1}, "robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ("robust", {"beta": 0.5, "label_smoothing": 0.3}, "robust", {"beta": 0.5, "label_smoothing": 0.3}),
    ("rpo", {"beta": 0.1, "alpha": 1.0}, ["sigmoid", "sft"], {"beta": 0.1, "loss_weights": [1.0, 1.0]}),
    ("rpo", {"beta": 0.5, "alpha": 0.3}, ["sigmoid", "sft"], {"beta": 0.5, "loss_weights": [1.0, 0.3]}),
    ("sft", {}, "sft", {}),
    ("sppo_hard", {"beta": 0.1}, "sppo_hard", {"beta": 0.1}),
    ("sppo_hard", {"beta": 0.5}, "sppo_hard", {"beta": 0.5}),
    ("nca_pair", {"beta": 0.1}, "nca_pair", {"beta": 0.1}),
    ("nca_pair", {"beta": 0.5}, "nca_pair", {"beta": 0.5}),
    ("apo_zero", {"beta": 0.1}, "apo_zero", {"beta": 0.1}),
    ("apo_zero", {"beta": 0.5}, "apo_zero", {"beta": 0.5}),
    ("apo_down", {"beta": 0.1}, "apo_down", {"beta": 0.1}),
    ("apo_down", {"beta": 0.5}, "apo_down", {"beta": 0.5}),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 1e-3}, "exo_pair", {"beta": 0.1, "label_smoothing": 1e-3}),
    ("exo_pair", {"beta": 0.5, "label_smoothing": 0.2}, "exo_pair", {"beta": 0.5, "label_smoothing": 0.2}),
    ("discopop", {"beta": 0.1, "tau": 0.05}, "discopop", {"beta": 0.1, "discopop_tau": 0.05}),
    ("discopop", {"beta": 0.5, "tau": 0.3}, "discopop", {"beta": 0.5, "discopop_tau": 0.3}),
    # TRL's remaining DPO options: bco_pair, sigmoid_norm, aot, aot_unpaired, and the f-divergence family
    ("bco_pair", {"beta": 0.1}, "bco_pair", {"beta": 0.1}),
    ("bco_pair", {"beta": 0.5}, "bco_pair", {"beta": 0.5}),
    ("sigmoid_norm", {"beta": 0.1}, "sigmoid_norm", {"beta": 0.1}),
    ("sigmoid_norm", {"beta": 2.0}, "sigmoid_norm", {"beta": 2.0}),
    ("aot", {"beta": 0.1}, "aot", {"beta": 0.1}),
    ("aot", {"beta": 0.5, "label_smoothing": 0.2}, "aot", {"beta": 0.5, "label_smoothing": 0.2}),
    ("aot_unpaired", {"beta": 0.1}, "aot_unpaired", {"beta": 0.1}),
    ("aot_unpaired", {"beta": 0.5, "label_smoothing": 0.2}, "aot_unpaired", {"beta": 0.5, "label_smoothing": 0.2}),
    *[("dpo", {"beta": 0.1, "f_divergence_type": f, "f_alpha_divergence_coef": a}, "sigmoid",
       {"beta": 0.1, "f_divergence_type": f, "f_alpha_divergence_coef": a})
      for f, a in (("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                   ("alpha_divergence", 1.5), ("alpha_divergence", 1.0))],
    ("sigmoid_norm", {"beta": 0.5, "f_divergence_type": "js_divergence"}, "sigmoid_norm",
     {"beta": 0.5, "f_divergence_type": "js_divergence"}),
]


@pytest.mark.parametrize("name,params,loss_type,trl_settings", TRL_DPO_CASES)
def test_matches_trl_dpo_trainer(name, params, loss_type, trl_settings):
    """prefopt's mean loss equals the scalar TRL's DPOTrainer computes from the same per-token log-probs.
    rpo is TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha]. TRL's IPO divides by the
    unshifted completion mask's count; random_batch's prompts are >= 2 tokens, so it equals ours."""
    for seed in (0, 1):
        batch = random_batch(seed=seed)
        if trl_settings.get("f_divergence_type") == "alpha_divergence":  # TRL's clamp table knows fp32, not fp64
            batch = tuple(x.float() if x.is_floating_point() else x for x in batch)
        policy, reference = as_pairs(*batch)
        spec = LOSSES[name]
        ours = spec.fn(policy, reference if spec.needs_reference else None, **params).losses.mean()
        theirs = trl_dpo_loss(*batch, loss_type=loss_type, **trl_settings)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6 if batch[0].dtype == torch.float64 else 1e-5)


def test_ipo_hand_derived():
    """IPO on per-token mean log-ratios (TRL's convention, confirmed by the IPO authors; the paper's
    Eq. 17 writes sequence log-probs). policy (chosen, rejected) = (-4, -9) over (2, 3) tokens,
    reference (-6, -6): summed log-ratios 2 and -3, per-token 1 and -1, h_mean = 2.
    beta = 0.5: 1/(2 beta) = 1, loss = (2 - 1)^2 = 1; on the sums it would be (5 - 1)^2 = 16.
    beta = 0.25: 1/(2 beta) = 2, loss = 0. Rewards beta * summed log-ratios: 0.5 * 2 = 1, 0.5 * -3 = -1.5.
    """
    policy, reference = pair([-4.0], [-9.0], [2.0], [3.0]), pair([-6.0], [-6.0], [2.0], [3.0])
    out = ipo_loss(policy, reference, beta=0.5)
    assert out.losses.item() == pytest.approx(1.0, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((1.0, -1.5))
    assert ipo_loss(policy, reference, beta=0.25).losses.item() == pytest.approx(0.0, abs=1e-12)


def test_simpo_hand_derived():
    """SimPO, margin as the authors' code: gamma = gamma_beta_ratio * beta (TRL's CPO takes gamma itself
    as simpo_gamma). policy (chosen, rejected) = (-2, -6) over (2, 3) tokens: means -1 and -2.
    beta = 2, gamma_beta_ratio = 0.5, gamma = 1: beta * (-1 - -2) - 1 = 1,
    loss = -log sigma(1) = log(1 + e^-1) = 0.31326168751822286; rewards beta * mean: -2 and -4.
    sft_weight = 0.5 adds 0.5 * NLL = 0.5 * 2/2: 0.8132616875182228.
    """
    policy = pair([-2.0], [-6.0], [2.0], [3.0])
    out = simpo_loss(policy, None, beta=2.0, gamma_beta_ratio=0.5)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-2.0, -4.0))
    with_sft = simpo_loss(policy, None, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5)
    assert with_sft.losses.item() == pytest.approx(0.8132616875182228, abs=1e-12)


def test_orpo_hand_derived():
    """ORPO with per-token mean log-probs a, odds(y) = e^a / (1 - e^a).
    chosen: 3 tokens summing to 3 log(1/2), a = log(1/2), odds = 1, log odds = 0;
    rejected: 2 tokens summing to 2 log(1/5), a = log(1/5), odds = (1/5)/(4/5) = 1/4, log odds = -log 4.
    log odds ratio = log 4, sigma(log 4) = 4/5. NLL = 3 log 2 / 3 = log 2 = 0.6931471805599453.
    lambda = beta = 0.1: loss = log 2 - 0.1 log(0.8) = 0.6931471805599453 + 0.022314355131420972
    = 0.7154615356913663; rewards beta * a: -0.1 log 2 = -0.06931471805599453 (chosen) and
    -0.1 log 5 = -0.16094379124341004 (rejected).
    TRL's ORPO NLL also counts prompt tokens (test_orpo_nll_differs_from_trl_on_prompt_tokens).
    """
    policy = pair([3 * math.log(0.5)], [2 * math.log(0.2)], [3.0], [2.0])
    out = orpo_loss(policy, None, beta=0.1)
    assert out.losses.item() == pytest.approx(0.7154615356913663, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-0.06931471805599453, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.16094379124341004, abs=1e-12)


def test_sft_is_a_token_mean_over_the_batch():
    """As TRL's "sft": chosen sums (-2, -9) over (2, 1) tokens give 11/3 = 3.6666666666666665 as the batch mean,
    not the mean of per-example means (1 + 9)/2 = 5: each example's sum over the mean tokens per example, 1.5,
    so 2/1.5 and 9/1.5. Given the global batch's mean (token_normalizer, here 2.75 tokens per pair), each example
    is divided by that instead. Rewards are the per-token means -1 and -9 (chosen), -1 and -2 (rejected: sums
    (-3, -2) over (3, 1) tokens). rpo adds alpha times the same NLL to DPO."""
    policy = pair([-2.0, -9.0], [-3.0, -2.0], [2.0, 1.0], [3.0, 1.0])
    out = sft_loss(policy, None)
    assert out.losses.tolist() == pytest.approx([2 / 1.5, 9 / 1.5], abs=1e-12)
    assert out.losses.mean().item() == pytest.approx(11 / 3, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -9.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-1.0, -2.0])
    global_batch = dataclasses.replace(policy, token_normalizer=torch.tensor(2.75, dtype=torch.float64))
    assert sft_loss(global_batch, None).losses.tolist() == pytest.approx([2 / 2.75, 9 / 2.75], abs=1e-12)
    reference = pair([-1.0, -1.0], [-1.0, -1.0], [2.0, 1.0], [3.0, 1.0])
    dpo = LOSSES["dpo"].fn(policy, reference, beta=0.2).losses
    rpo = rpo_loss(policy, reference, beta=0.2, alpha=0.5).losses
    assert torch.allclose(rpo, dpo + 0.5 * out.losses, atol=1e-12)


def test_robust_rejects_flip_rate_of_a_half_or_more():
    policy, reference = pair([-1.0], [-3.0]), pair([-2.0], [-2.0])
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing .*\[0, 0\.5\)"):
            robust_loss(policy, reference, label_smoothing=eps)
    dpo = LOSSES["dpo"].fn(policy, reference, beta=0.5).losses.item()
    assert robust_loss(policy, reference, beta=0.5, label_smoothing=0.0).losses.item() == pytest.approx(dpo)


def logits_batch(b=5, t=10, vocab=7, prompt_lens=(2, 5), seed=0):
    """A stand-in model's logits (2B, T, V), chosen rows first, and TRL's CPO/ORPO batch: token ids,
    attention masks and labels, the labels -100 on the prompt and on the right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * b, t, vocab, generator=g, dtype=torch.float64) * 2
    input_ids = torch.randint(1, vocab, (2 * b, t), generator=g)
    attention_mask = torch.ones(2 * b, t, dtype=torch.long)
    labels = input_ids.clone()
    for row in range(2 * b):
        start = int(torch.randint(*prompt_lens, (1,), generator=g))  # the prompt's length
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        labels[row, :start] = -100
        labels[row, end:], input_ids[row, end:], attention_mask[row, end:] = -100, 0, 0
    halves = {"chosen": slice(0, b), "rejected": slice(b, None)}
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return logits, {f"{side}_{key}": v[rows] for side, rows in halves.items() for key, v in tensors.items()}


def logits_pairs(logits, batch) -> PairLogps:
    """Our side: completion log-prob sums and token counts from the same logits."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    mask = (labels != -100).to(logits.dtype)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums, counts = (token_logps * mask).sum(-1), mask.sum(-1)
    b = len(sums) // 2
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def stand_in_model(logits):
    return lambda input_ids, attention_mask=None, use_cache=False: SimpleNamespace(logits=logits)


def trl_cpo_simpo(logits, batch, *, beta, simpo_gamma, cpo_alpha):
    """TRL's CPOTrainer.get_batch_loss_metrics, loss_type="simpo", on a stand-in trainer."""
    from trl.experimental.cpo import CPOTrainer

    stub = SimpleNamespace(
        loss_type="simpo", beta=beta, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, label_smoothing=0.0,
        alpha=0.0, is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False,
        accelerator=_Accelerator(),
        concatenated_inputs=CPOTrainer.concatenated_inputs, get_batch_logps=CPOTrainer.get_batch_logps,
    )
    stub.cpo_loss = partial(CPOTrainer.cpo_loss, stub)
    stub.concatenated_forward = partial(CPOTrainer.concatenated_forward, stub)
    return CPOTrainer.get_batch_loss_metrics(stub, stand_in_model(logits), batch)


def trl_orpo(logits, batch, *, beta):
    """TRL's ORPOTrainer.get_batch_loss_metrics (odds_ratio_loss and its NLL) on a stand-in trainer."""
    from trl.experimental.orpo import ORPOTrainer

    stub = SimpleNamespace(
        beta=beta, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
        accelerator=_Accelerator(),
        concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    stub.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, stub)
    stub.concatenated_forward = partial(ORPOTrainer.concatenated_forward, stub)
    return ORPOTrainer.get_batch_loss_metrics(stub, stand_in_model(logits), batch)


@pytest.mark.parametrize("beta,gamma_beta_ratio,sft_weight",
                         [(2.0, 0.5, 0.0), (10.0, 0.3, 0.0), (2.5, 0.5, 1.0)])
def test_simpo_matches_trl_cpo(beta, gamma_beta_ratio, sft_weight):
    """TRL's CPO with loss_type="simpo". Documented difference: its simpo_gamma is gamma itself, ours
    gamma_beta_ratio * beta as the SimPO authors' code, so simpo_gamma = gamma_beta_ratio * beta here.
    cpo_alpha is our sft_weight (CPO-SimPO), both a token-mean cross-entropy over the chosen completions."""
    logits, batch = logits_batch()
    out = simpo_loss(logits_pairs(logits, batch), None, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                     sft_weight=sft_weight)
    loss, metrics = trl_cpo_simpo(logits, batch, beta=beta, simpo_gamma=gamma_beta_ratio * beta,
                                  cpo_alpha=sft_weight)
    assert out.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_with_one_token_prompts(beta):
    """TRL's ORPO takes its NLL over prompt and completion tokens; with a one-token prompt the prompt has no
    predicted token, so its NLL is our completion token mean and the losses agree. TRL computes the odds
    ratio in float32, hence the 1e-6 tolerance."""
    logits, batch = logits_batch(prompt_lens=(1, 2))
    out = orpo_loss(logits_pairs(logits, batch), None, beta=beta)
    loss, metrics = trl_orpo(logits, batch, beta=beta)
    assert out.losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-6)


def test_orpo_nll_differs_from_trl_on_prompt_tokens():
    """Documented difference: with longer prompts TRL's NLL is the token mean over every attended chosen
    token after the first (prompt included; its comment: "orpo chosen nll loss is computed over the full
    prompt and response"). PairLogps carries completion log-probs only, so ours is the completion token
    mean (the paper's L_SFT on y given x). Swapping that one term makes the two agree."""
    logits, batch = logits_batch(prompt_lens=(3, 6))
    policy = logits_pairs(logits, batch)
    ours = orpo_loss(policy, None, beta=0.1).losses.mean()
    theirs, _ = trl_orpo(logits, batch, beta=0.1)
    b = len(policy.chosen)
    attended = batch["chosen_attention_mask"][:, 1:].to(logits.dtype)
    targets = batch["chosen_input_ids"][:, 1:, None]
    token_logps = logits[:b, :-1].log_softmax(-1).gather(-1, targets).squeeze(-1)
    full_nll = -(token_logps * attended).sum() / attended.sum()
    completion_nll = -policy.chosen.sum() / policy.chosen_tokens.sum()
    assert abs(ours.item() - theirs.item()) > 1e-3
    assert (ours - completion_nll + full_nll).item() == pytest.approx(theirs.item(), abs=1e-6)


def test_registry():
    reference_free = {"simpo", "orpo", "sft"}
    added = {case[0] for case in TRL_DPO_CASES} | reference_free
    assert added == {"ipo", "simpo", "rpo", "robust", "hinge", "orpo", "sft", "sppo_hard", "nca_pair",
                     "apo_zero", "apo_down", "exo_pair", "discopop", "bco_pair", "sigmoid_norm", "aot", "aot_unpaired",
                     "dpo"}
    for name in added:
        assert LOSSES[name].needs_reference == (name not in reference_free), name
    assert set(LOSSES["simpo"].hyperparameters()) == {"beta", "gamma_beta_ratio", "sft_weight"}
    assert set(LOSSES["rpo"].hyperparameters()) == {"beta", "alpha"}
    assert set(LOSSES["discopop"].hyperparameters()) == {"beta", "tau"}
    assert set(LOSSES["sft"].hyperparameters()) == set()


def test_bco_pair_and_aot_by_hand():
    """bco_pair: policy (chosen, rejected) = (-4, -9), reference (-6, -6), beta 0.5: r_c = 1, r_r = -1.5;
    -log sigma(1) - log sigma(1.5) = 0.31326169 + 0.20141328 = 0.51467497.
    aot_unpaired on two pairs: chosen log-ratios (2, -1) sort to (-1, 2), rejected (0, 3) to (0, 3): deltas (-1, -1),
    each -log sigma(-beta) at beta 1 = log(1 + e) = 1.31326169."""
    from prefopt.losses.preference import aot_unpaired_loss, bco_pair_loss

    out = bco_pair_loss(pair([-4.0], [-9.0], [2.0], [3.0]), pair([-6.0], [-6.0], [2.0], [3.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.51467497, abs=1e-8)
    policy, reference = pair([2.0, -1.0], [0.0, 3.0], [1.0, 1.0], [1.0, 1.0]), pair([0.0, 0.0], [0.0, 0.0],
                                                                                    [1.0, 1.0], [1.0, 1.0])
    assert aot_unpaired_loss(policy, reference, beta=1.0).losses.tolist() == pytest.approx([1.31326169] * 2)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_matches_trl(alpha):
    """LD-DPO: the policy's log-probs are shared + alpha * tail (the tokens past the shorter completion of the
    pair), weighed by prefopt.logprobs.length_desensitized from the scored tokens in order; TRL's DPOTrainer with
    ld_alpha on the same per-token log-probs (reference sums given, weighed alike)."""
    from prefopt.logprobs import length_desensitized

    for seed in (0, 1):
        token_logps, completion_mask, _, _ = random_batch(seed=seed)
        scored = completion_mask[:, 1:].bool()  # (2B, T-1): the logits position scoring each completion token
        sequence = scored.nonzero()[:, 0]  # row-major: each sequence's tokens in order
        counts = scored.sum(1)
        weights = length_desensitized(sequence, counts, alpha)
        sums = torch.zeros(len(counts), dtype=token_logps.dtype).index_add(0, sequence, token_logps[scored] * weights)
        reference = sums.detach() * 0.7 - 1.0  # a reference that differs, weighed the same way
        b = len(counts) // 2
        policy = PairLogps(sums[:b], sums[b:], counts[:b].double(), counts[b:].double())
        ref = PairLogps(reference[:b], reference[b:], counts[:b].double(), counts[b:].double())
        ours = LOSSES["dpo"].fn(policy, ref, beta=0.1).losses.mean()
        theirs = trl_dpo_loss(token_logps, completion_mask, reference[:b], reference[b:], beta=0.1, ld_alpha=alpha)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-9)


def test_wpo_weighting_matches_trl():
    """WPO: each pair's loss times exp(mean aligned log-prob) of its chosen and of its rejected completion, the
    aligned log-prob log p - log sum_v p_v^2 per token (from the logits); TRL's DPOTrainer with use_weighting on
    the same per-token log-probs and log sum p^2."""
    from prefopt.logprobs import _log_sum_squares, wpo_weights

    g = torch.Generator().manual_seed(3)
    for loss_type, name in (("sigmoid", "dpo"), ("ipo", "ipo")):
        token_logps, completion_mask, ref_chosen, ref_rejected = random_batch(seed=3)
        logits = torch.randn(*token_logps.shape, 11, generator=g, dtype=torch.float64)
        targets = torch.randint(0, 11, token_logps.shape, generator=g)
        token_logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        squares = _log_sum_squares(logits.flatten(0, 1)).view(token_logps.shape).double()
        scored = completion_mask[:, 1:].to(token_logps.dtype)
        counts = scored.sum(1)
        aligned = ((token_logps - squares) * scored).sum(1) / counts.clamp(min=1)  # (2B,)
        b = len(counts) // 2
        policy, reference = as_pairs(token_logps, completion_mask, ref_chosen, ref_rejected)
        ours = (LOSSES[name].fn(policy, reference, beta=0.1).losses * wpo_weights(aligned[:b], aligned[b:])).mean()
        theirs = trl_dpo_loss(token_logps, completion_mask, ref_chosen, ref_rejected, loss_type=loss_type, beta=0.1,
                              log_sum_sq_probs=squares)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-9)
    p = torch.softmax(torch.tensor([[1.0, 2.0, 0.5]]), -1)
    assert _log_sum_squares(torch.tensor([[1.0, 2.0, 0.5]])).item() == pytest.approx(torch.log((p**2).sum()).item())
