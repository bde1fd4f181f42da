"""Trainers: the one loop (base.Trainer) and the methods built on it."""

from prefopt.trainers.base import Trainer
from prefopt.trainers.ppo import PPOTrainer
from prefopt.trainers.preference import PreferenceTrainer
from prefopt.trainers.reward import RewardTrainer

__all__ = ["Trainer", "PreferenceTrainer", "PPOTrainer", "RewardTrainer", "trainer_for"]


def trainer_for(recipe) -> Trainer:
    """A `ppo:` section runs PPO on prompts; otherwise the method follows from what the loss consumes:
    rewards of pairs train a reward model, log-probs train a policy offline."""
    from prefopt.losses import get_loss

    if recipe.ppo is not None:
        return PPOTrainer(recipe)
    if get_loss(recipe.loss[0].name).data == "rewards":
        return RewardTrainer(recipe)
    return PreferenceTrainer(recipe)
