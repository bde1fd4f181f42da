"""Losses in recipes: reference-free runs, weighted sums, user losses, and errors before models load."""

import gc

import pytest
from conftest import read_metrics, write_recipe
from transformers import PreTrainedModel

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import RecipeError
from prefopt.trainers import PreferenceTrainer


def live_models() -> int:
    """Causal LMs alive in this process (their inner backbones are PreTrainedModels too: not counted)."""
    gc.collect()
    return sum(type(obj).__name__.endswith("ForCausalLM") for obj in gc.get_objects()
               if isinstance(obj, PreTrainedModel))


@pytest.mark.parametrize("loss", [{"name": "simpo"}, {"name": "orpo"}, [{"name": "sft"}, {"name": "simpo"}]])
def test_reference_free_runs_hold_no_reference(sort_task, tmp_path, loss):
    before = live_models()
    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss=loss))
    trainer = PreferenceTrainer(recipe)
    assert trainer.reference is None
    assert live_models() - before == 1  # the policy alone
    with_reference = PreferenceTrainer(recipe_lib.from_dict({**recipe.to_dict(), "loss": {"name": "dpo"},
                                                                 "reference": {"kind": "auto"}}))
    assert with_reference.reference is not None and live_models() - before == 3  # + a policy and a reference


def test_weighted_sum_dpo_plus_sft_equals_rpo(sort_task, tmp_path):
    """RPO is DPO + alpha * NLL(chosen): a two-term recipe must give the same trajectory."""
    runs = {}
    for name, loss in (("rpo", {"name": "rpo", "beta": 0.1, "alpha": 0.3}),
                       ("sum", [{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.3}])):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, loss=loss,
                                  train={"max_steps": 3}))
        runs[name] = read_metrics(tmp_path / name)
    assert [r["loss"] for r in runs["sum"]] == pytest.approx([r["loss"] for r in runs["rpo"]], abs=1e-6)
    assert "loss/dpo" in runs["sum"][0] and "loss/sft" in runs["sum"][0]
    resolved = recipe_lib.load(tmp_path / "sum" / "recipe.yaml")
    assert [(t.name, t.weight) for t in resolved.loss] == [("dpo", 1.0), ("sft", 0.3)]


USER_LOSS = '''
import torch.nn.functional as F
from prefopt.losses import LossOutput, register_loss


@register_loss("scaled_dpo", needs_reference=True)
def scaled_dpo(policy, reference, *, beta: float = 0.1, scale: float = 2.0):
    """scale * DPO: a user's loss living in their own package."""
    chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    losses = -scale * F.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())
'''


def test_user_loss_from_a_module(sort_task, tmp_path, monkeypatch):
    (tmp_path / "mylosses.py").write_text(USER_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                              loss={"name": "mylosses:scaled_dpo", "beta": 0.1, "scale": 3.0},
                              train={"max_steps": 1}))
    (first,) = read_metrics(tmp_path / "run")
    assert first["loss"] == pytest.approx(3.0 * 0.6931471805599453, abs=1e-5)  # 3 * ln 2 at step 1
    with pytest.raises(RecipeError, match="has no argument 'scael'; did you mean 'scale'"):
        recipe_lib.load(tmp_path / "r.yaml", ["loss.scael=1"])
    with pytest.raises(RecipeError, match="cannot import 'nomodule:fn'"):
        recipe_lib.load(tmp_path / "r.yaml", ["loss.name=nomodule:fn"])


@pytest.mark.parametrize("loss,message", [
    ({"name": "simpo", "gama": 1.0}, "loss 'simpo' has no argument 'gama'"),
    ({"name": "robust", "label_smoothing": 0.5}, r"robust loss: label_smoothing must be in \[0, 0.5\), got 0.5"),
    ({"name": "exo_pair", "label_smoothing": 0.0}, r"must be in \(0, 1\)"),
    ([{"name": "dpo"}, {"name": "ipo", "weight": "x"}], r"loss\[1\].weight: expected a number"),
])
def test_bad_loss_settings_fail_before_any_model_loads(sort_task, tmp_path, loss, message):
    before = live_models()
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss=loss))
    assert live_models() == before


def test_ld_alpha_in_a_run_is_layout_free_and_one_is_plain_dpo(sort_task, tmp_path):
    """LD-DPO through the trainer: the same losses packed and padded; ld_alpha 1 is DPO; refused where it
    cannot apply."""
    import json

    rows = [json.loads(line) for line in (sort_task / "train.jsonl").read_text().splitlines()][:64]
    for i, row in enumerate(rows):  # completions of different lengths: a tail for LD-DPO to weigh
        row["rejected" if i % 2 else "chosen"] += " 9 9"
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses = {}
    for name, loss, packing in (("packed", {"ld_alpha": 0.5}, True), ("padded", {"ld_alpha": 0.5}, False),
                                ("one", {"ld_alpha": 1.0}, True), ("plain", {}, True)):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name,
                                  loss={"name": "dpo", "beta": 0.1, **loss}, data={"train": str(data), "eval": None},
                                  optim={"lr": 1e-2}, train={"max_steps": 3, "packing": packing}))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)
    assert losses["one"] == pytest.approx(losses["plain"], abs=1e-6)
    assert abs(losses["packed"][-1] - losses["plain"][-1]) > 1e-3  # the tail weighs less: another trajectory
    for loss, message in (({"name": "kto", "ld_alpha": 0.5}, "with pair losses"),
                          ({"name": "dpo", "ld_alpha": 1.5}, r"in \[0, 1\]")):
        with pytest.raises(RecipeError, match=message):
            recipe_lib.load(write_recipe(tmp_path / "bad.yaml", sort_task, tmp_path / "bad", loss=loss))


def test_wpo_in_a_run_is_the_same_in_every_layout(sort_task, tmp_path):
    """use_weighting through the trainer: the chunked LM head and full logits, packed and padded rows give the same
    losses, and they differ from unweighted DPO."""
    losses = {}
    for name, loss, train in (("chunked", {"use_weighting": True}, {}),
                              ("full", {"use_weighting": True}, {"logps_chunk_size": 0, "packing": False}),
                              ("plain", {}, {})):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name,
                                  loss={"name": "dpo", "beta": 0.1, **loss}, optim={"lr": 1e-2},
                                  train={"max_steps": 3, **train}))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert losses["chunked"] == pytest.approx(losses["full"], abs=1e-5)
    assert abs(losses["chunked"][0] - losses["plain"][0]) > 1e-4  # step 1: ln 2 per pair, times its weight
    with pytest.raises(RecipeError, match="use_weighting"):
        recipe_lib.load(write_recipe(tmp_path / "bad.yaml", sort_task, tmp_path / "bad",
                                     loss={"name": "aot", "use_weighting": True}))
