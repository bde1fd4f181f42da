"""PPOTrainer: KL-regularised PPO on the shared loop, and RLOO, GRPO and REINFORCE by recipe switch.

One optimizer step of the base loop is one PPO mini-batch. Every `ppo.epochs x ppo.num_mini_batches`
steps, `batches()` samples a fresh rollout: `train.batch_size x ppo.num_mini_batches` completions
(`rollout.samples_per_prompt` per prompt), scored by `reward_model`, with the policy's and the
reference's per-token log-probs, KL-shaped rewards and advantages (GAE with a value head on the
policy, or the critic-free group estimators). `compute_loss` is the clipped objective. The maths
lives in prefopt/losses/ppo.py; here are only the plumbing and the bookkeeping.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from prefopt import distributed
from prefopt import reference as refs
from prefopt.data import load_prompts
from prefopt.errors import RecipeError, import_object
from prefopt.logprobs import token_logps
from prefopt.losses import ppo as ppo_math
from prefopt.models import load_causal_lm, load_policy, load_reference_copy
from prefopt.scoring import RewardScorer
from prefopt.trainers.base import Trainer
from prefopt.trainers.metrics import MetricMeans


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


class PolicyWithValueHead(nn.Module):
    """The policy, and for GAE a scalar value head on the last hidden state of the policy's backbone or of a
    separate critic model (trained alongside): one module to prepare."""

    def __init__(self, policy, value_head: bool, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        hidden = (critic or policy).config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:  # start from V = 0: the first advantages are the rewards themselves
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # What Accelerate's FSDP2 preparation asks of a transformers model: the decoder layer classes (each layer
    # one shard unit), the embeddings, and re-tying them after the move to the meta device (else a tied LM head
    # would train as a separate weight)
    @property
    def _no_split_modules(self) -> list[str]:
        return [name for model in (self.policy, self.critic) if model is not None
                for name in getattr(model, "_no_split_modules", None) or []]

    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def tie_weights(self):
        for model in (self.policy, self.critic):
            if model is not None:
                model.tie_weights()

    def forward(self, input_ids, attention_mask):
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        out = self.policy(**kwargs, output_hidden_states=self.value_head is not None and self.critic is None)
        if self.value_head is None:
            return out.logits, None
        hidden = (out if self.critic is None else self.critic(**kwargs, output_hidden_states=True)).hidden_states[-1]
        return out.logits, self.value_head(hidden).squeeze(-1).float()  # (N, L, V), (N, L)

    def save_pretrained(self, path, state_dict=None, **kwargs):
        """The policy in Hugging Face (or PEFT) format; the value head beside it as value_head.pt, and a separate
        critic in critic/. `state_dict`: the whole model's weights, gathered where they are sharded."""
        def part(prefix):
            return None if state_dict is None else {
                k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}

        self.policy.save_pretrained(path, state_dict=part("policy."), **kwargs)
        if self.value_head is not None:
            torch.save(part("value_head.") or self.value_head.state_dict(), f"{path}/value_head.pt")
        if self.critic is not None:
            self.critic.save_pretrained(f"{path}/critic", state_dict=part("critic."))


class PPOTrainer(Trainer):
    def __init__(self, recipe):
        super().__init__(recipe)
        acc, data, ppo = self.accelerator, recipe.data, recipe.ppo
        with acc.main_process_first():
            self.train_data = load_prompts(data.train, self.tokenizer, data, recipe.seed, "data.train", acc.print)
            if data.eval:
                self.eval_data = load_prompts(data.eval, self.tokenizer, data, recipe.seed, "data.eval", acc.print)
        reward = recipe.reward_model
        source = import_object(reward.function, "reward_model.function") if reward.function else reward.models
        lockstep = None
        if distributed.shards_parameters(acc):  # the reward models sharded like the policy
            def lockstep(batches: int) -> int:
                return int(acc.gather(torch.tensor([batches], device=acc.device)).max())
        self.scorer = RewardScorer(source, reward.aggregate, reward.std_coef, reward.normalize,
                                   device=str(acc.device), place=self.prepare_frozen, lockstep=lockstep)
        critic = None
        if ppo.advantage == "gae" and ppo.critic == "separate":
            critic = load_causal_lm(recipe.model, ppo.critic_name_or_path, key="ppo.critic_name_or_path")
        self.model = PolicyWithValueHead(load_policy(recipe.model), value_head=ppo.advantage == "gae", critic=critic)
        if recipe.reference.kind == "copy":
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path))
        self.kl_controller = ppo_math.AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.checkpointed["kl_controller"] = self.kl_controller
        self.cycle = ppo.epochs * ppo.num_mini_batches  # optimizer steps per rollout
        self.buffer, self.buffer_cycle, self.stats, self.stop_epoch = None, None, {}, False

    def can_stop_after(self, step: int) -> bool:
        return step % self.cycle == 0  # between rollouts: a checkpoint holds no half-used rollout

    def _prepare(self) -> None:
        super()._prepare()
        if self.accelerator.distributed_type.name == "FSDP":  # FSDP2 sets itself up in the first forward of the
            # whole model; generation calls the policy inside it, so run that forward first
            ids = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.accelerator.device)
            with torch.no_grad():
                self.model(ids, torch.ones_like(ids))

    def placed_models(self) -> dict[str, nn.Module]:
        members = {f"reward_model_{i}": model for i, (model, *_) in enumerate(self.scorer.members)}
        return {**super().placed_models(), **members}

    def _check_data(self) -> None:
        prompts = self.recipe.train.batch_size * self.recipe.ppo.num_mini_batches // self.recipe.rollout.samples_per_prompt
        if len(self.train_data) < prompts:
            raise RecipeError(f"a rollout takes {prompts} prompts but data.train has {len(self.train_data)}")
        if prompts % self.world_size:
            raise RecipeError(f"a rollout's {prompts} prompts (train.batch_size x ppo.num_mini_batches / "
                              f"rollout.samples_per_prompt) do not split evenly over {self.world_size} processes")

    # ----- rollouts -------------------------------------------------------------------------------

    def _pad_prompts(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (N, P) ids and mask, on the device."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    @torch.no_grad()
    def generate(self, examples: list[dict], sampler: GumbelSampler | None = None) -> dict[str, torch.Tensor]:
        """Completions of the examples' prompts, cut after their first EOS: sampled by `sampler`
        (rollout.samples_per_prompt each, at rollout.temperature and top_p), or greedy without one."""
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        rollout = self.recipe.rollout
        k = rollout.samples_per_prompt if sampler else 1
        prompt_ids, prompt_mask = self._pad_prompts([ex["prompt_ids"] for ex in examples])
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        processors = LogitsProcessorList()
        if sampler:  # the whole temperature-scaled (top-p) distribution the update's log-probs are taken under,
            # not the top 50 or the repetition penalty of a model's own generation config
            sampler.prompt_width = prompt_ids.shape[1]
            processors.append(TemperatureLogitsWarper(rollout.temperature))
            if rollout.top_p < 1:
                processors.append(TopPLogitsWarper(rollout.top_p))
            processors.append(sampler)
        config = GenerationConfig(do_sample=False, max_new_tokens=rollout.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        policy = self.accelerator.unwrap_model(self.model).policy
        was_training = policy.training
        policy.eval()
        with distributed.generation_weights(self.model, self.accelerator):
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                  logits_processor=processors)
        policy.train(was_training)
        responses = out[:, prompt_ids.shape[1] :]  # (N, R)
        is_eos = responses == self.tokenizer.eos_token_id
        ended = is_eos.any(1)
        lengths = torch.where(ended, is_eos.int().argmax(1) + 1, responses.shape[1])  # (N,) up to the first EOS
        mask = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
        responses = responses.masked_fill(~mask, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts = [ex["prompt"] for ex in examples for _ in range(k)]
        scores = self.scorer(prompts, texts).to(responses.device).float()  # (N,)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": responses,
                "input_ids": torch.cat([prompt_ids, responses], 1), "attention_mask": torch.cat([prompt_mask, mask], 1),
                "mask": mask.float(), "ended": ended, "scores": scores, "texts": texts, "prompts": prompts}

    def _response_logps(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """log-probs (N, R) of the response tokens under the sampling temperature (as the rollout drew them)."""
        width = batch["mask"].shape[1]
        logits = logits[:, -width - 1 : -1] / self.recipe.rollout.temperature
        return token_logps(logits, batch["input_ids"][:, -width:])

    @torch.no_grad()
    def _score_tokens(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-token log-probs of the responses under the policy (as sampled, without dropout) and the reference,
        and the values for GAE: (N, R) each, 0 past the response."""
        acc, mask = self.accelerator, batch["mask"]
        was_training = self.model.training
        self.model.eval()
        logits, values = self.model(batch["input_ids"], batch["attention_mask"])
        logps = self._response_logps(logits, batch) * mask
        del logits
        ref_logps = logps
        if self.recipe.reference.kind != "none":
            with acc.autocast():
                if self.reference is None:  # adapter_off
                    with refs.adapter_disabled(self.model, acc.unwrap_model(self.model).policy):
                        ref_logits, _ = self.model(batch["input_ids"], batch["attention_mask"])
                else:
                    ref_logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(min=0),
                                                use_cache=False).logits
            ref_logps = self._response_logps(ref_logits, batch) * mask
        self.model.train(was_training)
        values = torch.zeros_like(mask) if values is None else values[:, -mask.shape[1] - 1 : -1] * mask
        return {"old_logps": logps, "ref_logps": ref_logps, "old_values": values}

    def _gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's rows, in process order, on every process: prompts left-padded and responses
        right-padded to the widest, so the rollout is laid out as one process would lay it out."""
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

    @torch.no_grad()
    def _rollout(self, cycle: int) -> None:
        """Sample the rollout of `cycle`: each process generates and scores its share of the prompts, then all
        rows are gathered and every process computes the same rewards, advantages and whitening from them."""
        recipe, acc = self.recipe, self.accelerator
        ppo, k = recipe.ppo, recipe.rollout.samples_per_prompt
        per_rollout = recipe.train.batch_size * ppo.num_mini_batches // k  # prompts, over all processes
        n = len(self.train_data)
        epoch, index = divmod(cycle, n // per_rollout)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + epoch)).tolist()
        share = per_rollout // self.world_size
        first = index * per_rollout + acc.process_index * share
        rows = torch.arange(share * k) + acc.process_index * share * k
        sampler = GumbelSampler(hash((recipe.seed, cycle)), rows, per_rollout * k)
        batch = self.generate([self.train_data[i] for i in order[first : first + share]], sampler)
        local = {key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "mask", "scores")}
        local["ended"] = batch["ended"].float()
        buffer = self._gather({**local, **self._score_tokens(batch)})
        mask, ended = buffer.pop("mask"), buffer.pop("ended").bool()
        scores = buffer.pop("scores")
        buffer["input_ids"] = torch.cat([buffer.pop("prompt_ids"), buffer.pop("response_ids")], 1)
        buffer["attention_mask"] = torch.cat([buffer.pop("prompt_mask"), mask.long()], 1)
        penalised = scores.clone()
        if recipe.rollout.missing_eos_penalty is not None:
            penalised[~ended] -= recipe.rollout.missing_eos_penalty
        kl = ppo_math.kl_estimate(buffer["old_logps"], buffer["ref_logps"], ppo.kl_estimator) * mask  # (N, R)
        beta = self.kl_controller.value
        rewards = ppo_math.shape_rewards(penalised, kl, mask, beta if ppo.kl_penalty == "reward" else 0.0)
        if ppo.advantage == "gae":
            advantages, returns = ppo_math.gae(rewards, buffer["old_values"], mask, ppo.gamma, ppo.lam)
        else:
            sequence = ppo_math.group_advantages(rewards.sum(1), k, ppo.advantage)  # score - beta KL, per completion
            advantages, returns = sequence[:, None] * mask, torch.zeros_like(mask)
        if ppo.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        self.buffer = {**buffer, "mask": mask, "advantages": advantages, "returns": returns}
        self.buffer_cycle = cycle
        stats = {"rollout/score": scores.mean(), "rollout/shaped_reward": rewards.sum(1).mean(),
                 "rollout/kl_per_token": kl.sum() / mask.sum(), "rollout/kl": kl.sum(1).mean(),
                 "rollout/length": mask.sum(1).mean(), "rollout/eos": ended.float().mean(), "rollout/kl_coef": beta}
        if ppo.advantage == "gae":
            values = buffer["old_values"]
            residual = ppo_math.masked_mean((returns - values - ppo_math.masked_mean(returns - values, mask)) ** 2, mask)
            total = ppo_math.masked_mean((returns - ppo_math.masked_mean(returns, mask)) ** 2, mask)
            stats["value/explained_variance"] = 1 - residual / total
        self.stats = {key: float(value) for key, value in stats.items()}
        self.kl_controller.update(self.stats["rollout/kl"], len(mask))
        if acc.is_main_process:
            with open(self.output_dir / "samples.jsonl", "a") as f:
                for i in range(min(3, len(batch["texts"]))):
                    f.write(json.dumps({"cycle": cycle, "prompt": batch["prompts"][i], "completion": batch["texts"][i],
                                        "score": batch["scores"][i].item()}) + "\n")

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
        n = len(self.buffer["mask"])  # the whole rollout, the same on every process
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.recipe.seed * 100_003 + cycle * 1009 + epoch)).tolist()
        size = n // ppo.num_mini_batches
        for chunk in self.deal(order[mini * size : (mini + 1) * size]):
            index = torch.tensor(chunk, device=self.buffer["mask"].device)
            yield {key: value[index] for key, value in self.buffer.items()}

    def compute_loss(self, batch):
        ppo = self.recipe.ppo
        mask = batch["mask"]
        logits, values = self.model(batch["input_ids"], batch["attention_mask"])
        width = mask.shape[1]
        response_logits = logits[:, -width - 1 : -1] / self.recipe.rollout.temperature
        logps = token_logps(response_logits, batch["input_ids"][:, -width:])
        loss, stats = ppo_math.clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, ppo.clip)
        metrics = {"policy/loss": loss.detach(), "policy/clipfrac": stats["clipfrac"],
                   "policy/approx_kl": stats["approx_kl"]}
        with torch.set_grad_enabled(ppo.entropy_coef > 0):
            logp_all = torch.log_softmax(response_logits.float(), -1)
            entropy = ppo_math.masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask)
        metrics["policy/entropy"] = entropy.detach()
        loss = loss - ppo.entropy_coef * entropy
        if values is not None:
            value_loss, value_clipfrac = ppo_math.clipped_value_loss(values[:, -width - 1 : -1], batch["old_values"],
                                                                     batch["returns"], mask, ppo.value_clip)
            loss = loss + ppo.vf_coef * value_loss
            metrics.update({"value/loss": value_loss.detach(), "value/clipfrac": value_clipfrac})
        if ppo.kl_penalty == "loss":  # KL to the reference as a loss term (as GRPO), not in the reward
            kl = ppo_math.masked_mean(ppo_math.kl_estimate(logps, batch["ref_logps"], ppo.kl_estimator), mask)
            loss = loss + self.kl_controller.value * kl
            metrics["policy/kl"] = kl.detach()
        metrics.update({key: torch.tensor(value) for key, value in self.stats.items()})
        return loss, metrics

    def train_step(self, step: int) -> dict[str, float]:
        record = super().train_step(step)
        bound = self.recipe.ppo.approx_kl_stop
        if bound is not None and record.get("policy/approx_kl", 0.0) > bound:
            self.stop_epoch = True
        return record

    @torch.no_grad()
    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts: their mean score, EOS share and length."""
        examples = self.eval_data if examples is None else examples
        if not examples:
            return {}
        acc = self.accelerator
        means = MetricMeans()
        for key in ("score", "eos", "length"):  # every process has every key, even one with no prompts
            means.add(key, torch.empty(0, device=acc.device))
        for chunk, counts in self.eval_chunks(examples, self.recipe.train.eval_batch_size or 64):
            batch = self.generate(chunk)
            if not counts:
                continue
            means.add("score", batch["scores"])
            means.add("eos", batch["ended"].float())
            means.add("length", batch["mask"].sum(1))
        return means.result(acc)

