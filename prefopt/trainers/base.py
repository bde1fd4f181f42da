"""Trainer: the one training loop, on Hugging Face Accelerate.

A method subclasses Trainer, loads what it needs in __init__ (its data first,
so that bad data stops the run before any model loads, then `self.model` and
any reference or reward model), and overrides at most:

- `batches(step)`: this process's micro-batches for one optimizer step;
- `compute_loss(batch) -> (loss, metrics)`: one micro-batch;
- `after_step(step, record)`: what happens between optimizer steps (a reference sync, an engine marked stale).

`fit` and `train_step` are not overridden. Everything else lives here once: gradient accumulation, clipping, mixed
precision, schedules, logging, evaluation, checkpoints and resume.

Data order is a pure function of (seed, step): each epoch is a seeded
permutation of the training set, cut into global batches of
`train.batch_size`; each global batch is cut into micro-batches, dealt to the
processes in turn. So resuming needs only the step number, and N processes with
accumulation A see exactly the batches that one process with accumulation N*A
sees.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from prefopt import degenerate, distributed
from prefopt import recipe as recipe_lib
from prefopt.data import rows_at
from prefopt.data.stream import Stream, StreamStop
from prefopt.errors import RecipeError, Stopped
from prefopt.methods import record
from prefopt.models import check_positions, load_tokenizer
from prefopt.run import checkpoints, tracking
from prefopt.run import directory as runs
from prefopt.run import metrics as metrics_file
from prefopt.run.checkpoints import remove_leftovers, write_atomic, writing
from prefopt.run.integrity import input_fingerprint
from prefopt.run.metrics import MetricMeans
from prefopt.trainers import setup
from prefopt.trainers.finite import nonfinite_update

AT_STEP = ("data/epoch", "data/dropped_rows")  # logged as they are at the step, not averaged over log_every


class Trainer:
    evaluating = False  # made by prefopt eval: data.eval is its --data, and nothing trains

    def __init__(self, recipe: recipe_lib.Recipe):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe = recipe
        self.method = record(recipe)  # its record: sections, headline metrics, plot panels
        train = recipe.train
        if recipe.log.quiet:
            tracking.quiet_libraries()
        tracking.check_trackers(recipe.log.to)
        self.output_dir = Path(recipe.output_dir)
        trackers, self.tracker_init = tracking.tracker_settings(recipe, self.output_dir)
        state, cpu = distributed.start_processes()
        rollout = recipe.rollout  # a spawned engine server that generates during the update
        overlapped = rollout.server == "spawn" and rollout.lag > 0 and rollout.overlap
        self.threads = distributed.cpu_threads(cpu, helpers=int(overlapped))
        self.world_size = state.num_processes
        per_step = train.micro_batch_size * self.world_size
        if train.batch_size % per_step:
            raise RecipeError(
                f"train.batch_size ({train.batch_size}) must be a multiple of train.micro_batch_size "
                f"({train.micro_batch_size}) x processes ({self.world_size}) = {per_step}; change one of them")
        self.accumulation_steps = train.batch_size // per_step
        self.accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=self.accumulation_steps,
                                       mixed_precision=setup.mixed_precision(train.mixed_precision), **trackers)
        distributed.check_fsdp(self.accelerator)
        distributed.configure_deepspeed(self.accelerator, train, self.accumulation_steps)
        set_seed(recipe.seed)
        self.run_log = tracking.RunLog(self)
        self.tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template_kwargs)
        new_tokens = recipe.rollout.max_new_tokens if self.method.prompts_only else 0
        check_positions(recipe, recipe.data.max_length + new_tokens, f"data.max_length ({recipe.data.max_length})"
                        + (f" + rollout.max_new_tokens {new_tokens} = {recipe.data.max_length + new_tokens}"
                           if new_tokens else ""))
        self.model = None  # the policy: set by the method's __init__, after its data loads
        self.reference = None  # a frozen reference model, for a method that keeps one
        self.train_data: list[dict] = []  # examples that self.collate turns into batches (prefopt.data.Rows)
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation of train_data)
        self.eval_data: list[dict] = []
        self.started = _now()
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient (train.on_nonfinite: skip)
        # state saved with each checkpoint beside Accelerate's (objects with state_dict/load_state_dict): as JSON,
        # or as safetensors when a state is all tensors; never pickled, so loading a checkpoint runs no code
        self.checkpointed: dict[str, object] = {}
        self.stop_signal: int | None = None  # SIGTERM/SIGINT received: checkpoint at the end of this step and stop
        self.global_step = 0  # optimizer steps done
        self.inputs: dict[str, dict] = {}  # the files the run reads, by content (set when fit starts)

    # ----- what a method overrides ------------------------------------------------------------

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch -> (scalar loss to minimise, metrics as (B,) per-example tensors)."""
        raise NotImplementedError

    def batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's `accumulation_steps` micro-batches for optimizer step `step` (1-based)."""
        train = self.recipe.train
        if isinstance(self.train_data, Stream):  # the next global batch of the stream
            examples = self.train_data.batch(step, train.batch_size)
        else:
            n = len(self.train_data)
            epoch, index = divmod(step - 1, n // train.batch_size)
            if self._order is None or self._order[0] != epoch:  # the epoch's permutation, drawn once
                generator = torch.Generator().manual_seed(self.recipe.seed + epoch)
                self._order = (epoch, torch.randperm(n, generator=generator))
            examples = rows_at(self.train_data, self._order[1][index * train.batch_size :][: train.batch_size].tolist())
        if train.group_by_length:  # similar lengths share a micro-batch: less padding, the same global batch
            examples.sort(key=example_length)
        shared = self.global_batch_values(examples)
        for chunk in self.deal(examples):
            yield self.to_device({**self.collate(chunk), **shared})

    def global_batch_values(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Values that every micro-batch of a global batch (or of an evaluation) shares, known before the first
        one: the normalisers of token means, so that aggregation follows the global batch (none here)."""
        return {}

    def deal(self, rows: list) -> list[list]:
        """This process's share of a global batch: cut into micro-batches, dealt to the processes in turn."""
        micro = self.recipe.train.micro_batch_size
        chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
        return chunks[self.accelerator.process_index :: self.world_size]

    # ----- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train for train.max_steps, resuming from the newest checkpoint; returns the eval records."""
        from tqdm.auto import tqdm

        recipe, train, acc = self.recipe, self.recipe.train, self.accelerator
        self._check_data()
        degenerate.check_recipe(recipe, acc.print)
        self.inputs = input_fingerprint(recipe) if acc.is_main_process else {}  # what the run reads, by content
        self._prepare()
        if acc.is_main_process:
            remove_leftovers(self.output_dir)
        acc.wait_for_everyone()
        start = self.global_step = self._resume() if train.resume else 0
        changed = checkpoints.apply_remedies(self) if start else {}
        if acc.is_main_process:
            info = setup.run_info(self)
            old = self.output_dir / "run.json"
            history = json.loads(old.read_text()).get("changed_on_resume", []) if start and old.exists() else []
            info["changed_on_resume"] = history + ([{"step": start, **changed}] if changed else [])
            with writing("recipe.yaml and run.json", self.output_dir):
                self.output_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(self.output_dir / "recipe.yaml", recipe_lib.dump(setup.as_run(self)))
                write_atomic(old, json.dumps(info, indent=2) + "\n")
            print(setup.start_message(self, start))
        self.run_log.start(start, self.tracker_init)
        if start == 0:
            self.eval_step(0)
        progress = tqdm(range(start + 1, train.max_steps + 1), initial=start, total=train.max_steps,
                        disable=not (train.progress_bar and acc.is_main_process), desc="train")
        window: dict[str, list[float]] = defaultdict(list)
        with runs.stop_signals(self._on_stop_signal):
            for step in progress:
                try:
                    record = self.train_step(step)
                except StreamStop as stop:  # a bad row reached: what was trained is kept
                    raise checkpoints.stopped_at_bad_row(self, stop, step) from None
                self.global_step = step
                self.after_step(step, record)
                for key, value in record.items():
                    window[key].append(value)
                stopping = self._stopping(step)
                if window and (step % train.log_every == 0 or step == train.max_steps or stopping):
                    record = {key: values[-1] if key in AT_STEP else sum(values) / len(values)
                              for key, values in window.items()}
                    window.clear()
                    self.run_log.write(record, step=step, split="train")
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                if step == train.max_steps or (train.eval_every and step % train.eval_every == 0):
                    self.eval_step(step)
                saved = step == train.max_steps or (train.save_every and step % train.save_every == 0)
                if saved or stopping:
                    self.save_checkpoint(step)
                if stopping:
                    raise Stopped(self.stop_signal, step, self.output_dir)
        progress.close()
        with runs.stop_signals(self._on_signal_at_final):  # final/ is finished, then the run stops, saying so
            self.save_final()
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal, train.max_steps, self.output_dir)
        if acc.is_main_process:
            info = json.loads((self.output_dir / "run.json").read_text())
            write_atomic(self.output_dir / "run.json", json.dumps({**info, "ended": _now()}, indent=2) + "\n")
        evals = self._summary()
        self.run_log.finish()
        return evals

    def eval_step(self, step: int) -> None:
        """Evaluate at `step`: the method's metrics and its samples (eval.generate), through the run's log."""
        record = self.evaluate()
        rows = self.generate_samples() if self.recipe.eval.generate else []
        self.run_log.write({**record, **self.sample_metrics(rows)}, step=step, split="eval")
        self.run_log.samples(rows, step)

    def generate_samples(self) -> list[dict]:
        """Rows {prompt, completion, scores...} of eval.generate held-out prompts (a method that can generate)."""
        return []

    def sample_metrics(self, rows: list[dict]) -> dict[str, float]:
        """Metrics of the samples, for the eval record (none here)."""
        return {}

    def _on_stop_signal(self, signum: int) -> None:
        self.stop_signal = signum
        print(f"[prefopt] {signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again "
              "to exit at once)", flush=True)

    def _on_signal_at_final(self, signum: int) -> None:
        self.stop_signal = signum
        print(f"[prefopt] {signal.Signals(signum).name} while final/ is written: it is finished first, then the run "
              "stops (send it again to exit at once; final/ is written atomically)", flush=True)

    def _stopping(self, step: int) -> bool:
        """Whether a stop signal reached any process and this step is one a run may stop after."""
        flag = torch.tensor(float(self.stop_signal or 0), device=self.accelerator.device)
        if self.world_size > 1:
            flag = self.accelerator.reduce(flag, "max")
        if flag and self.stop_signal is None:
            self.stop_signal = int(flag)
        return bool(flag) and step < self.recipe.train.max_steps and self.can_stop_after(step)

    def can_stop_after(self, step: int) -> bool:
        """Whether a checkpoint after `step` resumes exactly (PPO: only between rollouts)."""
        return True

    def after_step(self, step: int, record: dict[str, float]) -> None:
        """After optimizer step `step`, before it is logged: what a method does between steps (sync a reference,
        mark its engine stale); it may add metrics to `record`. Nothing here."""

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns metrics averaged over all processes."""
        acc, train = self.accelerator, self.recipe.train
        start = time.perf_counter()
        self.model.train()
        means = MetricMeans()
        grad_norm = torch.zeros((), device=acc.device)
        finite = torch.ones((), dtype=torch.bool, device=acc.device)  # every micro-batch's loss so far
        skipped = False
        tokens = None  # prompt + completion tokens of every sequence, where the batches count them
        for batch in self.batches(step):
            if "num_tokens" in batch:
                tokens = batch.pop("num_tokens") + (0 if tokens is None else tokens)
            with acc.accumulate(self.model):
                loss, metrics = self.compute_loss(batch)
                finite &= torch.isfinite(loss.detach())
                acc.backward(loss)
                if acc.sync_gradients:
                    max_norm = train.max_grad_norm if train.max_grad_norm is not None else math.inf
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                    skipped = nonfinite_update(self, step, finite, grad_norm)
                    if not skipped:
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            means.add("loss", loss)  # one value per micro-batch
            for key, value in metrics.items():
                means.add(key, value)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if not means.sums:  # the method had nothing to train on this step (PPO's approximate-KL stop)
            return {}
        record = means.result(acc)
        record.update(grad_norm=float(grad_norm), lr=lr, **({"skipped_nonfinite": 1.0} if skipped else {}))
        if tokens is not None:
            record["num_tokens"] = acc.reduce(tokens.float(), reduction="sum").item()
        record["step_seconds"] = time.perf_counter() - start
        if tokens is not None:
            record["tokens_per_second"] = record["num_tokens"] / record["step_seconds"]
        if isinstance(self.train_data, Stream):
            record.update(self.train_data.stats())
        return record

    @torch.no_grad()
    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Per-example metrics averaged over the eval set, or `examples` (split across processes)."""
        examples = self.eval_data if examples is None else examples
        if not examples:
            return {}
        self.model.eval()
        means, train = MetricMeans(), self.recipe.train
        shared = self.global_batch_values(examples)
        for chunk, counts in self.eval_chunks(examples, train.eval_batch_size or train.micro_batch_size):
            loss, metrics = self.compute_loss(self.to_device({**self.collate(chunk), **shared}))
            if counts:
                means.add("loss", loss, weight=len(chunk))  # loss is a mean over the micro-batch
                for key, value in metrics.items():
                    means.add(key, value)
        return means.result(self.accelerator)

    def eval_chunks(self, examples: list[dict], size: int) -> Iterator[tuple[list[dict], bool]]:
        """This process's share of `examples`, `size` at a time, with whether to count them: every process runs as
        many chunks as the busiest one (sharded models gather in lockstep); one out of examples runs the first
        example again and counts nothing (distributed.eval_chunks)."""
        return distributed.eval_chunks(examples, size, self.accelerator.process_index, self.world_size)

    # ----- set-up -----------------------------------------------------------------------------

    def load_data(self, takes: str) -> None:
        """data.train and data.eval (or a held-out data.eval_fraction) -> self.train_data, self.eval_data; `takes`:
        what the losses train on (prefopt.data.load_examples)."""
        self.train_data, self.eval_data = setup.load_data(self, takes)

    def _prepare(self) -> None:
        """The optimizer and schedule, compiled layers and activation checkpointing (prefopt.trainers.setup)."""
        setup.prepare(self)

    def _lr_factor(self, step: int) -> float:
        """Multiplier of optim.lr after `step` optimizer steps."""
        return setup.lr_factor(self.recipe.optim, self.recipe.train.max_steps, step)

    def _check_data(self) -> None:
        needed = self.recipe.train.batch_size
        if isinstance(self.train_data, Stream):
            return
        if len(self.train_data) < needed:
            raise RecipeError(f"train.batch_size is {needed} but the training set has only {len(self.train_data)} "
                              "usable examples; lower train.batch_size or add data")

    def prepare_frozen(self, model):
        """A frozen model (a reference) placed like the policy: sharded where the policy is."""
        return distributed.place_frozen(model, self.accelerator)

    def placed_models(self) -> dict[str, torch.nn.Module]:
        """Every model the run placed on its devices (trained or frozen), by name."""
        return {name: model for name, model in (("model", self.model), ("reference", self.reference))
                if model is not None}

    def close(self) -> None:
        """End the trackers and the run's distributed state (the CLI calls it after fit, also after an error)."""
        self.run_log.end()
        if isinstance(self.train_data, Stream):
            self.train_data.close()
        distributed.end(self.accelerator, list(self.placed_models().values()))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ----- logging ----------------------------------------------------------------------------

    def _summary(self) -> list[dict]:
        """Eval records of this run; the main process prints the first and last side by side."""
        if not self.accelerator.is_main_process:
            return []
        return metrics_file.eval_summary(self.output_dir)

    # ----- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """checkpoints/step-N, written atomically (prefopt.run.checkpoints.save)."""
        return checkpoints.save(self, step)

    def save_final(self, extra_files: dict[str, str] | None = None) -> Path:
        """The trained model in Hugging Face format in output_dir/final, with its model card (README.md) and
        `extra_files` (name -> text)."""
        from prefopt.run.card import run_card

        return checkpoints.save_final(self, {"README.md": run_card(self), **(extra_files or {})})

    def _resume(self) -> int:
        return checkpoints.resume(self)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def example_length(example: dict) -> int:
    """Tokens of an example: its prompt and every completion."""
    return sum(len(value) for key, value in example.items() if key.endswith("_ids"))
