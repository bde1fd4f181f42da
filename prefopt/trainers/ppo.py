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

from prefopt import reference as refs
from prefopt.data import load_prompts
from prefopt.errors import RecipeError, import_object
from prefopt.logprobs import token_logps
from prefopt.losses import ppo as ppo_math
from prefopt.models import load_causal_lm, load_policy, load_reference_copy
from prefopt.scoring import RewardScorer
from prefopt.trainers.base import Trainer
from prefopt.trainers.metrics import MetricMeans


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
        """The policy in Hugging Face (or PEFT) format; the value head beside it as value_head.pt."""
        if state_dict is not None:
            state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        self.policy.save_pretrained(path, state_dict=state_dict, **kwargs)
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), f"{path}/value_head.pt")
        if self.critic is not None:
            self.critic.save_pretrained(f"{path}/critic")


class PPOTrainer(Trainer):
    def __init__(self, recipe):
        super().__init__(recipe)
        acc, data, ppo = self.accelerator, recipe.data, recipe.ppo
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise RecipeError(f"PPO under {acc.distributed_type.name} is not supported yet: generation needs the "
                              "sharded weights gathered; launch with the ddp (or single_gpu) config")
        with acc.main_process_first():
            self.train_data = load_prompts(data.train, self.tokenizer, data, recipe.seed, "data.train", acc.print)
            if data.eval:
                self.eval_data = load_prompts(data.eval, self.tokenizer, data, recipe.seed, "data.eval", acc.print)
        reward = recipe.reward_model
        source = import_object(reward.function, "reward_model.function") if reward.function else reward.models
        self.scorer = RewardScorer(source, reward.aggregate, reward.std_coef, reward.normalize,
                                   device=str(acc.device))
        critic = None
        if ppo.advantage == "gae" and ppo.critic == "separate":
            critic = load_causal_lm(recipe.model, ppo.critic_name_or_path, key="ppo.critic_name_or_path")
        self.model = PolicyWithValueHead(load_policy(recipe.model), value_head=ppo.advantage == "gae", critic=critic)
        self.reference = None
        if recipe.reference.kind == "copy":
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path))
        self.kl_controller = ppo_math.AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        acc.register_for_checkpointing(self.kl_controller)
        self.cycle = ppo.epochs * ppo.num_mini_batches  # optimizer steps per rollout
        self.buffer, self.buffer_cycle, self.stats, self.stop_epoch = None, None, {}, False

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
    def generate(self, examples: list[dict], sample: bool) -> dict[str, torch.Tensor]:
        """Completions of the examples' prompts (k each when sampling), cut after their first EOS."""
        rollout = self.recipe.rollout
        k = rollout.samples_per_prompt if sample else 1
        prompt_ids, prompt_mask = self._pad_prompts([ex["prompt_ids"] for ex in examples])
        policy = self.accelerator.unwrap_model(self.model).policy
        was_training = policy.training
        policy.eval()
        # top_k=0: sample from the whole (temperature-scaled, top-p) distribution whose log-probs the update uses,
        # not the top 50 that a model's default generation config would keep
        kwargs = {"do_sample": True, "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": 0} if sample \
            else {"do_sample": False}
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=rollout.max_new_tokens,
                              num_return_sequences=k, pad_token_id=self.tokenizer.pad_token_id,
                              eos_token_id=self.tokenizer.eos_token_id, **kwargs)
        policy.train(was_training)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        responses = out[:, prompt_ids.shape[1] :]  # (N, R)
        is_eos = responses == self.tokenizer.eos_token_id
        ended = is_eos.any(1)
        lengths = torch.where(ended, is_eos.int().argmax(1) + 1, responses.shape[1])  # (N,) up to the first EOS
        mask = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
        responses = responses.masked_fill(~mask, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts = [ex["prompt"] for ex in examples for _ in range(k)]
        scores = self.scorer(prompts, texts).to(responses.device).float()  # (N,)
        return {"input_ids": torch.cat([prompt_ids, responses], 1), "attention_mask": torch.cat([prompt_mask, mask], 1),
                "mask": mask.float(), "ended": ended, "scores": scores, "texts": texts, "prompts": prompts}

    def _response_logps(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """log-probs (N, R) of the response tokens under the sampling temperature (as the rollout drew them)."""
        width = batch["mask"].shape[1]
        logits = logits[:, -width - 1 : -1] / self.recipe.rollout.temperature
        return token_logps(logits, batch["input_ids"][:, -width:])

    @torch.no_grad()
    def _rollout(self, cycle: int) -> None:
        recipe, acc = self.recipe, self.accelerator
        ppo, k = recipe.ppo, recipe.rollout.samples_per_prompt
        per_rollout = recipe.train.batch_size * ppo.num_mini_batches // k  # prompts, over all processes
        n = len(self.train_data)
        per_epoch = n // per_rollout
        epoch, index = divmod(cycle, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + epoch)).tolist()
        chosen = order[index * per_rollout : (index + 1) * per_rollout][acc.process_index :: self.world_size]
        batch = self.generate([self.train_data[i] for i in chosen], sample=True)
        mask = batch["mask"]
        was_training = self.model.training
        self.model.eval()  # no dropout in the log-probs the ratio is taken against
        logits, values = self.model(batch["input_ids"], batch["attention_mask"])
        logps = self._response_logps(logits, batch) * mask
        del logits
        if recipe.reference.kind == "none":
            ref_logps = logps
        else:
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
        scores = batch["scores"].clone()
        if recipe.rollout.missing_eos_penalty is not None:
            scores[~batch["ended"]] -= recipe.rollout.missing_eos_penalty
        kl = ppo_math.kl_estimate(logps, ref_logps, ppo.kl_estimator) * mask  # (N, R)
        beta = self.kl_controller.value
        in_reward = beta if ppo.kl_penalty == "reward" else 0.0
        rewards = ppo_math.shape_rewards(scores, kl, mask, in_reward)
        if ppo.advantage == "gae":
            values = values[:, -mask.shape[1] - 1 : -1] * mask
            advantages, returns = ppo_math.gae(rewards, values, mask, ppo.gamma, ppo.lam)
        else:
            sequence = ppo_math.group_advantages(rewards.sum(1), k, ppo.advantage)  # score - beta KL, per completion
            advantages, returns, values = sequence[:, None] * mask, torch.zeros_like(mask), torch.zeros_like(mask)
        if ppo.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        self.buffer = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "mask": mask,
                       "old_logps": logps, "ref_logps": ref_logps, "advantages": advantages, "returns": returns,
                       "old_values": values}
        self.buffer_cycle = cycle
        lengths = mask.sum(1)
        stats = {"rollout/score": batch["scores"].mean(), "rollout/shaped_reward": rewards.sum(1).mean(),
                 "rollout/kl_per_token": (kl.sum() / mask.sum()), "rollout/kl": kl.sum(1).mean(),
                 "rollout/length": lengths.mean(), "rollout/eos": batch["ended"].float().mean(),
                 "rollout/kl_coef": torch.tensor(beta, device=mask.device)}
        if ppo.advantage == "gae":
            residual = ppo_math.masked_mean((returns - values - ppo_math.masked_mean(returns - values, mask)) ** 2, mask)
            total = ppo_math.masked_mean((returns - ppo_math.masked_mean(returns, mask)) ** 2, mask)
            stats["value/explained_variance"] = 1 - residual / total
        keys = sorted(stats)
        reduced = acc.reduce(torch.stack([stats[key].float() for key in keys]), reduction="mean").tolist()
        self.stats = dict(zip(keys, reduced))
        self.kl_controller.update(self.stats["rollout/kl"], len(chosen) * k * self.world_size)
        if acc.is_main_process:
            with open(self.output_dir / "samples.jsonl", "a") as f:
                for i in range(min(3, len(batch["texts"]))):
                    f.write(json.dumps({"cycle": cycle, "prompt": batch["prompts"][i], "completion": batch["texts"][i],
                                        "score": batch["scores"][i].item()}) + "\n")

    # ----- the two methods the loop calls ---------------------------------------------------------

    def batches(self, step: int):
        ppo, train = self.recipe.ppo, self.recipe.train
        cycle, position = divmod(step - 1, self.cycle)
        if self.buffer_cycle != cycle:
            self._rollout(cycle)
        epoch, mini = divmod(position, ppo.num_mini_batches)
        if mini == 0:
            self.stop_epoch = False
        if self.stop_epoch:  # approximate KL passed ppo.approx_kl_stop: the rest of this epoch is skipped
            return
        n = len(self.buffer["mask"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.recipe.seed * 100_003 + cycle * 1009 + epoch)).tolist()
        size = n // ppo.num_mini_batches
        rows = order[mini * size : (mini + 1) * size]
        for i in range(0, len(rows), train.micro_batch_size):
            index = torch.tensor(rows[i : i + train.micro_batch_size], device=self.buffer["mask"].device)
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
        mine = examples[acc.process_index :: self.world_size]
        size = self.recipe.train.eval_batch_size or 64
        means = MetricMeans()
        for key in ("score", "eos", "length"):  # every process has every key, even one with no prompts
            means.add(key, torch.empty(0, device=acc.device))
        for i in range(0, len(mine), size):
            batch = self.generate(mine[i : i + size], sample=False)
            means.add("score", batch["scores"])
            means.add("eos", batch["ended"].float())
            means.add("length", batch["mask"].sum(1))
        return means.result(acc)

