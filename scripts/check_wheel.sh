#!/usr/bin/env bash
# Builds one abi3 wheel with the CUDA kernels (USE_CUDA=1) from this checkout and
# checks it as a user installs it: in a second venv with a CPU-only torch older
# than the one it was built with (OLD_TORCH, default 2.13.0), from outside the
# source tree, the CPU kernels must load (the CUDA library cannot there: no
# libtorch_cuda) and the op tests (tests/kernels/test_op_*.py) must pass on them.
#
# Run after ./scripts/setup.sh: the wheel build reuses that build's objects
# (build/temp.*), so with USE_CUDA=1 there it only relinks. CI runs it
# (.ci/run); WHEEL_DIR keeps the wheel (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_TORCH=${OLD_TORCH:-2.13.0}
export USE_CUDA=${USE_CUDA:-1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
work=$(mktemp -d -t ascood-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT  # the second venv holds a whole torch
wheel_dir=${WHEEL_DIR:-$work/dist}
say() { echo "[wheel] $*"; }

say "building the wheel (USE_CUDA=$USE_CUDA) into $wheel_dir"
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$wheel_dir" .
wheel=$(ls -t "$wheel_dir"/ascood-*-cp310-abi3-*.whl | head -n1)
say "built $(basename "$wheel")"
listing=$(.venv/bin/python -m zipfile -l "$wheel")
grep -q "ascood_kernels/_C.abi3.so" <<<"$listing" || { say "the wheel has no ascood_kernels/_C.abi3.so"; exit 1; }
if [ "$USE_CUDA" = 1 ] && ! grep -q "ascood_kernels/_C_cuda.abi3.so" <<<"$listing"; then
  say "USE_CUDA=1 but the wheel has no ascood_kernels/_C_cuda.abi3.so"; exit 1
fi

say "a second venv with torch==$OLD_TORCH (CPU-only) and the wheel"
# The interpreter behind .venv (the local torch wheels are built for it).
base_python=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
"$base_python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check "torch==$OLD_TORCH" pytest
# --no-deps: the wheel's own dependencies include torchvision, whose pin would replace that torch.
"$py" -m pip install -q --disable-pip-version-check --no-deps "$wheel"

mkdir "$work/tests"
cp tests/backends.py tests/kernels/test_op_*.py "$work/tests/"
cp scripts/installed_wheel/conftest.py "$work/tests/conftest.py"
printf '[pytest]\nmarkers =\n    slow: longer CPU tests\n    gpu: needs a CUDA device\n' > "$work/tests/pytest.ini"
cd "$work/tests"
# The CPU kernels of the CUDA wheel loaded under the older CPU-only torch (not the source tree's copy).
ASCOOD_EMU=0 "$py" - <<'PY'
import torch
import ascood_kernels as ak
from ascood_kernels import _backend
where = ak.__file__
backends = ak.available_backends()
print(f"[wheel] torch {torch.__version__} (cuda {torch.version.cuda}); ascood_kernels from {where}; backends {backends}")
print(f"[wheel] cuda backend: {_backend._why_not('cuda')}")
assert "site-packages" in where, "imported the source tree, not the installed wheel"
assert "cpu" in backends, f"the CPU kernels did not load: {_backend._why_not('cpu')}"
assert torch.version.cuda is not None or "cuda" not in backends
PY
# The self-check there: its abi line names the build's torch, this torch and the target.
ASCOOD_EMU=0 "$py" -m ascood_kernels --quick | grep -v "^  pass"
ASCOOD_EMU=0 "$py" -m pytest -q -p no:cacheprovider -x .
say "op tests passed on the wheel's CPU kernels under torch $OLD_TORCH"
