"""The loss registry: name -> LossSpec. Importing this package needs only torch.

A loss is a pure function of tensors with keyword-only hyper-parameters:

    def my_loss(policy: PairLogps, reference: PairLogps | None, *, beta: float) -> LossOutput

registered with what it needs, so that the trainer never loads a reference
model for a reference-free loss, and feeds it the data it takes: pairs
(PairLogps) or unpaired thumbs-up/down completions (UnpairedLogps). A recipe's `loss:` block is the name plus the
function's keyword arguments, checked against its signature before any model
loads.
"""

from prefopt.losses import preference, reward, unpaired  # noqa: E402,F401  (register the losses)
from prefopt.losses.registry import (  # noqa: F401 (the package's names)
    LOSSES,
    GroupLogps,
    LossOutput,
    LossSpec,
    PairLogps,
    PairRewards,
    RunningMean,
    UnpairedLogps,
    check_range,
    get_loss,
    register_loss,
)
