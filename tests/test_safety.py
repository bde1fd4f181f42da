"""Dropout is off by default (as TRL), and every out-of-range value or unreadable column ends in one clear
error before any model loads, with no traceback."""

import json
import math

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import main, train_recipe


def test_dropout_is_off_by_default(sort_task, tmp_path):
    """A model saved with dropout 0.1 everywhere: step 1's DPO loss is ln 2 exactly (policy == reference);
    model.dropout: true keeps the config's dropout, and the loss moves from noise alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sort_task / "model", attention_dropout=0.1)
    model.config.attention_dropout = 0.1
    model.save_pretrained(tmp_path / "dropout-model")
    (tmp_path / "dropout-model" / "tokenizer.json").write_bytes((sort_task / "model" / "tokenizer.json").read_bytes())
    (tmp_path / "dropout-model" / "tokenizer_config.json").write_bytes(
        (sort_task / "model" / "tokenizer_config.json").read_bytes())
    first = {}
    for dropout in (False, True):
        out = tmp_path / f"run-{dropout}"
        train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 1},
                                  model={"name_or_path": str(tmp_path / "dropout-model"), "dropout": dropout}))
        first[dropout] = read_metrics(out)[0]["loss"]
    assert first[False] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first[True] - math.log(2)) > 1e-4


BAD = [
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1"),
    (["optim.lr=.nan"], "optim.lr: must be > 0, got nan"),
    (["train.max_steps=0"], "train.max_steps: must be >= 1, got 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1, got 0"),
    (["train.eval_every=-1"], "train.eval_every: must be >= 0, got -1"),
    (["loss.beta=-1"], "dpo loss: beta must be > 0, got -1"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps: must be >= 0, got -5"),
    (["optim.weight_decay=-1"], "optim.weight_decay: must be >= 0"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas: must be two numbers in [0, 1)"),
    (["train.max_grad_norm=0"], "train.max_grad_norm: must be > 0, got 0"),
    (["data.max_length=1"], "data.max_length: must be >= 2, got 1"),
    (["data.max_prompt_length=-5"], "data.max_prompt_length: must be >= 1, got -5"),
    (["loss.name=ipo", "loss.beta=0"], "ipo loss: beta must be > 0, got 0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_values_end_in_one_clear_error(sort_task, tmp_path, capsys, overrides, message):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run")
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and str(path) in err
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_yaml_exponents_are_numbers(sort_task, tmp_path):
    """PyYAML reads 1e-1 (no dot) as a string: numbers in exponent form mean numbers in every field."""
    from prefopt import recipe as recipe_lib

    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run")
    recipe = recipe_lib.load(path, ["loss.beta=1e-1", "optim.lr=1e-3"])
    assert recipe.loss[0].params["beta"] == 0.1 and recipe.optim.lr == 0.001


def test_an_unmapped_prompt_column_is_an_error_and_columns_map_it(sort_task, tmp_path, capsys):
    rows = [json.loads(line) for line in (sort_task / "train.jsonl").read_text().splitlines()[:16]]
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps({"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
                            + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                          data={"train": str(path), "eval": None}, train={"max_steps": 1})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "no 'prompt' column, but text column(s) 'question'" in err and "data.columns: {prompt: question}" in err
    assert "Traceback" not in err
    assert main(["train", str(recipe), "data.columns={prompt: question}"]) == 0
    assert main(["train", str(recipe), "data.columns={prompt: null}", "output_dir=" + str(tmp_path / "b")]) == 2
    assert "share no prefix" in capsys.readouterr().err  # "sort: ..." vs " 1 2": chosen/rejected hold no prompt
