"""`prefopt` for the tests, with Accelerate's FSDP allowed on CPU processes.

Accelerate 1.15 turns FSDP on only for GPU-class devices (accelerate/state.py): on CPU an FSDP config runs
as plain data parallel, and prefopt refuses it. PyTorch's FSDP2 (`fully_shard`) itself runs on CPU over gloo,
so the CPU tests lift that one gate, and nothing else, to run prefopt's FSDP2 code for real:

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 tests/fsdp_on_cpu.py train R
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = PartialState.__init__


def _init_as_multi_device(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:  # the distributed types AcceleratorState shards
        self.distributed_type = DistributedType.MULTI_GPU


PartialState.__init__ = _init_as_multi_device

if __name__ == "__main__":
    from prefopt.cli import main

    sys.exit(main())
