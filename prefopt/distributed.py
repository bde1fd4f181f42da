"""What the backends need beyond Accelerate's `prepare`: the processes started (DeepSpeed on CPU included),
DeepSpeed's config filled from the recipe, frozen models sharded like the policy (and checkpointed whole),
sharded weights gathered for a generation or an update, and the run's distributed state ended. The trainers
call these instead of branching on the backend themselves.

Under ZeRO-3 every model loaded after the Accelerator exists (from_pretrained sees DeepSpeed's config) holds
only its shard of each weight; a forward through its engine gathers a layer's weights as it runs. FSDP2's
shard units do the same in their forward hooks.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext

from prefopt.errors import RecipeError
from prefopt.models import decoder_layers


def start_processes():
    """Accelerate's process state, and the `cpu` flag for the Accelerator: True without CUDA, except under
    DeepSpeed, which Accelerate drops for cpu=True. There the process group starts on gloo, for DeepSpeed's own
    CPU accelerator."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return PartialState(cpu=False, backend="gloo"), False
    return PartialState(cpu=cpu), cpu


def cpu_threads(cpu: bool, helpers: int = 0) -> str | None:
    """On a CPU, torch's threads per process from the cores this process may use and the processes on this
    machine (oversubscribed threads slow every process down), unless OMP_NUM_THREADS says otherwise; the choice,
    said, or None where nothing was set. `helpers`: processes each one starts that work at the same time (an engine
    server generating during the update), given as many threads."""
    import torch

    if not cpu or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * (1 + helpers)
    torch.set_num_threads(max(1, cores // local))
    return (f"torch threads per process: {torch.get_num_threads()} ({cores} cores / {local} process(es) here"
            + (", engine servers included" if helpers else "") + "; OMP_NUM_THREADS sets it)")


def eval_chunks(examples: list, size: int, rank: int, world: int):
    """Process `rank`'s share of `examples`, `size` at a time, with whether to count them: every process runs as
    many chunks as the busiest one (sharded models gather in lockstep); one out of examples runs the first example
    again and counts nothing."""
    import math

    mine = examples[rank::world]
    for i in range(math.ceil(math.ceil(len(examples) / world) / size)):
        chunk = mine[i * size : (i + 1) * size]
        yield list(chunk or examples[:1]), bool(chunk)  # rows read from their table (prefopt.data.Rows)


def check_fsdp(accelerator) -> None:
    """Accelerate turns FSDP on for GPU-class devices only; on CPU an FSDP launch would silently run plain DDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type.name != "FSDP":
        raise RecipeError(f"the launch config asks for FSDP, but Accelerate runs it as "
                          f"{accelerator.distributed_type.name} on {accelerator.device.type}: FSDP needs "
                          "GPUs; on CPU launch with torchrun or the ddp config")


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None for any other backend."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.zero_stage


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only shards of the weights between forwards (FSDP2, ZeRO-3)."""
    return accelerator.distributed_type.name == "FSDP" or zero_stage(accelerator) == 3


def local_numel(model) -> int:
    """Parameter elements this process holds: its shards under ZeRO-3 and FSDP2, every element otherwise."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.to_local().numel() if hasattr(p, "to_local")
               else p.numel() for p in model.parameters())


def fill_config(config: dict, wanted: dict[str, tuple[object, str]]) -> None:
    """Set DeepSpeed config keys (dotted paths) from the recipe: {key: (value, recipe field it comes from)}.
    A launch config that already sets a key to something else is an error, not silently overridden."""
    for key, (value, source) in wanted.items():
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
        if section.get(name, "auto") not in ("auto", value):
            raise RecipeError(f"the DeepSpeed config sets {key}: {section[name]}, but {source} makes it {value}; "
                              f"remove {key} from the launch config (prefopt fills it in)")
        section[name] = value


def configure_deepspeed(accelerator, train, accumulation_steps: int) -> None:
    """Under DeepSpeed the recipe sets the batch shape, the clipping and the final save: DeepSpeed does the
    accumulation and clipping itself, from its config, which this fills (a launch config that disagrees is an
    error). Filled before any model loads: frozen engines are made from the same config."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    wanted = {"train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
              "gradient_accumulation_steps": (accumulation_steps, "train.batch_size"),
              "train_batch_size": (train.batch_size, "train.batch_size"),
              "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm")}
    fill_config(plugin.deepspeed_config, wanted)
    if plugin.zero_stage == 3:  # final/ is one Hugging Face checkpoint, gathered from the shards (whatever
        # Accelerate's default for zero3_save_16bit_model)
        plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def place_frozen(model, accelerator):
    """A frozen model placed like the policy: under DeepSpeed an inference engine, partitioned under ZeRO-3;
    under FSDP2 its decoder layers, then itself, sharded with fully_shard (Accelerate shards only models it
    trains); elsewhere moved to the device."""
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED":
        return frozen_engine(model, accelerator.state.deepspeed_plugin.deepspeed_config)
    model.to(accelerator.device)
    if kind == "FSDP":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        # FSDP2 keeps the root's weights (embeddings, LM head) whole after a forward, for a backward that a
        # frozen model never runs: shard them again, or they stay whole on every process
        model.register_forward_hook(lambda module, args, output: module.reshard())
    return model


def gathered(params, accelerator, modifier_rank: int | None = None):
    """ZeRO-3: these parameters whole inside the block; with modifier_rank, that process's changes are kept and
    partitioned again on the way out. Elsewhere they are whole, or sharded alike (FSDP2), already."""
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


class WholeWeights:
    """A model's weights in checkpoints (`register_for_checkpointing`), saved whole and loaded back into the
    model's layout: gathered from ZeRO-3 partitions one tensor at a time, or from FSDP2 shards. Accelerate
    writes such state from the main process alone, so a sharded model's own state dict would keep only the main
    process's shards."""

    def __init__(self, model, accelerator):
        self.model, self.accelerator = model, accelerator
        self.fsdp = accelerator.distributed_type.name == "FSDP"

    def _tensors(self) -> dict:
        return getattr(self.model, "module", self.model).state_dict(keep_vars=True)  # a DeepSpeed engine's model

    def state_dict(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {}
        for name, tensor in self._tensors().items():
            with gathered([tensor], self.accelerator):
                state[name] = tensor.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
            return
        for name, tensor in self._tensors().items():
            with gathered([tensor], self.accelerator, modifier_rank=0):
                tensor.data.copy_(state[name])


def release_gathers(accelerator, models) -> None:
    """ZeRO-3 engines wait for the weight gathers they started ahead (a process group torn down under one aborts
    the process); a no-op once the process group is gone."""
    import torch

    if zero_stage(accelerator) == 3 and torch.distributed.is_initialized():
        for engine in models:
            if hasattr(engine, "empty_partition_cache"):
                engine.empty_partition_cache()


def end(accelerator, models) -> None:
    """End the run's distributed state: the ZeRO-3 gathers first, then the process group."""
    release_gathers(accelerator, models)
    accelerator.end_training()


def frozen_engine(model, ds_config: dict):
    """A frozen model as a DeepSpeed inference engine (as TRL prepares its reference): partitioned like the
    policy under ZeRO-3; under ZeRO-1/2 whole on every process (stage 0), in DeepSpeed's precision."""
    import deepspeed

    config = copy.deepcopy(ds_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = model.config.get_text_config().hidden_size
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    else:
        zero["stage"] = 0
    for key in ("optimizer", "scheduler"):  # training-only: no optimizer is passed
        config.pop(key, None)
    zero.pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextmanager
def generation_weights(model, accelerator):
    """The trained model's weights whole for the length of a generation, where they are sharded, so that each
    decoding step does not gather every layer again (TRL's unwrap_model_for_generation does the same):

    - ZeRO-3: gathered once, the per-layer gather/release hooks taken off meanwhile and put back after;
    - FSDP2: every shard unit unsharded once and kept so through the forwards (the decoder layers'
      reshard_after_forward off meanwhile), then resharded.

    Elsewhere, nothing to do."""
    if accelerator.distributed_type.name == "FSDP":
        with _fsdp_unsharded(model, accelerator.state.fsdp_plugin.reshard_after_forward):
            yield
        return
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    offload = model.optimizer.parameter_offload  # model: the DeepSpeed engine
    with deepspeed.zero.GatheredParameters(list(model.module.parameters())):
        for param in model.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # DeepSpeed >= 0.16.4, as TRL re-adds them


@contextmanager
def _fsdp_unsharded(model, reshard_after_forward: bool):
    """Every shard unit unsharded; the decoder layers (the units Accelerate gives the launch config's
    reshard_after_forward) kept so through their forwards. The root and the embeddings' unit already are."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    layers = [layer for layer in decoder_layers(model) if isinstance(layer, FSDPModule)]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(reshard_after_forward, recurse=False)
        for unit in units:
            unit.reshard()
