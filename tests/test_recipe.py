"""Strict recipes: one clear error naming the key, the file and the closest valid key."""

from pathlib import Path

import pytest
import yaml

from prefopt import recipe as recipe_lib
from prefopt.errors import RecipeError

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {name_or_path: m}\ndata: {train: t.jsonl}\n"


def test_quickstart_recipe_loads_with_the_documented_names():
    r = recipe_lib.load(QUICKSTART)
    assert [(t.name, t.weight, t.params) for t in r.loss] == [("dpo", 1.0, {"beta": 0.1, "label_smoothing": 0.0})]
    assert r.data.train[0].path == "runs/quickstart-assets/train.jsonl"
    assert (r.train.batch_size, r.train.micro_batch_size) == (32, 16)


def test_defaults_and_shapes_of_data_sources(tmp_path):
    r = recipe_lib.load(write(tmp_path, MINIMAL + "optim: {lr: 5e-7}\n"))  # YAML 1.1 reads 5e-7 as a string
    assert r.optim.lr == 5e-7 and r.reference.kind == "copy" and r.data.eval is None
    r = recipe_lib.load(write(tmp_path, "model: {name_or_path: m}\ndata:\n  train:\n"
                              "    - {path: a.jsonl, weight: 0.5}\n    - {path: org/set, split: test}\n"))
    assert [(s.path, s.split, s.weight) for s in r.data.train] == [("a.jsonl", "train", 0.5),
                                                                     ("org/set", "test", 1.0)]


def test_overrides_are_typed_and_checked(tmp_path):
    r = recipe_lib.load(write(tmp_path, MINIMAL), ["train.max_steps=7", "loss.beta=0.5", "optim.schedule=linear"])
    assert r.train.max_steps == 7 and r.loss[0].params == {"beta": 0.5} and r.optim.schedule == "linear"
    with pytest.raises(RecipeError, match="train.max_stpes: unknown key; did you mean 'train.max_steps'"):
        recipe_lib.load(write(tmp_path, MINIMAL), ["train.max_stpes=7"])


@pytest.mark.parametrize("text,message", [
    (MINIMAL + "train: {bach_size: 8}\n", r"r.yaml: train.bach_size: unknown key; did you mean 'train.batch_size'"),
    (MINIMAL + "optim: {lerning_rate: 0.1}\n", r"optim.lerning_rate: unknown key; did you mean 'optim.lr'"),
    (MINIMAL + "train: {batch_size: eight}\n", r"train.batch_size: expected an integer, got str 'eight'"),
    (MINIMAL + "optim: {schedule: cosin}\n", r"optim.schedule: 'cosin' is not one of .* \(did you mean 'cosine'\?\)"),
    ("data: {train: t.jsonl}\n", r"r.yaml: model: missing required key"),
    ("model: {dtype: float32}\ndata: {train: t.jsonl}\n", r"model.name_or_path: missing required key"),
    (MINIMAL + "loss: {name: dpo, bta: 0.1}\n", r"loss 'dpo' has no argument 'bta'; did you mean 'beta'"),
    (MINIMAL + "loss: {name: dpp}\n", r"unknown loss 'dpp'; did you mean 'dpo'"),
    (MINIMAL + "loss: {name: dpo, beta: high}\n", r"loss.beta: expected a number, got str 'high'"),
    (MINIMAL + "train: {batch_size: 8, micro_batch_size: 3}\n", r"train.batch_size: 8 is not a multiple"),
    (MINIMAL.replace("data: {train: t.jsonl}", "data: {train: t.jsonl, max_length: 10, max_prompt_length: 10}"),
     r"must be smaller than"),
    ("- a\n- b\n", r"a recipe is a mapping of sections"),
])
def test_bad_recipes_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        recipe_lib.load(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_lib.load(QUICKSTART, ["seed=3"])
    recipe_lib.save(r, tmp_path / "resolved.yaml")
    data = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert data["loss"] == {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0} and data["seed"] == 3
    assert recipe_lib.from_dict(data) == r


def test_every_shipped_recipe_loads():
    """Each recipe in recipes/ (the package's prefopt/recipes) resolves and passes its method's checks."""
    root = QUICKSTART.parent
    recipes = [p for p in sorted(root.rglob("*.yaml")) if "accelerate" not in p.parts]
    assert len(recipes) > 40
    for path in recipes:
        recipe_lib.load(path)
