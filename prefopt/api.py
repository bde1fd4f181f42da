"""The Python API, for notebooks and scripts:

    import prefopt
    evals = prefopt.train("recipes/quickstart.yaml", train={"max_steps": 20})
    evals = prefopt.train({"model": {...}, "data": {...}, "loss": {"name": "dpo"}}, train_data=my_dataset)

`train` runs exactly what `prefopt train` runs (the lock, the resume check, the method's trainer) and returns the
run's eval records (what metrics.jsonl holds for split "eval").
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from prefopt import recipe as recipe_lib


def load_recipe(recipe: str | Path | dict | recipe_lib.Recipe, **sections: Any) -> recipe_lib.Recipe:
    """A validated Recipe from a path, a dict or a Recipe; `sections` update it: a dict updates that section
    (`train={"max_steps": 10}`), anything else replaces the key (`output_dir="runs/x"`, `loss={"name": "ipo"}`)."""
    if isinstance(recipe, recipe_lib.Recipe):
        data, where, name = recipe.to_dict(), "<Recipe>", "recipe"
    elif isinstance(recipe, dict):
        data, where, name = copy.deepcopy(recipe), "<dict>", "recipe"
    else:
        recipe_lib.load(recipe)  # a missing file or bad YAML: the CLI's message
        data, where, name = yaml.safe_load(Path(recipe).read_text()) or {}, str(recipe), Path(recipe).stem
    for key, value in sections.items():
        if isinstance(value, dict) and key != "loss" and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return recipe_lib.from_dict(data, where, name=name)


def train(recipe: str | Path | dict | recipe_lib.Recipe, *, train_data=None, eval_data=None, restart: bool = False,
          trainer=None, **sections: Any) -> list[dict]:
    """Train a recipe; returns its eval records. train_data / eval_data: in-memory `datasets.Dataset`s used as
    data.train / data.eval (their fingerprints name them in the recipe, so a changed dataset is a changed run).
    trainer: a subclass of the method's trainer (or set `trainer: module:Class` in the recipe)."""
    from prefopt.cli import run_recipe
    from prefopt.data.sources import in_memory

    with in_memory(train=train_data, eval=eval_data) as data:
        if data:
            sections["data"] = {**sections.get("data", {}), **data}
        return run_recipe(load_recipe(recipe, **sections), restart, trainer_cls=trainer)
