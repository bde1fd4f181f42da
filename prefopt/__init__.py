"""prefopt: train language models from preferences.

    import prefopt
    evals = prefopt.train("recipes/quickstart.yaml", train={"max_steps": 20})

prefopt.train and prefopt.load_recipe are the Python API (prefopt/api.py); the trainers are in
prefopt.trainers (Trainer, PreferenceTrainer, RewardTrainer, PPOTrainer), the losses in prefopt.losses.
"""

from prefopt.version import __version__

__all__ = ["__version__", "load_recipe", "train"]


def __getattr__(name):  # the API imports torch and transformers: only when used, so `import prefopt` stays light
    if name in ("train", "load_recipe"):
        from prefopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
