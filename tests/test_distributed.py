"""Two processes on CPU (gloo) follow the same trajectory as one process with twice the accumulation."""

import json
import os
import subprocess
import sys

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import train_recipe


def test_two_processes_match_one_with_double_accumulation(sort_task, tmp_path):
    sections = dict(train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 5, "eval_every": 5})
    one = tmp_path / "one"
    train_recipe(write_recipe(tmp_path / "one.yaml", sort_task, one, **sections))
    two = tmp_path / "two"
    path = write_recipe(tmp_path / "two.yaml", sort_task, two, **sections)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "prefopt", "train", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]

    info = {name: json.loads((d / "run.json").read_text()) for name, d in (("one", one), ("two", two))}
    assert info["two"]["world_size"] == 2 and info["two"]["accumulation_steps"] == 1
    assert info["one"]["world_size"] == 1 and info["one"]["accumulation_steps"] == 2
    for split in ("train", "eval"):
        a, b = read_metrics(one, split), read_metrics(two, split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b):
            for key, value in ra.items():
                assert rb[key] == pytest.approx(value, abs=1e-5), (split, ra["step"], key)
