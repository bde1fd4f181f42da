"""The rollout of online methods: prompts -> samples -> scores -> log-probs -> advantages, numbered as in docs/ppo.md.

`make_rollout(trainer, cycle)` returns a `Rollout` that every process holds whole: each process samples and
scores its share of the prompts, the rows are gathered, each process takes the log-probs of its block of them,
and those are gathered too; rewards and advantages are then computed from the same tensors everywhere. Every
random draw depends only on (seed, cycle, round, row), so one process and N processes, or a resumed run, make
the same rollout. The maths is in prefopt/losses/ppo.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from prefopt import distributed
from prefopt import reference as refs
from prefopt.losses import ppo as ppo_math


class GumbelSampler:
    """A logits processor that makes greedy decoding draw from softmax(scores): it adds Gumbel noise (Gumbel-max
    trick) that depends only on (seed, decoding step, global row). One process drawing all rows and N processes
    drawing their shares therefore draw the same samples, and a resumed run draws the rollout it would have."""

    def __init__(self, seed: int, rows: torch.Tensor, total_rows: int):
        self.seed, self.rows, self.total_rows = seed, rows, total_rows
        self.prompt_width = 0  # set by generate(): decoding step = sequence length - prompt width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        generator = torch.Generator(scores.device).manual_seed(hash((self.seed, step)) & (2**63 - 1))
        uniform = torch.rand(self.total_rows, scores.shape[-1], generator=generator, device=scores.device)
        uniform = uniform[self.rows.to(scores.device)].clamp_(min=1e-20)  # this process's rows
        return scores - torch.log(-torch.log(uniform))


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
    is_weights: torch.Tensor | None  # (B, R) truncated importance weights trainer / engine (ppo.engine_is)
    stats: dict[str, float] = field(default_factory=dict)  # rollout/*, rewards/*, timing/* metrics

    def __len__(self) -> int:
        return len(self.mask)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = {key: getattr(self, key) for key in ("input_ids", "attention_mask", "mask", "ref_logps",
                                                       "old_logps", "old_values", "advantages", "returns", "is_weights")}
        return {key: value[index] for key, value in tensors.items() if value is not None}


def pad_prompts(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (N, P) ids and mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(trainer, examples: list[dict], sampler: GumbelSampler | None = None,
             max_new_tokens: int | None = None, samples: int | None = None) -> dict:
    """Completions of the examples' prompts, cut after their first EOS: sampled by `sampler`
    (`samples` or rollout.samples_per_prompt each, at rollout.temperature and top_p), or greedy without one; up
    to `max_new_tokens` (rollout.max_new_tokens). Any trainer: an offline one generates with its policy."""
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    rollout, tokenizer = trainer.recipe.rollout, trainer.tokenizer
    k = (samples or rollout.samples_per_prompt) if sampler else 1
    prompt_ids, prompt_mask = pad_prompts([ex["prompt_ids"] for ex in examples], tokenizer.pad_token_id,
                                          trainer.accelerator.device)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
    rows = [ex for ex in examples for _ in range(k)]
    if getattr(trainer, "engine", None) is not None:
        return _engine_generate(trainer, rows, prompt_ids, prompt_mask, sampler)
    processors = LogitsProcessorList()
    if sampler:  # the whole temperature-scaled (top-p) distribution the update's log-probs are taken under,
        # not the top 50 or the repetition penalty of a model's own generation config
        sampler.prompt_width = prompt_ids.shape[1]
        processors.append(TemperatureLogitsWarper(rollout.temperature))
        if rollout.top_p < 1:
            processors.append(TopPLogitsWarper(rollout.top_p))
        processors.append(sampler)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens or rollout.max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy = getattr(policy, "policy", policy)  # PolicyWithValueHead's
    was_training = policy.training
    policy.eval()
    with distributed.generation_weights(trainer.model, trainer.accelerator):
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                              logits_processor=processors)
    policy.train(was_training)
    responses = out[:, prompt_ids.shape[1] :]  # (N, R)
    is_eos = responses == tokenizer.eos_token_id
    ended = is_eos.any(1)
    lengths = torch.where(ended, is_eos.int().argmax(1) + 1, responses.shape[1])  # (N,) up to the first EOS
    mask = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
    responses = responses.masked_fill(~mask, tokenizer.pad_token_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": responses, "mask": mask.float(),
            "ended": ended, "texts": tokenizer.batch_decode(responses, skip_special_tokens=True), "rows": rows}


def _engine_generate(trainer, rows: list[dict], prompt_ids, prompt_mask, sampler: GumbelSampler | None) -> dict:
    """generate() through the vLLM engine: each row drawn with a seed from (rollout seed, global row), greedy
    without a sampler; also the engine's log-prob of each sampled token (`engine_logps`)."""
    rollout, tokenizer, device = trainer.recipe.rollout, trainer.tokenizer, prompt_ids.device
    trainer.sync_engine()
    seeds = [None] * len(rows) if sampler is None else [
        hash((sampler.seed, int(row))) & (2**31 - 1) for row in sampler.rows]
    tokens, logps = trainer.engine.generate([row["prompt_ids"] for row in rows], seeds,
                                            temperature=rollout.temperature, top_p=rollout.top_p,
                                            max_new_tokens=rollout.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    width = max(1, max(map(len, tokens)))
    responses = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    engine_logps = torch.zeros(len(rows), width)
    for i, (ids, values) in enumerate(zip(tokens, logps)):
        responses[i, : len(ids)], engine_logps[i, : len(values)] = torch.tensor(ids, dtype=torch.long), \
            torch.tensor(values)
    lengths = torch.tensor([len(ids) for ids in tokens])
    mask = torch.arange(width)[None] < lengths[:, None]
    ended = torch.tensor([bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in tokens])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": responses.to(device),
            "mask": mask.float().to(device), "ended": ended.to(device), "engine_logps": engine_logps.to(device),
            "texts": tokenizer.batch_decode(responses, skip_special_tokens=True), "rows": rows}


def score(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the reward terms' weighted sum (N,) and each term's values (terms, N), NaN where one does not apply."""
    rows = batch["rows"]
    total, terms = trainer.rewards([row["prompt"] for row in rows], batch["texts"], rows)
    device = batch["mask"].device
    return total.to(device).float(), terms.to(device).float()


def penalise(scores: torch.Tensor, ended: torch.Tensor, mask: torch.Tensor, rollout) -> torch.Tensor:
    """Scores less rollout.missing_eos_penalty where a completion never ended and DAPO's overlong penalty."""
    penalised = scores.clone()
    if rollout.missing_eos_penalty is not None:
        penalised[~ended] -= rollout.missing_eos_penalty
    if rollout.overlong:
        penalised += ppo_math.overlong_penalty(mask.sum(1), rollout.max_new_tokens, rollout.overlong.buffer,
                                               rollout.overlong.penalty)
    return penalised


def _concat(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Row-wise concatenation of gathered rounds: prompts left-padded and completions right-padded to the widest."""
    out = {}
    for key in parts[0]:
        values = parts[0][key], *(part[key] for part in parts[1:])
        if values[0].dim() == 2 and key != "terms":
            width = max(v.shape[1] for v in values)
            pad = pad_id if key.endswith("_ids") else 0
            values = [torch.nn.functional.pad(v, (width - v.shape[1], 0) if key.startswith("prompt_") else
                                              (0, width - v.shape[1]), value=pad) for v in values]
        out[key] = torch.cat(values)
    return out


@torch.no_grad()
def make_rollout(trainer, cycle: int) -> Rollout:
    recipe, acc, world = trainer.recipe, trainer.accelerator, trainer.world_size
    ppo, rollout, k = recipe.ppo, recipe.rollout, recipe.rollout.samples_per_prompt
    prompts = recipe.train.batch_size * ppo.num_mini_batches // k  # per rollout, over all processes
    share = prompts // world
    timing = {"generate": 0.0, "score": 0.0}
    kept, dropped, samples, rounds, generated = [], [], None, 0, 0.0
    while len(kept) < prompts and rounds < (rollout.filter_max_rounds if rollout.filter_groups else 1):
        # 1. prompts: round 0 takes the next slice of the epoch's permutation; a dynamic-sampling round r draws
        # a seeded sample of its own (so the data order stays a function of (seed, cycle))
        examples = trainer.rollout_prompts(cycle, rounds, prompts)[acc.process_index * share :][:share]
        # 2. samples: this process's share, each row's noise from its global index
        rows = torch.arange(share * k) + acc.process_index * share * k
        sampler = GumbelSampler(hash((recipe.seed, cycle) + ((rounds,) if rounds else ())), rows, prompts * k)
        start = time.perf_counter()
        batch = generate(trainer, examples, sampler)
        timing["generate"] += time.perf_counter() - start
        # 3. scores: the reward terms, then the missing-EOS and overlong penalties
        start = time.perf_counter()
        scores, terms = score(trainer, batch)
        timing["score"] += time.perf_counter() - start
        samples = samples or [{"cycle": cycle, **row} for row in sample_rows(
            batch, scores, terms, trainer.rewards.names)[: recipe.eval.generate or 3]]  # the first round's
        local = {key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "mask", "engine_logps")
                 if key in batch}
        gathered = trainer.gather({**local, "ended": batch["ended"].float(), "scores": scores, "terms": terms.T})
        gathered["ended"] = gathered["ended"].bool()
        generated += gathered["mask"].sum().item()
        gathered["penalised"] = penalise(gathered["scores"], gathered["ended"], gathered["mask"], rollout)
        groups = [{key: value[g * k : (g + 1) * k] for key, value in gathered.items()} for g in range(prompts)]
        rounds += 1
        if not rollout.filter_groups:
            kept = groups
            break
        # DAPO's dynamic sampling: a group whose completions all score the same has no advantage to learn from
        for group in groups:
            (kept if group["penalised"].max() > group["penalised"].min() else dropped).append(group)
    short = max(0, prompts - len(kept))  # the cap was reached: dropped groups fill the rest (logged)
    buffer = _concat((kept + dropped)[:prompts], trainer.tokenizer.pad_token_id)
    mask, ended, scores, penalised = buffer["mask"], buffer["ended"], buffer["scores"], buffer["penalised"]
    input_ids = torch.cat([buffer["prompt_ids"], buffer["response_ids"]], 1)
    attention_mask = torch.cat([buffer["prompt_mask"], mask.long()], 1)

    # 4. log-probs: the sampling policy's (unless the one update uses its own), the reference's, the values;
    # each process its block of rows, gathered
    start = time.perf_counter()
    block = slice(acc.process_index * len(mask) // world, (acc.process_index + 1) * len(mask) // world)
    tokens = token_logps(trainer, input_ids[block], attention_mask[block], mask[block], old=not trainer.fused_old_logps)
    tokens = trainer.gather(tokens) if world > 1 else tokens
    timing["logps"] = time.perf_counter() - start
    old_logps = tokens.get("old_logps")

    # 5. rewards: the score at each completion's last token, minus beta x KL per token where the KL is in the reward
    beta = trainer.kl_controller.value
    stats = {"rollout/score": scores.mean(), "rollout/length": mask.sum(1).mean(), "rollout/eos": ended.float().mean(),
             "rollout/kl_coef": beta}
    kl = torch.zeros_like(mask)
    if old_logps is not None:
        kl = ppo_math.kl_estimate(old_logps, tokens["ref_logps"], ppo.kl_estimator) * mask  # (B, R)
        stats.update({"rollout/kl_per_token": kl.sum() / mask.sum(), "rollout/kl": kl.sum(1).mean()})
    rewards = ppo_math.shape_rewards(penalised, kl, mask, beta if ppo.kl_penalty == "reward" else 0.0)
    stats["rollout/shaped_reward"] = rewards.sum(1).mean()

    # 6. advantages: the estimator, then its scale
    advantages, returns = ppo_math.estimate_advantages(
        rewards, mask, ppo.advantage, ppo.advantage_scale, values=tokens.get("old_values"), group_size=k,
        gamma=ppo.gamma, lam=ppo.lam)
    if ppo_math.ADVANTAGES[ppo.advantage].critic:
        values = tokens["old_values"]
        residual = ppo_math.masked_mean((returns - values - ppo_math.masked_mean(returns - values, mask)) ** 2, mask)
        total = ppo_math.masked_mean((returns - ppo_math.masked_mean(returns, mask)) ** 2, mask)
        stats["value/explained_variance"] = 1 - residual / total

    is_weights = None
    if "engine_logps" in buffer:  # the engine's and the trainer's log-probs of the same tokens
        gap = (buffer["engine_logps"] - old_logps).abs() * mask
        stats.update({"rollout/engine_logp_gap_mean": gap.sum() / mask.sum(), "rollout/engine_logp_gap_max": gap.max()})
        if ppo.engine_is == "truncate":  # truncated importance sampling (TIS): pi_trainer / pi_engine, capped
            is_weights = torch.exp(old_logps - buffer["engine_logps"]).clamp(max=ppo.engine_is_cap) * mask

    # 7. the loss mask: completions cut by max_new_tokens leave it with rollout.mask_truncated
    loss_mask = mask * ended[:, None] if rollout.mask_truncated else mask
    for i, name in enumerate(trainer.rewards.names):
        values = buffer["terms"][:, i]
        applies = values[~values.isnan()]
        stats[f"rewards/{name}/mean"] = applies.mean() if len(applies) else float("nan")
        stats[f"rewards/{name}/std"] = applies.std(unbiased=False) if len(applies) else float("nan")
    if rollout.filter_groups:
        stats.update({"rollout/groups_filtered": len(dropped), "rollout/sampling_rounds": rounds,
                      "rollout/groups_short": short})
    if trainer.engine is not None:  # the engine's weight sync (inside timing/generate)
        timing["sync"] = trainer.sync_seconds
    stats.update({f"timing/{key}": value for key, value in timing.items()})
    stats["rollout/tokens_per_second"] = generated / max(timing["generate"], 1e-9)
    result = Rollout(input_ids, attention_mask, loss_mask, tokens["ref_logps"], old_logps,
                     tokens.get("old_values", torch.zeros_like(mask)), advantages, returns, is_weights,
                     {key: float(value) for key, value in stats.items()})
    trainer.samples = samples
    return result


def sample_rows(batch: dict, scores: torch.Tensor, terms: torch.Tensor, names: list[str]) -> list[dict]:
    """{prompt, completion, score, <term>...} of each generated completion."""
    return [{"prompt": row["prompt"], "completion": text, "score": scores[i].item(),
             **{name: terms[j, i].item() for j, name in enumerate(names)}}
            for i, (row, text) in enumerate(zip(batch["rows"], batch["texts"]))]


@torch.no_grad()
def token_logps(trainer, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                old: bool = True) -> dict[str, torch.Tensor]:
    """Step 4 on this process's rows: per-token log-probs of the completions under the sampling policy (without
    dropout; unless `old` is False) and the reference (the policy's own without one), and the values for GAE."""
    acc, recipe, model = trainer.accelerator, trainer.recipe, trainer.model
    out = {}
    was_training = model.training
    model.eval()
    if old or ppo_math.ADVANTAGES[recipe.ppo.advantage].critic:
        logps, _, values = trainer.token_forward(model, input_ids, attention_mask, mask)
        out["old_logps"] = logps * mask
        if values is not None:
            out["old_values"] = values * mask
    if recipe.reference.kind != "none":
        with acc.autocast():
            if trainer.reference is None:  # adapter_off
                with refs.adapter_disabled(model, acc.unwrap_model(model).policy):
                    logps = trainer.token_forward(model, input_ids, attention_mask, mask)[0]
            else:
                logps = trainer.token_forward(trainer.reference, input_ids, attention_mask, mask)[0]
        out["ref_logps"] = logps * mask
    else:
        out["ref_logps"] = out.get("old_logps", torch.zeros_like(mask))
    model.train(was_training)
    return out
