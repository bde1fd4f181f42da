"""Reference policies (copy, adapter_off, precomputed, TR-DPO sync) and LoRA policies end to end."""

import json
import math

import pytest
import torch
from conftest import assert_resume_matches, read_metrics, write_recipe
from test_loss_recipes import live_models

from prefopt import recipe as recipe_lib
from prefopt import reference as refs
from prefopt.cli import main, train_recipe
from prefopt.errors import RecipeError
from prefopt.trainers import PreferenceTrainer
from prefopt.trainers import preference as preference_module
from prefopt.trainers.preference import pair_logps

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def trainer_for(tmp_path, sort_task, **sections):
    return PreferenceTrainer(recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                                          **sections)))


def test_adapter_off_holds_one_set_of_base_weights_and_matches_the_base(sort_task, tmp_path):
    from transformers import AutoModelForCausalLM

    before = live_models()
    trainer = trainer_for(tmp_path, sort_task, model={"lora": LORA})
    assert trainer.recipe.reference.kind == "adapter_off" and trainer.reference is None
    assert live_models() - before == 1  # the LoRA policy; no second model
    params = dict(trainer.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # train the adapter a little so that policy and base differ, then compare with an untouched base
    trainer.recipe.train.max_steps, trainer.recipe.train.progress_bar = 2, False
    trainer.fit()
    batch = trainer.to_device(trainer.collate(trainer.eval_data[:8]))
    trainer.model.train()  # as in a training step (fit ends in evaluation mode)
    policy = pair_logps(trainer.model, batch)
    reference = trainer.reference_logps(batch, policy, pair_logps)
    base = AutoModelForCausalLM.from_pretrained(sort_task / "model").eval()
    with torch.no_grad():
        expected = pair_logps(base, batch)
    assert torch.allclose(reference.chosen, expected.chosen, atol=1e-5)
    assert torch.allclose(reference.rejected, expected.rejected, atol=1e-5)
    assert not torch.allclose(policy.chosen.detach(), expected.chosen, atol=1e-3)  # the adapter did move
    assert trainer.model.training  # the reference pass restored training mode


def test_precomputed_matches_copy_reuses_its_cache_and_is_invalidated(sort_task, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    runs = {}
    for kind in ("copy", "precomputed"):
        train_recipe(write_recipe(tmp_path / f"{kind}.yaml", sort_task, tmp_path / kind,
                                  reference={"kind": kind, "cache_dir": str(cache)}, train={"max_steps": 5}))
        runs[kind] = read_metrics(tmp_path / kind) + read_metrics(tmp_path / kind, "eval")
    for a, b in zip(runs["copy"], runs["precomputed"]):
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["split"], a["step"], key)
    assert len(list(cache.glob("*.pt"))) == 2  # train and eval

    computed, loaded = [], []
    real_compute, real_load = refs.compute_logps, preference_module.load_reference_copy
    monkeypatch.setattr(refs, "compute_logps", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    monkeypatch.setattr(preference_module, "load_reference_copy",
                        lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    path = write_recipe(tmp_path / "again.yaml", sort_task, tmp_path / "again",
                        reference={"kind": "precomputed", "cache_dir": str(cache)}, train={"max_steps": 5})
    train_recipe(path)
    assert computed == [] and loaded == []  # no reference model, no reference forward
    assert [r["loss"] for r in read_metrics(tmp_path / "again")] == [r["loss"] for r in read_metrics(
        tmp_path / "precomputed")]

    # other data: the train set's key changes (the eval set's does not)
    rows = (sort_task / "train.jsonl").read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(rows[:200]) + "\n")
    capsys.readouterr()
    train_recipe(path, ["data.train=" + str(tmp_path / "fewer.jsonl"), "train.max_steps=1"], restart=True)
    assert len(computed) == 1 and len(loaded) == 1
    printed = capsys.readouterr().out
    assert "log-probs of data.train: computed and cached in" in printed
    assert "log-probs of data.eval: reused from" in printed
    # other weights: the same model saved again with one weight changed invalidates both
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sort_task / "model")
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(tmp_path / "changed")
    AutoTokenizer.from_pretrained(sort_task / "model").save_pretrained(tmp_path / "changed")
    train_recipe(path, ["model.name_or_path=" + str(tmp_path / "changed"), "train.max_steps=1"], restart=True)
    assert len(computed) == 3 and len(loaded) == 2


def test_merged_model_gives_the_adapter_models_logits(sort_task, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, model={"lora": LORA},
                              optim={"lr": 1e-2}, train={"max_steps": 3}))
    assert (out / "final" / "adapter_model.safetensors").exists() and not (out / "final" / "model.safetensors").exists()
    base_path = json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str((sort_task / "model").resolve())  # absolute: the adapter loads from anywhere
    assert main(["merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sort_task / "model"),
                                             out / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(sort_task / "model").eval()
    ids = torch.randint(0, merged.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = merged(ids).logits, adapter(ids).logits, base(ids).logits
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3  # the adapter was not a no-op


def test_continued_adapter_reference_is_the_adapter_or_the_base(sort_task, tmp_path):
    first = tmp_path / "first"
    train_recipe(write_recipe(tmp_path / "first.yaml", sort_task, first, model={"lora": LORA},
                              optim={"lr": 1e-2}, train={"max_steps": 3}))
    adapter = str(first / "final")
    losses = {}
    for kind in ("copy", "adapter_off"):
        out = tmp_path / kind
        train_recipe(write_recipe(tmp_path / f"{kind}.yaml", sort_task, out, model={"adapter": adapter},
                                  reference={"kind": kind}, train={"max_steps": 1}))
        losses[kind] = read_metrics(out)[0]["loss"]
    assert losses["copy"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the adapter as it started
    assert abs(losses["adapter_off"] - math.log(2)) > 1e-3  # the reference is the base


def test_tr_dpo_sync_with_alpha_one_makes_the_reference_the_policy(sort_task, tmp_path):
    """With alpha = 1 after every step the reference becomes the policy, so each step starts at
    policy == reference and its loss is ln 2."""
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 3},
                              reference={"kind": "copy", "sync_every": 1, "sync_alpha": 1.0}))
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx([math.log(2)] * 3, abs=1e-5)


@pytest.mark.parametrize("sections", [
    {"model": {"lora": LORA}},
    {"reference": {"kind": "copy", "sync_every": 2, "sync_alpha": 0.5}},
], ids=["lora", "tr-dpo"])
def test_resume_continues_exactly(sort_task, tmp_path, sections):
    assert_resume_matches(sort_task, tmp_path, **sections)
    if "model" in sections:  # a LoRA checkpoint holds the adapter, not the base weights
        saved = (tmp_path / "b" / "checkpoints" / "step-4" / "model.safetensors").stat().st_size
        assert saved < 0.1 * (sort_task / "model" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("sections,message", [
    ({"reference": {"kind": "adapter_off"}}, "adapter_off needs a LoRA policy"),
    ({"reference": {"kind": "none"}}, "none, but loss 'dpo' needs a reference"),
    ({"reference": {"kind": "precomputed"}, "loss": {"name": "kto"}}, "precomputed cannot serve KTO's KL term"),
    ({"model": {"lora": LORA}, "reference": {"kind": "adapter_off", "sync_every": 2}}, "needs reference.kind=copy"),
    ({"model": {"load_in_4bit": True}}, "4-bit weights cannot be trained directly: add model.lora"),
    ({"model": {"lora": LORA, "adapter": "x"}}, "not both"),
])
def test_reference_recipe_errors(sort_task, tmp_path, sections, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_qlora_on_cpu_is_a_clear_error(sort_task, tmp_path):
    with pytest.raises(RecipeError, match="4-bit \\(QLoRA\\) weights need a CUDA GPU"):
        trainer_for(tmp_path, sort_task, model={"lora": LORA, "load_in_4bit": True})
