"""Steps 4-7 of a rollout (docs/ppo.md): log-probs, rewards, advantages and the loss mask, on the gathered rows
the Sampler collected. The maths is in prefopt/losses/ppo.py; here it is applied to a rollout.

`TokenForward` is how every online forward is taken (rollout, update and evaluation): per-token log-probs of
the completions through the shared-prompt layout where it pays, else the padded rows as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefopt import distributed
from prefopt import reference as refs
from prefopt.errors import RecipeError
from prefopt.logprobs import custom_masks, plain_head, response_logps, shared_prompt_logps
from prefopt.losses import ppo as ppo_math


@dataclass
class Rollout:
    """One rollout, the same on every process: B completions (prompts left-padded, completions right-padded)."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    mask: torch.Tensor  # (B, R) the completion tokens the loss counts (mask_truncated takes cut ones out)
    ref_logps: torch.Tensor  # (B, R) the reference's per-token log-probs (the policy's own without a reference)
    old_logps: torch.Tensor | None  # (B, R) the sampling policy's; None: one update per rollout, which uses its own
    old_values: torch.Tensor  # (B, R) the value head's (0 without one)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R) value targets (0 without a critic)
    is_weights: torch.Tensor | None  # (B, R) importance weights trainer / engine (ppo.engine_is)
    stats: dict[str, float] = field(default_factory=dict)  # rollout/*, rewards/*, timing/* metrics
    # (B, R) the engine's log-probs, where the weights come from the update's own forward (old_logps None)
    behaviour_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.mask)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = {key: getattr(self, key) for key in ("input_ids", "attention_mask", "mask", "ref_logps",
                                                       "old_logps", "old_values", "advantages", "returns", "is_weights",
                                                       "behaviour_logps")}
        return {key: value[index] for key, value in tensors.items() if value is not None}


def sequences(rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, P + R) of gathered or generated rows: the prompt, then the completion."""
    return (torch.cat([rows["prompt_ids"], rows["response_ids"]], 1),
            torch.cat([rows["prompt_mask"], rows["mask"].long()], 1))


class TokenForward:
    """Per-token log-probs and entropies (N, W) of the completions of left-padded rows under a model (the policy
    or a reference), and the value head's values (N, W) or None."""

    def __init__(self, recipe, config, accelerator, pad_token_id: int, critic: bool):
        self.temperature, self.pad_token_id = recipe.rollout.temperature, pad_token_id
        # the LM head runs outside the model's forward: not where its weight is sharded between forwards
        chunked = plain_head(config) and not distributed.shards_parameters(accelerator)
        # at most 2^26 fp32 logits (256 MB) per chunk: a 152k vocabulary takes 441 tokens at a time, not 1024
        vocab = config.get_text_config().vocab_size
        self.chunk_size = min(recipe.train.logps_chunk_size, max(16, 2**26 // vocab)) if chunked else 0
        # the k samples of a prompt packed behind one copy of it, for every forward of the update and the rollout
        # (the offline share_prompt layout); not with a critic, whose values this layout does not give. With
        # train.share_prompt unset, per batch where it pays (sharing_pays)
        allowed = custom_masks(config, recipe.model.attn_implementation) and not critic
        self.force = recipe.train.share_prompt
        self.share_prompt = recipe.train.packing and (
            allowed and recipe.rollout.samples_per_prompt > 1 if self.force is None else self.force)
        if self.share_prompt and not allowed:
            raise RecipeError("train.share_prompt needs a critic-free advantage and a custom attention mask (attention "
                              "sdpa or eager, no sliding window); set train.share_prompt: false")
        self.hidden_size = config.get_text_config().hidden_size

    def __call__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                 entropy_grad: bool = False, temperature: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        options = {"temperature": self.temperature if temperature is None else temperature,
                   "chunk_size": self.chunk_size, "entropy_grad": entropy_grad}
        if self.share_prompt and (self.force or sharing_pays(input_ids, attention_mask, mask.shape[1],
                                                             self.hidden_size)):
            return (*shared_prompt_logps(model, input_ids, attention_mask, mask, pad_token_id=self.pad_token_id,
                                         **options), None)
        logps, entropy, out = response_logps(model, input_ids, attention_mask, mask, **options)
        values = getattr(out, "critic_values", None)
        return logps, entropy, None if values is None else values[:, -mask.shape[1] - 1 : -1]


@torch.no_grad()
def token_logps(forward: TokenForward, model, reference, kind: str, accelerator, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, mask: torch.Tensor, old: bool = True, critic: bool = False,
                token_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Step 4 on this process's rows: per-token log-probs of the completions under the sampling policy (without
    dropout; unless `old` is False), the values for GAE (`critic`), and the reference's (reference.kind `kind`;
    the policy's own without one)."""
    out = {}
    was_training = model.training
    model.eval()
    if old or critic:
        logps, _, values = forward(model, input_ids, attention_mask, mask)
        out["old_logps"] = logps * mask
        if values is not None:
            out["old_values"] = values * mask
    if token_map is not None:  # a teacher whose vocabulary holds the student's tokens under other ids
        input_ids = token_map.to(input_ids.device)[input_ids.clamp(max=len(token_map) - 1)]
    if hasattr(reference, "logps_of"):  # a teacher on an engine server (distill.server)
        ref = reference.logps_of(input_ids, attention_mask, mask)
    else:
        ref = refs.reference_logps(kind, model, reference, accelerator,
                                   lambda m: forward(m, input_ids, attention_mask, mask)[0])
    out["ref_logps"] = ref * mask if ref is not None else out.get("old_logps", torch.zeros_like(mask))
    model.train(was_training)
    return out


def sample_kl(forward: TokenForward, model, reference, kind: str, accelerator, token_map=None):
    """None without a reference; else kl(batch) -> (N,): KL(pi || pi_ref) of each completion sampled from pi (at
    rollout.temperature), for evaluations: the sum over its tokens of Schulman's k3 = (r - 1) - log r with
    r = pi_ref / pi at each sampled token. Each term is unbiased for the KL of that token's next-token
    distributions, so the sum is unbiased for the sequence's (the chain rule), and, unlike the summed log-ratio
    (k1), never negative."""
    if kind == "none":
        return None

    def kl(batch: dict) -> torch.Tensor:
        input_ids, attention_mask = sequences(batch)
        tokens = token_logps(forward, model, reference, kind, accelerator, input_ids, attention_mask, batch["mask"],
                             token_map=token_map)
        k3 = ppo_math.kl_estimate(tokens["old_logps"], tokens["ref_logps"], "k3")
        return (k3 * model_tokens(batch)).sum(1)

    return kl


def model_tokens(rows: dict) -> torch.Tensor:
    """(B, R) 1 on the completion tokens the model sampled: all of them, or, in a multi-turn rollout, not the
    tool replies and template glue inserted between its turns (tool_mask 0)."""
    return rows["mask"] * rows["tool_mask"] if "tool_mask" in rows else rows["mask"]


@torch.no_grad()
def make_experience(buffer: dict, tokens: dict, stats: dict, recipe, kl_coef: float) -> Rollout:
    """Steps 5-7 on the gathered rollout: the rewards (the score at each completion's last token, less beta x KL
    per token where the KL is in the reward), the advantages (the estimator, then its scale), the engine's
    importance weights, and the loss mask (completions cut by max_new_tokens leave it with
    rollout.mask_truncated)."""
    ppo, rollout = recipe.ppo, recipe.rollout
    estimator = ppo_math.get_advantage(ppo.advantage)
    mask, ended, penalised = model_tokens(buffer), buffer["ended"], buffer["penalised"]
    old_logps = tokens.get("old_logps")
    stats = {**stats, "rollout/kl_coef": kl_coef}
    kl = torch.zeros_like(mask)
    if old_logps is not None:
        kl = ppo_math.kl_estimate(old_logps, tokens["ref_logps"], ppo.kl_estimator) * mask  # (B, R)
        stats.update({"rollout/kl_per_token": kl.sum() / mask.sum(), "rollout/kl": kl.sum(1).mean()})
    # reward terms' per-token rewards at their tokens, the rest of each score at its last token: a sequence-level
    # estimator sums them back (its return), a token-level one (gae, reinforce_pp) sees where they fell
    token = buffer["token_rewards"] * mask if "token_rewards" in buffer else torch.zeros_like(mask)
    rewards = ppo_math.shape_rewards(penalised - token.sum(1), kl, mask,
                                     kl_coef if ppo.kl_penalty == "reward" else 0.0) + token
    stats["rollout/shaped_reward"] = rewards.sum(1).mean()
    advantages, returns = ppo_math.estimate_advantages(
        rewards, mask, estimator, ppo.advantage_scale, values=tokens.get("old_values"),
        group_size=rollout.samples_per_prompt, gamma=ppo.gamma, lam=ppo.lam, process=token)
    if estimator.critic:
        values = tokens["old_values"]
        residual = ppo_math.masked_mean((returns - values - ppo_math.masked_mean(returns - values, mask)) ** 2, mask)
        total = ppo_math.masked_mean((returns - ppo_math.masked_mean(returns, mask)) ** 2, mask)
        stats["value/explained_variance"] = 1 - residual / total
    is_weights, behaviour = None, buffer.get("engine_logps")
    if behaviour is not None and old_logps is not None:  # else the update's forward is the proximal one
        is_weights, is_stats = engine_weights(old_logps, behaviour, mask, ppo)
        stats.update(is_stats)
        behaviour = None
    loss_mask = mask * ended[:, None] if rollout.mask_truncated else mask
    input_ids, attention_mask = sequences(buffer)
    return Rollout(input_ids, attention_mask, loss_mask, tokens["ref_logps"], old_logps,
                   tokens.get("old_values", torch.zeros_like(mask)), advantages, returns, is_weights,
                   {key: float(value) for key, value in stats.items()}, behaviour)


def engine_weights(proximal: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, ppo
                   ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """ppo.engine_is's weights of each token (the behaviour policy is the engine's, the proximal one the
    trainer's: ppo_math.importance_weights), with the engine/trainer log-prob gap and the weights' stats."""
    gap = (behaviour - proximal).abs() * mask
    weights, stats = ppo_math.importance_weights(ppo.engine_is, proximal - behaviour, mask, ppo.engine_is_low,
                                                 ppo.engine_is_cap)
    return weights, {"rollout/engine_logp_gap_mean": gap.sum() / mask.sum(), "rollout/engine_logp_gap_max": gap.max(),
                     **stats}


def sharing_pays(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, hidden: int) -> bool:
    """Whether packing each prompt's completions behind one copy of it costs less than the padded rows. A
    transformer layer costs about 24 h^2 FLOPs per token in its projections and 4 h per (query, key) pair in a
    dense masked attention, so a layout costs 6 h x tokens + sum over its rows (or segments) of length^2. Packing
    saves the k - 1 prompt copies but makes one long segment per prompt: long prompts with short completions
    share, short prompts with long completions do not. Rows of left-padded prompts, the last `width` columns
    the completions."""
    prompts, completions = attention_mask[:, :-width].sum(1).tolist(), attention_mask[:, -width:].sum(1).tolist()
    segments: dict[tuple, int] = {}
    for row, prompt, completion in zip(input_ids[:, :-width], prompts, completions):
        key = tuple(row[row.shape[0] - prompt :].tolist())
        segments[key] = segments.get(key, prompt) + completion
    padded = [prompt + completion for prompt, completion in zip(prompts, completions)]
    shared = list(segments.values())
    return 6 * hidden * sum(shared) + sum(n * n for n in shared) < 6 * hidden * sum(padded) + sum(n * n for n in padded)
