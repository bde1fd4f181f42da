"""Runs TRL 1.12's own PPO code (trl.experimental.ppo) on tensors from a file; run with TRL 1.12 on PYTHONPATH.

TRL 1.12 computes KL, GAE and the clipped losses inline in PPOTrainer.train(). We execute those
exact source lines, cut from the installed trl/experimental/ppo/ppo_trainer.py between marker
lines, on our inputs: nothing here re-implements TRL's maths.

    python trl112_ppo_oracle.py INPUTS.pt OUTPUTS.pt
"""

import sys
import textwrap
from types import SimpleNamespace

import torch
import trl
from trl.experimental.ppo import ppo_trainer
from trl.experimental.ppo.ppo_trainer import masked_mean, masked_whiten

assert trl.__version__ == "1.12.0", trl.__version__
SOURCE = open(ppo_trainer.__file__).read().splitlines()


def block(first: str, last: str) -> str:
    """The source lines from the one containing `first` to the one containing `last`, dedented."""
    start = next(i for i, line in enumerate(SOURCE) if first in line)
    end = next(i for i in range(start, len(SOURCE)) if last in SOURCE[i])
    return textwrap.dedent("\n".join(SOURCE[start : end + 1]))


def run(code: str, **names) -> dict:
    scope = {"torch": torch, "masked_mean": masked_mean, **names}
    exec(code, scope)
    return scope


inputs = torch.load(sys.argv[1])
out = {}
for estimator in ("k1", "k3"):
    scope = run(block("logr = ref_logprobs - logprobs", "kl = -logr if args.kl_estimator"),
                logprobs=inputs["logps"], ref_logprobs=inputs["ref_logps"], args=SimpleNamespace(kl_estimator=estimator))
    out[f"kl_{estimator}"] = scope["kl"]
scope = run(block("lastgaelam = 0", "returns = advantages + values"), rewards=inputs["rewards"],
            values=inputs["values"], responses=inputs["rewards"], args=SimpleNamespace(gamma=inputs["gamma"],
                                                                                       lam=inputs["lam"]))
out["advantages"], out["returns"] = scope["advantages"], scope["returns"]
mask = inputs["mask"].bool()
out["whitened"] = masked_whiten(inputs["rewards"], mask)
out["whitened_keep_mean"] = masked_whiten(inputs["rewards"], mask, shift_mean=False)
every = torch.arange(len(mask))
scope = run(block("vpredclipped = torch.clamp(", "pg_loss = masked_mean(pg_loss_max"),
            vpred=inputs["new_values"], mb_values=inputs["values"], mb_return=inputs["returns"],
            new_logprobs=inputs["new_logps"], mb_logprobs=inputs["logps"], mb_advantage=inputs["advantages"],
            padding_mask=~mask, padding_mask_p1=~mask, micro_batch_inds=every,
            args=SimpleNamespace(cliprange=inputs["clip"], cliprange_value=inputs["value_clip"]))
scope["logits"] = torch.zeros(*mask.shape, 2)  # the entropy lines in between need some logits
scope = run(block("pg_clipfrac = masked_mean(", "approxkl = 0.5"), **scope)
for key in ("vf_loss", "vf_clipfrac", "pg_loss", "pg_clipfrac", "approxkl"):
    out[key] = scope[key]
torch.save(out, sys.argv[2])
