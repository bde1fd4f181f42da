"""Every launch config in recipes/accelerate loads in Accelerate as the distribution it says it is; a launched
process ends without the interpreter teardown."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
EXPECTED = {"single_gpu": ("NO", 1), "ddp": ("MULTI_GPU", 8), "fsdp2": ("FSDP", 8), "zero2": ("DEEPSPEED", 8),
            "zero3": ("DEEPSPEED", 8), "multi_node": ("MULTI_GPU", 16)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_loads(name):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert (config.distributed_type.name, config.num_processes) == EXPECTED[name]
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_a_launched_process_ends_without_the_interpreter_teardown(tmp_path, monkeypatch):
    """Under a multi-process launch, `prefopt` ends through end_launched_process (os._exit after flushing), with
    the command's exit status: the interpreter's teardown can abort with the process group's threads alive."""
    from prefopt import cli

    ended = []
    monkeypatch.setattr(cli.os, "_exit", ended.append)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2 and ended == [2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2 and ended == [2]
