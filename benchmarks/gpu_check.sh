#!/usr/bin/env bash
# GPU check: on a fresh GPU machine with torch already installed and no
# network, build the extension for this card, run every CUDA and Triton test,
# time the first-use check of the GPU kernels, then print each op's median
# time per backend beside eager PyTorch and torch.compile (128x3x32x32,
# 64x3x224x224; features 4096x2048).
# Logs go to $OUT when set (else ./gpu_check_logs). Exits non-zero on any
# build or test failure. Budget: < 8 minutes on an H100/H200.
#   PYTHON=python3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-$PWD/gpu_check_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 USE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
unset TRITON_INTERPRET
status=0
t0=$(date +%s)
step() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0), 'cc', torch.cuda.get_device_capability(0))"
  date -u +%Y-%m-%dT%H:%MZ; } 2>&1 | tee "$LOG/machine.txt"

step "build for this card (MAX_JOBS=$MAX_JOBS)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
ASCOOD_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace > "$LOG/build.log" 2>&1 || { echo "BUILD FAILED (see build.log)"; tail -40 "$LOG/build.log"; exit 1; }
grep -E "registers|spill" "$LOG/build.log" | sort | uniq -c | sort -rn | head -20 > "$LOG/ptxas_summary.txt" || true
"$PY" -c "import ascood_kernels as ak; print('backends', ak.available_backends())" | tee -a "$LOG/machine.txt"

step "CUDA and Triton tests (op tests on the GPU; CPU cases too, they are fast)"
timeout 300 "$PY" -m pytest tests/kernels/ -q -rfEs -m gpu -p no:cacheprovider --maxfail=20 \
  --junitxml="$LOG/tests.xml" 2>&1 | tee "$LOG/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "first-use check: its one-time cost on this GPU (README, BENCHMARKS.md GPU section)"
for be in cuda triton; do
  for dt in float32 float16; do
    timeout 120 "$PY" benchmarks/first_use_cost.py --device cuda --backend $be --dtype $dt 2>&1 | tee -a "$LOG/first_use.txt" \
      || status=1
  done
done

step "benchmark table"
timeout 240 "$PY" -m pytest benchmarks/test_bench_ops.py --benchmark-only --bench-device cuda --check-shapes -q \
  -p no:cacheprovider --bench-md "$LOG/bench.md" --benchmark-json "$LOG/bench.json" > "$LOG/bench.log" 2>&1
[ $? -eq 0 ] || { echo "benchmark run failed (see bench.log)"; status=1; }
cat "$LOG/bench.md" 2>/dev/null

step "done, status $status"
exit $status
