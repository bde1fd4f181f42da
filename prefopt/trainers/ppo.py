"""PPOTrainer: KL-regularised PPO on the shared loop, and the critic-free GRPO family by recipe switch.

One optimizer step of the base loop is one PPO mini-batch. Every `ppo.epochs x ppo.num_mini_batches` steps,
`batches()` makes a fresh rollout: the trainer's Sampler collects prompts, samples and scores
(prefopt/online/sampler.py), then log-probs, rewards and advantages follow (prefopt/online/experience.py):
`train.batch_size x ppo.num_mini_batches` completions, `rollout.samples_per_prompt` per prompt. `compute_loss`
is the clipped objective on the completion tokens, aggregated over the whole mini-batch
(`ppo.loss_aggregation`), so that micro-batches and processes do not change the gradient. The maths lives in
prefopt/losses/ppo.py; here are only the plumbing and the bookkeeping.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prefopt.losses import ppo as ppo_math
from prefopt.methods import METHODS
from prefopt.models import (
    PolicyWithValueHead,
    check_same_tokenizer,
    load_causal_lm,
    load_policy,
    load_reference_copy,
)
from prefopt.online.experience import (
    TokenForward,
    engine_weights,
    make_experience,
    model_tokens,
    sample_kl,
    sequences,
    token_logps,
)
from prefopt.online.sampler import Sampler
from prefopt.rewards import TrainerState
from prefopt.trainers.base import Trainer


class PPOTrainer(Trainer):
    def __init__(self, recipe):
        super().__init__(recipe)
        ppo = recipe.ppo
        self.sampler = Sampler(recipe, self.accelerator, self.tokenizer, place=self.prepare_frozen,  # data first
                               evaluating=self.evaluating)
        self.train_data, self.eval_data = self.sampler.train_data, self.sampler.eval_data
        self.checkpointed.update(self.sampler.checkpointed)  # an online implicit PRM
        self.estimator = ppo_math.get_advantage(ppo.advantage)
        critic = None
        if self.estimator.critic and ppo.critic == "separate":
            critic = load_causal_lm(recipe.model, ppo.critic_name_or_path, key="ppo.critic_name_or_path")
        self.model = PolicyWithValueHead(load_policy(recipe.model), value_head=self.estimator.critic, critic=critic)
        teacher = METHODS[recipe.method].teacher
        self.token_map = None  # the teacher's id of each student token (distill.token_map: by_text)
        if teacher:  # it scores every sampled token: it must share the student's tokenizer, or map to its own
            self.token_map = check_same_tokenizer(self.tokenizer, recipe.distill.teacher, "distill.teacher",
                                                  recipe.model.trust_remote_code, recipe.distill.token_map)
        self.teacher = None  # a teacher on an engine server (distill.server), scoring in place of a reference copy
        if teacher and recipe.distill.server:
            from prefopt.online.served import ServedTeacher

            self.teacher = ServedTeacher(recipe, self.tokenizer)
        elif recipe.reference.kind == "copy":
            key = "distill.teacher" if teacher else "reference.name_or_path"
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path,
                                                                     key))
        self.forward = TokenForward(recipe, self.model.policy.config, self.accelerator, self.tokenizer.pad_token_id,
                                    critic=self.estimator.critic)
        self.sampler.start_engine()
        self.kl_controller = ppo_math.AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.checkpointed["kl_controller"] = self.kl_controller
        self.cycle = ppo.epochs * ppo.num_mini_batches  # optimizer steps per rollout
        # one update per rollout: its old log-probs are the update's own, detached (no forward at the rollout),
        # unless the rollout needs them for a KL in the reward, the adaptive KL or a critic; an engine's (or an
        # older policy's) samples are then weighed in the update (compute_loss), by the same forward
        self.fused_old_logps = self.cycle == 1 and not self.estimator.critic and ppo.target_kl is None and not (
            ppo.kl_penalty == "reward" and ppo.kl_coef > 0)
        self.buffer, self.buffer_cycle, self.stop_epoch = None, None, False
        self.queue = RolloutQueue()  # rollout.lag: the rollouts generated ahead, saved with checkpoints
        self.checkpointed["rollout_queue"] = self.queue
        engine = self.sampler.engine  # with a lag, an engine with its own weights generates while the trainer updates
        self.overlap = bool(recipe.rollout.lag and recipe.rollout.overlap and engine.gives_logps and
                            not engine.samples_from_trainer)
        self.in_flight, self.rollout_seconds = None, 0.0  # the rollout generating in the background

    def can_stop_after(self, step: int) -> bool:
        return step % self.cycle == 0  # between rollouts: a checkpoint holds no half-used rollout

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        self.sampler.close(list(self.placed_models().values()))
        super().close()

    def placed_models(self) -> dict[str, nn.Module]:
        return {**super().placed_models(), **self.sampler.placed_models()}

    def _check_data(self) -> None:
        self.sampler.check_prompts(self._prompts(), "a rollout")


    # ----- rollouts -------------------------------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, cycle: int):
        """Rollout `cycle` (steps 1-7) and the samples of the rollouts generated now. With rollout.lag s, rollout c
        was generated s rollouts earlier, by the policy before update c - s (the first s + 1 by the starting
        policy): each cycle generates rollout c + s and takes rollout c from the queue, whose log-probs at
        generation are its behaviour policy's (ppo.engine_is corrects for them against the current policy's).
        With rollout.overlap, rollout c + s generates in the background during update c; the next cycle (or a
        checkpoint, or an evaluation) takes it into the queue before the engine syncs again."""
        lag, samples = self.recipe.rollout.lag, []
        if not lag:
            buffer, stats, samples = self.collect(cycle)
        else:
            samples = self.drain()
            for ahead in range(cycle, cycle + lag + 1):  # past max_steps too: a run continued further needs them
                if ahead in self.queue.rollouts:
                    continue
                if self.overlap and ahead == cycle + lag:
                    self.sampler.submit(self.model, ahead, self._prompts())
                    self.in_flight = ahead
                    continue
                buffer, stats, drawn = self.collect(ahead, behaviour=True)
                self.queue.rollouts[ahead] = buffer, stats
                samples += drawn
            buffer, stats = self.queue.rollouts.pop(cycle)
            stats = {**stats, "rollout/staleness": float(min(lag, cycle))}  # updates between generation and use
        return self.experience(buffer, stats), samples

    def drain(self) -> list[dict]:
        """The rollout generating in the background, scored and gathered into the queue (its first samples)."""
        if self.in_flight is None:
            return []
        cycle, self.in_flight = self.in_flight, None
        buffer, stats, samples = self.collect(cycle, behaviour=True)
        self.queue.rollouts[cycle] = buffer, stats
        return samples

    def _prompts(self) -> int:
        return self.recipe.train.batch_size * self.recipe.ppo.num_mini_batches // self.recipe.rollout.samples_per_prompt

    def collect(self, cycle: int, behaviour: bool = False) -> tuple[dict, dict, list]:
        """Steps 1-3 of rollout `cycle` with the current policy; with `behaviour`, its log-probs of the sampled
        tokens too (as `engine_logps`, unless the engine gave its own)."""
        recipe = self.recipe
        state = TrainerState(global_step=cycle * self.cycle, max_steps=recipe.train.max_steps)  # steps done
        buffer, stats, samples = self.sampler.collect(self.model, cycle, self._prompts(), state,
                                                      filter_groups=recipe.rollout.filter_groups)
        if behaviour and "engine_logps" not in buffer:
            buffer["engine_logps"] = self.token_logps(buffer, old=True, policy_only=True)["old_logps"]
        return buffer, stats, samples

    def experience(self, buffer: dict, stats: dict):
        """Steps 4-7: each process's block of the current policy's (and the reference's) log-probs, gathered, then
        rewards, advantages and the loss mask."""
        start = time.perf_counter()
        tokens = self.token_logps(buffer, old=not self.fused_old_logps)
        stats = {**stats, "timing/logps": time.perf_counter() - start}
        return make_experience(buffer, tokens, stats, self.recipe, self.kl_controller.value)

    def token_logps(self, buffer: dict, old: bool, policy_only: bool = False) -> dict:
        """Step 4 over the gathered rows, each process its block, gathered: the policy's log-probs (`old`), the
        values and the reference's; with `policy_only`, the policy's alone (a behaviour policy's, rollout.lag)."""
        acc, world = self.accelerator, self.world_size
        input_ids, attention_mask = sequences(buffer)
        mask = model_tokens(buffer)  # a multi-turn rollout's inserted tool tokens are not scored
        block = slice(acc.process_index * len(mask) // world, (acc.process_index + 1) * len(mask) // world)
        kind = "none" if policy_only else self.recipe.reference.kind
        tokens = token_logps(self.forward, self.model, self.teacher or self.reference, kind, acc, input_ids[block],
                             attention_mask[block], mask[block], old=old,
                             critic=self.estimator.critic and not policy_only, token_map=self.token_map)
        return self.sampler.gather(tokens) if world > 1 else tokens

    def _rollout(self, cycle: int) -> None:
        """Rollout `cycle`, made at the first step of its update (the samples drawn now are logged at that step)."""
        start = time.perf_counter()
        (self.buffer, samples), self.buffer_cycle = self.make_rollout(cycle), cycle
        self.rollout_seconds = time.perf_counter() - start
        if not self.overlap:
            self.sampler.engine.sleep()  # on a GPU the engine frees its memory while the trainer updates
        self.kl_controller.update(self.buffer.stats.get("rollout/kl", float("nan")), len(self.buffer))
        self.run_log.samples(samples, cycle * self.cycle + 1)

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
        if self.recipe.distill is not None and self.recipe.distill.loss == "jsd":
            return self.divergence_loss(batch)
        logps, entropy, values = self.forward(self.model, batch["input_ids"], batch["attention_mask"], mask,
                                                    entropy_grad=ppo.entropy_coef > 0)
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        aggregation = {"aggregation": ppo.loss_aggregation, "max_new_tokens": rollout.max_new_tokens,
                       "normalizer": batch["token_normalizer"] if ppo.loss_aggregation == "token_mean" else None}
        weights, metrics = batch.get("is_weights"), {}
        if "behaviour_logps" in batch:  # the proximal policy is this forward's (one update per rollout)
            weights, metrics = engine_weights(old_logps, batch["behaviour_logps"], mask, ppo)
        loss = ppo_math.policy_loss(logps, old_logps, batch["advantages"], mask, clip_low=ppo.clip_low,
                                    clip_high=ppo.clip_high, dual_clip=ppo.dual_clip, ratio=ppo.ratio,
                                    weights=weights, **aggregation)
        stats = ppo_math.clip_stats(logps, old_logps, batch["advantages"], mask, ppo.clip_low, ppo.clip_high,
                                    batch["token_normalizer"], ppo.ratio)
        metrics.update({"policy/loss": loss.detach(), "policy/clipfrac": stats["clipfrac"],
                        "policy/approx_kl": stats["approx_kl"]})
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

    def divergence_loss(self, batch):
        """distill.loss jsd: GKD's generalised JSD between the student's and the teacher's next-token
        distributions at each sampled completion position, the token mean over the mini-batch."""
        from prefopt.losses.distill import completion_logits, generalized_jsd

        distill, mask = self.recipe.distill, batch["mask"]
        ids, attention = batch["input_ids"], batch["attention_mask"]
        student = completion_logits(self.model, ids, attention, mask.shape[1])
        with torch.no_grad(), self.accelerator.autocast():
            teacher = completion_logits(self.reference, ids, attention, mask.shape[1])
        per_token = generalized_jsd(student, teacher, distill.beta, self.recipe.rollout.temperature, distill.top_k)
        loss = ppo_math.aggregate(per_token, mask, "token_mean", batch["token_normalizer"])
        return loss, {"distill/jsd": loss.detach(), **{key: torch.tensor(value) for key, value in
                                                      self.buffer.stats.items()}}

    def after_step(self, step: int, record: dict[str, float]) -> None:
        self.sampler.policy_changed()
        self.sampler.check_background()  # a failed background rollout ends the run now, not at its turn
        bound = self.recipe.ppo.approx_kl_stop
        if bound is not None and record.get("policy/approx_kl", 0.0) > bound:
            self.stop_epoch = True
        if record:  # the update's time: the step's, less the time it spent making (or waiting for) rollouts
            made_here = self.buffer_cycle * self.cycle + 1 == step  # the rollout was made at this step's start
            record["timing/update"] = record["step_seconds"] - (self.rollout_seconds if made_here else 0.0)

    def save_checkpoint(self, step: int):
        self.run_log.samples(self.drain(), step + 1)  # the rollout generating now is saved with the queue
        return super().save_checkpoint(step)

    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts and, with a reference, KL(pi || pi_ref) (Sampler.evaluate)."""
        self.run_log.samples(self.drain(), self.global_step + 1)  # the engine is free, then synced to this policy
        kl = sample_kl(self.forward, self.model, self.teacher or self.reference, self.recipe.reference.kind,
                       self.accelerator, self.token_map)
        return self.sampler.evaluate(self.model, examples, kl, self.global_step)

    def generate_samples(self) -> list[dict]:
        return self.sampler.generated_samples()


class RolloutQueue:
    """The rollouts generated ahead of their update (rollout.lag): {cycle: (gathered rows, stats)}, the same on
    every process. A checkpoint holds them, so a resumed run updates on exactly the rollouts the uninterrupted
    one would have."""

    def __init__(self):
        self.rollouts: dict[int, tuple[dict, dict]] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for cycle, (rows, stats) in self.rollouts.items():
            out.update({f"{cycle}/rows/{key}": value for key, value in rows.items()})
            out.update({f"{cycle}/stats/{key}": torch.tensor(float(value)) for key, value in stats.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rollouts = {}
        for name, value in state.items():
            cycle, part, key = name.split("/", 2)
            rows, stats = self.rollouts.setdefault(int(cycle), ({}, {}))
            if part == "rows":
                rows[key] = value
            else:
                stats[key] = value.item()
