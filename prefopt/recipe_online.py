"""The sections of online recipes (methods rl and online): how to sample (rollout), what scores (rewards), the
update (ppo) and the pairs (pairs). prefopt.recipe loads them like every other section; the comments say what
each key means."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment: a completion longer than rollout.max_new_tokens - buffer loses up to penalty."""

    buffer: int  # the last `buffer` of rollout.max_new_tokens tokens, where the penalty grows linearly
    penalty: float = 1.0  # the penalty at rollout.max_new_tokens


@dataclass
class RolloutConfig:
    """How online methods sample completions (Hugging Face generate, KV cache, left padding)."""

    samples_per_prompt: int = 4  # completions per prompt (k): RLOO and GRPO compare them
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion that never ends
    overlong: OverlongConfig | None = None  # DAPO's soft overlong punishment, added to the score
    mask_truncated: bool = False  # completions cut by max_new_tokens (no EOS) leave the loss (DAPO; TRL's option)
    # DAPO's dynamic sampling: drop prompts whose completions all score the same (no signal) and sample more
    # prompts until the rollout is full, for at most filter_max_rounds rounds (then the dropped fill the rest)
    filter_groups: bool = False
    filter_max_rounds: int = 4
    # hf: Hugging Face generate on the policy; vllm: a vLLM engine colocated in each process, synced after updates;
    # module:Class: an engine of your own (prefopt.online.engines.Engine), made as Class(recipe, tokenizer)
    engine: str = "hf"
    # multi-turn, tool-using rollouts with TRL's contracts (prefopt/online/agent.py, docs/agents.md): tool
    # functions "module:function" (type hints and Google-style docstrings, sync or async), and an environment
    # factory "module:Class" (reset(**row), public methods as tools, optional get_reward) or {name: factory}
    # chosen by each row's `environment` column. max_new_tokens then bounds the whole trajectory after the prompt
    tools: list[str] = field(default_factory=list)
    environment: str | dict[str, str] | None = None
    max_turns: int | None = None  # assistant turns per trajectory (TRL's max_tool_calling_iterations + 1); None: no limit
    max_tool_calls: int | None = None  # tool calls per trajectory; None: no limit
    tool_timeout: float | None = 30.0  # seconds per tool call; past it the model gets {"error": ...}
    gpu_memory_utilization: float = 0.3  # vllm: the share of GPU memory the engine may take
    tensor_parallel_size: int = 1  # vllm


@dataclass
class PairsConfig:
    """How method online turns each prompt's samples into what its loss takes (prefopt/trainers/online.py)."""

    # best_worst: the best-scored completion against the worst (one pair per prompt); all: every pair whose scores
    # differ by more than min_gap (k(k-1)/2 slots per prompt). A tie (no gap above min_gap) makes no pair: counted
    select: Literal["best_worst", "all"] = "best_worst"
    min_gap: float = 0.0
    # module:function(prompts, a, b) -> P(a beats b) per row: a pairwise judge that ranks each prompt's samples
    # (by their mean win rate against the others) instead of the rewards, and gives SPPO its win rates
    judge: str | None = None


@dataclass
class RewardTerm:
    """One term of the score: reward models (an ensemble when several) or a Python function, times weight."""

    name: str | None = None  # metrics rewards/<name>/mean; None: the function's name, or model<i>
    models: list[str] = field(default_factory=list)  # run directories or model directories / hub ids
    # "module:function", called as TRL's GRPOTrainer calls a reward function (prefopt/rewards.py): by keyword,
    # prompts=, completions= (message lists where the prompt is one), completion_ids=, trainer_state=, log_extra=,
    # log_metric= and each dataset column (answer=[...]); returns one float (or None: does not apply) per
    # completion. An `async def` function runs concurrently with the other terms
    function: str | None = None
    weight: float = 1.0
    timeout: float | None = None  # seconds per call of the function; None: no limit
    on_timeout: Literal["error", "skip"] = "error"  # a call past timeout stops the run, or scores None (counted)
    isolate: bool = False  # run the function in a worker process (code execution): a crash or hang never reaches the run

    def default_name(self, index: int) -> str:
        """Its name, else its function's, else model<index>."""
        return self.name or (self.function.rpartition(":")[2] if self.function else f"model{index}")
    aggregate: Literal["mean", "min", "mean_minus_std"] = "mean"  # how an ensemble combines its members
    std_coef: float = 1.0  # lambda of mean_minus_std
    normalize: bool = False  # (r - mean) / std with each reward model's stored statistics


@dataclass
class PPOConfig:
    """KL-regularised PPO (Ziegler et al. 2019; Ouyang et al. 2022) and the critic-free GRPO family."""

    # gae learns a value function (critic); the others are critic-free (prefopt.losses.ppo.ADVANTAGES); or a
    # user's module:function (prefopt.losses.ppo.register_advantage declares its level, critic and defaults)
    advantage: str = "gae"  # gae | grpo | rloo | reinforce | reinforce_pp | module:function
    advantage_scale: Literal["group", "batch", "none"] | None = None  # None: the estimator's (grpo: group, else batch)
    # token_mean: over every completion token of the mini-batch (DAPO); sequence_mean: over sequences of each one's
    # token mean (GRPO); constant: token sum / (sequences x rollout.max_new_tokens) (Dr. GRPO). None: the
    # estimator's (grpo: sequence_mean, else token_mean). The count is the whole mini-batch's: micro-batches and
    # processes do not change it
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] | None = None
    critic: Literal["head", "separate"] = "head"  # gae: a value head on the policy's backbone, or its own model
    critic_name_or_path: str | None = None  # separate critic's starting weights; None: model.name_or_path
    epochs: int = 1  # passes over each rollout
    num_mini_batches: int = 1  # optimizer steps per pass; train.batch_size completions each
    clip: float = 0.2  # policy ratio clip epsilon: ratio in [1 - clip_low, 1 + clip_high]
    clip_low: float | None = None  # None: clip
    clip_high: float | None = None  # None: clip; DAPO's clip-higher uses 0.28
    dual_clip: float | None = None  # dual-clip PPO (Ye et al. 2020): a negative advantage's loss at most -c A; c > 1
    ratio: Literal["token", "sequence"] = "token"  # sequence: GSPO's one ratio per completion
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0  # entropy bonus
    kl_coef: float = 0.05  # beta; 0 loads and runs no reference
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_penalty: Literal["reward", "loss"] = "reward"  # subtract beta KL from the reward, or add it to the loss
    target_kl: float | None = None  # adaptive beta toward this KL per completion (Ziegler et al. 2019)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    approx_kl_stop: float | None = None  # skip the rest of an epoch once the approximate KL passes this
    # correct for the gap between the engine's sampling distribution and the trainer's, rho = pi_trainer /
    # pi_engine (prefopt.losses.ppo.importance_weights): token_truncate (TIS; `truncate`) weighs each token's loss
    # by min(rho, engine_is_cap); sequence_truncate by the capped product over the sequence; token_mask,
    # sequence_mask, geometric_mask drop tokens / sequences whose rho (product, geometric mean) leaves
    # [engine_is_low, engine_is_cap]. None: truncate with rollout.engine vllm, else none
    engine_is: Literal["none", "truncate", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask",
                       "geometric_mask"] | None = None
    engine_is_cap: float = 2.0
    engine_is_low: float = 0.5  # the mask modes' lower bound
