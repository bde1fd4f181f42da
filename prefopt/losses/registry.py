"""The loss registry's parts: the tensors a loss takes and gives, LossSpec, register_loss and get_loss (the
package prefopt.losses re-exports them and registers the losses)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefopt.errors import RecipeError, import_object


@dataclass(frozen=True)
class PairLogps:
    """Per-example completion log-probs of one model, summed over completion tokens."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,) completion token counts, for length-normalised losses
    rejected_tokens: torch.Tensor  # (B,)
    # token-mean terms (an NLL of the chosen) divide each example's sum by this: the mean chosen tokens per pair of
    # the whole global batch, so that the batch's mean is its token mean however it is cut; None: this batch's
    token_normalizer: torch.Tensor | None = None
    # WPO's per-pair weights (B,), detached: the trainer multiplies each pair's loss by them (use_weighting)
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class UnpairedLogps:
    """Per-row completion log-probs of one model for unpaired (prompt, completion, label) rows."""

    logps: torch.Tensor  # (N,) summed over completion tokens
    tokens: torch.Tensor  # (N,) completion token counts
    desirable: torch.Tensor  # (N,) bool: thumbs up
    kl_logps: torch.Tensor | None = None  # (N,) log-probs of mismatched pairs: prompt i, completion i - 1
    token_normalizer: torch.Tensor | None = None  # as PairLogps's: mean desirable tokens per row of the global batch


@dataclass(frozen=True)
class GroupLogps:
    """Per-sample completion log-probs of one model for a group loss (SPPO): every sample of each prompt, with
    its estimated win rate against the policy, P(y > pi_t | x)."""

    logps: torch.Tensor  # (N,) summed over completion tokens
    tokens: torch.Tensor  # (N,) completion token counts
    win_rate: torch.Tensor  # (N,) in [0, 1]


@dataclass(frozen=True)
class PairRewards:
    """A reward model's scalar rewards of each pair's completions (reward-model losses)."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    margin: torch.Tensor | None = None  # (B,) how much better chosen is, from the data's `margin` column


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,) per-example losses; the trainer takes their mean
    chosen_rewards: torch.Tensor  # (B,) detached implicit rewards, for logging
    rejected_rewards: torch.Tensor  # (B,); unpaired losses: (N,) each, NaN on rows of the other label


class RunningMean:
    """The mean of every value given to update() so far, over all processes; checkpointed with the run.

    `reduce` sums a tensor over processes (the trainer passes Accelerate's); frozen
    (as during evaluation) update() only reads the mean.
    """

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.reduce, self.total, self.count, self.frozen = reduce, 0.0, 0.0, False

    def update(self, value: torch.Tensor) -> float:
        if not self.frozen:
            total, count = self.reduce(torch.stack([value.detach().double(), value.new_ones((), dtype=torch.float64)]))
            self.total, self.count = self.total + total.item(), self.count + count.item()
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = state["total"], state["count"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool  # False: the trainer loads no reference model
    # "paired" (PairLogps), "unpaired" (UnpairedLogps), "any" (either), "rewards" (PairRewards), "group" (GroupLogps)
    data: str = "paired"
    kl: bool = False  # unpaired: also score mismatched prompt/completion rows (UnpairedLogps.kl_logps)
    state: type | None = None  # e.g. RunningMean: made by the trainer, passed as the third argument

    def hyperparameters(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def check_params(self, params: dict, where: str) -> None:
        """Raise RecipeError for an unknown, missing or non-numeric hyper-parameter."""
        valid = self.hyperparameters()
        for key, value in params.items():
            if key not in valid:
                close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise RecipeError(f"{where}: loss {self.name!r} has no argument {key!r}; {hint}"
                                  f"its arguments are: {', '.join(valid) or 'none'}")
            default = valid[key].default
            if isinstance(value, str) and isinstance(default, float):  # YAML 1.1 reads 1e-1 (no dot) as a string
                try:
                    value = params[key] = float(value)
                except ValueError:
                    pass
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RecipeError(f"{where}.{key}: expected a number, got {type(value).__name__} {value!r}")
        for key, param in valid.items():
            if param.default is inspect.Parameter.empty and key not in params:
                raise RecipeError(f"{where}.{key}: missing required argument of loss {self.name!r}")
        # Values a loss rejects (a flip rate >= 0.5, say) fail here, on a tiny batch, not after models load.
        one = torch.ones(2, dtype=torch.float64)
        if self.data == "unpaired":
            probe = UnpairedLogps(-one, one, torch.tensor([True, False]), -one if self.kl else None)
        elif self.data == "rewards":
            probe = PairRewards(one, -one)
        elif self.data == "group":
            probe = GroupLogps(-one, one, one / 2)
        else:
            probe = PairLogps(-one, -2 * one, one, one)
        state = [self.state()] if self.state else []
        try:
            self.fn(probe, probe if self.needs_reference else None, *state, **params)
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None


def check_range(loss: str, **values: tuple[float, str]) -> None:
    """ValueError for the first hyper-parameter out of its range: name=(value, "> 0" | ">= 0" | "< 0.5" ...).
    Losses call it first, so that the recipe check (LossSpec.check_params) stops a bad value before models load."""
    tests = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 0.5)": lambda v: 0 <= v < 0.5,
             "in (0, 1)": lambda v: 0 < v < 1, "in [0, 0.5]": lambda v: 0 <= v <= 0.5}
    for name, (value, rule) in values.items():
        if not tests[rule](value):
            raise ValueError(f"{loss} loss: {name} must be {rule}, got {value}")


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_reference: bool, data: str = "paired", kl: bool = False,
                  state: type | None = None) -> Callable:
    """Decorator: `@register_loss("dpo", needs_reference=True)` above a loss function (see LossSpec)."""

    def add(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        LOSSES[name] = LossSpec(name=name, fn=fn, needs_reference=needs_reference, data=data, kl=kl, state=state)
        return fn

    return add


def get_loss(name: str, where: str = "loss.name") -> LossSpec:
    """A registered loss by name, or a user's loss as "package.module:function".

    A user's function decorated with @register_loss keeps what it registered;
    an undecorated one is taken to need a reference model.
    """
    if ":" in name:
        return _import_loss(name, where)
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"{where}: unknown loss {name!r}; {hint}known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def _import_loss(name: str, where: str) -> LossSpec:
    fn = import_object(name, where)
    registered = [spec for spec in LOSSES.values() if spec.fn is fn]
    return registered[0] if registered else LossSpec(name=name, fn=fn, needs_reference=True)
