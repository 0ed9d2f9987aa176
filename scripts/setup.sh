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
# A second run with nothing changed reuses the environment and the build: the stamps below record what
# the last successful install and build were made from (requirements; sources, build settings, torch).
req_stamp=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.ascood-req-stamp 2>/dev/null)" = "$req_stamp" ]; then
  echo "[setup] dependencies unchanged since the last setup: not reinstalled"
else
  echo "[setup] installing dependencies (requirements.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$req_stamp" > .venv/.ascood-req-stamp
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${USE_CUDA:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then USE_CUDA=auto; else USE_CUDA=0; fi
fi
export USE_CUDA
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_stamp=$( { find csrc -type f | LC_ALL=C sort | xargs cat; cat setup.py pyproject.toml;
                 echo "USE_CUDA=$USE_CUDA ARCH=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-}";
                 .venv/bin/python -c "import sys, torch; print(sys.version, torch.__version__)"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.ascood-build-stamp 2>/dev/null)" = "$build_stamp" ] && ls ascood_kernels/_C*.so >/dev/null 2>&1 \
    && .venv/bin/python -c "import ascood_kernels" 2>/dev/null; then
  echo "[setup] ascood_kernels._C is up to date (same sources, settings and torch): not rebuilt"
  .venv/bin/python -c "import ascood_kernels as ak; print('[setup] backends:', ak.available_backends())"
  exit 0
fi
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
echo "$build_stamp" > .venv/.ascood-build-stamp
