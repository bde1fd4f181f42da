"""Recipes: one YAML file per experiment, loaded into typed dataclasses.

Every key a recipe may hold is a field below, with its meaning in the comment
beside it. Loading is strict: an unknown key, a value of the wrong type or a
missing required key is one `RecipeError` naming the key, the file and the
closest valid key. `key.sub=value` overrides from the command line are merged
into the YAML before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prefopt.errors import RecipeError
from prefopt.methods import METHODS, SECTIONS, implied_method
from prefopt.recipe_checks import check, fail
from prefopt.recipe_identity import REMEDIES, RESUMABLE, fingerprint, flatten, identity  # noqa: F401 (re-exported)
from prefopt.recipe_online import (  # noqa: F401 (re-exported)
    DistillConfig,
    OverlongConfig,
    PairsConfig,
    PPOConfig,
    RewardTerm,
    RolloutConfig,
)
from prefopt.recipe_yaml import (  # noqa: F401
    ALIASES,
    SHIPPED,
    DuplicateKey,
    UniqueKeyLoader,
    _join,
    _show,
    _suggest,
    apply_override,
    drop_other_loss_arguments,
    shipped,
)


@dataclass
class LoraConfig:
    r: int = 16  # rank of the adapter matrices
    alpha: float = 32.0  # scaling: the update is (alpha / r) * B A
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"  # module names, or "all-linear" (every linear but the LM head)


@dataclass
class ModelConfig:
    name_or_path: str  # hub id or local directory, loaded with from_pretrained
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # dtype of the weights
    trust_remote_code: bool = False  # run modelling code shipped with a hub model
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None: transformers' default
    lora: LoraConfig | None = None  # train a new LoRA adapter (peft) instead of every weight
    adapter: str | None = None  # continue training this saved PEFT adapter (hub id or directory)
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base weights (CUDA and bitsandbytes); needs lora or adapter
    dropout: bool = False  # keep the config's dropout; false (as TRL) sets it to 0 in every model (LoRA's is lora.dropout)
    chat_template: str | None = None  # a .jinja file or the template itself, in place of the tokenizer's (TRL's chat_template_path)


@dataclass
class RewardModelConfig:
    """method reward: what kind of reward model it trains."""

    # classifier: a score head on the model, trained on pairs (bradley_terry, ...); implicit_prm: the model itself,
    # whose reward is beta * sum_t log pi/pi_ref (Yuan et al. 2024), trained against its reference on outcome labels
    # (loss implicit_prm_ce) or pairs (dpo): a process reward model for rewards[i].implicit_prm
    kind: Literal["classifier", "implicit_prm"] = "classifier"


@dataclass
class ReferenceConfig:
    # copy: a frozen copy of the starting policy (with a continued adapter, the adapter as it started);
    # adapter_off: the LoRA policy with its adapter disabled, i.e. the base weights, no second copy;
    # precomputed: log-probs computed once before training, cached on disk, the model then freed;
    # none: no reference (reference-free losses); auto: adapter_off with LoRA, none if no loss needs one, else copy
    kind: Literal["auto", "copy", "adapter_off", "precomputed", "none"] = "auto"
    name_or_path: str | None = None  # copy/precomputed: a different checkpoint; None: the starting policy
    cache_dir: str | None = None  # precomputed: where cached log-probs live; None: ~/.cache/prefopt/reference
    sync_every: int = 0  # TR-DPO (Gorbatovski et al. 2024): every N steps mix the policy into a copy reference
    sync_alpha: float = 0.5  # reference <- alpha * policy + (1 - alpha) * reference


@dataclass
class DataSource:
    path: str  # hub id, local file (.json/.jsonl/.parquet/.csv) or directory
    split: str = "train"  # split of a hub dataset or of a local file (local files have only "train")
    name: str | None = None  # hub dataset configuration name
    weight: float = 1.0  # rows taken from this source: 0.5 a random half, 2.0 every row twice


@dataclass
class DataConfig:
    train: list[DataSource]  # a path, a {path, split, ...} mapping, or a list of them (a mixture)
    eval: list[DataSource] | None = None  # same shapes as train; None: no held-out set
    eval_fraction: float = 0.0  # with no `eval`, hold out this share of the train rows
    max_length: int = 1024  # prompt + completion tokens (TRL's default)
    max_prompt_length: int | None = None  # longer prompts keep their head (BOS...) and last tokens; None: no limit
    # keep_start: completions that do not fit are cut at their end, and a prompt leaving no room is a bad row (TRL);
    # keep_end: the prompt is cut instead, keeping its head (leading special tokens) and its last tokens
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    # the dataset's column for each of prefopt's names, e.g. {prompt: question, chosen: good, rejected: bad};
    # {prompt: null}: no prompt column, chosen and rejected hold whole texts sharing it (implicit prompt)
    columns: dict[str, str | None] = field(default_factory=dict)
    num_proc: int | None = None  # processes tokenizing the data (datasets.map); None: this one
    # numeric columns carried into every batch as (B,) tensors, batch[name], for a custom trainer's compute_loss
    extra_columns: list[str] = field(default_factory=list)
    on_bad_row: Literal["error", "drop"] = "error"  # unusable rows stop the run, or are dropped and counted
    # read data.train as training goes (local .jsonl/.parquet shards, a glob of them, a hub id), tokenized in a
    # background thread: a data set of any size starts at once (prefopt/data/stream.py); the position is checkpointed
    streaming: bool = False
    shuffle_buffer: int = 1000  # streaming: rows of a shard read together and shuffled (1: in file order)
    # a signal that trains nothing (chosen == rejected, one label, a reward that is None or constant, no group
    # variance, warm-up past the run; prefopt/degenerate.py): said loudly, or the run stops
    on_degenerate: Literal["warn", "error"] = "warn"
    # keyword arguments of every chat-template render (training data, rollouts, evaluation, inspect), e.g.
    # {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # SFT (the sft loss): train only the assistant turns of `messages` and conversational prompt/completion rows,
    # as the chat template's {% generation %} markers say, or, without markers, the text each assistant message
    # adds to the conversation before it (a prefix diff). false: every token, as TRL
    assistant_only_loss: bool = False
    # SFT on prompt/completion rows: train the completion only; false: the prompt too. None: true (as TRL)
    completion_only_loss: bool | None = None


@dataclass
class LossConfig:
    """One loss term: `{name: dpo, beta: 0.1, ...}`, optionally with a `weight`.

    `loss:` in a recipe is one term, or a list of terms whose weighted sum is
    minimised: `[{name: dpo, beta: 0.1}, {name: sft, weight: 0.2}]`.
    """

    name: str = "dpo"  # a registered loss (prefopt.losses.LOSSES) or "package.module:function"
    weight: float = 1.0  # multiplies this term in a weighted sum
    params: dict[str, Any] = field(default_factory=dict)  # checked against the loss function's signature
    allow_negative_weight: bool = False  # a negative weight maximises the term (unlearning): refused unless set
    # LD-DPO (TRL's ld_alpha): the log-prob of each completion's tail past the shorter one's length weighs this;
    # None: 1. The same for every term of a recipe (they share the log-probs)
    ld_alpha: float | None = None
    # WPO (TRL's use_weighting): each pair's loss times its completions' aligned probabilities (on policy-ness)
    use_weighting: bool = False


@dataclass
class OptimConfig:
    lr: float = 5.0e-7  # peak learning rate of AdamW
    schedule: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # linear and cosine decay end at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class TrainConfig:
    batch_size: int = 8  # global pairs per optimizer step, across all processes
    micro_batch_size: int = 8  # pairs per forward/backward on one process
    eval_batch_size: int | None = None  # pairs per evaluation forward; None: micro_batch_size
    max_steps: int = 100  # optimizer steps
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    log_every: int = 1  # write train metrics (averaged since the last write) every N steps
    eval_every: int = 50  # evaluate every N steps (always at step 0 and at the end); 0: only then
    save_every: int = 50  # checkpoint every N steps; 0: no intermediate checkpoints
    keep_checkpoints: int | None = 2  # keep the newest N checkpoints; None: keep all
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    progress_bar: bool = True
    # speed and memory; none changes the loss (docs/benchmarks.md)
    logps_chunk_size: int = 1024  # LM head + fp32 log-softmax on this many completion tokens at a time; 0: full logits
    packing: bool = True  # sequences end to end without padding (position ids restart per sequence)
    share_prompt: bool | None = None  # with packing, one prompt forward for chosen and rejected; None: where it can
    group_by_length: bool = True  # micro-batches of similar lengths within each global batch (same gradient)
    compile: bool = False  # torch.compile each decoder layer
    # a non-finite loss or gradient norm never reaches the weights: stop the run (naming the step, the metric and
    # the last good checkpoint), or skip that step's update, logged, up to max_skipped_steps times in a run
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10


@dataclass
class LogConfig:
    """Where each record goes besides metrics.jsonl and the console: the trackers of Accelerate."""

    # Accelerate's tracker names: tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab.
    # Each reads its own settings from its environment (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...); TensorBoard
    # writes to output_dir/tensorboard, MLflow to output_dir/mlruns unless MLFLOW_TRACKING_URI says otherwise
    to: list[str] = field(default_factory=list)
    project: str = "prefopt"  # the tracker's project (W&B, trackio), experiment (MLflow) or folder (TensorBoard)
    run_name: str | None = None  # None: the output_dir's name
    quiet: bool = True  # hide library progress bars and warnings a user cannot act on (weight loading, saving)


@dataclass
class EvalConfig:
    """What each evaluation adds to the method's metrics."""

    # offline: greedy completions of the first N held-out prompts at each eval, into samples.jsonl and the trackers
    # (with each reward term's score); online: N completions of each eval's held-out prompts and of the rollouts
    generate: int = 0
    max_new_tokens: int = 64  # offline samples (online runs use rollout.max_new_tokens)
    rewards: list[RewardTerm] = field(default_factory=list)  # offline: what scores the samples (as rewards:)


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    method: str = "preference"  # a prefopt.methods name: preference, reward, rl, online
    trainer: str | None = None  # "package.module:Class", a subclass of the method's trainer; None: prefopt's own
    output_dir: str | None = None  # recipe.yaml, metrics.jsonl, checkpoints/, final/; None: runs/<recipe name>-<hash>
    seed: int = 0
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)  # method reward: the kind of model
    loss: list[LossConfig] = field(default_factory=lambda: [LossConfig()])  # offline methods
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig | None = None  # online: present, the recipe runs PPOTrainer on prompt-only data
    distill: DistillConfig | None = None  # method distill: the teacher
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardTerm] = field(default_factory=list)  # online: the terms whose weighted sum is the score
    pairs: PairsConfig = field(default_factory=PairsConfig)  # method online: how samples become pairs
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-ready data: the method's sections only, loss params inlined."""
        out = dataclasses.asdict(self)
        terms = [{"name": t.name, **({"weight": t.weight} if t.weight != 1.0 else {}),
                  **({"allow_negative_weight": True} if t.allow_negative_weight else {}),
                  **({"ld_alpha": t.ld_alpha} if t.ld_alpha is not None else {}),
                  **({"use_weighting": True} if t.use_weighting else {}), **t.params} for t in self.loss]
        out["loss"] = terms[0] if len(terms) == 1 else terms
        return {key: value for key, value in out.items()
                if key not in SECTIONS or key in METHODS[self.method].sections}


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `a.b=value` overrides, validate and return it."""
    path = shipped(Path(path))
    where = str(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {where} (give the path to a .yaml recipe, or a shipped one by name: prefopt recipes lists them)")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {exc}") from None
    except DuplicateKey as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    loss_before = data.get("loss", {}).get("name", "dpo") if isinstance(data.get("loss"), dict) else None
    for override in overrides:
        apply_override(data, override, where)
    if loss_before is not None and isinstance(data.get("loss"), dict) and data["loss"].get("name") != loss_before:
        given = {o.partition("=")[0].removeprefix("loss.") for o in overrides if o.startswith("loss.")}
        drop_other_loss_arguments(data["loss"], loss_before, given)
    return from_dict(data, where, name=path.stem)


def from_dict(data: dict[str, Any], where: str = "<recipe>", name: str = "recipe") -> Recipe:
    """A recipe from plain data; `name` (the file's stem) names its default output_dir."""
    data = {**data, "method": data.get("method") or implied_method(data)}
    method = data["method"]
    if method not in METHODS:
        fail(where, "method", f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for section in SECTIONS:
        if section in data and section not in METHODS[method].sections:
            owners = [m for m, record in METHODS.items() if section in record.sections]
            fail(where, section, f"is not a section of method {method!r} (it belongs to {' or '.join(owners)}); "
                 f"method {method!r} takes {', '.join(METHODS[method].sections)} besides model, data, optim and train")
    recipe = _convert(data, Recipe, "", where)
    if recipe.output_dir is not None and not str(recipe.output_dir).strip():
        fail(where, "output_dir", "is empty: it would write the run into the current directory; give a directory of "
             "its own, e.g. runs/my-run, or leave the key out for runs/<recipe name>-<hash>")
    METHODS[method].resolve(recipe, where)
    check(recipe, where)
    METHODS[method].check(recipe, where)
    if recipe.output_dir is None:
        recipe.output_dir = f"runs/{name}-{fingerprint(recipe)[:8]}"
    return recipe


def save(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump(recipe))


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[-1])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(where, key, f"{value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, key, where)
    if origin is list:
        (item_tp,) = args
        if not isinstance(value, list):
            if item_tp in (DataSource, LossConfig, RewardTerm, str):  # a single one stands for a list of one
                value = [value]
            else:
                fail(where, key, f"expected a list, got {_show(value)}")
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail(where, key, f"expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            fail(where, key, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, key, f"expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, key, f"expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(where, key, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"recipe field {key} has unsupported type {tp}")  # a bug in this file, not in a recipe


def _convert_dataclass(value: Any, cls: type, key: str, where: str) -> Any:
    if cls is DataSource and isinstance(value, str):
        value = {"path": value}
    if cls is LossConfig and isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        fail(where, key, f"expected a mapping, got {_show(value)}")
    if cls is LossConfig:  # everything but name and weight goes to the loss function, checked in recipe_checks
        value = dict(value)
        name = _convert(value.pop("name", "dpo"), str, _join(key, "name"), where)
        weight = _convert(value.pop("weight", 1.0), float, _join(key, "weight"), where)
        negative = _convert(value.pop("allow_negative_weight", False), bool, _join(key, "allow_negative_weight"), where)
        ld_alpha = _convert(value.pop("ld_alpha", None), float | None, _join(key, "ld_alpha"), where)
        weighting = _convert(value.pop("use_weighting", False), bool, _join(key, "use_weighting"), where)
        return LossConfig(name=name, weight=weight, params=value, allow_negative_weight=negative, ld_alpha=ld_alpha,
                          use_weighting=weighting)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in value:
        if name not in fields:
            fail(where, _join(key, str(name)), f"unknown key{_suggest(str(name), list(fields), key)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], _join(key, name), where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(where, _join(key, name), "missing required key")
    return cls(**kwargs)
