"""Rollout engines: what samples completions for online methods (`rollout.engine`). One interface, `Engine`:

- `generate(prompts, draw, max_new_tokens)`: one completion per prompt (token ids, cut after EOS), drawn by
  `draw` (prefopt.generation.Draw) or greedy; and the engine's log-prob of each sampled token, or None;
- `sync(model, accelerator)`: take the trained policy's current weights (the sampler calls it before a
  generation that follows an update);
- `sleep()` / `wake()`: free the engine's memory while the trainer updates, and take it back;
- `close()`.

Engines:

- `hf` (HFEngine): Hugging Face `generate` on the trained policy itself (prefopt.generation), whose sync is free;
- `vllm` (VLLMEngine): a vLLM engine colocated in each training process (TRL's colocate design: each process
  generates its share of the prompts), holding its own copy of the policy's weights, loaded at each sync;
- `module:Class`: an engine of the user's, made as `Class(recipe, tokenizer)`;
- any of hf and vllm in a process of its own (`rollout.server`: prefopt/online/server.py).

The Sampler makes the recipe's engine (`make_engine` in prefopt/online/served.py).

Determinism: each completion is drawn with its own seed, derived from (seed, rollout, round, global row), so a
resumed or re-sharded run asks vLLM for the same draws. vLLM then promises the same tokens for the same seed and
logits; it does not promise logits that are bit-equal across batch compositions (its kernels may reduce in a
different order), so a run on another number of processes may diverge after a near-tie. Old log-probs are
always the trainer's own forward; the engine's are kept to measure the gap (`rollout/engine_logp_gap_*`) and,
with `ppo.engine_is: truncate`, to correct for it by truncated importance sampling.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator

import torch

from prefopt import distributed
from prefopt.errors import PrefoptError, TrainingError
from prefopt.generation import Draw, generate

SYNC_TIMEOUT_S = 300.0


class Engine:
    """What samples completions for an online method (see the module's docstring)."""

    samples_from_trainer = False  # the engine is the trained policy itself: its log-probs are the trainer's
    gives_logps = False  # generate returns each sampled token's log-prob (the behaviour policy's)

    def generate(self, prompts: list[list[int]], draw: Draw | None, max_new_tokens: int
                 ) -> tuple[list[list[int]], list[list[float]] | None]:
        raise NotImplementedError

    def sync(self, model, accelerator) -> None:
        raise NotImplementedError

    def sleep(self) -> None:
        """Nothing to free by default."""

    def wake(self) -> None:
        """Nothing to take back by default."""

    def close(self) -> None:
        """Nothing to shut down by default."""


class HFEngine(Engine):
    """Hugging Face generate on the trained policy itself: a sync points it at the model (no copy)."""

    samples_from_trainer = True

    def __init__(self, tokenizer, *, temperature: float, top_p: float, logps: bool = False):
        self.tokenizer, self.temperature, self.top_p = tokenizer, temperature, top_p
        self.model = self.accelerator = None
        self.gives_logps = logps  # the behaviour policy's, kept while sampling (rollout.lag: its update is later)

    def sync(self, model, accelerator) -> None:
        if self.model is None and accelerator.distributed_type.name == "FSDP":  # FSDP2 sets itself up in the
            # first forward of the whole model; generation calls the policy inside it, so run that forward first
            ids = torch.full((1, 1), self.tokenizer.pad_token_id, device=accelerator.device)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        self.model, self.accelerator = model, accelerator

    def generate(self, prompts, draw, max_new_tokens):
        out = generate(self.model, self.accelerator, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                       draw=draw, temperature=self.temperature, top_p=self.top_p, logps=self.gives_logps)
        return out if self.gives_logps else (out, None)


def vllm_options(recipe) -> dict:
    """A vLLM engine's settings from the recipe (besides its sampling)."""
    model, rollout = recipe.model, recipe.rollout
    length = recipe.data.max_length  # None (prefopt serve MODEL without --max-model-len): the model's own
    return {"seed": recipe.seed, "dtype": model.dtype,
            "max_model_len": None if length is None else length + rollout.max_new_tokens,
            "gpu_memory_utilization": rollout.gpu_memory_utilization,
            "tensor_parallel_size": rollout.tensor_parallel_size, "trust_remote_code": model.trust_remote_code}


def vllm_available() -> str | None:
    """None when vLLM imports here, else why not (for the error, and for the tests' skip reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an ImportError, or a build that fails to load against this torch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


class VLLMEngine(Engine):
    """A vLLM LLM in this process on the policy's starting checkpoint; `sync` loads the trained weights."""

    gives_logps = True

    def __init__(self, name_or_path: str, *, seed: int, max_model_len: int, gpu_memory_utilization: float,
                 tensor_parallel_size: int, dtype: str, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, trust_remote_code: bool = False):
        self.temperature, self.top_p, self.eos_token_id = temperature, top_p, eos_token_id
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no spawned engine process
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU
        missing = vllm_available()
        if missing:
            raise PrefoptError(f"rollout.engine: vllm, but vLLM does not import here ({missing}); install it "
                               "(pip install 'prefopt[vllm]' on a GPU, make vllm on a CPU) or set rollout.engine: hf")
        from vllm import LLM

        gpu = torch.cuda.is_available()
        try:
            self.llm = LLM(model=name_or_path, dtype="float32" if dtype == "float32" else dtype, seed=seed,
                           max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, enforce_eager=not gpu, enable_sleep_mode=gpu,
                           trust_remote_code=trust_remote_code, logprobs_mode="processed_logprobs",
                           use_tqdm_on_load=False)
        except Exception as exc:
            raise PrefoptError(f"rollout.engine: vllm could not start on {name_or_path!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.sleeping = False

    def _runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def sync(self, model, accelerator) -> None:
        """Load the trained policy's weights (gathered where sharded)."""
        with distributed.generation_weights(model, accelerator):
            self.load(policy_weights(model, accelerator))

    def load(self, weights: Iterator[tuple[str, torch.Tensor]], timeout: float = SYNC_TIMEOUT_S) -> None:
        """Load (name, tensor) pairs in Hugging Face names into the engine, a tensor at a time. A name the engine
        does not know, or any failure of the engine, stops the run with its error; so does a sync that takes
        longer than `timeout` seconds."""
        self.wake()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(self._runner().reload_weights, weights_iterator=weights)
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TrainingError(f"vLLM weight sync did not finish in {timeout:.0f} s; the run stopped") from None
        except Exception as exc:
            raise TrainingError(f"vLLM weight sync failed: {type(exc).__name__}: {exc}") from exc
        finally:
            pool.shutdown(wait=False)

    def generate(self, prompts, draw, max_new_tokens):
        """One completion per prompt (greedy without a draw, else each row with its own seed), cut after EOS: its
        token ids and each sampled token's log-prob under the temperature-scaled (top-p) distribution."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        seeds = [None] * len(prompts) if draw is None else draw.row_seeds()
        params = [SamplingParams(temperature=self.temperature if seed is not None else 0.0, top_p=self.top_p,
                                 top_k=-1, max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                 stop_token_ids=[self.eos_token_id],
                                 ignore_eos=False, skip_special_tokens=False, detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        tokens, logps = [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens.append(list(sample.token_ids))
            logps.append([step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs or [])])
        return tokens, logps

    def score(self, prompts, completions, temperature: float) -> list[list[float]]:
        """Each completion token's log-prob given its prompt (vLLM's prompt log-probs of prompt + completion)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature != 1.0:
            raise PrefoptError(f"a vLLM teacher scores at temperature 1 only (vLLM's prompt log-probs are the raw "
                               f"logits'), not {temperature}: set rollout.temperature: 1.0, or distill.engine: hf")
        self.wake()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(c))
                                     for p, c in zip(prompts, completions)], params, use_tqdm=False)
        return [[out.prompt_logprobs[len(p) + i][token].logprob for i, token in enumerate(c)]
                for out, p, c in zip(outputs, prompts, completions)]

    def close(self) -> None:
        """Shut the engine down (its own distributed state too) before the trainer ends its process group."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """On a GPU, free the engine's weights and KV cache while the trainer updates (vLLM's sleep mode)."""
        if torch.cuda.is_available() and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def policy_weights(model, accelerator) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights in Hugging Face names, a tensor at a time: without the value head or critic, a LoRA
    adapter merged into its base layers (W + B A scaled), gathered where sharded (inside
    distributed.generation_weights)."""
    policy = accelerator.unwrap_model(model).policy
    peft = hasattr(policy, "peft_config")
    if peft:
        policy.merge_adapter()
    try:
        base = policy.get_base_model() if peft else policy
        for name, tensor in base.state_dict().items():
            if peft and "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            yield name, getattr(tensor, "full_tensor", lambda t=tensor: t)().detach()  # FSDP2: a DTensor's whole
    finally:
        if peft:
            policy.unmerge_adapter()
