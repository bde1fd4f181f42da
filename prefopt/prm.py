"""Implicit process rewards as a reward term (`rewards: [{implicit_prm: {model, reference, beta}}]`).

Yuan et al. 2024, "Free Process Rewards without Process Labels": a model trained on outcome labels with its
outcome reward parameterised as r = beta * sum_t log pi(y_t)/pi_ref(y_t) (loss implicit_prm_ce, or DPO on pairs)
is a process reward model for free: each token's reward is beta * (log pi(y_t) - log pi_ref(y_t)). PRIME (Cui et
al. 2025) adds these to an RL run's outcome rewards; here they reach every estimator as per-token rewards
(docs/dense.md). The PRM is frozen (PRIME's online update is not built yet)."""

from __future__ import annotations

import torch

from prefopt.errors import RecipeError


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
        out = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            if not completion:
                out.append([])
                continue
            ids = torch.tensor([list(prompt) + list(completion)], device=self.device)
            policy, reference = (self._logps(model, ids, len(completion)) for model in self.models)
            out.append((self.beta * (policy - reference)).tolist())
        return out

    @staticmethod
    def _logps(model, ids: torch.Tensor, width: int) -> torch.Tensor:
        logits = model(input_ids=ids).logits[0, -width - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(1, ids[0, -width:, None])[:, 0]
