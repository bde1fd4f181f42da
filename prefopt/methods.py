"""The methods a recipe names (`method:`), one record each: the sections it owns besides the common ones (model,
data, optim, train, log, eval), how its recipe is resolved and checked, its trainer, its headline metrics, its
plot panels, what its model card says and what `prefopt eval` does with its runs. This is the one place that
knows the methods by name; everything else asks the record (`METHODS[recipe.method]`).

A recipe written before `method:` existed gets its method from its sections (`implied_method`), and its saved
recipe.yaml then names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from prefopt import recipe_checks as checks
from prefopt import recipe_distill

LR_AND_SPEED = [("learning rate", ["lr"]), ("tokens/s", ["tokens_per_second"])]
ONLINE_PANELS = [("score", ["score", "rollout/score"]), ("reward terms", ["rewards/"]),
                 ("KL to the reference", ["kl", "rollout/kl"]), ("completion length", ["length", "rollout/length"])]


@dataclass(frozen=True)
class Method:
    name: str
    sections: tuple[str, ...]  # recipe sections of its own
    trainer: str  # module:Class, imported when a run starts (the recipe stays light)
    headline: tuple[str, ...]  # the console's metrics (a key ending in / takes its children)
    panels: list = field(default_factory=list)  # `prefopt plot`: [(title, [metric keys])]
    description: str = ""  # the model card's
    resolve: Callable | None = None  # fills what the recipe left to its defaults (registry entries declare them)
    check: Callable | None = None  # validates the resolved recipe; never writes into it
    prompts_only: bool = False  # its data is prompts (online) rather than completions
    reward_model: bool = False  # it trains a model with a score head
    # prefopt eval on its runs: "reward_model" (ranking accuracy), "losses" (its eval metrics against its
    # reference), "sampler" (greedy samples scored by its reward terms), "none"
    evaluation: str = "none"
    frontier: bool = False  # `prefopt plot` draws eval reward terms against KL (Gao et al. 2023)
    # a frozen teacher scores each sampled token (distill): reward terms are optional, scores alike are no lack of
    # signal, and the teacher (reference copy) must share the student's tokenizer
    teacher: bool = False

    def trainer_class(self):
        from prefopt.errors import import_object

        return import_object(self.trainer, f"method {self.name}")


METHODS = {method.name: method for method in (
    Method("preference", ("reference", "loss"), "prefopt.trainers.preference:PreferenceTrainer",
           ("loss", "rewards/accuracy", "rewards/margin", "diag/policy_ranking_accuracy", "diag/chosen_logp_change",
            "diag/length_margin_corr"),
           [("loss", ["loss"]), ("reward margin", ["rewards/margin"]),
            ("ranking accuracy", ["rewards/accuracy", "diag/policy_ranking_accuracy", "diag/reference_ranking_accuracy"]),
            ("log-probs", ["logps/chosen", "logps/rejected"]),
            ("log-prob change vs reference", ["diag/chosen_logp_change", "diag/rejected_logp_change"]),
            ("chosen log-prob fell (share)", ["diag/chosen_logp_fell"]), *LR_AND_SPEED],
           "offline preference optimisation", checks.resolve_losses, checks.check_preference, evaluation="losses"),
    # supervised fine-tuning: the likelihood of `messages`, `text`, prompt/completion or chosen completions
    Method("sft", ("loss",), "prefopt.trainers.preference:PreferenceTrainer", ("loss", "logps/"),
           [("loss", ["loss"]), ("log-prob of each sequence's trained tokens", ["logps/"]), *LR_AND_SPEED],
           "supervised fine-tuning", checks.resolve_sft, checks.check_sft, evaluation="losses"),
    Method("reward", ("loss", "reward", "reference"), "prefopt.trainers.reward:RewardTrainer",
           ("loss", "rewards/accuracy", "rewards/margin", "rewards/std"),
           [("loss", ["loss"]), ("accuracy", ["rewards/accuracy"]), ("reward margin", ["rewards/margin"]),
            *LR_AND_SPEED],
           "reward modelling", checks.resolve_losses, checks.check_reward, reward_model=True, evaluation="reward_model"),
    Method("rl", ("reference", "rollout", "rewards", "ppo"), "prefopt.trainers.ppo:PPOTrainer",
           ("score", "rewards/", "kl", "length", "rollout/score", "rollout/kl", "policy/entropy"),
           [*ONLINE_PANELS, ("entropy", ["policy/entropy"]), ("learning rate", ["lr"]),
            ("tokens/s", ["rollout/tokens_per_second", "tokens_per_second"])],
           "online reinforcement learning", checks.resolve_rl, checks.check_rl, prompts_only=True,
           evaluation="sampler", frontier=True),
    # on-policy distillation: the student samples, the teacher's per-token log-probs make the dense reward
    Method("distill", ("rollout", "rewards", "ppo", "distill"), "prefopt.trainers.ppo:PPOTrainer",
           ("kl", "rollout/kl", "score", "length", "policy/entropy"),
           [("KL to the teacher", ["kl", "rollout/kl"]), ("score", ["score", "rollout/score"]),
            ("completion length", ["length", "rollout/length"]), ("entropy", ["policy/entropy"]),
            ("learning rate", ["lr"])],
           "on-policy distillation", recipe_distill.resolve_distill, recipe_distill.check_distill, prompts_only=True,
           evaluation="sampler", teacher=True),
    # preference losses on the policy's own samples, paired by their scores (online and iterative DPO, SPPO)
    Method("online", ("reference", "loss", "rollout", "rewards", "pairs"),
           "prefopt.trainers.online:OnlinePreferenceTrainer",
           ("loss", "score", "kl", "rewards/accuracy", "rewards/margin", "rollout/score", "pairs/ties"),
           [*ONLINE_PANELS, ("loss", ["loss"]), ("reward margin", ["rewards/margin"]),
            ("pairs", ["pairs/real", "pairs/ties"]), ("learning rate", ["lr"])],
           "online preference optimisation on its own samples", checks.resolve_online, checks.check_online,
           prompts_only=True, evaluation="sampler", frontier=True),
)}
SECTIONS = {section for method in METHODS.values() for section in method.sections}
# method reward with reward.kind implicit_prm: a policy-shaped model trained against its reference on outcome labels
# (implicit_prm_ce) or pairs (dpo), Yuan et al. 2024, by the preference trainer; a causal LM, not a score head
IMPLICIT_PRM = dataclasses.replace(
    METHODS["preference"], name="reward", sections=METHODS["reward"].sections,
    headline=("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"),
    description="implicit process reward modelling (Yuan et al. 2024)", check=checks.check_reward)


def record(recipe) -> Method:
    """The record that runs a resolved recipe (or a saved one, as plain data): its method's, or for method reward
    with reward.kind implicit_prm, IMPLICIT_PRM's."""
    if isinstance(recipe, dict):
        method, kind = recipe.get("method") or implied_method(recipe), (recipe.get("reward") or {}).get("kind")
    else:
        method, kind = recipe.method, recipe.reward.kind
    return IMPLICIT_PRM if method == "reward" and kind == "implicit_prm" else METHODS.get(method, METHODS["preference"])


def implied_method(data: dict) -> str:
    """The method of a recipe that does not name one (written before `method:` existed)."""
    if "pairs" in data:
        return "online"
    if "ppo" in data or "rollout" in data or "rewards" in data:
        return "rl"
    loss = data.get("loss")
    first = (loss[0] if isinstance(loss, list) and loss else loss) or {}
    name = first.get("name", "dpo") if isinstance(first, dict) else first
    from prefopt.losses import LOSSES

    return "reward" if isinstance(name, str) and name in LOSSES and LOSSES[name].data == "rewards" else "preference"


def method_of(recipe: dict | None) -> Method:
    """The record of a saved recipe (recipe.yaml as plain data)."""
    return record(recipe or {})
