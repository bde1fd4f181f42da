"""Every launch config in recipes/accelerate loads in Accelerate as the distribution it says it is."""

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
