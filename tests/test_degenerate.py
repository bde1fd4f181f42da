"""Degenerate signals are said at start-up (or at the rollout that shows them), and stop the run with
data.on_degenerate: error: the run would otherwise train and mean nothing."""

import json

import pytest
from conftest import write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import DataError, RecipeError


def pairs_file(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(sort_task, tmp_path, capsys, on_degenerate="warn", **sections):
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 1, **sections["train"]}
    sections.setdefault("data", {})["on_degenerate"] = on_degenerate
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / f"run-{on_degenerate}", **sections)
    if on_degenerate == "error":
        with pytest.raises(DataError) as info:
            train_recipe(path)
        return str(info.value)
    train_recipe(path)
    return capsys.readouterr().out


SAME = [{"prompt": f"sort: {i} 1 =>", "chosen": " 1 2", "rejected": " 1 2"} for i in range(8)]


@pytest.mark.parametrize("mode", ["warn", "error"])
def test_chosen_equal_to_rejected(sort_task, tmp_path, capsys, mode):
    out = run(sort_task, tmp_path, capsys, mode, data={"train": pairs_file(tmp_path, SAME), "eval": None})
    assert "8 of 8 pairs have chosen equal to rejected" in out


def test_one_kto_label_throughout(sort_task, tmp_path, capsys):
    rows = [{"prompt": f"sort: {i} 1 =>", "completion": " 1 2", "label": True} for i in range(8)]
    out = run(sort_task, tmp_path, capsys, "error", data={"train": pairs_file(tmp_path, rows), "eval": None},
              loss={"name": "kto", "beta": 0.1}, train={"micro_batch_size": 8})
    assert "every unpaired row is labelled desirable" in out


def test_warmup_past_the_run(sort_task, tmp_path, capsys):
    out = run(sort_task, tmp_path, capsys, "warn", optim={"warmup_steps": 5})
    assert "WARNING: optim.warmup_steps (5) is not shorter than train.max_steps (1)" in out


def always_none(completions, **kwargs):
    return [None] * len(completions)


def constant(completions, **kwargs):
    return [0.5] * len(completions)


@pytest.mark.parametrize("function, message", [("always_none", "returned None for every completion"),
                                               ("constant", "gave every completion of this rollout the same value")])
def test_a_reward_without_signal(sort_task, tmp_path, capsys, function, message):
    sections = {"method": "rl", "data": {"eval": None}, "rewards": [{"function": f"test_degenerate:{function}"}],
                "rollout": {"samples_per_prompt": 2, "max_new_tokens": 4}, "ppo": {"advantage": "grpo", "kl_coef": 0},
                "train": {"max_steps": 3}}
    out = run(sort_task, tmp_path, capsys, "warn", **sections)
    assert message in out and out.count(message) == 1  # once per term
    assert "for 3 rollouts in a row no prompt's 2 completions scored differently" in out
    assert message in run(sort_task, tmp_path, capsys, "error", **sections)


@pytest.mark.parametrize("weight, message", [(0.0, "other than 0"), (-0.5, "allow_negative_weight: true")])
def test_a_loss_weight_of_zero_or_below_is_refused(sort_task, tmp_path, weight, message):
    loss = [{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": weight}]
    with pytest.raises(RecipeError, match=rf"loss\[1\].weight: .*{message}"):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss=loss))
    loss[1]["allow_negative_weight"] = True
    if weight < 0:  # unlearning, meant
        assert recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss=loss)).loss[1].weight == weight


def test_the_shipped_verifiers_compare_answers_by_value():
    """An answer column of integers (or of strings with spaces) scores a right completion 1, as its text does."""
    from prefopt.data.synthetic import arithmetic_correct, number_format

    assert arithmetic_correct(completions=[" 7", " 8", [{"role": "assistant", "content": "7"}]],
                              answer=[7, "8 ", "7"]) == [1.0, 1.0, 1.0]
    assert arithmetic_correct(completions=[" 07 apples"], answer=[7]) == [1.0]
    assert number_format(completions=[" 12 ", "twelve"]) == [1.0, 0.0]


def test_a_large_set_is_judged_by_seeded_blocks_of_consecutive_rows(monkeypatch):
    """Above SAMPLED rows, SAMPLED // BLOCK blocks of BLOCK consecutive rows, drawn from the seed, each read in
    one call (a memory-mapped table is then read in a few places); the finding counts the rows read."""
    from types import SimpleNamespace

    from prefopt import degenerate

    class Examples(list):
        def take(self, positions):
            reads.append(list(positions))
            return [self[i] for i in positions]

    monkeypatch.setattr(degenerate, "SAMPLED", 40)
    monkeypatch.setattr(degenerate, "BLOCK", 10)
    examples = Examples({"chosen_ids": [1], "rejected_ids": [1 if i % 4 else 2]} for i in range(105))
    recipe = SimpleNamespace(seed=3, data=SimpleNamespace(on_degenerate="warn"))
    said, reads = [], []
    degenerate.check_examples(examples, "data.train", recipe, log=said.append)
    assert len(reads) == 4 and all(r == list(range(r[0], r[0] + len(r))) and r[0] % 10 == 0 for r in reads)
    assert reads == sorted(reads) and len({r[0] for r in reads}) == 4
    first = reads
    reads = []
    degenerate.check_examples(examples, "data.train", recipe, log=said.append)
    assert reads == first  # the same blocks for the same seed
    same = sum(i % 4 > 0 for block in first for i in block)
    assert said[0].startswith(f"[prefopt] WARNING: data.train: {same} of {sum(map(len, first))} pairs have chosen")
