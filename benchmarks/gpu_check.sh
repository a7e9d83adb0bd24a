#!/usr/bin/env bash
# GPU check, under 5 minutes on one H100/H200: the CUDA/AMP tests, then the speed benchmark's
# criterion step (a), full ResNet50 training step (b) and data pipeline (c) on the GPU.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Writes benchmarks/results/speed_gpu.md (GPU named in it) and gpu_check.log; exits non-zero
# when a test fails or a stage overruns its time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
LOG="$RESULTS/gpu_check.log"
mkdir -p "$RESULTS"
: >"$LOG"
status=0

run() {  # run <seconds> <label> <command...>: time-limited, logged, status remembered
  local limit=$1 label=$2
  shift 2
  echo "== $label (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $label: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then status=1; fi
}

run 30 "environment" "$PYTHON" - <<'EOF'
import platform, torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
      f"torch {torch.__version__}, Python {platform.python_version()}")
EOF

# CUDA/AMP tests: flow and NIR on CUDA vs CPU, fp16/bf16 autocast, evaluation on CUDA, the
# sync-free training step under CUDA's sync detector (bf16 and fp16 + GradScaler).
run 150 "CUDA/AMP tests" "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda" \
  tests/test_flow.py tests/test_nir.py tests/test_eval_api.py tests/test_speed.py

# (a) criterion, (b) ResNet50 step with AMP bf16 + channels_last, (c) data pipeline.
run 200 "speed benchmark" "$PYTHON" benchmarks/speed.py --device cuda --amp bf16 \
  --repeats 25 --warmup 5 --step-repeats 8 --step-block 5 --step-warmup 3 \
  --images 360 --data-batches 8 --out "$RESULTS/speed_gpu.md"

echo "== done: status $status; results in $RESULTS/speed_gpu.md, log in $LOG" | tee -a "$LOG"
exit $status
