#!/usr/bin/env bash
# The GPU acceptance check: one prepared command for a machine with one H100/H200, about 10 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # on the GPU: writes OUT_DIR/offline.md and OUT_DIR/online.md
#   bash scripts/gpu_check.sh --dry-run        # on a CPU, tiny sizes: the same commands, so the script cannot rot
#
# offline: DPO and SimPO, prefopt against TRL, on a Qwen2.5-0.5B-shaped random model in bf16 (scripts/benchmark.py);
# online: GRPO, prefopt with rollout.engine hf and vllm against TRL GRPOTrainer (with vLLM colocate where trl[vllm]
# is installed), same model, 8 samples per prompt, 128 new tokens (scripts/online_benchmark.py). The target is
# prefopt with vLLM at half TRL's seconds per step.
# async: the same GRPO with 512 new tokens, prefopt's vLLM engine synchronous against rollout.lag 1 (the next
# rollout generated during the update), beside TRL GRPOTrainer and AsyncGRPOTrainer (vllm serve, NCCL weight
# transfer, max_staleness 1). The claim: prefopt async at least 1.7x faster per step than prefopt sync. Needs torch, transformers, accelerate, peft, datasets, trl and
# vllm in the python on PATH (PYTHON=... to choose another).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "--dry-run" ]]; then
  out=$(mktemp -d)
  offline=(--preset cpu-small --methods dpo --steps 1 --warmup 0 --repeats 1 --batch 2)
  online=(--models tiny --new-tokens 8 --steps 2)
  async=(--models tiny --new-tokens 8 --steps 2 --async)
else
  out=${1:-gpu-check-$(date +%Y%m%d-%H%M)}
  offline=(--preset qwen2.5-0.5b --methods dpo simpo --precision bf16 --repeats 1)
  online=(--models qwen2.5-0.5b --new-tokens 128 --steps 4 --precision bf16)
  async=(--models qwen2.5-0.5b --new-tokens 512 --steps 6 --precision bf16 --async)
  "$PYTHON" -c "import vllm, trl" 2>/dev/null && online+=(--trl-vllm) && async+=(--trl-vllm)
fi
mkdir -p "$out"
"$PYTHON" -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
      'trl', trl.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$out/versions.txt"
timeout 600 "$PYTHON" scripts/benchmark.py "${offline[@]}" | tee "$out/offline.md"
timeout 600 "$PYTHON" scripts/benchmark.py --online "${online[@]}" | tee "$out/online.md"
timeout 900 "$PYTHON" scripts/benchmark.py --online "${async[@]}" | tee "$out/async.md"
grep -q "prefopt, hf" "$out/online.md" && grep -q "TRL 1.16 GRPOTrainer" "$out/online.md"
if grep "not run" "$out/online.md" "$out/offline.md" "$out/async.md" | grep -v vllm | grep -qv AsyncGRPO; then
  echo "a run failed: see above" >&2; exit 1
fi
# the async claim: seconds per step, prefopt sync / prefopt async (a GPU run only; on a CPU both share the cores)
speedup=$(awk -F'|' '/prefopt, vllm \(sync\)/ {s=$5} /rollout.lag 1/ {a=$5} END {if (s && a) printf "%.2f", s / a}' "$out/async.md")
echo "prefopt async speed-up over sync: ${speedup:-not measured} (claim: >= 1.7 on the GPU)" | tee -a "$out/async.md"
echo "wrote $out"
