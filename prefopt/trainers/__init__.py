"""Trainers: the one loop (base.Trainer) and the methods built on it."""

from prefopt.trainers.base import Trainer
from prefopt.trainers.online import OnlinePreferenceTrainer
from prefopt.trainers.ppo import PPOTrainer
from prefopt.trainers.preference import PreferenceTrainer
from prefopt.trainers.reward import RewardTrainer

__all__ = ["Trainer", "PreferenceTrainer", "PPOTrainer", "RewardTrainer", "OnlinePreferenceTrainer", "trainer_for"]


TRAINERS = {"preference": PreferenceTrainer, "reward": RewardTrainer, "rl": PPOTrainer,
            "online": OnlinePreferenceTrainer}


def trainer_for(recipe) -> Trainer:
    """The recipe's method names its trainer; `trainer: module:Class` runs a user's subclass of it instead."""
    from prefopt.errors import RecipeError, import_object

    base = TRAINERS[recipe.method]
    if recipe.trainer is None:
        return base(recipe)
    cls = import_object(recipe.trainer, "trainer")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RecipeError(f"trainer: {recipe.trainer} is not a subclass of {base.__name__}, the trainer of method "
                          f"{recipe.method!r}; subclass prefopt.trainers.{base.__name__}")
    return cls(recipe)
