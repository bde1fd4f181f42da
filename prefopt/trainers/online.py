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

import torch
from torch import nn

from prefopt import distributed
from prefopt import reference as refs
from prefopt.diagnostics import pair_diagnostics, ranked
from prefopt.errors import RecipeError, import_object
from prefopt.losses import GroupLogps, PairLogps, get_loss
from prefopt.models import PolicyWithValueHead, load_policy, load_reference_copy
from prefopt.online.experience import TokenForward, model_tokens, sample_kl, sequences
from prefopt.online.pairs import bradley_terry, judge_preferences, make_pairs, win_rates
from prefopt.online.sampler import Sampler
from prefopt.rewards import TrainerState
from prefopt.trainers.base import Trainer


class OnlinePreferenceTrainer(Trainer):
    def __init__(self, recipe):
        super().__init__(recipe)
        self.sampler = Sampler(recipe, self.accelerator, self.tokenizer, place=self.prepare_frozen,  # data first
                               evaluating=self.evaluating)
        self.train_data, self.eval_data = self.sampler.train_data, self.sampler.eval_data
        self.checkpointed.update(self.sampler.checkpointed)  # an online implicit PRM
        self.terms = [(get_loss(term.name), term) for term in recipe.loss]
        self.group = self.terms[0][0].data == "group"
        self.judge = pairwise_judge(recipe, str(self.accelerator.device))
        k = recipe.rollout.samples_per_prompt
        self.slots = k if self.group else 1 if recipe.pairs.select == "best_worst" else k * (k - 1) // 2
        self.model = PolicyWithValueHead(load_policy(recipe.model), value_head=False)
        if recipe.reference.kind == "copy":
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path))
        if recipe.reference.sync_every:  # iterative rounds move it: a resumed run needs it as it was
            self.checkpointed["reference"] = distributed.WholeWeights(self.reference, self.accelerator)
        self.forward = TokenForward(recipe, self.model.policy.config, self.accelerator, self.tokenizer.pad_token_id,
                                    critic=False)
        self.sampler.start_engine()

    def close(self) -> None:
        if hasattr(self.judge, "close"):
            self.judge.close()
        self.sampler.close(list(self.placed_models().values()))
        super().close()

    def placed_models(self) -> dict[str, nn.Module]:
        return {**super().placed_models(), **self.sampler.placed_models()}

    def _check_data(self) -> None:
        train, k = self.recipe.train, self.recipe.rollout.samples_per_prompt
        if train.batch_size % self.slots:
            what = f"{k} rows (a group loss)" if self.group else f"{self.slots} pairs (pairs.select: {self.recipe.pairs.select})"
            raise RecipeError(f"train.batch_size ({train.batch_size}) must be a multiple of the {what} each prompt "
                              "gives: one step's slots are prompts x that")
        self.sampler.check_prompts(train.batch_size // self.slots, "a step")

    # ----- one step's samples -----------------------------------------------------------------------

    def preferences(self, batch: dict, scores: torch.Tensor) -> torch.Tensor:
        """(groups, k, k) P(y_i > y_j) of this process's groups: the judge's, or Bradley-Terry on the scores."""
        k = self.recipe.rollout.samples_per_prompt
        if self.judge is None:
            return bradley_terry(scores.view(-1, k))
        prompts = [row["prompt"] for row in batch["rows"]]
        judge = self.recipe.pairs.judge
        return judge_preferences(self.judge, judge if isinstance(judge, str) else judge.model, prompts,
                                 batch["texts"], k).to(scores.device)

    def sample(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """This step's completions over all processes (on every process), with each one's penalised score and
        win rate, and the sampling's stats."""
        prompts = self.recipe.train.batch_size // self.slots
        state = TrainerState(global_step=step - 1, max_steps=self.recipe.train.max_steps)
        rollout, stats, samples = self.sampler.collect(
            self.model, step - 1, prompts, state,
            local=lambda batch, scores: {"wins": win_rates(self.preferences(batch, scores)).flatten(),
                                         **self._unparsed(scores)})
        if "judge_unparsed" in rollout:  # a judge model's verdicts it could not read (each counted a tie)
            stats["pairs/judge_unparsed"] = rollout.pop("judge_unparsed").mean().item()
        self.run_log.samples(samples, step)
        return rollout, stats

    def _unparsed(self, scores: torch.Tensor) -> dict:
        """A judge model's share of unreadable verdicts in this process's last call, one per sample (gathered)."""
        share = getattr(self.judge, "unparsed", None)
        return {} if share is None else {"judge_unparsed": torch.full_like(scores, share)}

    def batches(self, step: int):
        recipe, k = self.recipe, self.recipe.rollout.samples_per_prompt
        rollout, stats = self.sample(step)
        scores, mask = rollout["penalised"], model_tokens(rollout)  # missing EOS, overlong; the sampled tokens
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
        stats.update({"pairs/real": float(real), "pairs/ties": float(ties)})
        if not self.group:
            gap = (order.view(-1)[rows[0]] - order.view(-1)[rows[1]])[valid]
            stats["pairs/score_gap"] = gap.mean() if real else torch.tensor(0.0)
        self.step_stats = {key: torch.as_tensor(value, dtype=torch.float32) for key, value in stats.items()}
        normalizer = chosen_tokens.float().mean() if real else torch.tensor(1.0)
        input_ids, attention_mask = sequences(rollout)
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
        logps = self.forward(model, batch["input_ids"], batch["attention_mask"], batch["mask"], temperature=1.0)[0]
        return (logps * batch["mask"]).sum(1)

    def compute_loss(self, batch):
        policy = self.sequence_logps(self.model, batch)
        reference = refs.reference_logps(self.recipe.reference.kind, self.model, self.reference, self.accelerator,
                                          lambda model: self.sequence_logps(model, batch))
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

    def after_step(self, step: int, record: dict[str, float]) -> None:
        self.sampler.policy_changed()
        ref = self.recipe.reference
        if ref.sync_every and step % ref.sync_every == 0:  # iterative rounds: the reference becomes the policy
            refs.sync_reference(self.reference, self.accelerator.unwrap_model(self.model).policy, ref.sync_alpha,
                                self.accelerator)

    # ----- evaluation: the sampler's -----------------------------------------------------------------

    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts and, with a reference, KL(pi || pi_ref) (Sampler.evaluate)."""
        kl = sample_kl(self.forward, self.model, self.reference, self.recipe.reference.kind, self.accelerator)
        return self.sampler.evaluate(self.model, examples, kl, self.global_step)

    def generate_samples(self) -> list[dict]:
        return self.sampler.generated_samples()


def pairwise_judge(recipe, device: str):
    """pairs.judge: a function (module:function) or a judge model (prefopt.judge.PairwiseJudge); None without."""
    judge = recipe.pairs.judge
    if judge is None:
        return None
    if isinstance(judge, str):
        return import_object(judge, "pairs.judge")
    from prefopt.judge import PairwiseJudge
    from prefopt.online.served import judge_engine

    return PairwiseJudge(judge, "judge", "pairs.judge", device, recipe.seed, serve=judge_engine)
