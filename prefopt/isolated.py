"""A reward function in a worker process of its own (`rewards[i].isolate: true`), for code that may crash, hang or
poison the interpreter (executing generated code). Light on purpose: the worker imports only this module and the
user's function, never torch.

The worker is started once (spawned, so it shares no state with the trainer) and answers one call at a time over
a pipe. A call that outlasts its timeout kills the worker; a worker that dies (os._exit, a segfault) is noticed
at once. Either way the trainer goes on, and the next call starts a fresh worker.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
from dataclasses import dataclass


@dataclass
class TrainerState:
    """What reward functions read from TRL's `trainer_state`: the optimizer steps done, and the run's total."""

    global_step: int
    max_steps: int
    epoch: float = 0.0


class WorkerDied(RuntimeError):
    """The isolated worker ended without an answer."""


class IsolatedFunction:
    def __init__(self, reference: str):
        self.reference = reference
        self.process = self.conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.reference), daemon=True,
                                       name=f"prefopt-reward-{self.reference}")
        self.process.start()
        child.close()

    def __call__(self, kwargs: dict, timeout: float | None) -> tuple[object, dict, list]:
        """(output, extra columns, [(metric, value)]) of one call; TimeoutError past `timeout` seconds (the
        worker is killed), WorkerDied if it ended without an answer; the function's own error re-raised."""
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send(kwargs)
            answered = self.conn.poll(timeout)
            status, *payload = self.conn.recv() if answered else ("timeout",)
        except (EOFError, OSError):  # the pipe broke: the worker is gone
            self.process.join(1)
            code = self.process.exitcode
            self.close()
            raise WorkerDied(f"its worker process died (exit code {code}) without an answer") from None
        if status == "timeout":
            self.close()
            raise TimeoutError(f"no answer within {timeout:g} s (the worker was stopped)")
        if status == "error":
            raise RuntimeError(payload[0])
        return payload[0], payload[1], payload[2]

    def close(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            self.conn.close()
        self.process = self.conn = None


def _serve(conn, reference: str) -> None:
    """The worker's loop: import the function, then answer each call with ("ok", output, extra, metrics)."""
    import importlib

    module, _, name = reference.partition(":")
    fn = getattr(importlib.import_module(module), name)
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        extra: dict[str, list] = {}
        metrics: list[tuple[str, float]] = []
        logs = {"log_extra": lambda column, values, extra=extra: extra.setdefault(column, []).extend(values),
                "log_metric": lambda metric, value, metrics=metrics: metrics.append((metric, float(value)))}
        kwargs.update({key: logs[key] for key in kwargs.pop("__log__", [])})
        try:
            output = fn(**kwargs)
            if inspect.isawaitable(output):
                output = asyncio.run(output)
            conn.send(("ok", list(output) if output is not None else output, extra, metrics))
        except Exception as exc:  # the function's own error: the trainer reports it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
