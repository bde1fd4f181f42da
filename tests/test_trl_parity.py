"""End to end: prefopt and TRL trained from the same tiny model on the same plain-text pairs,
with the same optimizer settings, give the same per-step loss (fp32, CPU).

The data set is exactly one global batch, so every step sees the same 8 pairs and the
two libraries' different shuffling cannot matter. TRL's per-step losses are read from
its own compute_loss, not from its log (which rounds to 4 decimals).
"""

import json

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import train_recipe

STEPS, BATCH, LR = 10, 8, 1.0e-3


@pytest.fixture(scope="module")
def eight_pairs(sort_task, tmp_path_factory):
    rows = [json.loads(line) for line in (sort_task / "train.jsonl").read_text().splitlines()[:BATCH]]
    path = tmp_path_factory.mktemp("parity") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trl_losses(sort_task, data_path, tmp_path, trainer_cls, config_cls, **config) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses = []

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                losses.append(loss.item())
            return loss

    args = config_cls(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_train_epochs=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, use_cpu=True, bf16=False,
        seed=0, report_to=[], save_strategy="no", logging_steps=1, dataloader_drop_last=False,
        max_length=48, **config,
    )
    model = AutoModelForCausalLM.from_pretrained(sort_task / "model")
    tokenizer = AutoTokenizer.from_pretrained(sort_task / "model")
    dataset = load_dataset("json", data_files=str(data_path), split="train")
    Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    return losses


def prefopt_losses(sort_task, data_path, tmp_path, loss) -> list[float]:
    out = tmp_path / "prefopt"
    train_recipe(write_recipe(
        tmp_path / "r.yaml", sort_task, out, loss=loss,
        data={"train": str(data_path), "eval": None, "max_length": 48, "max_prompt_length": 24},
        optim={"lr": LR, "schedule": "constant", "warmup_steps": 0},
        train={"batch_size": BATCH, "micro_batch_size": BATCH, "max_steps": STEPS}))
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.parametrize("trl_config,loss", [
    ({"loss_type": ["sigmoid"], "beta": 0.1}, {"name": "dpo", "beta": 0.1}),
    ({"loss_type": ["ipo"], "beta": 0.1}, {"name": "ipo", "beta": 0.1}),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1},
     {"name": "rpo", "beta": 0.1, "alpha": 0.5}),
], ids=["dpo", "ipo", "rpo"])
def test_dpo_family_matches_trl_step_by_step(sort_task, eight_pairs, tmp_path, trl_config, loss):
    from trl import DPOConfig, DPOTrainer

    theirs = trl_losses(sort_task, eight_pairs, tmp_path, DPOTrainer, DPOConfig, **trl_config)
    ours = prefopt_losses(sort_task, eight_pairs, tmp_path, loss)
    assert len(theirs) == len(ours) == STEPS
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert abs(ours[-1] - ours[0]) > 0.05  # the runs move: equal losses are not equal by standing still


def test_simpo_matches_trl_cpo_step_by_step(sort_task, eight_pairs, tmp_path, monkeypatch):
    """TRL's CPO trainer with loss_type="simpo" and cpo_alpha=0 is SimPO; it takes the margin gamma
    itself (simpo_gamma), prefopt takes gamma_beta_ratio as the SimPO authors: gamma = 0.5 * 2.0 = 1.0."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs = trl_losses(sort_task, eight_pairs, tmp_path, CPOTrainer, CPOConfig, loss_type="simpo", cpo_alpha=0.0,
                        beta=2.0, simpo_gamma=1.0)
    ours = prefopt_losses(sort_task, eight_pairs, tmp_path, {"name": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5})
    assert len(theirs) == len(ours) == STEPS
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert abs(ours[-1] - ours[0]) > 0.05
