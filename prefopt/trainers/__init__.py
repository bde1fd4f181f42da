"""Trainers: the one loop (base.Trainer) and the methods built on it."""

from prefopt.trainers.base import Trainer
from prefopt.trainers.preference import PreferenceTrainer
from prefopt.trainers.reward import RewardTrainer

__all__ = ["Trainer", "PreferenceTrainer", "RewardTrainer", "trainer_for"]


def trainer_for(recipe) -> Trainer:
    """The method a recipe runs follows from what its loss consumes: rewards of pairs train a reward model."""
    from prefopt.losses import get_loss

    if get_loss(recipe.loss[0].name).data == "rewards":
        return RewardTrainer(recipe)
    return PreferenceTrainer(recipe)
