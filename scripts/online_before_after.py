"""One change measured against another: prefopt's GRPO worker (scripts/online_benchmark.py, 64 completions per
step, 16 new tokens, 6 steps) on the same models, from two source trees, alternating, each measurement a fresh
process; prints medians of steps 2-6 (step, generate, log-probs, update, in seconds) and peak RSS (MB).

    git worktree add /tmp/before <commit>
    python scripts/online_before_after.py /tmp/before . tiny,wide hf,vllm 2
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import online_benchmark as ob  # noqa: E402

trees = {"before": str(Path(sys.argv[1]).resolve()), "after": str(Path(sys.argv[2]).resolve())}
sys.argv = sys.argv[2:]
py = {"hf": str(ROOT / ".venv" / "bin" / "python"), "vllm": str(ROOT / ".venv-vllm" / "bin" / "python")}
work = Path(tempfile.mkdtemp(prefix="bench-"))
rows = []
for name in sys.argv[1].split(","):
    model, data = ob.build(work, name)
    for engine in sys.argv[2].split(","):
        for repeat in range(int(sys.argv[3])):
            for label, tree in trees.items():
                run = work / f"{label}-{engine}-{name}-{repeat}"
                env = {**os.environ, "PYTHONPATH": tree}
                cmd = [py[engine], f"{tree}/scripts/online_benchmark.py", "--worker", "prefopt", "--engine", engine,
                       "--model", str(model), "--data", str(data), "--run-dir", str(run), "--new-tokens", "16",
                       "--steps", "6"]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
                if out.returncode:
                    print(label, engine, out.stderr[-2000:])
                    continue
                result = json.loads(out.stdout.split("RESULT ")[-1])
                records = result["records"]
                row = (name, engine, label, repeat,
                       *(statistics.median([r[k] for r in records if k in r])
                         for k in ("step_seconds", "timing/generate", "timing/logps", "timing/update")),
                       result["peak_mb"])
                rows.append(row)
                print(*[f"{v:.3f}" if isinstance(v, float) else v for v in row], flush=True)
