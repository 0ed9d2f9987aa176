#!/usr/bin/env bash
# One-step setup on a fresh machine: a virtual environment in .venv with the
# dependencies, then the package installed in editable mode, which compiles
# ascood_kernels._C (C++ CPU kernels; CUDA kernels too when a toolkit is found).
#   USE_CUDA=auto|0|1   (default: auto on a machine with an NVIDIA GPU -- compile the CUDA kernels when
#                        torch has CUDA and a toolkit exists -- and 0 without one, which saves minutes
#                        of nvcc; CI sets 1 to keep the CUDA sources compiling)
#   PYTHON=python3.11   (interpreter used to create .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing dependencies (requirements.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${USE_CUDA:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then USE_CUDA=auto; else USE_CUDA=0; fi
fi
export USE_CUDA
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building ascood_kernels._C (USE_CUDA=${USE_CUDA:-auto}, MAX_JOBS=$MAX_JOBS); this takes a few"
echo "[setup] minutes (longer with CUDA); the compiler's [n/m] steps follow"
# pip -v shows the build's output; keep only ninja's progress lines and errors so the wait is visible.
# The status is pip's (pipefail), and its full log is kept for a failed build.
log=$(mktemp -t ascood-build.XXXXXX.log)
if ! .venv/bin/python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
    | tee "$log" | { grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|error|Error' || true; } \
    | sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]) .* -c (\S+) .*/[setup]   \1 \2/'; then
  echo "[setup] build failed; full log: $log" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import ascood_kernels as ak; print('[setup] backends:', ak.available_backends())"
