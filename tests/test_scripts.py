"""The GPU acceptance script, dry-run on the CPU with tiny sizes: the same commands a GPU session runs (offline
DPO against TRL, online GRPO with prefopt's engines against TRL GRPOTrainer), so that the script cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    out = result.stdout
    assert "| tiny | 8 | prefopt, hf |" in out and "| tiny | 8 | TRL 1.16 GRPOTrainer |" in out
    assert "not run" not in out.replace("prefopt, vllm | not run", "").replace(
        "AsyncGRPOTrainer, vllm serve, max_staleness 1 | not run", "")  # no `vllm` command: said, not run
    assert "| tiny | 8 | prefopt, vllm, rollout.lag 1 (async) |" in out and "prefopt async speed-up over sync" in out
