"""What a recipe's defaults resolve to, and the checks that span several keys, before anything loads.

`resolve_<method>` fills what the recipe left to its defaults, from the registry entries that declare them (an
advantage estimator its scale and loss aggregation, the losses whether they need a reference); `check` then
validates the resolved recipe (the cross-key rules, the loss's arguments against its signature) and never writes
into it. prefopt.methods names each method's pair; prefopt.recipe calls them."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

from prefopt.errors import RecipeError

if typing.TYPE_CHECKING:
    from prefopt.recipe import Recipe


def fail(where: str, key: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{where}: {key or 'recipe'}: {message}")


def check(recipe: Recipe, where: str) -> None:
    """The checks every resolved recipe passes (prefopt.recipe then runs its method's). Nothing is written."""
    data, train = recipe.data, recipe.train
    _check_ranges(recipe, where)
    if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
        fail(where, "data.max_prompt_length", f"must be smaller than data.max_length ({data.max_length}), "
              f"so that every completion keeps at least one token; got {data.max_prompt_length}")
    if data.eval is not None and data.eval_fraction:
        fail(where, "data.eval_fraction", "give either data.eval or data.eval_fraction, not both")
    if data.streaming:
        _check_streaming(recipe, where)
    if train.share_prompt and not train.packing:
        fail(where, "train.share_prompt", "works on packed sequences: set train.packing: true too")
    if recipe.rollout.engine not in ("hf", "vllm") and ":" not in recipe.rollout.engine:
        fail(where, "rollout.engine", f"unknown engine {recipe.rollout.engine!r}; use hf, vllm or module:Class")
    server = recipe.rollout.server
    if server is not None and server != "spawn" and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", server):
        fail(where, "rollout.server", f"{server!r} is neither spawn nor HOST:PORT (e.g. 127.0.0.1:8123, where "
             "`prefopt serve MODEL --port 8123` runs)")
    if server is not None and recipe.rollout.engine not in ("hf", "vllm"):
        fail(where, "rollout.server", f"a server runs engine hf or vllm, not {recipe.rollout.engine!r}")
    if train.batch_size % train.micro_batch_size:
        fail(where, "train.batch_size", f"{train.batch_size} is not a multiple of train.micro_batch_size "
              f"({train.micro_batch_size}); the global batch is split into equal micro-batches")
    _check_log(recipe, where)


def _check_streaming(recipe: Recipe, where: str) -> None:
    """What a stream cannot serve: rows held out of it, or computed over all of it before training."""
    if recipe.data.eval_fraction:
        fail(where, "data.eval_fraction", "a stream is not held in memory to hold rows out of it: give data.eval "
             "(a held-out file), or set data.streaming: false")
    if recipe.reference.kind == "precomputed":
        fail(where, "reference.kind", "precomputed scores every training row before the run, which a stream does "
             "not hold: use copy (or adapter_off with LoRA), or set data.streaming: false")
    if recipe.distill is not None and recipe.distill.lmbda < 1:
        fail(where, "distill.lmbda", "GKD's data completions are drawn by (seed, rollout) from the whole set, which "
             "a stream does not hold: set distill.lmbda: 1, or data.streaming: false")


def sft_options(recipe: Recipe, where: str | None = None) -> list[str]:
    """The data.* switches of SFT that the recipe sets away from their defaults; with `where`, a method that
    does not train on SFT data refuses them."""
    data = recipe.data
    keys = ["assistant_only_loss"] * data.assistant_only_loss + ["completion_only_loss"] * (
        data.completion_only_loss is False)
    if where and keys:
        fail(where, f"data.{keys[0]}", f"shapes SFT data; method {recipe.method!r} does not train on it")
    return keys


# ----- resolution: what a recipe left to its defaults, from the registry entries that declare them -----------


def resolve_losses(recipe: Recipe, where: str) -> None:
    """reference.kind auto: adapter_off with LoRA, none if no loss needs a reference, else copy; eval.rewards'
    names."""
    from prefopt.losses import get_loss  # needs only torch

    _name_terms(recipe.eval.rewards)
    ref = recipe.reference
    if ref.kind == "auto":
        needs = any(get_loss(term.name, where=f"{where}: loss.name").needs_reference for term in recipe.loss)
        adapters = recipe.model.lora is not None or recipe.model.adapter is not None
        ref.kind = "none" if not needs else "adapter_off" if adapters else "copy"


def resolve_sft(recipe: Recipe, where: str) -> None:
    """method: sft trains with the sft loss unless the recipe names its loss (an SFT variant of its own)."""
    default = type(recipe.loss[0])() if recipe.loss else None  # LossConfig (prefopt.recipe imports this module)
    if recipe.loss == [default]:
        recipe.loss = [dataclasses.replace(default, name="sft")]
    resolve_losses(recipe, where)


def resolve_online(recipe: Recipe, where: str) -> None:
    resolve_losses(recipe, where)
    _name_terms(recipe.rewards)


def resolve_rl(recipe: Recipe, where: str) -> None:
    """The estimator's own defaults (its scale and loss aggregation), the engine's importance sampling, the
    clip bounds, and reference.kind auto (none without a KL, else as for losses)."""
    from prefopt.losses.ppo import get_advantage
    from prefopt.recipe_online import PPOConfig

    recipe.ppo = recipe.ppo or PPOConfig()
    ppo, rollout, ref = recipe.ppo, recipe.rollout, recipe.reference
    _name_terms(recipe.rewards)
    try:
        estimator = get_advantage(ppo.advantage)
    except (ValueError, RecipeError) as exc:
        fail(where, "ppo.advantage", str(exc).replace("ppo.advantage: ", ""))
    ppo.advantage_scale = ppo.advantage_scale or estimator.scale
    ppo.loss_aggregation = ppo.loss_aggregation or estimator.aggregation
    if ppo.engine_is is None:
        ppo.engine_is = "truncate" if rollout.engine == "vllm" or rollout.lag or rollout.server else "none"
    ppo.clip_low = ppo.clip if ppo.clip_low is None else ppo.clip_low
    ppo.clip_high = ppo.clip if ppo.clip_high is None else ppo.clip_high
    if ref.kind == "auto":
        ref.kind = "none" if ppo.kl_coef == 0 else "adapter_off" if recipe.model.lora or recipe.model.adapter else "copy"


def _name_terms(terms: list) -> None:
    """A reward term without a name takes its function's (or model<i>)."""
    for i, term in enumerate(terms):
        term.name = term.default_name(i)


# ----- the methods' checks ----------------------------------------------------------------------------------


def _loss_specs(recipe: Recipe, where: str) -> dict[str, str]:
    """Each loss term against its signature, the reference against what the losses need; {name: data kind}."""
    from prefopt.losses import get_loss  # needs only torch

    train = recipe.train
    if not recipe.loss:
        fail(where, "loss", "give at least one loss, e.g. {name: dpo, beta: 0.1}")
    from prefopt.degenerate import weight_problem

    specs = []
    for i, term in enumerate(recipe.loss):
        key = "loss" if len(recipe.loss) == 1 else f"loss[{i}]"
        problem = weight_problem(term.weight, term.allow_negative_weight)
        if problem:
            fail(where, f"{key}.weight", problem)
        specs.append(get_loss(term.name, where=f"{where}: {key}.name"))
        specs[-1].check_params(term.params, where=f"{where}: {key}")
    _check_reference(recipe, specs, where)
    kinds = {spec.name: spec.data for spec in specs}
    alphas = {term.ld_alpha for term in recipe.loss}
    if len(alphas) > 1:
        fail(where, "loss", f"terms give different ld_alpha ({sorted(map(str, alphas))}); they share one forward: "
              "give it to every term, the same")
    alpha = alphas.pop()
    if alpha is not None and (not 0 <= alpha <= 1 or set(kinds.values()) != {"paired"}):
        fail(where, "loss.ld_alpha", f"weighs the tail of the longer completion of a pair: in [0, 1], with pair "
              f"losses; got {alpha} with {kinds}")
    weighting = {term.use_weighting for term in recipe.loss}
    if True in weighting and (len(weighting) > 1 or set(kinds.values()) != {"paired"} or {"aot", "aot_unpaired"} & set(kinds)):
        fail(where, "loss.use_weighting", f"weighs pairs (WPO): give it to every term, with pair losses other than "
              f"aot (whose sort couples the pairs, as TRL refuses it); got {kinds}")
    if {"paired", "unpaired"} <= set(kinds.values()):
        fail(where, "loss", f"mixes losses on pairs and on unpaired rows ({kinds}); they need different batches")
    if any(spec.kl for spec in specs) and train.micro_batch_size < 2:
        fail(where, "train.micro_batch_size", "must be at least 2 for a loss with a KL reference point (kto): "
              "it is estimated from mismatched prompt/completion pairs within the micro-batch")
    return kinds


def check_preference(recipe: Recipe, where: str) -> None:
    kinds = _loss_specs(recipe, where)
    if "rewards" in kinds.values():
        fail(where, "method", f"loss {kinds} trains a reward model: add the line `method: reward`")
    if "group" in kinds.values():
        fail(where, "loss", f"{kinds} takes groups of the policy's own samples: use method: online")
    for key in sft_options(recipe):
        if set(kinds.values()) != {"any"}:
            fail(where, f"data.{key}", f"shapes what SFT trains; the loss {kinds} is not an SFT loss: use "
                  "method: sft (loss sft), or leave it at its default")


def check_sft(recipe: Recipe, where: str) -> None:
    kinds = _loss_specs(recipe, where)
    if set(kinds.values()) != {"any"}:
        fail(where, "loss", f"method 'sft' trains the likelihood of the data (loss sft); {kinds} is a preference "
              "loss: use method: preference for it")


def check_reward(recipe: Recipe, where: str) -> None:
    if recipe.reward.kind == "implicit_prm":
        names = [term.name for term in recipe.loss]
        if not set(names) <= {"implicit_prm_ce", "dpo"}:
            fail(where, "loss", f"an implicit PRM (reward.kind implicit_prm) trains on outcome labels with "
                 f"implicit_prm_ce, or on pairs with dpo (Yuan et al. 2024); got {', '.join(names)}")
        check_preference(recipe, where)
        return
    sft_options(recipe, where)
    kinds = _loss_specs(recipe, where)
    if set(kinds.values()) != {"rewards"}:
        fail(where, "loss", f"method 'reward' trains a reward model on a reward-model loss (bradley_terry), got {kinds}")
    if recipe.reference.kind not in ("auto", "none"):
        fail(where, "reference", "a classifier reward model has no reference; remove the section (an implicit PRM, "
             "reward.kind: implicit_prm, has one)")


# Every numeric recipe value's range: (test, what it must be). NaN fails every test.
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
UNIT, UNIT_OPEN = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    "optim.lr": POSITIVE, "optim.eps": POSITIVE, "optim.warmup_steps": NON_NEGATIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.min_lr_ratio": UNIT, "data.max_length": (lambda v: v >= 2, ">= 2"), "data.max_prompt_length": AT_LEAST_ONE,
    "data.eval_fraction": UNIT_OPEN, "data.num_proc": AT_LEAST_ONE, "data.shuffle_buffer": AT_LEAST_ONE,
    "train.batch_size": AT_LEAST_ONE, "train.micro_batch_size": AT_LEAST_ONE, "train.eval_batch_size": AT_LEAST_ONE,
    "train.max_steps": AT_LEAST_ONE, "train.max_grad_norm": POSITIVE, "train.log_every": AT_LEAST_ONE,
    "train.eval_every": NON_NEGATIVE, "train.save_every": NON_NEGATIVE, "train.keep_checkpoints": AT_LEAST_ONE,
    "train.logps_chunk_size": NON_NEGATIVE, "train.max_skipped_steps": NON_NEGATIVE,
    "model.lora.r": AT_LEAST_ONE, "model.lora.alpha": POSITIVE, "model.lora.dropout": UNIT_OPEN,
    "reference.sync_every": NON_NEGATIVE, "reference.sync_alpha": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.samples_per_prompt": AT_LEAST_ONE, "rollout.lag": NON_NEGATIVE, "rollout.max_new_tokens": AT_LEAST_ONE,
    "rollout.temperature": POSITIVE, "rollout.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.filter_max_rounds": AT_LEAST_ONE, "rollout.overlong.buffer": AT_LEAST_ONE,
    "rollout.overlong.penalty": NON_NEGATIVE, "rollout.gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.tensor_parallel_size": AT_LEAST_ONE, "ppo.engine_is_cap": (lambda v: v >= 1, ">= 1"),
    "ppo.epochs": AT_LEAST_ONE, "ppo.num_mini_batches": AT_LEAST_ONE, "ppo.clip": POSITIVE, "ppo.value_clip": POSITIVE,
    "ppo.clip_low": POSITIVE, "ppo.clip_high": POSITIVE, "ppo.dual_clip": ((lambda v: v > 1), "> 1"),
    "ppo.vf_coef": NON_NEGATIVE, "ppo.entropy_coef": NON_NEGATIVE, "ppo.kl_coef": NON_NEGATIVE,
    "ppo.target_kl": POSITIVE, "ppo.kl_horizon": AT_LEAST_ONE, "ppo.gamma": UNIT, "ppo.lam": UNIT,
    "ppo.approx_kl_stop": POSITIVE, "pairs.min_gap": NON_NEGATIVE, "eval.generate": NON_NEGATIVE, "eval.max_new_tokens": AT_LEAST_ONE,
}


def _check_ranges(recipe: Recipe, where: str) -> None:
    """Each value of RANGES (a section or value that is None is not checked), then optim.betas."""
    for key, (test, rule) in RANGES.items():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part, None)
        if value is not None and not (test(value) and math.isfinite(value)):
            fail(where, key, f"must be {rule}, got {value}")
    betas = recipe.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        fail(where, "optim.betas", f"must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas}")


def check_rl(recipe: Recipe, where: str, rewards_required: bool = True) -> None:
    """The cross-key rules of method rl (PPO and the GRPO family)."""
    sft_options(recipe, where)
    from prefopt.losses.ppo import get_advantage

    ppo, rollout, train, ref = recipe.ppo, recipe.rollout, recipe.train, recipe.reference
    _check_rewards(recipe.rewards, where, required=rewards_required)
    _no_eval_rewards(recipe, where)
    estimator = get_advantage(ppo.advantage)
    k = rollout.samples_per_prompt
    if k < estimator.min_group or (rollout.filter_groups and k < 2):
        fail(where, "rollout.samples_per_prompt", f"{k} is too few for advantage {ppo.advantage}"
              + (" with rollout.filter_groups" if rollout.filter_groups else "")
              + f" (it compares at least {max(2 if rollout.filter_groups else 1, estimator.min_group)})")
    if train.batch_size % k:
        fail(where, "train.batch_size", f"{train.batch_size} completions per step must be a multiple of "
              f"rollout.samples_per_prompt ({k}): a prompt's completions stay together")
    if ppo.advantage_scale == "group" and (estimator.level != "sequence" or k < 2):
        fail(where, "ppo.advantage_scale", f"group divides by the std of a prompt's completions: it needs a "
              f"sequence-level advantage ({ppo.advantage} is {estimator.level}-level) and "
              f"rollout.samples_per_prompt >= 2 (got {k})")
    if ppo.engine_is != "none" and rollout.engine == "hf" and not (rollout.lag or rollout.server):
        fail(where, "ppo.engine_is", f"{ppo.engine_is} corrects samples drawn by another engine or an older policy "
              "(rollout.lag); rollout.engine hf samples from the trained policy itself: set ppo.engine_is: none")
    if not 0 < ppo.engine_is_low <= 1 <= ppo.engine_is_cap:
        fail(where, "ppo.engine_is_low", f"the mask modes keep rho in [engine_is_low, engine_is_cap], which must "
              f"hold 1 (samples the engine and the trainer agree on): 0 < low <= 1 <= cap; got "
              f"[{ppo.engine_is_low}, {ppo.engine_is_cap}]")
    if ppo.clip_low >= 1:
        fail(where, "ppo.clip_low", f"must be below 1 (the ratio's lower bound is 1 - clip_low), got {ppo.clip_low}")
    if rollout.overlong and rollout.overlong.buffer > rollout.max_new_tokens:
        fail(where, "rollout.overlong.buffer", f"{rollout.overlong.buffer} is more than rollout.max_new_tokens "
              f"({rollout.max_new_tokens}); the penalty grows over the last `buffer` of them")
    cycle = ppo.epochs * ppo.num_mini_batches
    if train.save_every % cycle:
        fail(where, "train.save_every", f"must be a multiple of ppo.epochs x ppo.num_mini_batches ({cycle}), so "
              "that checkpoints fall between rollouts")
    if ref.kind == "adapter_off" and not (recipe.model.lora or recipe.model.adapter):
        fail(where, "reference.kind", "adapter_off needs a LoRA policy (model.lora or model.adapter)")
    if ref.kind == "precomputed" or (ref.kind == "none" and ppo.kl_coef):
        fail(where, "reference.kind", f"{ref.kind} cannot give the per-token reference log-probs of fresh "
              "samples; use copy or adapter_off (or ppo.kl_coef: 0 with none)")


def check_online(recipe: Recipe, where: str) -> None:
    """method online: pair losses, or one group loss; reward terms; samples to pair."""
    sft_options(recipe, where)
    if recipe.rollout.lag:
        fail(where, "rollout.lag", "generates rollouts ahead for method rl; method online samples on-policy")
    kinds = _loss_specs(recipe, where)
    _no_eval_rewards(recipe, where)
    if recipe.loss[0].ld_alpha is not None or recipe.loss[0].use_weighting:
        fail(where, "loss", "ld_alpha and use_weighting are for offline pairs (method preference)")
    k = recipe.rollout.samples_per_prompt
    _check_rewards(recipe.rewards, where)
    wrong = {name: kind for name, kind in kinds.items() if kind not in ("paired", "group")}
    if wrong:
        fail(where, "loss", f"method online trains pair losses (dpo, ipo, simpo, rpo, ...) or a group loss (sppo) "
              f"on the policy's samples; {wrong} takes other data")
    if "group" in kinds.values() and len(kinds) > 1:
        fail(where, "loss", f"a group loss (sppo) trains alone on every sample, not beside pair losses: {kinds}")
    if k < 2:
        fail(where, "rollout.samples_per_prompt", f"{k}: a pair (or a win rate) needs at least 2 samples per prompt")
    if recipe.reference.kind == "precomputed":
        fail(where, "reference.kind", "precomputed cannot score fresh samples; use copy or adapter_off")
    judge = recipe.pairs.judge
    if judge is not None and not isinstance(judge, str) and not judge.model:
        fail(where, "pairs.judge.model", "give the judge: a causal LM's hub id or directory (or pairs.judge: "
             "module:function)")


def _check_log(recipe: Recipe, where: str) -> None:
    """log.to names Accelerate's trackers (whether each is installed is checked when the run starts);
    eval.rewards are reward terms."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for i, name in enumerate(recipe.log.to):
        if name not in LOGGER_TYPE_TO_CLASS and ":" not in name:
            fail(where, f"log.to[{i}]", f"unknown tracker {name!r}; known: {', '.join(LOGGER_TYPE_TO_CLASS)}, or "
                  "module:Class for your own accelerate.tracking.GeneralTracker")
    _check_rewards(recipe.eval.rewards, where, "eval.rewards")
    if recipe.eval.rewards and not recipe.eval.generate:
        fail(where, "eval.rewards", "score the samples of eval.generate: set eval.generate to N > 0")


def _no_eval_rewards(recipe: Recipe, where: str) -> None:
    if recipe.eval.rewards:
        fail(where, "eval.rewards", "online runs score their samples with the recipe's rewards: remove eval.rewards")


def _check_rewards(terms: list, where: str, section: str = "rewards", required: bool = True) -> None:
    if not terms and section == "rewards" and required:
        fail(where, "rewards", "give at least one term: {function: module:function} or {models: [reward model]}")
    names = []
    for i, term in enumerate(terms):
        key = f"{section}[{i}]"
        if bool(term.models) + bool(term.function) + bool(term.judge) + bool(term.implicit_prm) != 1:
            fail(where, key, "give models (reward models), function (module:function), judge ({model, template, "
                 "parse}) or implicit_prm ({model, reference, beta}), exactly one")
        if term.implicit_prm and not (term.implicit_prm.model and term.implicit_prm.reference):
            fail(where, f"{key}.implicit_prm", "give the trained implicit PRM (model) and the model it was trained "
                 "from (reference)")
        if term.implicit_prm and term.implicit_prm.online_update:
            prm = term.implicit_prm
            for key_, value in (("lr", prm.lr), ("max_grad_norm", prm.max_grad_norm), ("batch_size", prm.batch_size)):
                if not (value > 0 and math.isfinite(value)):
                    fail(where, f"{key}.implicit_prm.{key_}", f"must be a finite number > 0, got {value}")
        if term.judge and not term.judge.model:
            fail(where, f"{key}.judge.model", "give the judge: a causal LM's hub id or directory")
        if not math.isfinite(term.weight):
            fail(where, f"{key}.weight", f"must be a finite number, got {term.weight}")
        if term.std_coef < 0:
            fail(where, f"{key}.std_coef", f"must be >= 0, got {term.std_coef}")
        if term.isolate and not term.function:
            fail(where, f"{key}.isolate", "runs a function in a worker process: give function (module:function)")
        if term.timeout is not None and not (term.function and term.timeout > 0 and math.isfinite(term.timeout)):
            fail(where, f"{key}.timeout", f"is seconds per call of a function term, > 0; got {term.timeout}")
        names.append(term.name)
    if len(set(names)) < len(names):
        fail(where, section, f"two terms share a name ({names}); give each a distinct `name`")
    for i, term in enumerate(terms):  # PRIME's labels: another term, by name (the environment's come later)
        prm = term.implicit_prm
        if prm and prm.online_update and prm.label is not None and prm.label not in set(names) - {term.name}:
            fail(where, f"{section}[{i}].implicit_prm.label", f"names no other term: {prm.label!r}; the terms are "
                 f"{', '.join(n for n in names if n != term.name) or 'none besides it'}")


def _check_reference(recipe: Recipe, specs: list, where: str) -> None:
    """Refuse reference and adapter combinations that cannot work, before anything loads."""
    model, ref = recipe.model, recipe.reference
    adapters = model.lora is not None or model.adapter is not None
    needs = any(spec.needs_reference for spec in specs)
    if model.lora is not None and model.adapter is not None:
        fail(where, "model.lora", "give model.lora (a new adapter) or model.adapter (continue one), not both")
    if model.load_in_4bit and not adapters:
        fail(where, "model.load_in_4bit", "4-bit weights cannot be trained directly: add model.lora (QLoRA)")
    if ref.kind == "none" and needs:
        fail(where, "reference.kind", f"none, but loss {next(s.name for s in specs if s.needs_reference)!r} needs "
              "a reference; use copy, adapter_off (LoRA) or precomputed")
    if ref.kind == "adapter_off" and not adapters:
        fail(where, "reference.kind", "adapter_off needs a LoRA policy (model.lora or model.adapter)")
    if ref.kind == "precomputed" and any(spec.kl for spec in specs):
        fail(where, "reference.kind", "precomputed cannot serve KTO's KL term, whose mismatched pairs change "
              "with every batch; use copy or adapter_off")
    if ref.sync_every and (ref.kind != "copy" or adapters):
        fail(where, "reference.sync_every", "mixing the policy into the reference needs reference.kind=copy "
              "and a fully trained policy (no LoRA)")
