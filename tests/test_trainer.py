"""The training loop: first-step loss, accumulation, resume after a kill, checkpoints, final model."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import main, train_recipe
from prefopt.run.checkpoints import complete_checkpoints


def test_first_step_loss_is_ln2_when_policy_equals_reference(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1})
    train_recipe(path)
    (first,) = read_metrics(tmp_path / "run")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/accuracy"] == 0.5  # every pair is a tie before the first update
    evals = read_metrics(tmp_path / "run", "eval")
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[-1]["step"] == 1


def test_gradient_accumulation_matches_one_big_micro_batch(sort_task, tmp_path):
    """micro-batch 8 x 1 step and micro-batch 2 x 4 accumulation steps: the same 5-step trajectory."""
    runs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        train_recipe(write_recipe(tmp_path / f"r{micro}.yaml", sort_task, out,
                                  train={"micro_batch_size": micro, "max_steps": 5}))
        runs[micro] = read_metrics(out)
        assert json.loads((out / "run.json").read_text())["accumulation_steps"] == 8 // micro
    assert len(runs[8]) == len(runs[2]) == 5
    for big, small in zip(runs[8], runs[2]):
        for key in ("loss", "rewards/margin", "grad_norm", "lr"):
            assert small[key] == pytest.approx(big[key], abs=1e-5), (big["step"], key)
    assert runs[8][-1]["loss"] < runs[8][0]["loss"]  # and it learns


@pytest.mark.parametrize("method", ["dpo", "dpo-streaming", "grpo-lag", "grpo-lag-server"])
def test_resume_after_kill_matches_an_uninterrupted_run(sort_task, tmp_path, method):
    """kill -9 at a random point and the same command again: the metrics and weights of the uninterrupted run,
    for DPO (also streaming shards, into a second epoch: the position comes back from the checkpoint) and for
    GRPO with rollout.lag 1 (the rollouts generated ahead come back from the checkpoint), also with the engine in
    a server process of its own generating during the updates (which dies with its trainer)."""
    steps = 40
    sections = dict(train={"max_steps": steps, "save_every": 2, "eval_every": 10})
    if method == "dpo-streaming":
        from test_streaming import write_shards

        sections["data"] = {"train": write_shards(sort_task, tmp_path / "shards"), "streaming": True,
                            "shuffle_buffer": 16}
    if method.startswith("grpo-lag"):
        from test_ppo import ppo_sections

        sections = ppo_sections(advantage="grpo", num_mini_batches=1)
        sections["rollout"] = {**sections["rollout"], "lag": 1, "server": "spawn" if "server" in method else None}
        sections["train"] = {**sections["train"], "max_steps": steps, "save_every": 2, "eval_every": 10}
        sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    train_recipe(write_recipe(tmp_path / "whole.yaml", sort_task, tmp_path / "whole", **sections))
    whole = read_metrics(tmp_path / "whole") + read_metrics(tmp_path / "whole", "eval")

    out = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", sort_task, out, **sections)
    command = [sys.executable, "-m", "prefopt", "train", str(path)]
    tests = os.path.dirname(os.path.abspath(__file__))  # for test_ppo:length_score
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])})
    deadline = time.time() + 120
    while not any(step >= 4 for step, _ in complete_checkpoints(out / "checkpoints")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    deadline = time.time() + 10  # a spawned engine server follows its trainer
    while _servers_of(proc.pid):
        assert time.time() < deadline, "the engine server outlived its killed trainer"
        time.sleep(0.2)
    killed_at = complete_checkpoints(out / "checkpoints")[-1][0]
    assert killed_at < steps

    assert main(["train", str(path)]) == 0  # the same command again
    resumed = read_metrics(out) + read_metrics(out, "eval")
    assert [(r["split"], r["step"]) for r in resumed] == [(r["split"], r["step"]) for r in whole]
    for a, b in zip(whole, resumed):
        for key, value in a.items():
            assert b[key] == pytest.approx(value, abs=1e-6), (a["split"], a["step"], key)
    from safetensors.torch import load_file

    weights = [load_file(run / "final" / "model.safetensors") for run in (tmp_path / "whole", out)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def _servers_of(pid: int) -> list[str]:
    """The engine servers spawned by process `pid` still running (their command lines name their parent)."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--parent\0{pid}\0".encode() in path.read_bytes():
                found.append(path.parent.name)
        except OSError:  # ended meanwhile
            pass
    return found


def test_incomplete_checkpoints_are_never_resumed(sort_task, tmp_path):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 4, "save_every": 2,
                                                                    "keep_checkpoints": None})
    train_recipe(path)
    root = out / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [2, 4]
    assert not list(root.glob(".tmp-*"))
    # a crash mid-save leaves a temporary directory, or a directory without its state file
    (root / ".tmp-step-6").mkdir()
    (root / "step-8").mkdir()
    (root / "step-8" / "model.safetensors").write_bytes(b"truncated")
    assert [s for s, _ in complete_checkpoints(root)] == [2, 4]
    recipe = recipe_lib.load(path, ["train.max_steps=6"])
    from prefopt.trainers import PreferenceTrainer

    trainer = PreferenceTrainer(recipe)
    trainer._prepare()
    assert trainer._resume() == 4


def test_final_model_loads_and_generates(sort_task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 2}))
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("sort: 3 1 2 =>", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    resolved = recipe_lib.load(tmp_path / "run" / "recipe.yaml")
    assert resolved.train.max_steps == 2


def test_cli_reports_bad_input_without_a_traceback(sort_task, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {train: t.jsonl}\ntrain: {bach_size: 8}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefopt: error: ") and "did you mean 'train.batch_size'" in err
    assert "Traceback" not in err
    missing_data = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                data={"train": str(tmp_path / "missing.jsonl")})
    assert main(["train", str(missing_data)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_conversational_rows_train_with_a_held_out_fraction(sort_task, tmp_path):
    rows = [json.loads(line) for line in (sort_task / "train.jsonl").read_text().splitlines()[:40]]
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat))
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 2},
                              data={"train": str(data), "eval": None, "eval_fraction": 0.2}))
    info = json.loads((out / "run.json").read_text())
    assert (info["train_examples"], info["eval_examples"]) == (32, 8)
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("model", [{}, {"lora": {"r": 4, "alpha": 8}}], ids=["full", "lora"])
def test_gradient_checkpointing_changes_memory_not_the_loss(sort_task, tmp_path, model):
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        train_recipe(write_recipe(tmp_path / f"{flag}.yaml", sort_task, out, model=model,
                                  train={"max_steps": 3, "gradient_checkpointing": flag}))
        runs[flag] = [r["loss"] for r in read_metrics(out)]
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert runs[True][-1] != runs[True][0]  # it trained
