"""Hugging Face generation with the trained policy: greedy, or a seeded draw that one process and N processes (or
a resumed run) make alike. The online HF engine samples with it; offline runs write their eval samples with it.

A draw (`Draw`) names each prompt's global row: the Gumbel noise that turns greedy decoding into sampling from
softmax(logits / temperature) (top-p cut) depends only on (seed, decoding step, global row).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from prefopt import distributed


@dataclass
class Draw:
    """A seeded draw of one completion per prompt: `rows` (N,) are the prompts' global row indices, of
    `total_rows` over all processes."""

    seed: int
    rows: torch.Tensor
    total_rows: int

    def row_seeds(self) -> list[int]:
        """One seed per row, for an engine that seeds each request (vLLM)."""
        return [hash((self.seed, int(row))) & (2**31 - 1) for row in self.rows]


class GumbelSampler:
    """A logits processor that makes greedy decoding draw from softmax(scores): it adds Gumbel noise (Gumbel-max
    trick) that depends only on (seed, decoding step, global row)."""

    def __init__(self, draw: Draw, prompt_width: int):
        self.draw, self.prompt_width = draw, prompt_width  # decoding step = sequence length - prompt width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        generator = torch.Generator(scores.device).manual_seed(hash((self.draw.seed, step)) & (2**63 - 1))
        uniform = torch.rand(self.draw.total_rows, scores.shape[-1], generator=generator, device=scores.device)
        uniform = uniform[self.draw.rows.to(scores.device)].clamp_(min=1e-20)  # this process's rows
        return scores - torch.log(-torch.log(uniform))


class LogpRecorder:
    """A logits processor, first in line, that keeps each sampled token's log-prob under softmax(logits /
    temperature) (the distribution the update's log-probs are taken under): a step's token is read at the next
    step, the last one by `finish`. Holds one step's log-probs, not the whole generation's logits."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.logps = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.logps.append(self.last.gather(1, input_ids[:, -1:].to(self.last.device))[:, 0])
        self.last = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def finish(self, responses: torch.Tensor) -> list[list[float]]:
        """(N, R) sampled ids -> each row's log-probs (N, R) as lists."""
        if self.last is not None:
            self.logps.append(self.last.gather(1, responses[:, len(self.logps) : len(self.logps) + 1])[:, 0])
        return torch.stack(self.logps, 1).tolist() if self.logps else [[] for _ in range(len(responses))]


def local_accelerator(device) -> SimpleNamespace:
    """What `generate` reads of an Accelerator, for a model of its own outside the trained one (an engine server's
    copy, a judge): its device, nothing sharded."""
    return SimpleNamespace(device=torch.device(device), unwrap_model=lambda model: model,
                           distributed_type=SimpleNamespace(name="NO"), state=SimpleNamespace(deepspeed_plugin=None))


def laid_out(rows: list, width: int, fill: float = 0, dtype: torch.dtype = torch.float) -> torch.Tensor:
    """(N, width) of ragged rows (lists; None for none), each from the left, `fill` after it."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def pad_prompts(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (N, P) ids and mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def joined(prompts: list[list[int]], completions: list[list[int]], device) -> tuple[torch.Tensor, ...]:
    """Prompts and their completions as one batch to score: (ids, attention mask, completion mask), the prompts
    left-padded and the completions right-padded (padding id 0, masked)."""
    width = max(1, max(map(len, completions), default=0))
    prompt_ids, prompt_mask = pad_prompts([list(p) for p in prompts], 0, device)
    mask = laid_out([[1] * len(ids) for ids in completions], width).to(device)
    ids = torch.cat([prompt_ids, laid_out(completions, width, 0, torch.long).to(device)], 1)
    return ids, torch.cat([prompt_mask, mask.long()], 1), mask


@torch.no_grad()
def generate(model, accelerator, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             draw: Draw | None = None, temperature: float = 1.0, top_p: float = 1.0, logps: bool = False):
    """Each prompt's completion ids, cut after its first EOS: drawn by `draw` from the whole temperature-scaled
    (top-p) distribution the update's log-probs are taken under (not the top 50 or the repetition penalty of a
    model's own generation config), or greedy without one. `model` is the trained one, prepared (a policy with a
    value head generates with its policy); sharded weights are gathered for it. With `logps`, also each sampled
    token's log-prob under softmax(logits / temperature): (ids, logps)."""
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    prompt_ids, prompt_mask = pad_prompts(prompts, tokenizer.pad_token_id, accelerator.device)
    recorder = LogpRecorder(temperature) if logps else None
    processors = LogitsProcessorList([recorder] if recorder else [])
    if draw is not None:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(GumbelSampler(draw, prompt_ids.shape[1]))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    policy = accelerator.unwrap_model(model)
    policy = getattr(policy, "policy", policy)  # PolicyWithValueHead's
    was_training = policy.training
    policy.eval()
    with distributed.generation_weights(model, accelerator):
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                              logits_processor=processors)
    policy.train(was_training)
    responses = out[:, prompt_ids.shape[1] :]  # (N, R)
    eos = tokenizer.eos_token_id
    ids = [row[: row.index(eos) + 1] if eos in row else row for row in responses.tolist()]
    if recorder is None:
        return ids
    return ids, [values[: len(row)] for row, values in zip(ids, recorder.finish(responses))]
