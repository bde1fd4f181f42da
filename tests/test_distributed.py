"""Two processes on CPU (gloo) follow the same trajectory as one process with twice the accumulation: DDP for
DPO, reward models and PPO; and the shipped launch configs for DeepSpeed ZeRO-2/3 (DeepSpeed's CPU accelerator)
and FSDP2 (through fsdp_on_cpu.py, which lifts Accelerate's GPU-only gate for FSDP)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, write_recipe
from test_online import online_sections
from test_ppo import ppo_sections

from prefopt.cli import train_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def compare(one, two, tolerance=1e-5):
    for split in ("train", "eval"):
        a, b = read_metrics(one, split), read_metrics(two, split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b):
            for key, value in ra.items():
                assert rb[key] == pytest.approx(value, abs=tolerance), (split, ra["step"], key)


def run_two(launcher: list[str], path, overrides: list[str] = ()) -> str:
    """`prefopt train` under a launcher (one that ends with a script runs that script as prefopt)."""
    program = [] if launcher[-1].endswith(".py") else ["-m", "prefopt"]
    command = [sys.executable, "-m", *launcher, *program, "train", str(path), *overrides]
    tests = str(Path(__file__).parent)  # for test_ppo:length_score
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
           "PYTHONFAULTHANDLER": "1"}  # a process that aborts prints every thread's Python stack
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TRAIN = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 5, "eval_every": 5}
PPO_TRAIN = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "eval_every": 4, "log_every": 1}


@pytest.mark.parametrize("sections", [
    {"loss": {"name": "dpo", "beta": 0.1}, "train": TRAIN, "log": {"to": ["tensorboard"]}},  # main process logs
    {"loss": {"name": "bradley_terry", "center_coef": 0.01}, "train": TRAIN},
    # PPO: samples drawn by (seed, step, global row), whitening and mini-batches over the gathered rollout
    {**ppo_sections(advantage="gae", target_kl=0.01), "train": PPO_TRAIN},
    {**ppo_sections(advantage="rloo", epochs=2), "train": PPO_TRAIN},
    # a fixed lag: the queue of rollouts generated ahead is the gathered one, the same on every process; each
    # process generates on an engine server of its own, during its updates
    {**ppo_sections(advantage="grpo"), "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8, "lag": 1,
                                                   "server": "spawn"}, "train": PPO_TRAIN},
    # online DPO: samples drawn by (seed, step, global row), pairs formed over the gathered samples
    {**online_sections(select="all", min_gap=0.05), "train": {**PPO_TRAIN, "batch_size": 12, "micro_batch_size": 6}},
    # streamed prompts: each process tokenizes every other row of the stream; the rounds' prompts are shared
    {**ppo_sections(advantage="grpo"), "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8, "lag": 1,
                                                   "filter_groups": True}, "train": PPO_TRAIN,
     "data": {"streaming": True, "shuffle_buffer": 8}},
], ids=["dpo", "reward", "ppo-gae", "ppo-rloo", "grpo-lag", "online-dpo", "grpo-streaming"])
def test_ddp_two_processes_match_one_with_double_accumulation(sort_task, tmp_path, sections):
    if "ppo" in sections or sections.get("method") == "online":  # greedy evaluation split over the processes
        sections = {**sections, "data": {**sections.get("data", {}), "eval": str(sort_task / "eval.jsonl")}}
    one, two = tmp_path / "one", tmp_path / "two"
    train_recipe(write_recipe(tmp_path / "one.yaml", sort_task, one, **sections))
    run_two(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            write_recipe(tmp_path / "two.yaml", sort_task, two, **sections))
    info = {name: json.loads((d / "run.json").read_text()) for name, d in (("one", one), ("two", two))}
    assert info["two"]["world_size"] == 2 and info["two"]["accumulation_steps"] == 1
    assert info["one"]["world_size"] == 1 and info["one"]["accumulation_steps"] == 2
    assert len(list((two / "tensorboard" / "prefopt").glob("events.out.tfevents.*"))) == ("log" in sections)
    compare(one, two)


def test_two_processes_on_one_engine_server_match_one(sort_task, tmp_path):
    """rollout.server HOST:PORT: both processes generate on one `prefopt serve` (the first sends it the weights,
    between barriers), with a lag of 1 and the overlap; the run equals one process on that server."""
    from test_async import start_server

    process, address = start_server(sort_task / "model")
    try:
        sections = {**ppo_sections(advantage="grpo"), "train": PPO_TRAIN, "data": {"eval": str(sort_task / "eval.jsonl")},
                    "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8, "lag": 1, "server": address}}
        one_and_two(sort_task, tmp_path, sections)
        assert process.poll() is None  # a server started apart outlives its runs
    finally:
        process.kill()


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_distillation_two_processes_match_one(sort_task, tmp_path, loss):
    """method distill: each process scores its share of the samples with the teacher; the gathered rollout, its
    per-token advantages (or whole-distribution divergences) and the update are one process's."""
    from test_distill import distill_sections
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tiny_model

    teacher = build_tiny_model(AutoTokenizer.from_pretrained(sort_task / "model"), tmp_path / "teacher",
                               hidden_size=96, seed=7)
    one_and_two(sort_task, tmp_path, {**distill_sections(teacher, loss=loss), "train": PPO_TRAIN,
                                      "data": {"eval": str(sort_task / "eval.jsonl")}})


def test_primes_online_prm_on_two_processes_matches_one(sort_task, tmp_path):
    """An online implicit PRM (PRIME): each process scores and labels its share, the PRM's gradients are summed
    over the processes and divided by the global count: its losses, the run's, and its final weights are one
    process's."""
    from safetensors.torch import load_file
    from test_prm import prm_term
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tiny_model

    prm = build_tiny_model(AutoTokenizer.from_pretrained(sort_task / "model"), tmp_path / "prm", seed=7)
    sections = {**ppo_sections(advantage="grpo", num_mini_batches=1), "train": PPO_TRAIN,
                "data": {"eval": str(sort_task / "eval.jsonl")}, "rewards": [{"function": "test_prm:long_enough", "name": "outcome"},
                            prm_term(prm, sort_task / "model", batch_size=3)]}
    one_and_two(sort_task, tmp_path, sections)
    one, two = (load_file(str(tmp_path / run / "prm_implicit_prm" / "model.safetensors")) for run in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    assert "rewards/implicit_prm/prm_loss" in read_metrics(tmp_path / "two")[0]


def test_streaming_two_processes_match_one(sort_task, tmp_path):
    """data.streaming: each process parses and tokenizes every other row (disjoint), and they share what they
    read, so that the global batches, the rows dropped (a line that is not JSON, one without a completion) and the
    run are one process's."""
    from test_streaming import write_shards

    train = write_shards(sort_task, tmp_path / "shards", bad={(0, 3): "{oops", (2, 11): '{"prompt": "sort: 2 1 =>"}'})
    sections = {"train": {**TRAIN, "max_steps": 40, "eval_every": 40, "log_every": 5},
                "data": {"train": train, "streaming": True, "shuffle_buffer": 8, "on_bad_row": "drop"}}
    one_and_two(sort_task, tmp_path, sections)
    # the first bad line twice (epoch 2), the other once
    assert [r["data/dropped_rows"] for r in read_metrics(tmp_path / "two")][-1] == 3


def one_and_two(sort_task, tmp_path, sections: dict) -> None:
    """The recipe in one process and under torchrun in two: the same records."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_recipe(write_recipe(tmp_path / "one.yaml", sort_task, one, **sections))
    run_two(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            write_recipe(tmp_path / "two.yaml", sort_task, two, **sections))
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    compare(one, two)


def test_token_means_do_not_depend_on_the_world_size(sort_task, tmp_path):
    """RPO's NLL and SimPO's sft_weight term are token means over the global batch: two processes with
    micro-batches of 4 follow one process with one micro-batch of 8 (a per-micro-batch mean would not)."""
    loss = [{"name": "rpo", "beta": 0.1, "alpha": 1.0}, {"name": "simpo", "sft_weight": 1.0, "weight": 0.5}]
    one, two = tmp_path / "one", tmp_path / "two"
    train_recipe(write_recipe(tmp_path / "one.yaml", sort_task, one, loss=loss,
                              train={**TRAIN, "micro_batch_size": 8}))
    run_two(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            write_recipe(tmp_path / "two.yaml", sort_task, two, loss=loss, train=TRAIN))
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    for a, b in zip(read_metrics(one), read_metrics(two)):
        assert (b["loss"], b["grad_norm"]) == pytest.approx((a["loss"], a["grad_norm"]), abs=1e-5, rel=2e-6)


def same_final_model(one: Path, two: Path, kind: str) -> None:
    """Both runs' final/ load through from_pretrained (a LoRA adapter onto its base) with the same weights."""
    import peft
    import transformers

    auto = {"causal": transformers.AutoModelForCausalLM, "reward": transformers.AutoModelForSequenceClassification,
            "lora": peft.AutoPeftModelForCausalLM}[kind]
    for sub in ["final", "final/critic"][: 1 + (one / "final" / "critic").exists()]:
        a, b = (auto.from_pretrained(d / sub).state_dict() for d in (one, two))
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.allclose(value, b[key], atol=1e-4), (sub, key)
    if (one / "final" / "value_head.pt").exists():
        head_a, head_b = (torch.load(d / "final" / "value_head.pt") for d in (one, two))
        assert all(torch.allclose(head_a[k], head_b[k], atol=1e-4) for k in head_a)


@pytest.fixture(scope="module")
def reward_model(sort_task, tmp_path_factory):
    """A reward model trained by prefopt on the sorting task (a few steps)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    train_recipe(write_recipe(out.parent / "rm.yaml", sort_task, out, loss={"name": "bradley_terry"},
                              train={"max_steps": 10, "batch_size": 16, "micro_batch_size": 16}))
    return out


LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}  # dropout draws differ between processes


FSDP_ON_CPU = str(Path(__file__).parent / "fsdp_on_cpu.py")  # prefopt, with Accelerate's FSDP allowed on CPU


CHECKPOINTED = {"gradient_checkpointing": True}  # recomputed activations gather the sharded weights again


@pytest.mark.parametrize("config, sections, kind", [
    ("fsdp2", {"train": TRAIN}, "causal"),
    ("fsdp2", {"train": {**TRAIN, **CHECKPOINTED}, "model": LORA}, "lora"),
    ("fsdp2", {"loss": {"name": "bradley_terry"}, "train": TRAIN}, "reward"),
    ("fsdp2", {**ppo_sections(advantage="gae", critic="separate"), "train": {**PPO_TRAIN, **CHECKPOINTED}}, "causal"),
    ("zero2", {"train": TRAIN}, "causal"),
    ("zero2", {**ppo_sections(advantage="rloo", epochs=2), "train": PPO_TRAIN}, "causal"),
    ("zero3", {"train": {**TRAIN, **CHECKPOINTED}}, "causal"),
    ("zero3", {"train": TRAIN, "model": LORA}, "lora"),
    # the reference partitioned too while it computes, before the policy loads
    ("zero3", {"train": TRAIN, "reference": {"kind": "precomputed"}}, "causal"),
    ("zero3", {"loss": {"name": "bradley_terry"}, "train": TRAIN}, "reward"),
    # generation with the gathered weights; the reference a partitioned engine
    ("zero3", {**ppo_sections(advantage="gae", target_kl=0.01), "train": {**PPO_TRAIN, **CHECKPOINTED}}, "causal"),
    # iterative online DPO: the partitioned reference refreshed from the partitioned policy after step 2
    ("zero3", {**online_sections(), "reference": {"kind": "copy", "sync_every": 2, "sync_alpha": 1.0},
               "train": PPO_TRAIN}, "causal"),
], ids=["fsdp2-dpo", "fsdp2-dpo-lora", "fsdp2-reward", "fsdp2-ppo-critic", "zero2-dpo", "zero2-ppo-rloo",
        "zero3-dpo", "zero3-dpo-lora", "zero3-dpo-precomputed", "zero3-reward", "zero3-ppo", "zero3-online-dpo"])
def test_sharded_two_processes_match_one(sort_task, reward_model, tmp_path, config, sections, kind):
    """The launch configs as shipped, on two CPU processes: the trajectory of one process, the same final model.
    33 held-out examples split 17/16, so a sharded frozen model runs more batches on one process than on the
    other, unless the other repeats one (uncounted): PPO's reward model scores in batches of 16 (2 and 1), a
    precomputed reference in micro-batches of 4 (5 and 4), each run computing its own."""
    rows = (sort_task / "eval.jsonl").read_text().splitlines()[:33]
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    online = "ppo" in sections or sections.get("method") == "online"
    if online:
        sections = {**sections, "rewards": {"models": [str(reward_model)]}}
    if online or "reference" in sections:
        sections = {**sections, "data": {"eval": str(tmp_path / "eval.jsonl")}}
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        if "reference" in sections:
            sections["reference"] = {**sections["reference"], "cache_dir": str(run.with_name(f"{run.name}-cache"))}
        write_recipe(run.with_suffix(".yaml"), sort_task, run, **sections)
    train_recipe(one.with_suffix(".yaml"))
    launcher = ["accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", "2"]
    fsdp = config.startswith("fsdp")
    run_two(launcher + ([FSDP_ON_CPU] if fsdp else []), two.with_suffix(".yaml"))
    info = json.loads((two / "run.json").read_text())
    assert (info["world_size"], info["distributed_type"]) == (2, f"DistributedType.{'FSDP' if fsdp else 'DEEPSPEED'}")
    # ZeRO-3 and FSDP2 hold about half of every model on each of two processes, the frozen ones included
    whole, held = (json.loads((d / "run.json").read_text())["parameters_on_process_0"] for d in (one, two))
    for name, count in whole.items():
        assert count / held[name] == pytest.approx(1 if config == "zero2" else 2, rel=0.02), name
    compare(one, two, tolerance=1e-4)
    same_final_model(one, two, kind)


@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp2"])
def test_sharded_tr_dpo_resumes_from_its_checkpoint(sort_task, tmp_path, config):
    """TR-DPO, the policy mixed into the reference after every step, and a sharded checkpoint (the weights and
    optimizer state in shards, the moved reference whole) that continues the run: 2 steps, then 2 more, follow
    4 steps on one process."""
    sections = dict(optim={"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                    train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "save_every": 2},
                    reference={"sync_every": 1, "sync_alpha": 0.5})
    train_recipe(write_recipe(tmp_path / "whole.yaml", sort_task, tmp_path / "whole", **sections))
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
    launcher = ["accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", "2",
                *([FSDP_ON_CPU] if config == "fsdp2" else [])]
    run_two(launcher, path, ["train.max_steps=2"])
    assert "resuming after step 2" in run_two(launcher, path)
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-5)


def launch_fails(config: Path, recipe: Path) -> str:
    """stderr of a two-process launch that must stop with an error."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               "2", "-m", "prefopt", "train", str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode != 0
    return result.stderr


def test_deepspeed_config_that_disagrees_with_the_recipe_is_an_error(sort_task, tmp_path):
    config = tmp_path / "zero2.yaml"
    config.write_text((CONFIGS / "zero2.yaml").read_text().replace("deepspeed_config:\n",
                                                                   "deepspeed_config:\n  gradient_clipping: 0.5\n"))
    stderr = launch_fails(config, write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train=TRAIN))
    assert ("the DeepSpeed config sets gradient_clipping: 0.5, but train.max_grad_norm makes it 1.0; remove "
            "gradient_clipping from the launch config") in stderr


def test_fsdp2_on_cpu_is_refused_rather_than_silently_ddp(sort_task, tmp_path):
    """Accelerate 1.15 selects FSDP only on GPU-class devices (accelerate/state.py); with an FSDP2 config on
    CPU it would run plain DDP (MULTI_CPU). prefopt stops with a clear error instead."""
    stderr = launch_fails(CONFIGS / "fsdp2.yaml", write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                                               train=TRAIN))
    assert "the launch config asks for FSDP, but Accelerate runs it as MULTI_CPU on cpu" in stderr


def test_resume_on_two_processes_from_a_one_process_checkpoint(sort_task, tmp_path):
    """A checkpoint holds no per-process state that matters (data order is a function of seed and step):
    2 steps on one process, continued to 4 on two, follow 4 steps on one process."""
    sections = dict(optim={"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                    train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "save_every": 2})
    train_recipe(write_recipe(tmp_path / "whole.yaml", sort_task, tmp_path / "whole", **sections))
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
    train_recipe(path, ["train.max_steps=2"])
    out = run_two(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], path)
    assert "2 process(es) x micro-batch 4 x 1 accumulation" in out and "resuming after step 2" in out
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-5)
    assert resumed[3]["loss"] != pytest.approx(resumed[2]["loss"], abs=1e-4)  # training moved
