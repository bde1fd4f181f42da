"""Degenerate signals: a run that would train and mean nothing. Each is said loudly when it is found (at start-up
for the data and the recipe, at each rollout for the rewards), or stops the run with `data.on_degenerate: error`.

- every pair's chosen equals its rejected, or more than DEGENERATE_SHARE of them do (no preference to learn);
- every unpaired row has the same label (KTO and BCO learn from the contrast of desirable and undesirable);
- a reward term returns None for every row, or one constant value, through a whole rollout;
- no group has any reward variance for FLAT_ROLLOUTS rollouts in a row (every advantage is 0);
- warm-up as long as the run or longer (the learning rate never reaches optim.lr).
"""

from __future__ import annotations

import math

from prefopt.errors import DataError

DEGENERATE_SHARE = 0.5  # pairs with chosen == rejected above this share are said
FLAT_ROLLOUTS = 3  # rollouts in a row without any group's reward variance


def report(finding: str, recipe, log=print) -> None:
    """Say `finding` (a WARNING line), or stop with it under data.on_degenerate: error."""
    if recipe.data.on_degenerate == "error":
        raise DataError(f"{finding} (data.on_degenerate: error; set it to warn to train anyway)")
    log(f"[prefopt] WARNING: {finding} (data.on_degenerate: error stops the run here)")


SAMPLED, BLOCK = 20_000, 1000  # rows a data set larger than this is checked on: seeded blocks of consecutive rows


def check_examples(examples: list[dict], where: str, recipe, log=print, labels: bool = True) -> None:
    """Pairs whose chosen equals rejected; unpaired rows that all share one label (where a loss learns from the
    labels' contrast). A data set of more than SAMPLED rows is judged by SAMPLED // BLOCK blocks of BLOCK
    consecutive rows drawn from the seed: read a block at a time, memory does not grow with the rows, and a
    memory-mapped table is read in a few places, not page by page throughout."""
    blocks = range(math.ceil(len(examples) / BLOCK))
    if len(examples) > SAMPLED:
        import random

        blocks = sorted(random.Random(recipe.seed).sample(blocks, SAMPLED // BLOCK))
    pairs = same = 0
    seen = set()
    for block in blocks:
        part = range(block * BLOCK, min((block + 1) * BLOCK, len(examples)))
        for ex in examples.take(part) if hasattr(examples, "take") else [examples[i] for i in part]:
            if "chosen_ids" in ex:
                pairs += 1
                same += ex["chosen_ids"] == ex["rejected_ids"]
            if "label" in ex:
                seen.add(bool(ex["label"]))
    if pairs and (same == pairs or same / pairs > DEGENERATE_SHARE):
        report(f"{where}: {same} of {pairs} pairs have chosen equal to rejected (the same tokens), so "
               f"{'no pair' if same == pairs else 'most pairs'} carry a preference to learn", recipe, log)
    if labels and len(seen) == 1 and not pairs:
        kind = "desirable" if seen.pop() else "undesirable"
        report(f"{where}: every unpaired row is labelled {kind}; KTO and BCO learn from the contrast of desirable "
               "and undesirable completions", recipe, log)


def check_recipe(recipe, log=print) -> None:
    if recipe.optim.warmup_steps >= recipe.train.max_steps:
        report(f"optim.warmup_steps ({recipe.optim.warmup_steps}) is not shorter than train.max_steps "
               f"({recipe.train.max_steps}): the learning rate never reaches optim.lr", recipe, log)


class RolloutWatch:
    """Each rollout's reward terms and groups: a term that is None or constant throughout, said once per term;
    FLAT_ROLLOUTS rollouts in a row where no group's scores differ."""

    def __init__(self, recipe, log=print, scores_signal: bool = True):
        """scores_signal False: the scores are not the only signal (a teacher's log-probs), so scores alike in
        every group are said of no rollout."""
        self.recipe, self.log, self.scores_signal = recipe, log, scores_signal
        self.said: set[str] = set()
        self.flat = 0

    def check(self, names: list[str], terms, scores, group_size: int) -> None:
        """terms (rows, terms) with NaN where a term does not apply; scores (rows,) the penalised totals."""
        for i, name in enumerate(names):
            values = terms[:, i]
            applies = values[~values.isnan()]
            if len(applies) == 0:
                finding = f"rewards term {name!r} returned None for every completion of this rollout"
            elif len(values) > 1 and bool((applies == applies[0]).all()):
                finding = f"rewards term {name!r} gave every completion of this rollout the same value ({applies[0]:g})"
            else:
                continue
            if name not in self.said:
                self.said.add(name)
                report(finding + ": it gives no signal; check the function against the data's columns", self.recipe,
                       self.log)
        groups = scores.view(-1, group_size)
        if group_size > 1 and self.scores_signal:
            varied = bool((groups.max(1).values > groups.min(1).values).any())
            self.flat = 0 if varied else self.flat + 1
            if self.flat == FLAT_ROLLOUTS:
                report(f"for {FLAT_ROLLOUTS} rollouts in a row no prompt's {group_size} completions scored "
                       "differently: every advantage is 0 and the policy does not move", self.recipe, self.log)


def weight_problem(weight: float, allow_negative: bool) -> str | None:
    """Why a loss term's weight cannot be trained, or None."""
    if not math.isfinite(weight) or weight == 0:
        return f"must be a finite number other than 0, got {weight} (remove the term instead)"
    if weight < 0 and not allow_negative:
        return (f"is {weight}: a negative weight maximises the loss (unlearning); set allow_negative_weight: true "
                "on this term if that is meant")
    return None
