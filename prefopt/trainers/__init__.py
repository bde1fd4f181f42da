"""Trainers: the one loop (base.Trainer) and the methods built on it."""

from prefopt.trainers.base import Trainer
from prefopt.trainers.preference import PreferenceTrainer

__all__ = ["Trainer", "PreferenceTrainer"]
