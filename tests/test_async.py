"""Asynchronous rollouts (rollout.lag with rollout.server): an engine server in a process of its own generates the
next rollout while the trainer updates; the same rollouts as without the overlap, the behaviour log-probs from
the engine, and every failure of the server a clear error in bounded time. Resume after kill -9: test_trainer;
two processes: test_distributed."""

import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener

import pytest
import torch
from conftest import assert_same_records, read_metrics, write_recipe
from test_ppo import ppo_sections

from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError, TrainingError
from prefopt.generation import Draw, generate
from prefopt.online import served
from prefopt.online import server as server_lib

CALLS = []


def async_sections(**rollout):
    sections = ppo_sections(advantage="grpo", num_mini_batches=1)
    sections["rollout"] = {**sections["rollout"], "lag": 1, "server": "spawn", **rollout}
    sections["train"] = {**sections["train"], "max_steps": 4, "save_every": 2}
    sections["optim"] = {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2}
    return sections


def test_overlap_changes_nothing_but_the_time(sort_task, tmp_path):
    """lag 1 on a spawned server: generating rollout t + 1 during update t gives the run the rollouts, metrics and
    weights of the same engine used in turn; the samples are those the in-process engine draws (the same
    weights and noise), and only the behaviour log-probs (the server's own, from generation) differ from the
    trainer's forward, slightly."""
    runs = {}
    for name, rollout in (("overlap", {}), ("turns", {"overlap": False}), ("inside", {"server": None})):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, **async_sections(**rollout)))
        runs[name] = read_metrics(tmp_path / name)
    assert_same_records(runs["overlap"], runs["turns"])
    weights = [_weights(tmp_path / name / "final") for name in ("overlap", "turns")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    timed = read_metrics(tmp_path / "overlap", timing=True)
    assert all("timing/wait" in r for r in timed[1:]) and "timing/wait" not in timed[0]  # the first: made in turn
    assert [r["rollout/staleness"] for r in runs["overlap"]] == [0, 1, 1, 1]
    for a, b in zip(runs["overlap"], runs["inside"]):
        assert a["rollout/score"] == b["rollout/score"] and a["rollout/length"] == b["rollout/length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["rollout/is_weight_mean"] == pytest.approx(b["rollout/is_weight_mean"], abs=1e-4)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_behaviour_logps_from_generation_equal_a_forward(sort_task, tokenizer):
    """The server's behaviour log-probs, kept while generating (LogpRecorder), equal log softmax(logits / T) of
    the sampled tokens from one forward of the whole sequences."""
    from prefopt.models import load_causal_lm
    from prefopt.recipe import ModelConfig

    model = load_causal_lm(ModelConfig(name_or_path=str(sort_task / "model"))).eval()
    engine = server_lib.HFServerEngine(model)
    prompts = [tokenizer("sort : 3 1 2 =")["input_ids"], tokenizer("sort : 9 8 =")["input_ids"]]
    sampling = {"temperature": 0.7, "top_p": 1.0, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id}
    ids, logps = engine.generate(prompts, Draw(5, torch.arange(2), 2), 6, sampling)
    for prompt, completion, values in zip(prompts, ids, logps):
        assert len(values) == len(completion) > 0
        sequence = torch.tensor([prompt + completion])
        logits = model(sequence).logits[0, len(prompt) - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(values), expected, atol=1e-5)
    same = generate(model, engine.accelerator, tokenizer, prompts, max_new_tokens=6, draw=Draw(5, torch.arange(2), 2),
                    temperature=0.7)
    assert same == ids  # recording changes nothing sampled


def kill_the_server(prompts, completions, **kwargs):
    """Scores like length_score; at its second call (the first rollout generated in the background, taken)
    SIGKILLs the server named by PREFOPT_TEST_SERVER_PID."""
    CALLS.append(time.monotonic())
    if len(CALLS) == 2:
        os.kill(int(os.environ["PREFOPT_TEST_SERVER_PID"]), signal.SIGKILL)
    return [len(c) / 10 for c in completions]


def start_server(model, *args) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "prefopt", "serve", str(model), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "listening on " in line:
            return process, line.split("listening on ", 1)[1].split()[0]
    raise AssertionError(f"the server did not start (exit {process.wait()})")


def test_a_dead_server_ends_the_run_at_once_with_its_name(sort_task, tmp_path, monkeypatch):
    process, address = start_server(sort_task / "model")
    monkeypatch.setenv("PREFOPT_TEST_SERVER_PID", str(process.pid))
    CALLS.clear()
    sections = async_sections(server=address)
    sections["rewards"] = {"function": "test_async:kill_the_server"}
    with pytest.raises(TrainingError, match=f"engine server at {address} closed the connection"):
        train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    assert time.monotonic() - CALLS[1] < 60
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert not (tmp_path / "run" / "final").exists()


def test_a_sync_that_does_not_fit_is_refused_before_any_generation(sort_task, tmp_path):
    """A server on another model: the first sync names the server and the names that do not fit; the server
    keeps its own weights (they load only whole)."""
    from prefopt.data.synthetic import write_sort_task

    other = write_sort_task(tmp_path / "other", n_train=8, n_eval=2, hidden_size=32)
    process, address = start_server(other / "model")
    try:
        with pytest.raises(TrainingError, match=f"engine server at {address} failed a weight sync: .*do not fit"):
            train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **async_sections(server=address)))
    finally:
        process.kill()


def fake_server(replies) -> str:
    """A server that takes one connection and answers each message with `replies(message)`: (seconds, reply)
    pairs, each sent after its pause (none: silence)."""
    listener = Listener(("127.0.0.1", 0), authkey=server_lib.server_key())

    def run():
        conn = listener.accept()
        try:
            while True:
                for seconds, reply in replies(server_lib.receive(conn)):
                    time.sleep(seconds)
                    server_lib.send(conn, reply)
        except (EOFError, OSError):
            pass

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{listener.address[1]}"


def client(address):
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    recipe = SimpleNamespace(rollout=SimpleNamespace(temperature=1.0, top_p=1.0))
    return served.ServerEngine(recipe, tokenizer, address)


def test_a_silent_server_or_its_error_is_a_clear_error_in_bounded_time(monkeypatch):
    """A server that hears the request and says nothing (no heartbeat) is given up after SILENT_S; one that
    answers with an error has it reported; one that keeps beating is waited for, however long it works."""
    monkeypatch.setattr(served, "SILENT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"sent nothing for 0\.5 s during a generation \(no heartbeat\)"):
        client(fake_server(lambda message: [])).generate([[2, 3]], None, 4)
    assert time.monotonic() - start < 5
    with pytest.raises(TrainingError, match="failed a generation: RuntimeError: CUDA out of memory"):
        client(fake_server(lambda message: [(0, ("error", "RuntimeError: CUDA out of memory"))])).generate(
            [[2, 3]], None, 4)
    result = ("result", [[5, 1]], [[-0.5, -0.1]])
    beating = fake_server(lambda message: [(0.3, ("alive",))] * 4 + [(0.3, result)])  # 1.5 s of work
    assert client(beating).generate([[2, 3]], None, 4) == ([[5, 1]], [[-0.5, -0.1]])


def test_a_background_rollout_that_raises_ends_the_run_between_steps():
    from prefopt.online.background import Background

    def boom():
        raise ValueError("the tool pool broke")

    job = Background(boom)
    job.done.wait(5)
    with pytest.raises(TrainingError, match="the background rollout stopped: ValueError: the tool pool broke"):
        job.result()
    with pytest.raises(PrefoptError, match="no heartbeat"):
        Background(lambda: (_ for _ in ()).throw(TrainingError("no heartbeat"))).result()


def test_serve_needs_a_model():
    from prefopt.cli import main

    assert main(["serve"]) == 2
