"""Trainers: the one loop (base.Trainer) and the methods built on it. Offline: PreferenceTrainer (preference.py)
and RewardTrainer (reward.py); online: PPOTrainer (ppo.py) and OnlinePreferenceTrainer (online.py), each holding
a prefopt.online.Sampler. Which trainer a recipe's method runs is its record's (prefopt.methods)."""

from prefopt.trainers.base import Trainer
from prefopt.trainers.online import OnlinePreferenceTrainer
from prefopt.trainers.ppo import PPOTrainer
from prefopt.trainers.preference import PreferenceTrainer
from prefopt.trainers.reward import RewardTrainer

__all__ = ["Trainer", "PreferenceTrainer", "PPOTrainer", "RewardTrainer", "OnlinePreferenceTrainer", "trainer_for"]


def trainer_for(recipe) -> Trainer:
    """The recipe's method names its trainer; `trainer: module:Class` runs a user's subclass of it instead."""
    from prefopt.errors import RecipeError, import_object
    from prefopt.methods import record

    base = record(recipe).trainer_class()
    if recipe.trainer is None:
        return base(recipe)
    cls = import_object(recipe.trainer, "trainer")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RecipeError(f"trainer: {recipe.trainer} is not a subclass of {base.__name__}, the trainer of method "
                          f"{recipe.method!r}; subclass prefopt.trainers.{base.__name__}")
    return cls(recipe)
