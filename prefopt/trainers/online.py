"""OnlinePreferenceTrainer (method: online): preference losses on the policy's own samples.

Each optimizer step samples `rollout.samples_per_prompt` (k) completions of fresh prompts from the current
policy (the rollout engine: hf or vllm, each process its share, drawn per global row as PPO draws them), scores
them (the recipe's reward terms, or a pairwise judge), and trains the recipe's loss on them:

- a pair loss (dpo, ipo, simpo, rpo, ...) on pairs formed within each prompt's group (`make_pairs`): its best
  completion against its worst (`pairs.select: best_worst`), or every pair whose score gap exceeds
  `pairs.min_gap` (`all`); a tie (no gap above min_gap) makes no pair and is counted;
- a group loss (sppo) on every completion, with its estimated win rate against the others (`win_rates`).

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") keeps the starting
policy as the reference; iterative DPO (Xiong et al. 2024) refreshes it every N steps (`reference.sync_every: N`,
`sync_alpha: 1`); SPPO (Wu et al. 2024) refreshes it every iteration the same way.

A step's global batch has a fixed number of slots (`train.batch_size`): one pair per prompt for best_worst,
k(k-1)/2 for all, k rows for a group loss, so micro-batches, accumulation and processes are laid out as
offline. A slot that makes no pair (a tie) weighs 0, and the loss is the mean over the global batch's real pairs
(each slot's weight is (processes x accumulation) / real pairs), so the gradient does not depend on how the
batch is cut. The log-probs the loss takes are the model's own (temperature 1), as offline DPO trains; the
samples are drawn at `rollout.temperature`.
"""

from __future__ import annotations

import itertools
import time

import torch

from prefopt import distributed
from prefopt import reference as refs
from prefopt.diagnostics import pair_diagnostics, ranked
from prefopt.errors import PrefoptError, RecipeError, import_object
from prefopt.losses import GroupLogps, PairLogps, get_loss
from prefopt.trainers import rollout as rollouts
from prefopt.trainers.ppo import PPOTrainer


def make_pairs(scores: torch.Tensor, select: str, min_gap: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pairs within each group of scores (P, k): (chosen, rejected) sample indices (P, S) each, a (P, S) bool of
    the slots that hold a pair, and the ties (slots without one). best_worst: S = 1, the highest against the
    lowest score (the first of equals); all: S = k(k-1)/2, each (i, j), i < j, the higher-scored chosen.
    A slot holds a pair when the gap exceeds min_gap."""
    groups, k = scores.shape
    if select == "best_worst":
        best, worst = scores.argmax(1, keepdim=True), scores.argmin(1, keepdim=True)
        gap = scores.gather(1, best) - scores.gather(1, worst)
        return best, worst, gap > min_gap, int((gap <= min_gap).sum())
    first, second = (torch.tensor(index) for index in zip(*itertools.combinations(range(k), 2)))
    a, b = scores[:, first], scores[:, second]  # (P, S)
    a_wins = a >= b
    chosen = torch.where(a_wins, first, second)
    rejected = torch.where(a_wins, second, first)
    valid = (a - b).abs() > min_gap
    return chosen, rejected, valid, int((~valid).sum())


def win_rates(preference: torch.Tensor) -> torch.Tensor:
    """Each sample's estimated P(y_i beats the policy): its mean preference over the group's other samples,
    from (P, k, k) pairwise P(y_i > y_j) (diagonal ignored)."""
    k = preference.shape[-1]
    off = ~torch.eye(k, dtype=torch.bool, device=preference.device)
    return (preference * off).sum(-1) / (k - 1)


def bradley_terry(scores: torch.Tensor) -> torch.Tensor:
    """(P, k, k) P(y_i > y_j) = sigmoid(s_i - s_j) from (P, k) scalar scores (reward models, verifiers)."""
    return torch.sigmoid(scores[:, :, None] - scores[:, None, :])


class OnlinePreferenceTrainer(PPOTrainer):
    HEADLINE = ("loss", "score", "kl", "rewards/accuracy", "rewards/margin", "rollout/score", "pairs/ties")

    def __init__(self, recipe):
        from prefopt.recipe import PPOConfig

        # the sampling machinery is PPO's (engine, rewards, prompts, evaluation); its update is not used
        recipe.ppo = PPOConfig(advantage="grpo", kl_coef=0.0, epochs=1, num_mini_batches=1)
        super().__init__(recipe)
        self.terms = [(get_loss(term.name), term) for term in recipe.loss]
        self.group = self.terms[0][0].data == "group"
        self.judge = import_object(recipe.pairs.judge, "pairs.judge") if recipe.pairs.judge else None
        k = recipe.rollout.samples_per_prompt
        self.slots = k if self.group else 1 if recipe.pairs.select == "best_worst" else k * (k - 1) // 2
        self.fused_old_logps = False
        if recipe.reference.sync_every:  # iterative rounds move it: a resumed run needs it as it was
            self.checkpointed["reference"] = distributed.WholeWeights(self.reference, self.accelerator)

    def _check_data(self) -> None:
        train, k = self.recipe.train, self.recipe.rollout.samples_per_prompt
        if train.batch_size % self.slots:
            what = f"{k} rows (a group loss)" if self.group else f"{self.slots} pairs (pairs.select: {self.recipe.pairs.select})"
            raise RecipeError(f"train.batch_size ({train.batch_size}) must be a multiple of the {what} each prompt "
                              "gives: one step's slots are prompts x that")
        prompts = train.batch_size // self.slots
        if len(self.train_data) < prompts:
            raise RecipeError(f"a step takes {prompts} prompts but data.train has {len(self.train_data)}")
        if prompts % self.world_size:
            raise RecipeError(f"a step's {prompts} prompts do not split evenly over {self.world_size} processes")

    def can_stop_after(self, step: int) -> bool:
        return True  # every step samples its own

    # ----- one step's samples -----------------------------------------------------------------------

    def preferences(self, batch: dict, scores: torch.Tensor) -> torch.Tensor:
        """(groups, k, k) P(y_i > y_j) of this process's groups: the judge's, or Bradley-Terry on the scores."""
        k = self.recipe.rollout.samples_per_prompt
        if self.judge is None:
            return bradley_terry(scores.view(-1, k))
        groups = len(scores) // k
        pairs = [(g, i, j) for g in range(groups) for i, j in itertools.combinations(range(k), 2)]
        prompts = [batch["rows"][g * k]["prompt"] for g, _, _ in pairs]
        texts = batch["texts"]
        try:
            values = self.judge(prompts, [texts[g * k + i] for g, i, _ in pairs], [texts[g * k + j] for g, _, j in pairs])
            values = torch.as_tensor([float(v) for v in values])
        except Exception as exc:
            raise PrefoptError(f"pairs.judge {self.recipe.pairs.judge} failed: {type(exc).__name__}: {exc}") from exc
        if values.shape != (len(pairs),) or not ((values >= 0) & (values <= 1)).all():
            raise PrefoptError(f"pairs.judge {self.recipe.pairs.judge} must return one probability in [0, 1] per "
                               f"(prompt, a, b): got {values.tolist()[:8]} for {len(pairs)} pairs")
        out = torch.full((groups, k, k), 0.5)
        for (g, i, j), p in zip(pairs, values.tolist()):
            out[g, i, j], out[g, j, i] = p, 1 - p
        return out.to(scores.device)

    def sample(self, step: int) -> dict[str, torch.Tensor]:
        """This step's completions over all processes (on every process), with each one's score and win rate."""
        recipe, acc, k = self.recipe, self.accelerator, self.recipe.rollout.samples_per_prompt
        prompts = recipe.train.batch_size // self.slots
        share = prompts // self.world_size
        examples = self.rollout_prompts(step - 1, 0, prompts)[acc.process_index * share :][:share]
        rows = torch.arange(share * k) + acc.process_index * share * k
        sampler = rollouts.GumbelSampler(hash((recipe.seed, step - 1)), rows, prompts * k)
        start = time.perf_counter()
        batch = rollouts.generate(self, examples, sampler)
        generated = time.perf_counter() - start
        scores, _ = rollouts.score(self, batch)
        scores = rollouts.penalise(scores, batch["ended"], batch["mask"], recipe.rollout)  # missing EOS, overlong
        wins = win_rates(self.preferences(batch, scores)).flatten()
        self.samples = rollouts.sample_rows(batch, scores, torch.empty(0, len(scores)), [])[: recipe.eval.generate or 3]
        gathered = self.gather({key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "mask")}
                               | {"scores": scores, "wins": wins})
        gathered["timing"] = torch.tensor([generated, time.perf_counter() - start - generated])
        return gathered

    def batches(self, step: int):
        recipe, k = self.recipe, self.recipe.rollout.samples_per_prompt
        rollout = self.sample(step)
        self.run_log.samples(self.samples, step)
        scores, mask = rollout["scores"], rollout["mask"]
        order = rollout["wins"] if self.judge is not None else scores  # what ranks a group's samples
        if self.group:  # every sample a slot
            index = torch.arange(len(scores))[:, None]
            rows, valid, ties = (index, index), torch.ones(len(scores), dtype=torch.bool), 0
        else:
            chosen, rejected, valid, ties = make_pairs(order.view(-1, k).cpu(), recipe.pairs.select,
                                                       recipe.pairs.min_gap)
            offset = torch.arange(len(chosen))[:, None] * k
            rows, valid = ((chosen + offset).flatten(), (rejected + offset).flatten()), valid.flatten()
        real = int(valid.sum())
        weight = valid.float() * (self.world_size * self.accumulation_steps) / max(real, 1)
        lengths = mask.sum(1)
        chosen_tokens = lengths[rows[0].flatten()][valid]
        stats = {"rollout/score": scores.mean(), "rollout/length": lengths.mean(), "pairs/real": float(real),
                 "pairs/ties": float(ties), "timing/generate": rollout["timing"][0], "timing/score": rollout["timing"][1]}
        if not self.group:
            gap = (order.view(-1)[rows[0]] - order.view(-1)[rows[1]])[valid]
            stats["pairs/score_gap"] = gap.mean() if real else torch.tensor(0.0)
        self.step_stats = {key: torch.as_tensor(value, dtype=torch.float32) for key, value in stats.items()}
        normalizer = chosen_tokens.float().mean() if real else torch.tensor(1.0)
        input_ids = torch.cat([rollout["prompt_ids"], rollout["response_ids"]], 1)
        attention_mask = torch.cat([rollout["prompt_mask"], mask.long()], 1)
        for chunk in self.deal(list(range(len(weight)))):
            slots = torch.tensor(chunk)
            # a pair's chosen and rejected rows side by side: one prompt's rows stay together (share_prompt)
            picked = rows[0].flatten()[slots] if self.group else torch.stack([r[slots] for r in rows], 1).flatten()
            yield self.to_device({"input_ids": input_ids[picked], "attention_mask": attention_mask[picked],
                                  "mask": mask[picked], "weight": weight[slots], "wins": rollout["wins"][picked],
                                  "token_normalizer": normalizer})

    # ----- the update --------------------------------------------------------------------------------

    def sequence_logps(self, model, batch: dict) -> torch.Tensor:
        """Each row's completion log-prob under `model` at temperature 1, summed over its tokens."""
        logps = self.token_forward(model, batch["input_ids"], batch["attention_mask"], batch["mask"],
                                   temperature=1.0)[0]
        return (logps * batch["mask"]).sum(1)

    def reference_sequence_logps(self, batch: dict) -> torch.Tensor | None:
        kind = self.recipe.reference.kind
        if kind == "none":
            return None
        with torch.no_grad(), self.accelerator.autocast():
            if self.reference is None:  # adapter_off
                with refs.adapter_disabled(self.model, self.accelerator.unwrap_model(self.model).policy):
                    return self.sequence_logps(self.model, batch)
            return self.sequence_logps(self.reference, batch)

    def compute_loss(self, batch):
        policy, reference = self.sequence_logps(self.model, batch), self.reference_sequence_logps(batch)
        tokens, weight = batch["mask"].sum(1), batch["weight"]
        if self.group:
            inputs = [GroupLogps(policy, tokens, batch["wins"]), None if reference is None else
                      GroupLogps(reference, tokens, batch["wins"])]
        else:
            def pairs(x):  # rows chosen, rejected, chosen, ... -> (chosen, rejected)
                return x.view(-1, 2).unbind(1)

            inputs = [PairLogps(*pairs(policy), *pairs(tokens), batch["token_normalizer"]), None if reference is None
                      else PairLogps(*pairs(reference), *pairs(tokens), batch["token_normalizer"])]
        outputs = [spec.fn(*inputs, **term.params) for spec, term in self.terms]
        loss = sum(term.weight * (out.losses * weight).sum() for (_, term), out in zip(self.terms, outputs))
        real = weight > 0
        metrics = dict(self.step_stats)
        chosen_rewards, rejected_rewards = outputs[0].chosen_rewards, outputs[0].rejected_rewards
        if self.group:
            metrics["rewards/chosen"] = chosen_rewards
            metrics["sppo/win_rate"] = batch["wins"]
            return loss, metrics
        nan = torch.full_like(chosen_rewards, torch.nan)
        metrics["rewards/chosen"] = torch.where(real, chosen_rewards, nan)
        metrics["rewards/rejected"] = torch.where(real, rejected_rewards, nan)
        metrics["rewards/accuracy"] = torch.where(real, ranked(chosen_rewards, rejected_rewards), nan)
        metrics["rewards/margin"] = torch.where(real, chosen_rewards - rejected_rewards, nan)
        pair, ref = inputs
        diagnostics = pair_diagnostics(pair.chosen, pair.rejected, None if ref is None else ref.chosen,
                                       None if ref is None else ref.rejected, metrics["rewards/margin"],
                                       pair.chosen_tokens - pair.rejected_tokens)
        metrics.update({key: torch.where(real[:, None] if value.dim() == 2 else real, value, torch.nan)
                        for key, value in diagnostics.items()})
        return loss, metrics

    def train_step(self, step: int) -> dict[str, float]:
        record = super(PPOTrainer, self).train_step(step)
        self.engine_stale = True
        ref = self.recipe.reference
        if ref.sync_every and step % ref.sync_every == 0:  # iterative rounds: the reference becomes the policy
            refs.sync_reference(self.reference, self.accelerator.unwrap_model(self.model).policy, ref.sync_alpha,
                                self.accelerator)
        return record
