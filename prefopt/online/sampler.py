"""The Sampler: prompts -> samples -> scores -> the gathered rollout, for every online method (steps 1-3 of
docs/ppo.md). A trainer holds one; `prefopt label` samples through the same engines.

Every process samples and scores its share of a step's prompts; the rows are then gathered, so that every
process holds the whole rollout, laid out as one process would lay it out. Every random draw depends only on
(seed, cycle, round, global row): one process and N processes, or a resumed run, make the same rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from prefopt import distributed
from prefopt.degenerate import RolloutWatch
from prefopt.generation import Draw, laid_out, pad_prompts
from prefopt.losses import ppo as ppo_math
from prefopt.online.background import Background
from prefopt.online.experience import model_tokens
from prefopt.online.prompts import Prompts
from prefopt.rewards import RewardTerms, Scores, TrainerState


class Sampler:
    """The online side of a run: its prompts, engine and reward terms. Made before any model loads (the data is
    checked first); `start_engine()` once the policy is loaded."""

    def __init__(self, recipe, accelerator, tokenizer, place: Callable | None = None, evaluating: bool = False):
        data = recipe.data
        self.recipe, self.accelerator, self.tokenizer = recipe, accelerator, tokenizer
        self.world_size = accelerator.num_processes
        self.prompts = Prompts(recipe, accelerator, tokenizer, evaluating)
        self.train_data, self.eval_data = self.prompts.train_data, self.prompts.eval_data
        lockstep = None
        if distributed.shards_parameters(accelerator):  # the reward models sharded like the policy
            def lockstep(batches: int) -> int:
                return int(accelerator.gather(torch.tensor([batches], device=accelerator.device)).max())
        from prefopt.online.served import judge_engine

        self.rewards = RewardTerms(recipe.rewards, device=str(accelerator.device), place=place, lockstep=lockstep,
                                   serve_judge=judge_engine)
        self.agent = None  # multi-turn, tool-using rollouts (rollout.tools, rollout.environment)
        if recipe.rollout.tools or recipe.rollout.environment:
            from prefopt.online.agent import Agent

            self.agent = Agent(recipe.rollout, tokenizer, data.chat_template_kwargs)
            for name, fn in self.agent.reward_functions():
                self.rewards.add_function(name, fn)
        for rows, where in ((self.train_data, "data.train"), (self.eval_data, "data.eval")):
            self.rewards.check_columns(getattr(rows, "sample", rows), where)  # a stream: its first rows
        self.engine = None
        self.stale, self.sync_seconds = True, 0.0  # the engine's weights are not yet the policy's
        self.pending: dict[int, Background] = {}  # rollouts generating in the background, by cycle
        self.eval_samples: list[dict] = []
        from prefopt.methods import METHODS

        self.watch = RolloutWatch(recipe, accelerator.print,  # rewards that give no signal
                                  scores_signal=not METHODS[recipe.method].teacher)

    @property
    def checkpointed(self) -> dict:
        """What a checkpoint holds of the sampler: each online implicit PRM (weights and optimizer state), and a
        stream's position."""
        return {**{f"prm_{self.rewards.names[i]}": self.rewards.terms[i][2].fn for i in self.rewards.learners},
                **self.prompts.checkpointed}

    def start_engine(self) -> None:
        from prefopt.online.served import make_engine

        self.engine = make_engine(self.recipe, self.tokenizer, self.accelerator.is_main_process)

    def check_prompts(self, prompts: int, what: str) -> None:
        self.prompts.check(prompts, what)

    def policy_changed(self) -> None:
        """An update changed the policy: the engine syncs before it generates again."""
        self.stale = True

    def placed_models(self) -> dict:
        """The reward models it placed like the policy, by name."""
        return {f"reward_model_{i}": model for i, (model, *_) in enumerate(self.rewards.members)}

    def close(self, placed: list) -> None:
        self.rewards.close()
        self.prompts.close()
        if self.agent is not None:
            self.agent.close()
        if self.engine is not None:  # its shutdown ends the process group too: the ZeRO-3 gathers before it
            distributed.release_gathers(self.accelerator, placed)
            self.engine.close()

    # ----- 2. samples ---------------------------------------------------------------------------

    def sync_engine(self, model) -> None:
        """The engine takes the policy's weights if an update changed them. A server shared by the processes is
        kept out of use meanwhile: no process generates with the old weights, or starts before the new are in."""
        if not self.stale:
            return
        shared = self.world_size > 1 and self.recipe.rollout.server not in (None, "spawn")
        if shared:
            self.accelerator.wait_for_everyone()
        start = time.perf_counter()
        self.engine.sync(model, self.accelerator)
        if shared:
            self.accelerator.wait_for_everyone()
        self.stale, self.sync_seconds = False, time.perf_counter() - start

    @torch.no_grad()
    def generate(self, model, examples: list[dict], draw: Draw | None = None, samples: int = 1,
                 max_new_tokens: int | None = None) -> dict:
        """`samples` completions of each example's prompt (drawn by `draw`, greedy without), through the engine
        synced to `model`: see `sample`."""
        self.sync_engine(model)
        return self.sample(examples, draw, samples, max_new_tokens)

    @torch.no_grad()
    def sample(self, examples: list[dict], draw: Draw | None = None, samples: int = 1,
               max_new_tokens: int | None = None, from_data: bool = False) -> dict:
        """`samples` completions of each example's prompt through the engine as it is: left-padded prompts,
        right-padded completions with their mask, whether each ended (EOS), the texts, the rows, and the engine's
        log-probs where it gives them (`engine_logps`). No collective: it may run in the background. `from_data`:
        the data set's completions instead (GKD)."""
        rows = [ex for ex in examples for _ in range(samples)]
        device, pad, eos = self.accelerator.device, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        max_new_tokens = max_new_tokens or self.recipe.rollout.max_new_tokens
        prompts, trajectories = [row["prompt_ids"] for row in rows], None
        if from_data:
            (prompts, tokens), logps = self.prompts.data_completions(rows, max_new_tokens), None
        elif self.agent is not None:  # many turns: the prompts are rendered with their tools and observations
            trajectories, environments = self.agent.run(self.engine, rows, draw, max_new_tokens,
                                                        self.recipe.data.max_length)
            tokens, logps, prompts = trajectories.completion_ids, trajectories.logps, trajectories.prompt_ids
        else:
            tokens, logps = self.engine.generate(prompts, draw, max_new_tokens)
        prompt_ids, prompt_mask = pad_prompts(prompts, pad, device)
        width = max(1, max(map(len, tokens)))
        responses = laid_out(tokens, width, pad, torch.long)
        lengths = torch.tensor([len(ids) for ids in tokens])
        mask = torch.arange(width)[None] < lengths[:, None]
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": responses.to(device),
                 "mask": mask.float().to(device), "completion_ids": tokens, "rows": rows,
                 "ended": torch.tensor([bool(ids) and ids[-1] == eos for ids in tokens], device=device),
                 "texts": self.tokenizer.batch_decode(tokens, skip_special_tokens=True)}
        if trajectories is not None:
            batch.update(self._agent_fields(trajectories, environments, batch))
        if logps is not None:
            batch["engine_logps"] = laid_out(logps, width).to(device)
        return batch

    def _agent_fields(self, trajectories, environments: list, batch: dict) -> dict:
        """A multi-turn batch's tool_mask (1 on sampled tokens: the loss counts those), its completions as TRL's
        message lists, its environments and its counts; the trained ids are checked against the sampled ones."""
        from prefopt.online.agent import check_drift, drift

        responses = batch["response_ids"]
        tool_mask = laid_out(trajectories.tool_mask, responses.shape[1]).to(responses.device)
        drifted = drift(trajectories, responses.cpu())
        check_drift(drifted, self.tokenizer)
        n = len(trajectories.turns)
        return {"tool_mask": tool_mask, "messages": trajectories.messages, "environments": environments,
                "agent": {"rollout/turns": sum(trajectories.turns) / n,
                          "rollout/tool_calls": sum(trajectories.tool_calls) / n,
                          "rollout/tool_errors": sum(trajectories.tool_errors) / n, "rollout/token_drift": drifted,
                          "timing/tools": trajectories.tool_seconds}}

    # ----- 3. scores ----------------------------------------------------------------------------

    def score(self, batch: dict, state: TrainerState | None = None, learn: bool = False) -> Scores:
        """The reward terms on a generated batch: the weighted total (N,) and each term's values (terms, N).
        `learn`: a training rollout (an online implicit PRM learns from its labels)."""
        scores = self.rewards([row["prompt"] for row in batch["rows"]], batch["texts"], batch["rows"],
                              batch["completion_ids"], state, batch.get("messages"), batch.get("environments"),
                              learn)
        device = batch["mask"].device
        scores.total, scores.terms = scores.total.to(device).float(), scores.terms.to(device).float()
        return scores

    def penalise(self, scores: torch.Tensor, ended: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores less rollout.missing_eos_penalty where a completion never ended and DAPO's overlong penalty."""
        rollout = self.recipe.rollout
        penalised = scores.clone()
        if rollout.missing_eos_penalty is not None:
            penalised[~ended] -= rollout.missing_eos_penalty
        if rollout.overlong:
            penalised += ppo_math.overlong_penalty(mask.sum(1), rollout.max_new_tokens, rollout.overlong.buffer,
                                                   rollout.overlong.penalty)
        return penalised

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

    @torch.no_grad()
    def collect(self, model, cycle: int, prompts: int, state: TrainerState, filter_groups: bool = False,
                local: Callable[[dict, torch.Tensor], dict] | None = None) -> tuple[dict, dict, list[dict]]:
        """Steps 1-3 of rollout `cycle`: `prompts` prompts over all processes, rollout.samples_per_prompt samples
        each, scored and gathered. With `filter_groups` (DAPO's dynamic sampling) a group whose samples all score
        the same is dropped and further seeded rounds refill the rollout, for at most rollout.filter_max_rounds
        rounds. `local(batch, penalised)` adds per-row tensors computed on this process's batch (a judge's).
        Returns the gathered rows (prompt_ids, prompt_mask, response_ids, mask, ended, scores, penalised, terms
        (rows, terms), [engine_logps]), the stats and the first round's sample rows."""
        recipe, rollout = self.recipe, self.recipe.rollout
        k = rollout.samples_per_prompt
        timing = {"generate": 0.0, "score": 0.0}
        kept, dropped, samples, rounds, generated, metrics = [], [], None, 0, 0.0, {}
        background = cycle in self.pending
        while len(kept) < prompts and rounds < (rollout.filter_max_rounds if filter_groups else 1):
            # 1. prompts: round 0 takes the next slice of the epoch's permutation; a dynamic-sampling round r
            # draws a seeded sample of its own (so the data order stays a function of (seed, cycle))
            # 2. samples: this process's share, each row's noise from its global index; round 0 of a rollout
            # submitted ahead was generated in the background (its further rounds keep the engine's weights)
            start = time.perf_counter()
            if not rounds and cycle in self.pending:
                batch, timing["generate"] = self.pending.pop(cycle).result()
                timing["wait"] = time.perf_counter() - start
            else:
                if not background:  # a background rollout's further rounds keep the engine as it generated it
                    self.sync_engine(model)
                batch = self.sample(*self._round(cycle, rounds, prompts), samples=k, from_data=self.prompts.from_data(cycle))
                timing["generate"] += time.perf_counter() - start
            # 3. scores: the reward terms, then the missing-EOS and overlong penalties
            start = time.perf_counter()
            scored = self.score(batch, state, learn=True)
            penalised = self.penalise(scored.total, batch["ended"], batch["mask"])
            extra = local(batch, penalised) if local else {}
            timing["score"] += time.perf_counter() - start
            for key, value in {**scored.metrics, **batch.get("agent", {})}.items():  # reward terms' timing and
                metrics.setdefault(key, []).append(value)  # log_metric values; tool use
            samples = samples or [{"cycle": cycle, **row} for row in self.sample_rows(batch, scored)][
                : recipe.eval.generate or 3]  # the first round's
            local_rows = {key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "mask",
                                                      "engine_logps", "tool_mask") if key in batch}
            gathered = self.gather({**local_rows, "ended": batch["ended"].float(), "scores": scored.total,
                                    "penalised": penalised, "terms": scored.terms.T,
                                    "token_rewards": laid_out(scored.token, batch["mask"].shape[1]).to(batch["mask"].device),
                                    **extra})
            gathered["ended"] = gathered["ended"].bool()
            generated += gathered["mask"].sum().item()
            groups = [{key: value[g * k : (g + 1) * k] for key, value in gathered.items()} for g in range(prompts)]
            rounds += 1
            if not filter_groups:
                kept = groups
                break
            # DAPO's dynamic sampling: a group whose completions all score the same has no advantage to learn from
            for group in groups:
                (kept if group["penalised"].max() > group["penalised"].min() else dropped).append(group)
        buffer = _concat((kept + dropped)[:prompts], self.tokenizer.pad_token_id)
        mask, scores = model_tokens(buffer), buffer["scores"]
        self.watch.check(self.rewards.names, buffer["terms"], buffer["penalised"], k)
        stats = {"rollout/score": scores.mean(), "rollout/length": mask.sum(1).mean(),
                 **({"distill/on_policy": float(not self.prompts.from_data(cycle))} if self.prompts.lmbda < 1 else {}),
                 "rollout/eos": buffer["ended"].float().mean()}
        stats.update({key: sum(values) / (1 if key.startswith("timing/") else len(values))  # time adds up
                      for key, values in metrics.items()})
        for i, name in enumerate(self.rewards.names):
            values = buffer["terms"][:, i]
            applies = values[~values.isnan()]
            stats[f"rewards/{name}/mean"] = applies.mean() if len(applies) else float("nan")
            stats[f"rewards/{name}/std"] = applies.std(unbiased=False) if len(applies) else float("nan")
        if filter_groups:
            stats.update({"rollout/groups_filtered": len(dropped), "rollout/sampling_rounds": rounds,
                          "rollout/groups_short": max(0, prompts - len(kept))})  # the cap was reached
        timing["sync"] = self.sync_seconds  # the engine's last weight sync (inside timing/generate)
        stats.update({f"timing/{key}": value for key, value in timing.items()})
        stats["rollout/tokens_per_second"] = generated / max(timing["generate"], 1e-9)
        return buffer, {key: float(value) for key, value in stats.items()}, samples

    def _round(self, cycle: int, round: int, prompts: int) -> tuple[list[dict], Draw]:
        """This process's share of a sampling round's prompts, and their draw: each row's noise from its global
        index."""
        k, share, index = self.recipe.rollout.samples_per_prompt, prompts // self.world_size, self.accelerator.process_index
        examples = self.prompts.draw(cycle, round, prompts)[index * share :][:share]
        rows = torch.arange(share * k) + index * share * k
        return examples, Draw(hash((self.recipe.seed, cycle) + ((round,) if round else ())), rows, prompts * k)

    def submit(self, model, cycle: int, prompts: int) -> None:
        """Start round 0 of rollout `cycle` in the background on the engine synced now (rollout.lag with
        rollout.overlap); `collect(cycle)` takes it. The engine is not used otherwise until then."""
        if self.prompts.from_data(cycle):  # nothing to generate: collect takes the data set's completions
            return
        self.sync_engine(model)
        examples, draw = self._round(cycle, 0, prompts)
        self.pending[cycle] = Background(self._timed_sample, examples, draw, self.recipe.rollout.samples_per_prompt)

    def _timed_sample(self, examples: list[dict], draw: Draw, samples: int) -> tuple[dict, float]:
        start = time.perf_counter()
        return self.sample(examples, draw, samples), time.perf_counter() - start

    def check_background(self) -> None:
        """Raise the error of a background generation that failed (between steps: the run ends without waiting
        for the rollout's turn)."""
        for job in self.pending.values():
            if job.done.is_set() and job.error is not None:
                job.result()

    def sample_rows(self, batch: dict, scores: Scores) -> list[dict]:
        """{prompt, completion, score, <term>..., <log_extra column>...} of each generated completion."""
        names = self.rewards.names
        return [{"prompt": row["prompt"], "completion": text, "score": scores.total[i].item(),
                 **{name: scores.terms[j, i].item() for j, name in enumerate(names)},
                 **{column: values[i] for column, values in scores.extra.items() if i < len(values)}}
                for i, (row, text) in enumerate(zip(batch["rows"], batch["texts"]))]

    # ----- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, examples: list[dict] | None, kl: Callable[[dict], torch.Tensor] | None,
                 global_step: int = 0) -> dict[str, float]:
        """Greedy completions of the held-out prompts (`examples`, or data.eval): their mean score (and each reward term's), EOS share and
        length; the first eval.generate of them are kept in `eval_samples`. With `kl` (a reference), also
        KL(pi || pi_ref) per completion: `kl(batch)` on one sample of each held-out prompt (at
        rollout.temperature, seeded by the prompt's row, as rollouts are), the x-axis of the over-optimisation
        frontier (Gao et al. 2023)."""
        from prefopt.run.metrics import MetricMeans

        examples = self.eval_data if examples is None else examples
        if not examples:
            return {}
        state = TrainerState(global_step, self.recipe.train.max_steps)
        acc, world = self.accelerator, self.world_size
        means, self.eval_samples = MetricMeans(), []
        keys = ["score", "eos", "length", *(["kl"] if kl else []), *(f"rewards/{name}" for name in self.rewards.names)]
        for key in keys:  # every process has every key, even one with no prompts
            means.add(key, torch.empty(0, device=acc.device))
        size = self.recipe.train.eval_batch_size or 64
        for i, (chunk, counts) in enumerate(distributed.eval_chunks(examples, size, acc.process_index, world)):
            batch = self.generate(model, chunk)
            scored = self.score(batch, state)
            if kl:
                first = acc.process_index + world * i * size  # the chunk's global rows
                rows = torch.arange(len(chunk)) * world + first if counts else torch.zeros(1, dtype=torch.long)
                # seeded apart from every rollout (cycles count from 0); ints only: a str hash differs per process
                drawn = self.generate(model, chunk, Draw(hash((self.recipe.seed, -1)), rows, len(examples)))
                divergence = kl(drawn)
            if not counts:
                continue
            means.add("score", scored.total)
            means.add("eos", batch["ended"].float())
            means.add("length", model_tokens(batch).sum(1))
            if kl:
                means.add("kl", divergence)
            for name, values in zip(self.rewards.names, scored.terms):
                means.add(f"rewards/{name}", values[~values.isnan()])
            self.eval_samples += self.sample_rows(batch, scored)
            del self.eval_samples[self.recipe.eval.generate :]
        self.engine.sleep()
        return means.result(acc)

    def generated_samples(self) -> list[dict]:
        """The first eval.generate held-out completions of the last evaluation, from every process."""
        from accelerate.utils import gather_object

        rows = gather_object(self.eval_samples) if self.world_size > 1 else self.eval_samples
        return rows[: self.recipe.eval.generate]


def _concat(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Row-wise concatenation of gathered groups: prompts left-padded and completions right-padded to the widest."""
    out = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if values[0].dim() == 2 and key != "terms":
            width = max(v.shape[1] for v in values)
            pad = pad_id if key.endswith("_ids") else 0
            values = [torch.nn.functional.pad(v, (width - v.shape[1], 0) if key.startswith("prompt_") else
                                              (0, width - v.shape[1]), value=pad) for v in values]
        out[key] = torch.cat(values)
    return out
