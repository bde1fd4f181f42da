"""Reward terms: the score of each sampled completion, a weighted sum of the recipe's `rewards:` terms.

A function term is called exactly as TRL's GRPOTrainer calls a reward function, so functions written for TRL
(open-r1's, `trl.rewards`') run unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], trainer_state=state,
       log_extra=log_extra, log_metric=log_metric, **columns)

- every argument is a keyword; `columns` are the prompt rows' other dataset columns (`answer`, `solution`, ...),
  each a list beside `prompts`; a function without `**kwargs` gets only the arguments it names;
- a completion is a message list `[{"role": "assistant", "content": text}]` where its prompt is conversational (a
  message list), else the text;
- it returns one float per completion, or None where it does not apply: that row gets nothing from the term
  (TRL's nansum) and the term's metrics skip it;
- `async def` functions run concurrently with each other (and with the synchronous terms);
- `trainer_state.global_step` / `.max_steps`, `log_metric(name, value)` (logged with the step) and
  `log_extra(column, values)` (a column of the samples table) are TRL's.

Per term, `timeout: S` bounds each call: a call past it stops the run naming the term and its rows, or, with
`on_timeout: skip`, scores None (counted in `rewards/<term>/timeouts`). `isolate: true` runs the function in a
worker process of its own (code execution): a crash or a hang there ends the worker, never the trainer (a worker
that dies counts as a call without an answer, as a timeout does). `timing/reward/<term>` is each term's time.

A model term is a prefopt.scoring.RewardScorer (an ensemble when several models).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from prefopt.errors import PrefoptError
from prefopt.isolated import TrainerState, WorkerDied
from prefopt.reward_functions import FunctionTerm

INTERNAL_COLUMNS = ("prompt", "prompt_ids")  # what a prompt row carries besides its dataset columns
__all__ = ["RewardTerms", "Scores", "TrainerState", "conversational_completions"]


@dataclass
class Scores:
    """What scoring a batch gives: the weighted total (N,), each term's values (terms, N) (NaN where a term does
    not apply), metrics for the step's record and extra columns for the samples table."""

    total: torch.Tensor
    terms: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)
    # per-token rewards of the terms that gave them, weighted and summed: a list per completion aligned to its
    # tokens, None where no term did (their sums are in `total` and `terms` too)
    token: list[list[float] | None] = field(default_factory=list)


def conversational_completions(prompts: list, completions: list[str]) -> list:
    """TRL's completions: a message list where the prompt is one, else the text."""
    return [[{"role": "assistant", "content": c}] if _is_messages(p) else c for p, c in zip(prompts, completions)]


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


class RewardTerms:
    """The score of each completion: the weighted sum of a recipe's `rewards:` terms (prefopt.recipe_online.RewardTerm).
    `scorer_options` go to each RewardScorer (device, placement, lockstep)."""

    def __init__(self, terms: list, section: str = "rewards", serve_judge=None, **scorer_options):
        """`serve_judge`: how a served judge gets its engine (online runs: prefopt.online.served.judge_engine)."""
        from prefopt.scoring import RewardScorer

        self.terms = []  # (name, weight, FunctionTerm or RewardScorer)
        for i, term in enumerate(terms):
            name = term.default_name(i)
            if term.judge or term.implicit_prm:  # a model of its own, called as a function term is (by keyword)
                device, where = scorer_options.get("device", "cpu"), f"{section}[{i}]"
                if term.judge:
                    from prefopt.judge import Judge

                    fn = Judge(term.judge, name, f"{where}.judge", device, serve=serve_judge)
                    what = f"judge {term.judge.model}"
                else:
                    from prefopt.prm import ImplicitPRM

                    fn = ImplicitPRM(term.implicit_prm, name, f"{where}.implicit_prm", device)
                    what = f"implicit PRM {term.implicit_prm.model}"
                self.terms.append((name, term.weight, FunctionTerm(dataclasses.replace(term, function=what), name,
                                                                   where, fn)))
            elif term.function:
                self.terms.append((name, term.weight, FunctionTerm(term, name, f"{section}[{i}]")))
            else:
                scorer = RewardScorer(term.models, term.aggregate, term.std_coef, term.normalize, **scorer_options)
                self.terms.append((name, term.weight, scorer))
        self._loop: asyncio.AbstractEventLoop | None = None  # async terms run here, in a thread of their own

    def add_function(self, name: str, fn, weight: float = 1.0) -> None:
        """A term made in code (an environment's get_reward), called as the recipe's function terms are."""
        from prefopt.recipe_online import RewardTerm

        self.terms.append((name, weight, FunctionTerm(RewardTerm(name=name, function=name), name, name, fn)))

    @property
    def learners(self) -> dict[int, int]:
        """The terms that learn from the others' scores (an online implicit PRM): {index: its label term's index}."""
        online = {i: term.fn.config for i, (_, _, term) in enumerate(self.terms)
                  if getattr(getattr(term, "fn", None), "online", False)}
        out = {}
        for i, config in online.items():
            name = self.names[i]
            others = [j for j, other in enumerate(self.names) if j not in online and config.label in (None, other)]
            if not others:
                raise PrefoptError(f"rewards term {name!r}: the implicit PRM's online update needs outcome labels: "
                                   "add a verifier term (e.g. {function: mypkg:accuracy}) and name it in "
                                   "implicit_prm.label")
            out[i] = others[0]
        return out

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.terms]

    @property
    def members(self) -> list:
        """Every reward model of every term: (model, tokenizer, (mean, std))."""
        return [m for _, _, scorer in self.terms if not isinstance(scorer, FunctionTerm) for m in scorer.members]

    def check_columns(self, rows: list[dict], where: str) -> None:
        """Stop before training when a function names a column (without a default) that rows of `where` lack."""
        from prefopt.data import lacking

        have = (set(rows.columns) if hasattr(rows, "columns") else set().union(*(row.keys() for row in rows))) \
            - set(INTERNAL_COLUMNS) if len(rows) else set()
        for name, _, term in self.terms:
            if not isinstance(term, FunctionTerm):
                continue
            for column in term.required_columns():
                missing = lacking(rows, column)  # Arrow rows: counted without reading one
                if missing:
                    raise PrefoptError(
                        f"rewards term {name!r}: {term.reference} takes column {column!r}, but {missing} of "
                        f"{len(rows)} rows of {where} lack it; their columns are {', '.join(sorted(have)) or 'none'}"
                        f" besides the prompt. Add the column to the data, or give the parameter a default")

    def __call__(self, prompts: list, completions: list[str], rows: list[dict],
                 completion_ids: list[list[int]] | None = None, state: TrainerState | None = None,
                 messages: list[list[dict]] | None = None, environments: list | None = None,
                 learn: bool = False) -> Scores:
        """Score N completions (texts) of `prompts`, with their dataset `rows` and sampled token ids. A multi-turn
        rollout gives its completions as `messages` (assistant and tool messages) and its `environments`. `learn`:
        a training rollout, whose labels an online implicit PRM learns from (never held-out ones)."""
        metrics: dict[str, list[float]] = {}
        extra: dict[str, list] = {}
        columns = sorted(set().union(*(row.keys() for row in rows)) - set(INTERNAL_COLUMNS)) if rows else []
        available = {key: [row.get(key) for row in rows] for key in columns}
        if environments is not None:
            available["environments"] = environments
        available.update(prompts=prompts, completions=messages if messages is not None else
                         conversational_completions(prompts, completions),
                         completion_ids=completion_ids if completion_ids is not None else [[] for _ in completions],
                         prompt_ids=[row.get("prompt_ids", []) for row in rows],
                         trainer_state=state or TrainerState(0, 1),  # outside a run (prefopt label)
                         log_extra=lambda column, values: extra.setdefault(column, []).extend(values),
                         log_metric=lambda name, value: metrics.setdefault(name, []).append(float(value)))
        values: list[torch.Tensor | None] = [None] * len(self.terms)
        tokens: list[list[float] | None] = [None] * len(prompts)  # the weighted per-token rewards, summed
        timing: dict[str, float] = {}
        waiting = self._start_async(available, prompts, completions)  # concurrently with the synchronous terms
        learners = self.learners
        for i, (name, weight, term) in enumerate(self.terms):
            if isinstance(term, FunctionTerm) and term.is_async and term.isolated is None or i in learners:
                continue
            start = time.perf_counter()
            if isinstance(term, FunctionTerm):
                values[i] = self._checked(term, self._call(term, available, prompts, completions), prompts,
                                          completions, metrics, available["completion_ids"], tokens, weight)
            else:
                values[i] = term(prompts, [_text(c) for c in completions]).float()
            timing[name] = time.perf_counter() - start
        for i, (outcome, seconds) in waiting.items():
            term = self.terms[i][2]
            values[i] = self._checked(term, outcome(), prompts, completions, metrics, available["completion_ids"],
                                      tokens, self.terms[i][1])
            timing[self.names[i]] = seconds()
        for i, label in learners.items():  # an online PRM: after the term that labels its completions
            name, weight, term = self.terms[i]
            start = time.perf_counter()
            labels = values[label].tolist() if learn else None
            values[i] = self._checked(term, self._call(term, {**available, "labels": labels}, prompts, completions),
                                      prompts, completions, metrics, available["completion_ids"], tokens, weight)
            timing[name] = time.perf_counter() - start
        stacked = torch.stack(values) if values else torch.zeros(0, len(prompts))
        weights = torch.tensor([weight for _, weight, _ in self.terms], dtype=stacked.dtype)[:, None]
        out = {f"timing/reward/{name}": seconds for name, seconds in timing.items()}
        out.update({name: sum(v) / len(v) for name, v in metrics.items()})
        return Scores((stacked * weights).nansum(0), stacked, out, extra, tokens)

    # ----- calling ----------------------------------------------------------------------------

    def _call(self, term: FunctionTerm, available: dict, prompts: list, completions: list):
        """One synchronous call: in this process (in a watched thread under a timeout), or in its worker.
        Returns the function's output, or None where the call gave no answer and on_timeout is skip."""
        kwargs = term.kwargs(available)
        if term.isolated is not None:
            try:
                output, extra, metrics = term.isolated(_plain(kwargs), term.timeout)
            except (TimeoutError, WorkerDied) as exc:
                return self._no_answer(term, exc, prompts)
            except RuntimeError as exc:  # the function's own error, in its worker
                raise PrefoptError(f"rewards term {term.name!r} ({term.reference}) raised {exc} on a batch of "
                                   f"{len(prompts)}") from None
            for column, values in extra.items():
                available["log_extra"](column, values)
            for name, value in metrics:
                available["log_metric"](name, value)
            return output
        if term.timeout is None:
            return self._guarded(term, lambda: term.fn(**kwargs), prompts, completions, available)
        result: dict = {}

        def run():
            try:
                result["output"] = term.fn(**kwargs)
            except BaseException as exc:  # noqa: BLE001 (carried to the caller)
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True, name=f"reward-{term.name}")  # daemon: a hung call
        thread.start()  # never holds the process at exit
        thread.join(term.timeout)
        if thread.is_alive():
            return self._no_answer(term, TimeoutError(f"no answer within {term.timeout:g} s"), prompts)
        if "error" in result:
            return self._guarded(term, lambda: _raise(result["error"]), prompts, completions, available)
        return result["output"]

    def _guarded(self, term: FunctionTerm, call, prompts: list, completions: list, available: dict):
        """The call's output; its exception names the first row it fails on (called again row by row)."""
        try:
            return call()
        except Exception as exc:
            where = f"rewards term {term.name!r} ({term.reference})"
            if term.timeout is None and term.isolated is None and not term.is_async:
                for j in range(len(prompts)):
                    try:
                        term.fn(**term.kwargs(_row(available, j)))
                    except Exception as row_exc:
                        raise PrefoptError(f"{where} raised {type(row_exc).__name__}: {row_exc}, on the completion "
                                           f"{completions[j]!r:.200} of prompt {prompts[j]!r:.200}") from row_exc
            raise PrefoptError(f"{where} raised {type(exc).__name__}: {exc} on a batch of {len(prompts)}") from exc

    def _no_answer(self, term: FunctionTerm, exc: Exception, prompts: list):
        if term.skip:
            return None
        raise PrefoptError(f"rewards term {term.name!r} ({term.reference}): {exc} on its call with {len(prompts)} "
                           f"completions (rows 0-{len(prompts) - 1} of this batch; the first prompt is "
                           f"{prompts[0]!r:.200}), so the run stopped. Raise rewards.timeout, set on_timeout: skip "
                           f"to score such calls None, or isolate: true for code that may crash") from None

    def _start_async(self, available: dict, prompts: list, completions: list) -> dict:
        """Start every async term (not isolated) on the terms' event loop: {index: (outcome(), seconds())}."""
        started = {}
        for i, (_, _, term) in enumerate(self.terms):
            if not (isinstance(term, FunctionTerm) and term.is_async and term.isolated is None):
                continue
            if self._loop is None or not self._loop.is_running():
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, daemon=True, name="reward-async").start()
            clock: dict = {}

            async def timed(term=term, clock=clock):
                clock["start"] = time.perf_counter()
                try:
                    return await asyncio.wait_for(term.fn(**term.kwargs(available)), term.timeout)
                finally:
                    clock["end"] = time.perf_counter()

            future = asyncio.run_coroutine_threadsafe(timed(), self._loop)

            def outcome(term=term, future=future):
                try:  # a coroutine that blocks its loop cannot be cancelled by wait_for: wait a second more
                    return future.result(None if term.timeout is None else term.timeout + 1.0)
                except (TimeoutError, asyncio.TimeoutError):
                    if not future.done():
                        self._loop = None  # the loop is stuck: the next call starts another
                    return self._no_answer(term, TimeoutError(f"no answer within {term.timeout:g} s"), prompts)
                except Exception as exc:
                    return self._guarded(term, lambda exc=exc: _raise(exc), prompts, completions, available)

            started[i] = (outcome, lambda clock=clock: clock.get("end", time.perf_counter()) - clock.get("start", 0.0))
        return started

    def _checked(self, term: FunctionTerm, out, prompts: list, completions: list, metrics: dict,
                 completion_ids: list, tokens: list, weight: float) -> torch.Tensor:
        """The output as (N,) floats, NaN for None; a call without an answer (skipped) is all NaN, counted. A
        completion's value may be a list of per-token rewards aligned to its tokens: its sum is the value, and
        weight x the list is added to `tokens`."""
        where = f"rewards term {term.name!r} ({term.reference})"
        if term.timeout is not None or term.isolated is not None:
            metrics.setdefault(f"rewards/{term.name}/timeouts", []).append(float(out is None))
        if out is None:
            return torch.full((len(prompts),), math.nan)
        if not hasattr(out, "__len__") or len(out) != len(prompts):
            raise PrefoptError(f"{where} returned {len(out) if hasattr(out, '__len__') else type(out).__name__} "
                               f"values for {len(prompts)} completions; return one float (or None) per completion")
        scores = []
        for j, value in enumerate(out):
            if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1):
                value = self._token_rewards(where, value, len(completion_ids[j]), completions[j], tokens, j, weight)
            try:
                value = math.nan if value is None else float(value)
                if not math.isfinite(value) and out[j] is not None:
                    raise ValueError(value)
            except (TypeError, ValueError):
                raise PrefoptError(f"{where} gave {out[j]!r:.40} for the completion {completions[j]!r:.200} of "
                                   f"prompt {prompts[j]!r:.200}; a score is a finite number, a list of per-token "
                                   "rewards, or None where the term does not apply") from None
            scores.append(value)
        return torch.tensor(scores)

    @staticmethod
    def _token_rewards(where: str, values, length: int, completion, tokens: list, j: int, weight: float) -> float:
        """One completion's per-token rewards: checked (one finite number per completion token) and added, times
        the term's weight, to `tokens[j]`; their sum is the completion's value."""
        values = [float(v) for v in values]
        if len(values) != length or not all(map(math.isfinite, values)):
            raise PrefoptError(f"{where} gave {len(values)} per-token rewards for a completion of {length} tokens "
                               f"({completion!r:.200}); give one finite number per completion token (its "
                               "completion_ids), or one score per completion")
        tokens[j] = [w * weight + (tokens[j][t] if tokens[j] else 0.0) for t, w in enumerate(values)]
        return sum(values)

    def close(self) -> None:
        """Stop the isolated workers and the async loop."""
        for _, _, term in self.terms:
            if isinstance(term, FunctionTerm):
                term.close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def _row(available: dict, j: int) -> dict:
    """The arguments of one row j: lists cut to [j], the callables and the state as they are."""
    return {key: [value[j]] if isinstance(value, list) else value for key, value in available.items()}


def _plain(kwargs: dict) -> dict:
    """Arguments for a worker process: the callables stay here; the worker passes its own, which collect what the
    function logs (`__log__` names those it takes)."""
    callables = ("log_extra", "log_metric")
    return {**{key: value for key, value in kwargs.items() if key not in callables},
            "__log__": [key for key in callables if key in kwargs]}


def _raise(exc: BaseException):
    raise exc
