"""Method distill's recipe: what it resolves to (method rl with the teacher as the reference, its reverse KL the
reward) and the rules of its keys (prefopt.recipe_checks holds every other method's)."""

from __future__ import annotations

import math
import typing

from prefopt.recipe_checks import check_rl, fail, resolve_rl

if typing.TYPE_CHECKING:
    from prefopt.recipe import Recipe


def resolve_distill(recipe: Recipe, where: str) -> None:
    """On-policy distillation is method rl with the teacher as the reference and its per-token reverse KL as the
    reward (recipe_online.DistillConfig): these ppo keys are set, the others are the update's."""
    from prefopt.recipe_online import DistillConfig, PPOConfig

    distill = recipe.distill = recipe.distill or DistillConfig()
    if not distill.teacher:
        fail(where, "distill.teacher", "give the teacher's checkpoint: a hub id or a directory")
    if not (distill.coef > 0 and math.isfinite(distill.coef)):
        fail(where, "distill.coef", f"must be a finite number > 0, got {distill.coef}")
    if not 0 <= distill.beta <= 1:
        fail(where, "distill.beta", f"interpolates forward (0) and reverse (1) KL: in [0, 1], got {distill.beta}")
    if distill.top_k is not None and distill.top_k < 1:
        fail(where, "distill.top_k", f"must be >= 1 (or null: the whole vocabulary), got {distill.top_k}")
    recipe.reference.kind, recipe.reference.name_or_path = "copy", distill.teacher
    ppo = recipe.ppo = recipe.ppo or PPOConfig()
    ppo.advantage, ppo.gamma, ppo.advantage_scale = "reinforce_pp", 0.0, "none"
    ppo.kl_penalty, ppo.kl_coef, ppo.kl_estimator, ppo.target_kl = "reward", distill.coef, "k1", None
    resolve_rl(recipe, where)


def check_distill(recipe: Recipe, where: str) -> None:
    """Method distill: method rl's rules, its reward terms optional (the teacher's log-probs are its signal)."""
    check_rl(recipe, where, rewards_required=False)
    distill = recipe.distill
    if not 0 <= distill.lmbda <= 1:
        fail(where, "distill.lmbda", f"is the share of rollouts the student samples, in [0, 1]; got {distill.lmbda}")
    if distill.server and distill.loss == "jsd":
        fail(where, "distill.server", "jsd compares the two models' whole next-token distributions, which a served "
             "teacher does not send: use distill.loss: reverse_kl with a served teacher, or leave distill.server out")
    if distill.server == "spawn" and distill.engine == "vllm" and recipe.rollout.temperature != 1:
        fail(where, "distill.engine", f"a vLLM teacher scores at temperature 1 only (vLLM's prompt log-probs are the "
             f"raw logits'), and rollout.temperature is {recipe.rollout.temperature}: set it to 1.0, or use hf")
    if distill.token_map != "same" and distill.loss == "jsd":
        fail(where, "distill.token_map", "jsd compares whole next-token distributions over one vocabulary; a mapped "
             "teacher scores the sampled tokens only: use distill.loss: reverse_kl")
    if distill.lmbda < 1 and distill.loss != "jsd":
        fail(where, "distill.lmbda", f"{distill.lmbda} trains on the data set's completions in some rollouts; the "
             "reverse KL's sampled-token estimate needs the student's own samples: use distill.loss: jsd")
