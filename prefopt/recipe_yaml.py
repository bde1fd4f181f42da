"""A recipe's text: the YAML file (a key written twice is refused, both lines named), `key.sub=value` overrides,
a shipped recipe found by name, and the arguments of a loss switched by override. prefopt.recipe reads recipes
through these."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import RecipeError

SHIPPED = Path(__file__).resolve().parent / "recipes"  # the example recipes, in the wheel too


def shipped(path: Path) -> Path:
    """A recipe path, or the shipped recipe it names (`quickstart`, `dpo/qwen2.5-0.5b`) when no such file exists."""
    if path.is_file():
        return path
    for candidate in (SHIPPED / path, SHIPPED / f"{path}.yaml"):
        if candidate.is_file() and SHIPPED in candidate.resolve().parents:
            return candidate
    return path


def drop_other_loss_arguments(loss: dict, before: str, given: set[str]) -> None:
    """`loss.name=X` on a recipe written for another loss: its arguments that X does not take are dropped, and
    said (one that an override names itself, in `given`, still gets the error)."""
    from prefopt.losses import LOSSES

    spec = LOSSES.get(loss.get("name"))
    if spec is None:
        return
    keep = set(spec.hyperparameters()) | {"name", "weight", "allow_negative_weight"} | given
    dropped = [key for key in loss if key not in keep]
    for key in dropped:
        del loss[key]
    if dropped:
        print(f"[prefopt] loss.name={loss['name']}: dropped {', '.join(dropped)} (arguments of {before} that "
              f"{loss['name']} does not take)")


def apply_override(data: dict, override: str, where: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r}: expected key.sub=value, e.g. train.max_steps=10")
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {part!r} in {where} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise RecipeError(f"override {override!r}: the value is not plain YAML ({problem}); give a number, a word, "
                          f"[a, list] or {{a: mapping}}, quoted for the shell, e.g. '{key}=\"text\"'") from None


class DuplicateKey(Exception):
    """A mapping of a recipe file names one key twice (YAML would keep the later one without a word)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key written twice in one mapping, with both lines named."""


def _unique_mapping(loader: UniqueKeyLoader, node, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKey(f"{key!r} is written twice in one section, on line {seen[key]} and line "
                               f"{key_node.start_mark.line + 1}; YAML would keep only the later one. Keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


# Names people bring from TRL / transformers.TrainingArguments, and where prefopt keeps them.
ALIASES = {
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.schedule", "scheduler": "optim.schedule",
    "max_grad_norm": "train.max_grad_norm", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size", "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every", "save_steps": "train.save_every", "save_total_limit": "train.keep_checkpoints",
    "model_name_or_path": "model.name_or_path", "torch_dtype": "model.dtype", "beta": "loss.beta",
    "dataset_name": "data.train", "bf16": "train.mixed_precision", "reward_model": "rewards",
    "reward_funcs": "rewards", "whiten_advantages": "ppo.advantage_scale", "loss_type": "ppo.loss_aggregation",
    "epsilon": "ppo.clip", "epsilon_high": "ppo.clip_high", "num_generations": "rollout.samples_per_prompt",
}


def _suggest(name: str, valid: list[str], section: str) -> str:
    candidates = {_join(section, v): _join(section, v) for v in valid}
    candidates.update({_join(section, alias): target for alias, target in ALIASES.items()})
    candidates.update({alias: target for alias, target in ALIASES.items()})
    close = difflib.get_close_matches(_join(section, name), list(candidates), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {candidates[close[0]]!r}?"
    return f"; valid keys here: {', '.join(valid)}"


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
