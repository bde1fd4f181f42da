"""A call in a background thread: the next rollout generating while the trainer updates (rollout.lag with
rollout.overlap; prefopt/trainers/ppo.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefopt.errors import PrefoptError, TrainingError


class Background:
    """A call in a daemon thread (a hung engine cannot keep the process alive); `result()` waits for it and
    raises what it raised, saying where."""

    def __init__(self, fn: Callable, *args):
        self.done, self.value, self.error = threading.Event(), None, None
        threading.Thread(target=self._run, args=(fn, args), daemon=True, name="prefopt-rollout").start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread
            self.error = exc
        finally:
            self.done.set()

    def result(self):
        self.done.wait()
        if isinstance(self.error, PrefoptError):
            raise self.error
        if self.error is not None:
            raise TrainingError(f"the background rollout stopped: {type(self.error).__name__}: {self.error}"
                                ) from self.error
        return self.value
