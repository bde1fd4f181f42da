"""Implicit process rewards as a reward term (`rewards: [{implicit_prm: {model, reference, beta}}]`).

Yuan et al. 2024, "Free Process Rewards without Process Labels": a model trained on outcome labels with its
outcome reward parameterised as r = beta * sum_t log pi(y_t)/pi_ref(y_t) (loss implicit_prm_ce, or DPO on pairs)
is a process reward model for free: each token's reward is beta * (log pi(y_t) - log pi_ref(y_t)). PRIME (Cui et
al. 2025) adds these to an RL run's outcome rewards; here they reach every estimator as per-token rewards
(docs/dense.md). The PRM is frozen (PRIME's online update is not built yet)."""

from __future__ import annotations

import torch

from prefopt.errors import RecipeError
from prefopt.generation import laid_out, pad_prompts
from prefopt.logprobs import response_logps


class ImplicitPRM:
    """Per-token process rewards of completions, called as a reward function (prompt_ids, completion_ids)."""

    def __init__(self, config, where: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.beta, self.device = config.beta, torch.device(device)
        try:
            self.models = [AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
                           for path in (config.model, config.reference)]
        except OSError as exc:
            raise RecipeError(f"{where}: cannot load the implicit PRM or its reference: {exc}") from None

    @torch.no_grad()
    def __call__(self, prompt_ids, completion_ids, **kwargs) -> list[list[float]]:
        """The completions' rewards in one forward per model: left-padded prompts, right-padded completions."""
        width = max(1, max(map(len, completion_ids), default=0))
        prompts, prompt_mask = pad_prompts([list(p) for p in prompt_ids], 0, self.device)
        completions = laid_out(completion_ids, width, 0, torch.long).to(self.device)
        mask = laid_out([[1] * len(ids) for ids in completion_ids], width).to(self.device)
        ids, attention = torch.cat([prompts, completions], 1), torch.cat([prompt_mask, mask.long()], 1)
        policy, reference = (response_logps(model, ids, attention, mask)[0] for model in self.models)
        rewards = (self.beta * (policy - reference)).tolist()
        return [row[: len(ids_)] for row, ids_ in zip(rewards, completion_ids)]
