"""What the Trainer sets up before its loop, apart from the loop itself: the offline data, the optimizer and the
learning-rate schedule, compiled layers and activation checkpointing, the mixed precision a recipe asks for, and
the run's facts written to run.json."""

from __future__ import annotations

import math
import os
import random

import torch

from prefopt import degenerate, distributed
from prefopt.errors import RecipeError
from prefopt.models import decoder_layers
from prefopt.run import directory as runs
from prefopt.version import __version__


def load_data(trainer, takes: str) -> tuple[list[dict], list[dict]]:
    """The trainer's (train, eval) examples from data.train and data.eval, or a held-out data.eval_fraction;
    `takes`: what the losses train on (prefopt.data.load_examples). Degenerate training data is said (or stops)."""
    from prefopt.data import load_examples
    from prefopt.losses import get_loss

    recipe, acc = trainer.recipe, trainer.accelerator
    data = recipe.data

    def load(sources, where):
        return load_examples(sources, trainer.tokenizer, data, recipe.seed, where, takes, acc.print)

    eval_data = trainer.eval_data
    if trainer.evaluating:  # prefopt eval: its --data alone (the recipe's data.train and data.eval name it)
        with acc.main_process_first():
            eval_data = load(data.eval, "prefopt eval --data")
        return eval_data, eval_data
    with acc.main_process_first():  # the first process fills the datasets cache
        if data.streaming:  # read as training goes; its position is saved with each checkpoint
            from prefopt.data.stream import Stream

            train_data = trainer.checkpointed["data_stream"] = Stream(
                data.train, trainer.tokenizer, data, recipe.seed, "data.train", takes, acc.process_index,
                acc.num_processes, acc.print)
        else:
            train_data = load(data.train, "data.train")
        if data.eval:
            eval_data = load(data.eval, "data.eval")
    if data.eval_fraction:
        order = list(range(len(train_data)))
        random.Random(recipe.seed).shuffle(order)
        held_out = max(1, round(data.eval_fraction * len(train_data)))
        eval_data, train_data = train_data.select(order[:held_out]), train_data.select(order[held_out:])
    contrast = any(get_loss(term.name).data == "unpaired" for term in recipe.loss)  # KTO, BCO
    degenerate.check_examples(getattr(train_data, "sample", train_data), "data.train", recipe, acc.print,
                              labels=contrast)  # a stream: its first rows
    return train_data, eval_data


def prepare(trainer) -> None:
    """The trainer's optimizer (fused AdamW on the trainable parameters) and schedule, prepared with its model;
    train.compile and train.gradient_checkpointing; checkpoints of the trainable weights only where some are
    frozen (LoRA)."""
    recipe, accelerator = trainer.recipe, trainer.accelerator
    optim = recipe.optim
    policy = getattr(trainer.model, "policy", trainer.model)
    if recipe.train.compile:  # each decoder layer on its own: one graph, reused by every layer
        for layer in decoder_layers(policy):
            layer.compile(dynamic=True)
    if recipe.train.gradient_checkpointing:  # recompute activations in backward: less memory, more time
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(policy, "enable_input_require_grads"):  # LoRA: frozen embeddings still pass gradients on
            policy.enable_input_require_grads()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    # fused: one kernel per step, without the per-tensor (or, with foreach, model-sized) temporaries
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=True)
    # Not prepared: Accelerate's wrapper steps the schedule once per process, not once per step. Made on the
    # torch optimizer, whose parameter groups DeepSpeed's ZeRO optimizer keeps using.
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, trainer._lr_factor)
    trainer.model, trainer.optimizer = accelerator.prepare(trainer.model, optimizer)
    # parameter elements this process holds at rest (before a forward gathers any): its shards, if sharded
    trainer.held_parameters = {name: distributed.local_numel(model) for name, model in trainer.placed_models().items()}
    # With frozen weights (LoRA), checkpoints hold only the trained ones: the rest reload from the recipe.
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.partial_checkpoints = len(trainable) < len(dict(trainer.model.named_parameters()))
    if trainer.partial_checkpoints:
        def keep_trainable(models, weights, output_dir):
            for state in weights:
                for key in [k for k in state if k not in trainable]:
                    del state[key]

        accelerator.register_save_state_pre_hook(keep_trainable)
    trainer.checkpointed["scheduler"] = trainer.scheduler


def lr_factor(optim, max_steps: int, step: int) -> float:
    """Multiplier of optim.lr after `step` optimizer steps: linear warmup, then the schedule."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    decay = 1.0 - progress if optim.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * max(0.0, decay)


def mixed_precision(setting: str) -> str:
    """train.mixed_precision as Accelerate takes it: auto is bf16 on a GPU that has it, else no."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting != "no" and not torch.cuda.is_available():
        raise RecipeError(f"train.mixed_precision={setting} needs a GPU; use auto or no on a CPU")
    return setting


def as_run(trainer):
    """The recipe as it runs: a trainer class given from Python (not by `trainer:`) named by its import path."""
    import dataclasses

    from prefopt.methods import record

    recipe, cls = trainer.recipe, type(trainer)
    if recipe.trainer or cls is record(recipe).trainer_class():
        return recipe
    return dataclasses.replace(recipe, trainer=f"{cls.__module__}:{cls.__qualname__}")


def start_message(trainer, start: int) -> str:
    """What a run says as it starts: its layout, threads and precision (and where the launcher was overridden),
    and how to read an MLflow store it writes."""
    from prefopt.run.tracking import tracker_note

    train = trainer.recipe.train
    lines = [f"[prefopt] {trainer.world_size} process(es) x micro-batch {train.micro_batch_size} x "
             f"{trainer.accumulation_steps} accumulation = {train.batch_size} examples per step"
             + (f"; resuming after step {start}" if start else "")
             + (f"; {trainer.threads}" if trainer.threads else "")
             + ("; the run had finished: nothing to train" if start >= train.max_steps else ""),
             f"[prefopt] {precision_note(trainer.recipe, trainer.accelerator)}"]
    note = tracker_note(trainer.recipe)
    return "\n".join(lines + ([f"[prefopt] {note}"] if note else []))


def precision_note(recipe, accelerator) -> str:
    """The effective mixed precision, where it came from, and any launcher setting the recipe overrode (an
    Accelerate config's mixed_precision or gradient_accumulation_steps, which accelerate launch passes on)."""
    setting, used = recipe.train.mixed_precision, accelerator.mixed_precision
    why = {"auto": "train.mixed_precision: auto, " + ("bf16 on this GPU" if used == "bf16" else
                                                      "fp32 on a CPU or a GPU without bf16")}.get(
        setting, f"train.mixed_precision: {setting}")
    note = f"mixed precision {used} ({why})"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != used:
        note += (f"; the launcher's config asked for {launcher}: the recipe decides (set train.mixed_precision: "
                 f"{launcher} to follow it)")
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps and steps != "1":
        note += (f"; the launcher's gradient_accumulation_steps {steps} is not used: accumulation follows from "
                 "train.batch_size / (train.micro_batch_size x processes)")
    return note


def run_info(trainer) -> dict:
    """run.json's facts of a starting run: the layout, sizes, versions and where the code came from."""
    import transformers

    recipe, accelerator = trainer.recipe, trainer.accelerator
    return {"world_size": trainer.world_size, "accumulation_steps": trainer.accumulation_steps,
            "micro_batch_size": recipe.train.micro_batch_size, "batch_size": recipe.train.batch_size,
            "train_examples": None if hasattr(trainer.train_data, "sample") else len(trainer.train_data), "eval_examples": len(trainer.eval_data),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "parameters_on_process_0": trainer.held_parameters,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "torch_threads": torch.get_num_threads(), "distributed_type": str(accelerator.distributed_type),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "prefopt": __version__, "prefopt_commit": runs.source_commit(), "recipe_fingerprint":
            runs.fingerprint(recipe), "started": trainer.started, "ended": None}
