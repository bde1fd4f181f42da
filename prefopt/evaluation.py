"""`prefopt eval RUN_DIR --data PAIRS`: a finished run's held-out metrics on a preference set.

A reward run (or any reward model directory) reports its ranking accuracy and reward statistics
(prefopt.scoring.evaluate_reward_model). A preference run reports what its own evaluation logs: the loss, the
implicit-reward accuracy and margin, the log-probs, for its final policy against its reference (the starting
policy, or the base weights under a LoRA adapter). An online run (rl, online) reports what its evaluations log,
through the same Sampler that trained it: greedy completions of the file's prompts scored by the run's reward
terms (score, each term, EOS share, length) and, with a reference, the KL to it. What each method's runs get is
its record's `evaluation` (prefopt.methods).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from prefopt.errors import PrefoptError


def evaluate_run(path: str | Path, data: str) -> dict:
    from prefopt.scoring import evaluate_reward_model

    path = Path(path)
    saved = path / "recipe.yaml"
    if not saved.exists():  # a model directory or hub id: a reward model
        return evaluate_reward_model(path, data)
    recipe = yaml.safe_load(saved.read_text())
    from prefopt import recipe as recipe_lib
    from prefopt.methods import record

    method = record(recipe if recipe.get("method") else recipe_lib.from_dict(recipe, str(saved)))
    if method.evaluation == "reward_model":
        return evaluate_reward_model(path, data)
    if method.evaluation == "none":
        raise PrefoptError(f"{path} is a {method.name!r} run, which prefopt eval does not evaluate")
    if not (path / "final").is_dir():
        raise PrefoptError(f"{path} has no final/ yet: the run has not finished (resume it with prefopt train)")
    evaluate = evaluate_policy if method.evaluation == "losses" else evaluate_online
    return {"run": str(path), "data": data, **evaluate(recipe, path / "final", data)}


def final_model(recipe: dict, final: Path) -> tuple[dict, dict]:
    """The run's model and reference sections with its final weights as the model: a LoRA adapter on its base
    (the reference as trained), or the final weights with a copy reference of the starting policy."""
    model, reference = dict(recipe["model"]), dict(recipe.get("reference") or {})
    start = reference.get("name_or_path") or model["name_or_path"]
    if (final / "adapter_config.json").exists():  # LoRA: the adapter on its base; the reference as trained
        model.update(lora=None, adapter=str(final))
    else:
        model["name_or_path"] = str(final)
        if reference.get("kind") in ("copy", "precomputed"):
            reference.update(kind="copy", name_or_path=start)
    reference.pop("sync_every", None)  # evaluation moves nothing
    return model, reference


def final_sections(recipe: dict, final: Path) -> dict:
    """The run's model section with its final weights, and its reference section where its method has one
    (method sft has none)."""
    from prefopt.methods import method_of

    model, reference = final_model(recipe, final)
    return {"model": model, **({"reference": reference} if "reference" in method_of(recipe).sections else {})}


def evaluate_online(recipe: dict, final: Path, data: str) -> dict:
    """The online trainer's evaluation (its Sampler's) of `final` on the prompts of `data`."""
    from prefopt import recipe as recipe_lib
    from prefopt.methods import record

    recipe = {**recipe, **final_sections(recipe, final), "output_dir": str(final.parent), "trainer": None,
              "data": {**recipe["data"], "train": data, "eval": data, "eval_fraction": 0.0}}
    recipe = recipe_lib.from_dict(recipe, "prefopt eval")
    trainer = evaluating(record(recipe).trainer_class())(recipe)
    try:
        return {"prompts": len(trainer.eval_data), **trainer.evaluate()}
    finally:
        trainer.close()


def evaluate_policy(recipe: dict, final: Path, data: str) -> dict:
    """The preference trainer's evaluation of `final` on `data`, against the run's reference."""
    from prefopt import recipe as recipe_lib
    from prefopt.trainers import PreferenceTrainer

    recipe = {**recipe, **final_sections(recipe, final), "output_dir": str(final.parent),
              "data": {**recipe["data"], "train": data, "eval": data, "eval_fraction": 0.0, "on_bad_row": "drop"},
              "train": {**recipe["train"], "batch_size": recipe["train"]["micro_batch_size"]}}
    trainer = evaluating(PreferenceTrainer)(recipe_lib.from_dict(recipe, "prefopt eval"))
    try:
        return {"pairs": len(trainer.eval_data), **trainer.evaluate()}
    finally:
        trainer.close()


def evaluating(cls: type) -> type:
    """The trainer class as prefopt eval makes it: its data is the --data file alone, labelled so."""
    return type(f"Evaluating{cls.__name__}", (cls,), {"evaluating": True})
