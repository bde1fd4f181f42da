"""Rewards from reward models: for training, for `prefopt eval`, and as scorers for online methods.

RewardScorer scores (prompt, completion) batches with a saved reward model, an
ensemble of them, or a plain Python function (a verifier). An ensemble of K
models combines their scores per completion (Coste et al. 2023, "Reward Model
Ensembles Help Mitigate Overoptimization"):

    mean            the members' mean
    min             the worst case: the lowest member score
    mean_minus_std  mean - std_coef * std, std over the members (population std, divisor K):
                    uncertainty-weighted optimisation with the std as the uncertainty
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from prefopt.errors import PrefoptError
from prefopt.losses import PairRewards

NORMALIZATION_FILE = "reward_normalization.json"  # {"mean", "std", "completions"} beside a saved reward model
AGGREGATES = ("mean", "min", "mean_minus_std")


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> PairRewards:
    """Rewards of a pair batch (chosen rows first), read at each sequence's last non-padding token."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits.squeeze(-1).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return PairRewards(chosen, rejected, batch.get("margin"))


def load_reward_model(path: str | Path):
    """A saved reward model (a run directory's final/, or any model directory or hub id), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if (path / "final").is_dir():
        path = path / "final"
    try:
        if (path / "adapter_config.json").exists():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PrefoptError(f"cannot load a reward model from {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def normalization(path: str | Path) -> dict | None:
    for candidate in (Path(path) / "final" / NORMALIZATION_FILE, Path(path) / NORMALIZATION_FILE):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return None


class RewardScorer:
    """Scores (prompt, completion) pairs: score(prompts, completions) -> (N,) tensor.

    source: a reward model path, a list of them (an ensemble), or a function
    (prompts, completions) -> list of floats. normalize: (r - mean) / std with each
    model's stored statistics (reward_normalization.json), before combining.
    """

    def __init__(self, source: str | Path | list | Callable, aggregate: str = "mean", std_coef: float = 1.0,
                 normalize: bool = False, batch_size: int = 16, max_length: int = 2048, device: str | None = None,
                 place: Callable | None = None, lockstep: Callable[[int], int] | None = None):
        """place(model) -> the model to call (default: moved to `device`), e.g. sharded like a trained policy.
        lockstep(batches) -> the most batches any process scores at once: sharded models gather their weights
        in every forward, so each process runs that many (repeating a row, uncounted, once out of its own)."""
        if aggregate not in AGGREGATES:
            raise PrefoptError(f"aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
        self.aggregate, self.std_coef, self.batch_size, self.max_length = aggregate, std_coef, batch_size, max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lockstep = lockstep
        place = place or (lambda model: model.to(self.device))
        self.function = source if callable(source) else None
        self.members = []  # (model, tokenizer, (mean, std))
        for path in [] if self.function else (source if isinstance(source, list) else [source]):
            model, tokenizer = load_reward_model(path)
            stats = normalization(path) if normalize else None
            if normalize and stats is None:
                raise PrefoptError(f"normalize: {path} has no {NORMALIZATION_FILE}; train it with prefopt, or "
                                   "score without normalize")
            self.members.append((place(model), tokenizer, (stats["mean"], stats["std"]) if stats else (0, 1)))

    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        return self.combine(self.member_scores(prompts, completions))

    def member_scores(self, prompts: list, completions: list) -> torch.Tensor:
        """(K, N): each member's (normalised) score of each completion; K = 1 for a function."""
        if self.function:
            return torch.tensor([list(map(float, self.function(prompts, completions)))])
        return torch.stack([(self._score(model, tokenizer, prompts, completions) - mean) / std
                            for model, tokenizer, (mean, std) in self.members])

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        if self.aggregate == "min":
            return scores.min(0).values
        mean = scores.mean(0)
        if self.aggregate == "mean_minus_std":
            return mean - self.std_coef * scores.std(0, unbiased=False)
        return mean

    @torch.no_grad()
    def _score(self, model, tokenizer, prompts: list, completions: list) -> torch.Tensor:
        from prefopt.data.collate import pad_sequences
        from prefopt.data.formats import is_messages, render_example
        from prefopt.data.tokenize import tokenize_examples

        # no emptiness checks: a sampled completion may be nothing but EOS, and still gets a score
        rows = [render_example(tokenizer, p, {"completion": [{"role": "assistant", "content": c}] if is_messages(p)
                                              else c}) for p, c in zip(prompts, completions)]
        rows, _ = tokenize_examples(rows, tokenizer, self.max_length, self.max_length - 1, ("completion",))
        batches = math.ceil(len(rows) / self.batch_size)
        scores = []
        for i in range(self.lockstep(batches) if self.lockstep else batches):
            chunk = rows[i * self.batch_size : (i + 1) * self.batch_size]
            batch = pad_sequences([r["prompt_ids"] for r in chunk or rows[:1]],
                                  [r["completion_ids"] for r in chunk or rows[:1]], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device)).logits
            if chunk:
                scores.append(logits.squeeze(-1).float().cpu())
        return torch.cat(scores)


def evaluate_reward_model(path: str | Path, data: str, batch_size: int = 16, max_length: int = 2048) -> dict:
    """Accuracy, ties, margin and reward statistics of a saved reward model on a preference set."""
    from prefopt.data import load_examples
    from prefopt.data.collate import collate_pairs
    from prefopt.recipe import DataConfig, DataSource

    model, tokenizer = load_reward_model(path)
    cfg = DataConfig(train=[], max_length=max_length, max_prompt_length=max_length - 1, on_bad_row="drop")
    pairs = load_examples([DataSource(data)], tokenizer, cfg, 0, "--data", log=lambda _: None)
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            rewards = pair_rewards(model, collate_pairs(pairs[i : i + batch_size], tokenizer.pad_token_id))
            chosen.append(rewards.chosen)
            rejected.append(rewards.rejected)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    every = torch.cat([chosen, rejected])
    return {"model": str(path), "data": data, "pairs": len(pairs),
            "accuracy": (chosen > rejected).float().mean().item(), "ties": (chosen == rejected).float().mean().item(),
            "margin_mean": (chosen - rejected).mean().item(), "reward_mean": every.mean().item(),
            "reward_std": every.std(unbiased=False).item(), "chosen_mean": chosen.mean().item(),
            "rejected_mean": rejected.mean().item()}


INTERNAL_COLUMNS = ("prompt", "prompt_ids")  # what a prompt row carries besides its dataset columns


class RewardTerms:
    """The score of each completion: the weighted sum of a recipe's `rewards:` terms (prefopt.recipe_online.RewardTerm).

    A function term is called as fn(prompts, completions, **columns): each column of the prompts' dataset rows
    that the function names (all of them if it takes **kwargs), as lists beside prompts (None where a row lacks
    it). It returns one float per completion, or None where it does not apply: such a row gets nothing from the
    term (TRL's nansum), and the term's metrics skip it. A model term is a RewardScorer (an ensemble when
    several). `scorer_options` go to each RewardScorer (device, placement, lockstep).
    """

    def __init__(self, terms: list, **scorer_options):
        from prefopt.errors import import_object

        self.terms = []  # (name, weight, scorer or function, the columns it takes or None for all)
        for i, term in enumerate(terms):
            if term.function:
                fn = import_object(term.function, f"rewards[{i}].function")
                self.terms.append((term.name, term.weight, fn, _named_columns(fn, term.name)))
            else:
                scorer = RewardScorer(term.models, term.aggregate, term.std_coef, term.normalize, **scorer_options)
                self.terms.append((term.name, term.weight, scorer, ()))

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.terms]

    @property
    def members(self) -> list:
        """Every reward model of every term: (model, tokenizer, (mean, std))."""
        return [m for _, _, scorer, _ in self.terms if isinstance(scorer, RewardScorer) for m in scorer.members]

    def check_columns(self, rows: list[dict], where: str) -> None:
        """Stop before training when a function names a column (without a default) that rows of `where` lack."""
        import inspect

        have = set().union(*(row.keys() for row in rows)) - set(INTERNAL_COLUMNS) if rows else set()
        for name, _, fn, columns in self.terms:
            if not callable(fn) or isinstance(fn, RewardScorer) or columns is None:
                continue
            params = inspect.signature(fn).parameters
            for column in columns:
                if params[column].default is not inspect.Parameter.empty:
                    continue
                lacking = sum(column not in row for row in rows)
                if lacking:
                    raise PrefoptError(
                        f"rewards term {name!r}: {fn.__qualname__} takes column {column!r}, but {lacking} of "
                        f"{len(rows)} rows of {where} lack it; their columns are {', '.join(sorted(have)) or 'none'}"
                        f" besides the prompt. Add the column to the data, or give the parameter a default")

    def __call__(self, prompts: list, completions: list, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total (N,), per term (terms, N) with NaN where a term does not apply)."""
        values = torch.stack([self._term(i, prompts, completions, rows) for i in range(len(self.terms))])
        weights = torch.tensor([weight for _, weight, _, _ in self.terms], dtype=values.dtype)[:, None]
        return (values * weights).nansum(0), values

    def _term(self, i: int, prompts: list, completions: list, rows: list[dict]) -> torch.Tensor:
        name, _, scorer, columns = self.terms[i]
        if isinstance(scorer, RewardScorer):
            return scorer(prompts, completions).float()
        keys = set().union(*(row.keys() for row in rows)) - set(INTERNAL_COLUMNS) if columns is None else columns

        def call(index: list[int]):
            kwargs = {key: [rows[j].get(key) for j in index] for key in keys}
            return scorer([prompts[j] for j in index], [completions[j] for j in index], **kwargs)

        where = f"rewards term {name!r} ({getattr(scorer, '__qualname__', scorer)})"
        try:
            out = call(list(range(len(prompts))))
        except Exception as exc:
            for j in range(len(prompts)):  # name the first row it fails on
                try:
                    call([j])
                except Exception as row_exc:
                    raise PrefoptError(f"{where} raised {type(row_exc).__name__}: {row_exc}, on the completion "
                                       f"{completions[j]!r:.200} of prompt {prompts[j]!r:.200}") from row_exc
            raise PrefoptError(f"{where} raised {type(exc).__name__}: {exc} on a batch of {len(prompts)}") from exc
        if not hasattr(out, "__len__") or len(out) != len(prompts):
            raise PrefoptError(f"{where} returned {len(out) if hasattr(out, '__len__') else type(out).__name__} "
                               f"values for {len(prompts)} completions; return one float (or None) per completion")
        scores = []
        for j, value in enumerate(out):
            try:
                value = math.nan if value is None else float(value)
                if not math.isfinite(value) and out[j] is not None:
                    raise ValueError(value)
            except (TypeError, ValueError):
                raise PrefoptError(f"{where} gave {out[j]!r:.40} for the completion {completions[j]!r:.200} of "
                                   f"prompt {prompts[j]!r:.200}; a score is a finite number, or None where the term "
                                   "does not apply") from None
            scores.append(value)
        return torch.tensor(scores)


def _named_columns(fn, name: str) -> tuple[str, ...] | None:
    """The dataset columns a reward function takes: its parameters after (prompts, completions); None: all
    (it takes **kwargs)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise PrefoptError(f"rewards term {name!r}: {getattr(fn, '__qualname__', fn)} must take (prompts, "
                           "completions, **columns)")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in positional[2:]) + tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
