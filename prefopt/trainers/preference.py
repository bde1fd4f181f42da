"""PreferenceTrainer: offline feedback for DPO and its family.

Pairs (prompt, chosen, rejected) feed the pair losses; unpaired rows (prompt,
completion, thumbs up/down) feed KTO, BCO and SFT, with pairs split into a
desirable and an undesirable row. What a loss takes is in its LossSpec.
"""

from __future__ import annotations

import gc
from functools import partial
from pathlib import Path

import torch

from prefopt import distributed
from prefopt import reference as refs
from prefopt.data import as_rows, has_key
from prefopt.data.collate import collate_pairs, collate_rows
from prefopt.data.stream import Stream
from prefopt.diagnostics import pair_diagnostics, ranked
from prefopt.errors import RecipeError
from prefopt.logprobs import completion_logps, custom_masks, length_desensitized, plain_head, wpo_weights
from prefopt.losses import PairLogps, UnpairedLogps, get_loss
from prefopt.models import load_policy, load_reference_copy
from prefopt.trainers.base import Trainer


class PreferenceTrainer(Trainer):

    def __init__(self, recipe):
        super().__init__(recipe)
        self.terms = [(get_loss(term.name), term) for term in recipe.loss]
        kinds = {spec.data for spec, _ in self.terms}
        acc = self.accelerator
        self.load_data("paired" if "paired" in kinds else "unpaired" if "unpaired" in kinds else "any")
        # unpaired losses, or SFT on prompt/completion rows: train on rows; evaluate on pairs where there are any
        self.unpaired = "unpaired" in kinds or has_key(self.train_data, "completion_ids")
        if self.unpaired and isinstance(self.train_data, Stream):  # its pairs split as they come
            self.train_data.split_pairs = True
        elif self.unpaired:
            self.train_data = as_rows(self.train_data)
            if not all("chosen_ids" in ex for ex in self.eval_data):
                self.eval_data = as_rows(self.eval_data)
        self.kl = any(spec.kl for spec, _ in self.terms)
        # per-term state (BCO's running reward shift), summed over processes and saved with checkpoints
        self.states = [spec.state(lambda t: acc.reduce(t, reduction="sum")) if spec.state else None
                       for spec, _ in self.terms]
        for i, state in enumerate(self.states):
            if state is not None:
                self.checkpointed[f"loss_state_{i}"] = state
        self._choose_layout()
        self.sample_scorer = None  # eval.rewards, made at the first eval.generate
        if recipe.reference.kind == "precomputed":  # before the policy loads: one model in memory at a time
            self._precompute_reference()
        self.model = load_policy(recipe.model)
        if recipe.reference.kind == "copy":  # a frozen model of its own
            self.reference = self.prepare_frozen(load_reference_copy(recipe.model, recipe.reference.name_or_path))
            if recipe.reference.sync_every:  # TR-DPO moves it: a resumed run needs it as it was
                self.checkpointed["reference"] = distributed.WholeWeights(self.reference, acc)

    @torch.no_grad()
    def generate_samples(self) -> list[dict]:
        """Greedy completions of the first eval.generate held-out prompts, with each eval.rewards term's score and
        the data's chosen completion beside them. Rows without a prompt (SFT's `text`) have nothing to continue."""
        from accelerate.utils import gather_object

        from prefopt.generation import generate
        from prefopt.rewards import RewardTerms

        examples = [ex for ex in self.eval_data if ex["prompt_ids"]][: self.recipe.eval.generate]
        acc, decode = self.accelerator, self.tokenizer.decode
        if self.sample_scorer is None:
            self.sample_scorer = RewardTerms(self.recipe.eval.rewards, "eval.rewards", device=str(acc.device))
        rows = []
        for chunk, counts in self.eval_chunks(examples, self.recipe.train.eval_batch_size or self.recipe.train.micro_batch_size):
            chunk = [{**ex, "prompt": decode(ex["prompt_ids"], skip_special_tokens=True)} for ex in chunk]
            ids = generate(self.model, acc, self.tokenizer, [ex["prompt_ids"] for ex in chunk],
                           max_new_tokens=self.recipe.eval.max_new_tokens)
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            if counts:
                prompts = [ex["prompt"] for ex in chunk]
                columns = [{k: v for k, v in ex.items() if not k.endswith("_ids")} for ex in chunk]
                scored = self.sample_scorer(prompts, texts, columns, ids) if self.sample_scorer.terms else None
                rows += [{"prompt": ex["prompt"], "completion": text,
                          **({"chosen": decode(ex["chosen_ids"], skip_special_tokens=True)} if "chosen_ids" in ex else {}),
                          **({name: scored.terms[j, i].item() for j, name in enumerate(self.sample_scorer.names)}
                             if scored else {})}
                         for i, (ex, text) in enumerate(zip(chunk, texts))]
        return gather_object(rows) if self.world_size > 1 else rows

    def sample_metrics(self, rows: list[dict]) -> dict[str, float]:
        """samples/<term>: each eval.rewards term's mean score over the generated samples (where it applies)."""
        out = {}
        for name in (term.name for term in self.recipe.eval.rewards):
            values = [row[name] for row in rows if row.get(name) is not None and row[name] == row[name]]
            if values:
                out[f"samples/{name}"] = sum(values) / len(values)
        return out

    def _choose_layout(self) -> None:
        """The speed switches of train.* that this model and backend allow (none changes the loss)."""
        from transformers import AutoConfig

        train, model_cfg, acc = self.recipe.train, self.recipe.model, self.accelerator
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        # the LM head runs outside the model's forward: not where its weight is sharded between forwards
        sharded = distributed.shards_parameters(acc)
        self.chunk_size = train.logps_chunk_size if plain_head(config) and not sharded else 0
        masks = custom_masks(config, model_cfg.attn_implementation)
        self.share_prompt = train.packing and (masks if train.share_prompt is None else train.share_prompt)
        if self.share_prompt and not masks:
            raise RecipeError("train.share_prompt needs a custom attention mask: attention sdpa or eager, and no "
                              f"sliding window (model.attn_implementation is {model_cfg.attn_implementation}); "
                              "set train.share_prompt: false")
        acc.print(f"[prefopt] layout: {'packed' if train.packing else 'padded'}"
                  f"{', a prompt shared by the sequences continuing it' if self.share_prompt else ''}; log-probs "
                  + (f"through the LM head {self.chunk_size} tokens at a time" if self.chunk_size else "from full logits"))

    def _precompute_reference(self) -> None:
        """Reference log-probs of every train and eval example, from the cache or computed once and cached."""
        recipe, acc = self.recipe, self.accelerator
        ref, model_cfg = recipe.reference, recipe.model
        sources = [ref.name_or_path or model_cfg.name_or_path]
        if model_cfg.adapter and not ref.name_or_path:
            sources.append(model_cfg.adapter)
        cache_dir = Path(ref.cache_dir or Path.home() / ".cache" / "prefopt" / "reference")
        size = recipe.train.eval_batch_size or recipe.train.micro_batch_size
        logps, model = self.logps_function(), None
        for split, examples in (("train", self.train_data), ("eval", self.eval_data)):
            if not examples:
                continue
            # the layout is in the key: a model found to mix packed sequences must not leave wrong values behind
            setting = (f"{model_cfg.dtype}/{acc.mixed_precision}" + ("/packed" if recipe.train.packing else "")
                       + (f"/ld{recipe.loss[0].ld_alpha}" if recipe.loss[0].ld_alpha is not None else ""))
            path = cache_dir / f"{refs.cache_key(sources, examples, setting)}.pt"
            values = refs.load_cached(path, len(examples))
            # computed by every process or by none (machines without a shared disk may not all see the cache)
            cached = bool(acc.gather(torch.tensor([int(values is not None)], device=acc.device)).all())
            if not cached:
                if model is None:  # placed like the policy will be: sharded under ZeRO-3 and FSDP2
                    model = self.prepare_frozen(load_reference_copy(model_cfg, ref.name_or_path))
                values = refs.compute_logps(model, examples, self.eval_chunks(examples, size), self.collate, logps,
                                            acc)
                if acc.is_main_process:
                    refs.save_cached(path, values)
            acc.print(f"[prefopt] reference log-probs of data.{split}: "
                      f"{'reused from' if cached else 'computed and cached in'} {path}")
            refs.attach(examples, values)
        del model  # the reference is not needed again
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def after_step(self, step: int, record: dict[str, float]) -> None:
        ref = self.recipe.reference
        if ref.sync_every and step % ref.sync_every == 0:
            refs.sync_reference(self.reference, self.accelerator.unwrap_model(self.model), ref.sync_alpha,
                                self.accelerator)

    def reference_logps(self, batch, policy, logps):
        """The reference's log-probs of this batch, wherever reference.kind says they come from."""
        kind = self.recipe.reference.kind
        if kind == "none":
            return None
        if kind == "precomputed":
            ref = batch["ref_logps"]  # (N,) in the batch's sequence order
            if self.unpaired:
                return UnpairedLogps(ref, policy.tokens, policy.desirable)
            chosen, rejected = ref.chunk(2)
            return PairLogps(chosen, rejected, policy.chosen_tokens, policy.rejected_tokens)
        return refs.reference_logps(kind, self.model, self.reference, self.accelerator, lambda m: logps(m, batch))

    def _prepare(self) -> None:
        super()._prepare()
        if self.recipe.train.packing:
            self._check_packing()

    @torch.no_grad()
    def _check_packing(self) -> None:
        """Packed sequences rely on the model reading position ids (and 4-D masks) as transformers' own models
        do; one that ignores them (some remote code) would let sequences see each other. Compare once."""
        examples, acc = getattr(self.train_data, "sample", self.train_data)[:4], self.accelerator
        was_training = self.model.training
        self.model.eval()
        with acc.autocast():
            packed, padded = (completion_logps(self.model, self.to_device(self.collate(examples, packing)),
                                               self.chunk_size)[0] for packing in (True, False))
        self.model.train(was_training)
        exact = acc.mixed_precision == "no" and next(self.model.parameters()).dtype == torch.float32
        if not torch.allclose(packed, padded, rtol=1e-4 if exact else 1e-2, atol=1e-3 if exact else 0.1):
            raise RecipeError(f"packed sequences give other log-probs than padded ones ({packed.tolist()} vs "
                              f"{padded.tolist()}): this model does not keep packed sequences apart; "
                              "set train.packing: false")

    def collate(self, examples: list[dict], packing: bool | None = None) -> dict[str, torch.Tensor]:
        packing = self.recipe.train.packing if packing is None else packing
        layout = {"packing": packing, "share_prompt": packing and self.share_prompt,
                  "extra_columns": tuple(self.recipe.data.extra_columns)}
        if self.unpaired:
            return collate_rows(examples, self.tokenizer.pad_token_id, kl=self.kl, **layout)
        return collate_pairs(examples, self.tokenizer.pad_token_id, **layout)

    def global_batch_values(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """token_normalizer: the chosen (unpaired: desirable) tokens scored per example of these examples, what
        token-mean losses divide by (PairLogps.token_normalizer). A completion's first token is scored only
        after a prompt; with a completion_mask (SFT's assistant turns), only the tokens it marks."""
        def scored(ids: list[int], prompt: list[int], mask: list[int] | None = None) -> int:
            return (len(ids) if mask is None else sum(mask)) - (not prompt)

        if self.unpaired:  # rows, or pairs that collate_rows makes two rows each
            counts = [c for ex in examples for c in ((scored(ex["chosen_ids"], ex["prompt_ids"]), 0)
                      if "chosen_ids" in ex else
                      (scored(ex["completion_ids"], ex["prompt_ids"], ex.get("completion_mask")) * ex["label"],))]
        else:
            counts = [scored(ex["chosen_ids"], ex["prompt_ids"]) for ex in examples]
        return {"token_normalizer": torch.tensor(sum(counts) / len(counts))}

    def logps_function(self):
        if self.unpaired:
            return partial(unpaired_logps, chunk_size=self.chunk_size)
        return partial(pair_logps, chunk_size=self.chunk_size, ld_alpha=self.recipe.loss[0].ld_alpha,
                       use_weighting=self.recipe.loss[0].use_weighting)

    def compute_loss(self, batch):
        logps = self.logps_function()
        policy = logps(self.model, batch)
        # the reference's log-probs only (WPO weighs pairs by the policy's)
        reference = self.reference_logps(batch, policy, logps if self.unpaired else partial(logps, use_weighting=False))
        for state in filter(None, self.states):
            state.frozen = not self.model.training  # evaluation reads the running state, never moves it
        outputs = [spec.fn(policy, reference, *([state] if state else []), **term.params)
                   for (spec, term), state in zip(self.terms, self.states)]
        weights = getattr(policy, "weights", None)  # WPO's pair weights, or none
        loss = sum(term.weight * (out.losses if weights is None else out.losses * weights).mean()
                   for (_, term), out in zip(self.terms, outputs))
        metrics = {f"loss/{term.name}": out.losses.detach() for (_, term), out in zip(self.terms, outputs)
                   if len(outputs) > 1}
        chosen_rewards, rejected_rewards = outputs[0].chosen_rewards, outputs[0].rejected_rewards  # the first term's
        # per row, NaN where a metric does not apply; unpaired "chosen" rows are the desirable ones
        metrics["rewards/chosen"], metrics["rewards/rejected"] = chosen_rewards, rejected_rewards
        if self.unpaired:
            desirable = policy.desirable
            metrics["logps/chosen"] = torch.where(desirable, policy.logps.detach(), torch.nan)
            metrics["logps/rejected"] = torch.where(desirable, torch.nan, policy.logps.detach())
            if "pairs" not in batch:
                return loss, self._named(metrics)
            # pairs as rows: the chosen rows, then the rejected
            chosen_rewards, rejected_rewards = chosen_rewards.chunk(2)[0], rejected_rewards.chunk(2)[1]
            logps = [policy.logps.chunk(2), reference.logps.chunk(2) if reference else (None, None)]
            tokens = policy.tokens.chunk(2)
        else:
            metrics["logps/chosen"], metrics["logps/rejected"] = policy.chosen.detach(), policy.rejected.detach()
            logps = [(policy.chosen, policy.rejected),
                     (reference.chosen, reference.rejected) if reference else (None, None)]
            tokens = policy.chosen_tokens, policy.rejected_tokens
        # a tie (as at step 0, policy == reference) is a coin flip: it counts half
        metrics["rewards/accuracy"] = ranked(chosen_rewards, rejected_rewards)
        metrics["rewards/margin"] = chosen_rewards - rejected_rewards
        metrics.update(pair_diagnostics(*logps[0], *logps[1], metrics["rewards/margin"], tokens[0] - tokens[1]))
        return loss, self._named(metrics)

    def _named(self, metrics: dict) -> dict:
        """SFT has no implicit reward: what the first term logs as rewards are per-token log-probs, named so
        (logps/per_token, logps/per_token_rejected, _accuracy, _margin)."""
        if self.terms[0][0].name != "sft":
            return metrics
        names = {"rewards/chosen": "logps/per_token", "rewards/rejected": "logps/per_token_rejected",
                 "rewards/accuracy": "logps/per_token_accuracy", "rewards/margin": "logps/per_token_margin"}
        return {names.get(key, key): value for key, value in metrics.items()}


def pair_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 0, ld_alpha: float | None = None,
               use_weighting: bool = False) -> PairLogps:
    """Chosen and rejected through the model in one forward (the batch holds chosen first); with ld_alpha, each
    completion's tail past the shorter one's length weighs ld_alpha (LD-DPO); with use_weighting, WPO's pair
    weights."""
    weights = None if ld_alpha is None else length_desensitized(batch["token_sequence"], batch["completion_tokens"],
                                                                ld_alpha)
    logps, counts, *aligned = completion_logps(model, batch, chunk_size, weights, wpo=use_weighting)  # (2B,) each
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    pair_weights = wpo_weights(*aligned[0].chunk(2)) if aligned else None
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, batch.get("token_normalizer"), pair_weights)


def unpaired_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> UnpairedLogps:
    """Rows, and the mismatched KL rows after them if the batch has any, through the model in one forward."""
    logps, counts = completion_logps(model, batch, chunk_size)  # (N,) or (2N,)
    n = batch["label"].numel()
    return UnpairedLogps(logps[:n], counts[:n], batch["label"], logps[n:] if logps.numel() > n else None,
                         batch.get("token_normalizer"))
