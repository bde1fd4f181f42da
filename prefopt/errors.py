"""Errors a user can fix: each message says what was wrong, where, and how to fix it."""


class PrefoptError(Exception):
    """Base class; the CLI prints these without a traceback."""


class RecipeError(PrefoptError, ValueError):
    """A recipe key is unknown, of the wrong type, missing, or inconsistent with another."""


class DataError(PrefoptError, ValueError):
    """A dataset cannot be read, or rows in it cannot be used."""


class Stopped(PrefoptError):
    """A stop signal (SIGTERM, SIGINT) ended the run after a checkpoint; the same command resumes it."""

    def __init__(self, signum: int, step: int, output_dir):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, with a checkpoint in "
                         f"{output_dir}/checkpoints; run the same command again to resume")


class TrainingError(PrefoptError, RuntimeError):
    """Training cannot go on safely (a non-finite loss or gradient); the last good checkpoint is kept."""


def import_object(reference: str, where: str):
    """A user's "package.module:name" (a loss, a scoring function), or a RecipeError saying why not."""
    import importlib
    import os
    import sys

    module_name, _, name = reference.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # the directory it is run from, as `python -m` sees it
            if os.getcwd() in sys.path or "" in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RecipeError(f"{where}: cannot import {reference!r}: {exc} (is {module_name!r} on PYTHONPATH? the "
                          "form is package.module:name)") from None
