"""PPOTrainer: KL-regularised PPO on the shared loop, and the critic-free GRPO family by recipe switch.

One optimizer step of the base loop is one PPO mini-batch. Every `ppo.epochs x ppo.num_mini_batches` steps,
`batches()` makes a fresh rollout (prefopt/trainers/rollout.py: prompts -> samples -> scores -> log-probs ->
advantages): `train.batch_size x ppo.num_mini_batches` completions, `rollout.samples_per_prompt` per prompt.
`compute_loss` is the clipped objective on the completion tokens, aggregated over the whole mini-batch
(`ppo.loss_aggregation`), so that micro-batches and processes do not change the gradient. The maths lives in
prefopt/losses/ppo.py; here are only the plumbing and the bookkeeping.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prefopt import distributed
from prefopt.data import load_prompts
from prefopt.errors import RecipeError
from prefopt.logprobs import custom_masks, plain_head, response_logps, shared_prompt_logps
from prefopt.losses import ppo as ppo_math
from prefopt.models import PolicyWithValueHead, load_causal_lm, load_policy, load_reference_copy
from prefopt.scoring import RewardTerms
from prefopt.trainers import rollout as rollouts
from prefopt.trainers.base import Trainer
from prefopt.trainers.metrics import MetricMeans


class PPOTrainer(Trainer):
    HEADLINE = ("score", "rewards/", "kl", "length", "rollout/score", "rollout/kl", "policy/entropy")

    def __init__(self, recipe):
        super().__init__(recipe)
        acc, data, ppo = self.accelerator, recipe.data, recipe.ppo
        with acc.main_process_first():
            self.train_data = load_prompts(data.train, self.tokenizer, data, recipe.seed, "data.train", acc.print)
            if data.eval:
                self.eval_data = load_prompts(data.eval, self.tokenizer, data, recipe.seed, "data.eval", acc.print)
        lockstep = None
        if distributed.shards_parameters(acc):  # the reward models sharded like the policy
            def lockstep(batches: int) -> int:
                return int(acc.gather(torch.tensor([batches], device=acc.device)).max())
        self.rewards = RewardTerms(recipe.rewards, device=str(acc.device), place=self.prepare_frozen,
                                   lockstep=lockstep)
        for rows, where in ((self.train_data, "data.train"), (self.eval_data, "data.eval")):
            self.rewards.check_columns(rows, where)
        critic_based = ppo_math.ADVANTAGES[ppo.advantage].critic
        critic = None
        if critic_based and ppo.critic == "separate":
            critic = load_causal_lm(recipe.model, ppo.critic_name_or_path, key="ppo.critic_name_or_path")
        self.model = PolicyWithValueHead(load_policy(recipe.model), value_head=critic_based, critic=critic)
        if recipe.reference.kind == "copy":
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path))
        # the LM head runs outside the model's forward: not where its weight is sharded between forwards
        chunked = plain_head(self.model.policy.config) and not distributed.shards_parameters(acc)
        # at most 2^26 fp32 logits (256 MB) per chunk: a 152k vocabulary takes 441 tokens at a time, not 1024
        vocab = self.model.policy.config.get_text_config().vocab_size
        self.chunk_size = min(recipe.train.logps_chunk_size, max(16, 2**26 // vocab)) if chunked else 0
        # the k samples of a prompt packed behind one copy of it, for every forward of the update and the rollout
        # (the offline share_prompt layout); not with a critic, whose values this layout does not give. With
        # train.share_prompt unset, per batch where it pays (sharing_pays)
        allowed = custom_masks(self.model.policy.config, recipe.model.attn_implementation) and not critic_based
        share = recipe.train.share_prompt
        self.share_prompt = recipe.train.packing and (
            allowed and recipe.rollout.samples_per_prompt > 1 if share is None else share)
        if self.share_prompt and not allowed:
            raise RecipeError("train.share_prompt needs a critic-free advantage and a custom attention mask (attention "
                              "sdpa or eager, no sliding window); set train.share_prompt: false")
        self.hidden_size = self.model.policy.config.get_text_config().hidden_size
        self.kl_controller = ppo_math.AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.checkpointed["kl_controller"] = self.kl_controller
        self.cycle = ppo.epochs * ppo.num_mini_batches  # optimizer steps per rollout
        # one update per rollout: its old log-probs are the update's own, detached (no forward at the rollout),
        # unless the rollout needs them for a KL in the reward, the adaptive KL or a critic
        self.fused_old_logps = self.cycle == 1 and not critic_based and ppo.target_kl is None and not (
            ppo.kl_penalty == "reward" and ppo.kl_coef > 0) and recipe.rollout.engine == "hf"
        self.engine, self.engine_stale, self.sync_seconds = None, True, 0.0  # the engine's weights are not yet the policy's
        if recipe.rollout.engine == "vllm":
            from prefopt.engines import VLLMEngine

            rollout, model = recipe.rollout, recipe.model
            self.engine = VLLMEngine(model.name_or_path, seed=recipe.seed, dtype=model.dtype,
                                     max_model_len=data.max_length + rollout.max_new_tokens,
                                     gpu_memory_utilization=rollout.gpu_memory_utilization,
                                     tensor_parallel_size=rollout.tensor_parallel_size,
                                     trust_remote_code=model.trust_remote_code)
        self.buffer, self.buffer_cycle, self.stop_epoch, self.samples = None, None, False, []

    def can_stop_after(self, step: int) -> bool:
        return step % self.cycle == 0  # between rollouts: a checkpoint holds no half-used rollout

    def _prepare(self) -> None:
        super()._prepare()
        if self.accelerator.distributed_type.name == "FSDP":  # FSDP2 sets itself up in the first forward of the
            # whole model; generation calls the policy inside it, so run that forward first
            ids = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.accelerator.device)
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))

    def close(self) -> None:
        if self.engine is not None:  # its shutdown ends the process group too: the ZeRO-3 gathers before it
            distributed.release_gathers(self.accelerator, list(self.placed_models().values()))
            self.engine.close()
        super().close()

    def placed_models(self) -> dict[str, nn.Module]:
        members = {f"reward_model_{i}": model for i, (model, *_) in enumerate(self.rewards.members)}
        return {**super().placed_models(), **members}

    def _check_data(self) -> None:
        prompts = self.recipe.train.batch_size * self.recipe.ppo.num_mini_batches // self.recipe.rollout.samples_per_prompt
        if len(self.train_data) < prompts:
            raise RecipeError(f"a rollout takes {prompts} prompts but data.train has {len(self.train_data)}")
        if prompts % self.world_size:
            raise RecipeError(f"a rollout's {prompts} prompts (train.batch_size x ppo.num_mini_batches / "
                              f"rollout.samples_per_prompt) do not split evenly over {self.world_size} processes")

    # ----- rollouts -------------------------------------------------------------------------------

    def rollout_prompts(self, cycle: int, round: int, prompts: int) -> list[dict]:
        """The `prompts` examples of a rollout's sampling round, over all processes: round 0 the next slice of
        the epoch's seeded permutation of data.train; a further round (dynamic sampling) a seeded sample."""
        n, seed = len(self.train_data), self.recipe.seed
        if round:
            generator = torch.Generator().manual_seed(hash((seed, cycle, round)) & (2**63 - 1))
            return [self.train_data[i] for i in torch.randperm(n, generator=generator)[:prompts].tolist()]
        epoch, index = divmod(cycle, n // prompts)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        return [self.train_data[i] for i in order[index * prompts : (index + 1) * prompts]]

    def token_forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                      entropy_grad: bool = False, temperature: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies (N, W) of the completions of left-padded rows under `model` (the
        policy or a reference) at `temperature` (rollout.temperature), and the value head's values (N, W) or
        None: through the shared-prompt layout where it is on, else the padded rows as they are."""
        temperature = self.recipe.rollout.temperature if temperature is None else temperature
        options = {"temperature": temperature, "chunk_size": self.chunk_size,
                   "entropy_grad": entropy_grad}
        if self.share_prompt and (self.recipe.train.share_prompt or sharing_pays(input_ids, attention_mask, mask.shape[1], self.hidden_size)):
            return (*shared_prompt_logps(model, input_ids, attention_mask, mask,
                                         pad_token_id=self.tokenizer.pad_token_id, **options), None)
        logps, entropy, out = response_logps(model, input_ids, attention_mask, mask, **options)
        values = getattr(out, "critic_values", None)
        return logps, entropy, None if values is None else values[:, -mask.shape[1] - 1 : -1]

    def sync_engine(self) -> None:
        """Load the policy's current weights into the engine, where an update changed them since the last sync."""
        if self.engine is None or not self.engine_stale:
            return
        from prefopt.engines import policy_weights

        start = time.perf_counter()
        with distributed.generation_weights(self.model, self.accelerator):
            self.engine.sync(policy_weights(self.model, self.accelerator))
        self.engine_stale, self.sync_seconds = False, time.perf_counter() - start

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's rows, in process order, on every process: prompts left-padded and completions
        right-padded to the widest, so the rows are laid out as one process would lay them out."""
        acc = self.accelerator
        if self.world_size == 1:
            return tensors
        gathered = {}
        for key, value in tensors.items():
            if value.dim() == 2:
                pad = self.tokenizer.pad_token_id if key.endswith("_ids") else 0
                value = acc.pad_across_processes(value, dim=1, pad_index=pad, pad_first=key.startswith("prompt_"))
            gathered[key] = acc.gather(value)
        return gathered

    def _rollout(self, cycle: int) -> None:
        """Rollout `cycle`, made at the first step of its update (its samples are logged at that step)."""
        self.buffer, self.buffer_cycle = rollouts.make_rollout(self, cycle), cycle
        if self.engine is not None:  # on a GPU the engine frees its memory while the trainer updates
            self.engine.sleep()
        self.kl_controller.update(self.buffer.stats.get("rollout/kl", float("nan")), len(self.buffer))
        self.run_log.samples(self.samples, cycle * self.cycle + 1)

    # ----- the two methods the loop calls ---------------------------------------------------------

    def batches(self, step: int):
        ppo = self.recipe.ppo
        cycle, position = divmod(step - 1, self.cycle)
        if self.buffer_cycle != cycle:
            self._rollout(cycle)
        epoch, mini = divmod(position, ppo.num_mini_batches)
        if mini == 0:
            self.stop_epoch = False
        if self.stop_epoch:  # approximate KL passed ppo.approx_kl_stop: the rest of this epoch is skipped
            return
        n = len(self.buffer)  # the whole rollout, the same on every process
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.recipe.seed * 100_003 + cycle * 1009 + epoch)).tolist()
        size = n // ppo.num_mini_batches
        mini_batch = order[mini * size : (mini + 1) * size]
        # a token mean's count is the whole mini-batch's, per micro-batch: the micro-batch losses' mean (over
        # accumulation and processes) is then the mini-batch's token mean
        tokens = self.buffer.mask[mini_batch].sum().clamp(min=1)
        normalizer = tokens * self.recipe.train.micro_batch_size / size
        for chunk in self.deal(mini_batch):
            index = torch.tensor(chunk, device=self.buffer.mask.device)
            yield {**self.buffer.rows(index), "token_normalizer": normalizer}

    def compute_loss(self, batch):
        ppo, rollout = self.recipe.ppo, self.recipe.rollout
        mask = batch["mask"]
        logps, entropy, values = self.token_forward(self.model, batch["input_ids"], batch["attention_mask"], mask,
                                                    entropy_grad=ppo.entropy_coef > 0)
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        aggregation = {"aggregation": ppo.loss_aggregation, "max_new_tokens": rollout.max_new_tokens,
                       "normalizer": batch["token_normalizer"] if ppo.loss_aggregation == "token_mean" else None}
        loss = ppo_math.policy_loss(logps, old_logps, batch["advantages"], mask, clip_low=ppo.clip_low,
                                    clip_high=ppo.clip_high, dual_clip=ppo.dual_clip, ratio=ppo.ratio,
                                    weights=batch.get("is_weights"), **aggregation)
        stats = ppo_math.clip_stats(logps, old_logps, batch["advantages"], mask, ppo.clip_low, ppo.clip_high,
                                    batch["token_normalizer"])
        metrics = {"policy/loss": loss.detach(), "policy/clipfrac": stats["clipfrac"],
                   "policy/approx_kl": stats["approx_kl"]}
        entropy = ppo_math.aggregate(entropy, mask, **aggregation)
        metrics["policy/entropy"] = entropy.detach()
        if ppo.entropy_coef:
            loss = loss - ppo.entropy_coef * entropy
        if values is not None:
            value_loss, value_clipfrac = ppo_math.clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                                     mask, ppo.value_clip, **aggregation)
            loss = loss + ppo.vf_coef * value_loss
            metrics.update({"value/loss": value_loss.detach(), "value/clipfrac": value_clipfrac})
        if ppo.kl_penalty == "loss" and self.recipe.reference.kind != "none":  # KL as a loss term (as GRPO)
            kl = ppo_math.aggregate(ppo_math.kl_estimate(logps, batch["ref_logps"], ppo.kl_estimator), mask,
                                    **aggregation)
            loss = loss + self.kl_controller.value * kl
            metrics["policy/kl"] = kl.detach()
        metrics.update({key: torch.tensor(value) for key, value in self.buffer.stats.items()})
        return loss, metrics

    def train_step(self, step: int) -> dict[str, float]:
        start, made = time.perf_counter(), self.buffer_cycle
        record = super().train_step(step)
        self.engine_stale = True
        bound = self.recipe.ppo.approx_kl_stop
        if bound is not None and record.get("policy/approx_kl", 0.0) > bound:
            self.stop_epoch = True
        if record:  # the update's time: the step's, less the rollout it made
            rollout = sum(self.buffer.stats[f"timing/{key}"] for key in ("generate", "score", "logps"))
            record["timing/update"] = time.perf_counter() - start - (rollout if self.buffer_cycle != made else 0.0)
        return record

    @torch.no_grad()
    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts: their mean score (and each reward term's), EOS share and
        length; the first eval.generate of them are kept for `generate_samples`. With a reference, `kl`:
        KL(pi || pi_ref) per completion, estimated on one sample of each held-out prompt (at rollout.temperature,
        seeded by the prompt's row, as rollouts are) as the mean of sum_t log pi / pi_ref: the x-axis of the
        over-optimisation frontier (Gao et al. 2023)."""
        examples = self.eval_data if examples is None else examples
        if not examples:
            return {}
        acc, reference = self.accelerator, self.recipe.reference.kind != "none"
        means, self.eval_samples = MetricMeans(), []
        keys = ["score", "eos", "length", *(["kl"] if reference else []),
                *(f"rewards/{name}" for name in self.rewards.names)]
        for key in keys:  # every process has every key, even one with no prompts
            means.add(key, torch.empty(0, device=acc.device))
        size = self.recipe.train.eval_batch_size or 64
        for i, (chunk, counts) in enumerate(self.eval_chunks(examples, size)):
            batch = rollouts.generate(self, chunk)
            scores, terms = rollouts.score(self, batch)
            if reference:
                first = self.accelerator.process_index + self.world_size * i * size  # the chunk's global rows
                rows = torch.arange(len(chunk)) * self.world_size + first if counts else torch.zeros(1, dtype=torch.long)
                # seeded apart from every rollout (cycles count from 0); ints only: a str hash differs per process
                sampler = rollouts.GumbelSampler(hash((self.recipe.seed, -1)), rows, len(examples))
                drawn = rollouts.generate(self, chunk, sampler, samples=1)
                tokens = rollouts.token_logps(self, torch.cat([drawn["prompt_ids"], drawn["response_ids"]], 1),
                                              torch.cat([drawn["prompt_mask"], drawn["mask"].long()], 1),
                                              drawn["mask"])
                kl = (tokens["old_logps"] - tokens["ref_logps"]).sum(1)
            if not counts:
                continue
            means.add("score", scores)
            means.add("eos", batch["ended"].float())
            means.add("length", batch["mask"].sum(1))
            if reference:
                means.add("kl", kl)
            for name, values in zip(self.rewards.names, terms):
                means.add(f"rewards/{name}", values[~values.isnan()])
            self.eval_samples += rollouts.sample_rows(batch, scores, terms, self.rewards.names)
            del self.eval_samples[self.recipe.eval.generate :]
        if self.engine is not None:
            self.engine.sleep()
        return means.result(acc)

    def generate_samples(self) -> list[dict]:
        """The first eval.generate held-out completions of the last evaluation, from every process."""
        from accelerate.utils import gather_object

        rows = gather_object(self.eval_samples) if self.world_size > 1 else self.eval_samples
        return rows[: self.recipe.eval.generate]


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
