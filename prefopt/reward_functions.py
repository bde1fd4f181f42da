"""A reward function term as TRL's GRPOTrainer calls it (prefopt.rewards): the keyword arguments it takes, sync or
async, in this process or in a worker of its own (isolate: true)."""

from __future__ import annotations

import inspect

from prefopt.errors import RecipeError, import_object
from prefopt.isolated import IsolatedFunction

TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                 "environments", "prompt_ids")  # prompt_ids: prefopt's (the policy's prompt tokens)
TRL_FORM = "def reward(prompts, completions, **kwargs) -> list[float | None]  (dataset columns by name, e.g. answer)"


class FunctionTerm:
    """One function term: how it is called (the arguments it takes, sync or async, in this process or isolated)."""

    def __init__(self, term, name: str, where: str, fn=None):
        self.name, self.reference, self.timeout, self.skip = name, term.function, term.timeout, \
            term.on_timeout == "skip"
        self.fn = fn if fn is not None else import_object(term.function, f"{where}.function")
        if not callable(self.fn):
            raise RecipeError(f"{where}.function: {term.function} is not callable; it should be {TRL_FORM}")
        self.is_async = inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(
            type(self.fn).__call__)  # a callable object with an async __call__
        self.takes = _arguments(self.fn, f"{where}.function ({term.function})")
        self.isolated = IsolatedFunction(term.function) if term.isolate else None

    def kwargs(self, available: dict) -> dict:
        return available if self.takes is None else {k: v for k, v in available.items() if k in self.takes}

    def required_columns(self) -> list[str]:
        """The dataset columns it takes without a default (checked against the data before training)."""
        if self.takes is None:
            return []
        params = inspect.signature(self.fn).parameters
        return [name for name in self.takes if name not in TRL_ARGUMENTS
                and params[name].default is inspect.Parameter.empty]

    def close(self) -> None:
        from prefopt.judge import Judge

        if self.isolated is not None:
            self.isolated.close()
        if isinstance(self.fn, Judge):  # its engine server, if it has one
            self.fn.close()


def _arguments(fn, where: str) -> set[str] | None:
    """The keyword arguments a reward function takes (None: all, it has **kwargs); refuses a function that cannot
    be called by keyword with TRL's arguments, showing TRL's form."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None  # a builtin without a signature: give it everything
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if positional_only or not names & {"prompts", "completions", "completion_ids"}:
        shown = ", ".join(p.name for p in params)
        raise RecipeError(f"{where} takes ({shown}); reward functions are called as TRL calls them, by keyword: "
                          f"prompts=, completions=, completion_ids=, trainer_state=, log_extra=, log_metric= and the "
                          f"dataset's columns. Write it as {TRL_FORM}")
    return names
