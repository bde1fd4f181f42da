"""Implicit process rewards as a reward term (`rewards: [{implicit_prm: {model, reference, beta}}]`).

Yuan et al. 2024, "Free Process Rewards without Process Labels": a model trained on outcome labels with its
outcome reward parameterised as r = beta * sum_t log pi(y_t)/pi_ref(y_t) (loss implicit_prm_ce, or DPO on pairs)
is a process reward model for free: each token's reward is beta * (log pi(y_t) - log pi_ref(y_t)). PRIME (Cui et
al. 2025) adds these to an RL run's outcome rewards; here they reach every estimator as per-token rewards
(docs/dense.md). With `online_update`, PRIME's: the PRM learns from each rollout's outcome labels (another term's
values in [0, 1]) by the same cross-entropy, in the step that scores it, on every process alike (gradients summed
over processes and normalised by the global count, so N processes update as one)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prefopt.errors import PrefoptError, RecipeError
from prefopt.generation import joined
from prefopt.logprobs import response_logps


class ImplicitPRM:
    """Per-token process rewards of completions, called as a reward function (prompt_ids, completion_ids); with
    `config.online_update`, `labels=` (one per completion, None to skip) also trains it (RewardTerms passes them in
    training rollouts only). Its state (weights, optimizer) is a checkpointed object's."""

    def __init__(self, config, name: str, where: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.config, self.name, self.where, self.beta, self.device = config, name, where, config.beta, torch.device(device)
        self.online = config.online_update
        try:
            self.models = [AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
                           for path in (config.model, config.reference)]
        except OSError as exc:
            raise RecipeError(f"{where}: cannot load the implicit PRM or its reference: {exc}") from None
        self.models[1].requires_grad_(False)
        self.models[0].requires_grad_(self.online)
        self.optimizer = torch.optim.AdamW(self.models[0].parameters(), lr=config.lr) if self.online else None
        self.last_loss: float | None = None

    def __call__(self, prompt_ids, completion_ids, labels=None, log_metric=None, **kwargs) -> list[list[float]]:
        """The completions' rewards in one forward per model: left-padded prompts, right-padded completions."""
        batch = joined(prompt_ids, completion_ids, self.device)
        with torch.no_grad():
            reference = response_logps(self.models[1], *batch)[0]
        if labels is not None and self.config.update == "before":
            self.learn(batch, reference, labels, log_metric)
        with torch.no_grad():
            rewards = (self.beta * (response_logps(self.models[0], *batch)[0] - reference)).tolist()
        if labels is not None and self.config.update == "after":
            self.learn(batch, reference, labels, log_metric)
        return [row[: len(ids_)] for row, ids_ in zip(rewards, completion_ids)]

    def learn(self, batch: tuple, reference: torch.Tensor, labels: list, log_metric=None) -> None:
        """One AdamW step of PRIME's cross-entropy (Cui et al. 2025, Eq. 5 of Yuan et al. 2024) on the labelled
        completions of every process: -[y log sigma(r) + (1 - y) log(1 - sigma(r))], r = beta * sum_t log-ratio,
        summed here, the gradients summed over processes and divided by the global count of labels."""
        rows = [j for j, y in enumerate(labels) if y is not None and not math.isnan(y)]
        for j in rows:
            if not 0 <= labels[j] <= 1:
                raise PrefoptError(f"{self.where}: PRIME's update takes outcome labels in [0, 1] (1 correct), but "
                                   f"its label term gave {labels[j]} to completion {j}; label with a 0/1 verifier "
                                   "(implicit_prm.label names it)")
        count = _all_sum(torch.tensor([float(len(rows))], device=self.device))[0]
        if count == 0:
            return
        ids, attention, mask = batch
        total = 0.0
        for start in range(0, len(rows), self.config.batch_size):
            chunk = torch.tensor(rows[start : start + self.config.batch_size], device=self.device)
            with torch.enable_grad():  # rollouts are scored under no_grad
                policy = response_logps(self.models[0], ids[chunk], attention[chunk], mask[chunk])[0]
                r = self.beta * ((policy - reference[chunk]) * mask[chunk]).sum(1)
                y = torch.tensor([float(labels[j]) for j in chunk.tolist()], device=self.device)
                loss = F.binary_cross_entropy_with_logits(r, y, reduction="sum")
                (loss / count).backward()
            total += loss.item()
        parameters = [p for p in self.models[0].parameters() if p.requires_grad]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(_all_sum(p.grad))
        torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = _all_sum(torch.tensor([total], device=self.device))[0].item() / count.item()
        if log_metric is not None:
            log_metric(f"rewards/{self.name}/prm_loss", self.last_loss)

    def save_pretrained(self, path) -> None:
        """The updated PRM (written at the end of a run as output_dir/prm_<name>), to score or train on later."""
        self.models[0].save_pretrained(path)

    # ----- checkpointed: the PRM's weights and AdamW's state, as tensors ----------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"model/{k}": v for k, v in self.models[0].state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            out.update({f"optim/{i}/{k}": torch.as_tensor(v) for k, v in state.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.models[0].load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model/")})
        optim: dict[int, dict] = {}
        for key, value in state.items():
            if key.startswith("optim/"):
                _, i, name = key.split("/", 2)
                optim.setdefault(int(i), {})[name] = value.to(self.device)
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": optim, "param_groups": saved["param_groups"]})


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over the processes of a distributed run (itself in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
