"""Proof that the emulated tests can fail: deliberately broken copies of the CUDA kernels are caught.

Each fault is a one-line change to a copy of a shipped source (the original line
must be found exactly once, so a fault cannot silently stop applying). The
copies are built into one emulated library (ascood_kernels.emulation.
build_variants, each in its own namespace) and run, in a separate process, on
the same checks as the emulated tests (emu_checks.py): once with the race
check on, as test_cuda_emulated.py runs, and once without it, to show what the
comparison with the reference alone catches. Faults marked ``by="asan"`` are
memory errors the emulator cannot see (an access past a tensor): they are built
and run under AddressSanitizer by test_cuda_emulated_asan.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from ascood_kernels import emulation

pytestmark = pytest.mark.skipif(emulation.source_dir() is None or not emulation.load(),
                                reason=f"CUDA emulation unavailable: {emulation.why_not()}")


@dataclass(frozen=True)
class Fault:
    name: str
    file: str      # the source the fault edits (common.cuh or a kernel file)
    kernel: str    # the kernel file built for it (and whose checks run)
    before: str
    after: str
    what: str
    # Does the comparison with the reference catch it without the race check? True / False are
    # asserted; None: it depends on how the OS schedules the block's threads (not asserted).
    alone: bool | None
    by: str = "emulator"  # what must catch it: the emulated checks, or "asan" (test_cuda_emulated_asan.py)


FAULTS = [
    Fault("dropped_syncthreads", "common.cuh", "select.cu",
          "    __syncthreads();\n    prefix = *s_prefix;\n", "    prefix = *s_prefix;\n",
          "block_radix_select: no barrier between thread 0 publishing the digit and every thread reading it",
          None),
    Fault("tile_off_by_one", "select.cu", "select.cu",
          "for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s_bits[i] = g[row + i];",
          "for (int64_t i = threadIdx.x; i < n - 1; i += blockDim.x) s_bits[i] = g[row + i];",
          "select_small_kernel: the row tile copied into shared memory stops one element short", True),
    Fault("wrong_shuffle_offset", "common.cuh", "zscore.cu",
          "  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);",
          "  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);",
          "warp_sum: the butterfly starts at lane offset 8, not 16, so each half-warp sums alone", True),
    Fault("missing_atomic_shared", "common.cuh", "select.cu",
          "        atomicAdd(&hist[static_cast<int>((key >> lo) & static_cast<wide_t>(nb - 1))], 1u);",
          "        hist[static_cast<int>((key >> lo) & static_cast<wide_t>(nb - 1))] += 1u;",
          "block_radix_select: the shared-memory histogram counts with a plain += instead of atomicAdd", None),
    Fault("missing_atomic_global", "select.cu", "select.cu",
          "  unsigned* gh = ghist + static_cast<int64_t>(blockIdx.y) * kMaxBins;\n"
          "  for (int i = threadIdx.x; i < nb; i += blockDim.x) {\n"
          "    const unsigned c = sh[i];\n    if (c != 0u) atomicAdd(&gh[i], c);",
          "  unsigned* gh = ghist + static_cast<int64_t>(blockIdx.y) * kMaxBins;\n"
          "  for (int i = threadIdx.x; i < nb; i += blockDim.x) {\n"
          "    const unsigned c = sh[i];\n    if (c != 0u) gh[i] += c;",
          "hist_top_kernel: the blocks of a sample add their histograms into global memory without atomicAdd",
          False),
    Fault("unwritten_output_element", "iodin.cu", "iodin.cu",
          "i < total; i += stride) {", "i < total - 1; i += stride) {",
          "iodin_all_kernel: the grid-stride loop stops one short, so the last element of the `empty` output is "
          "never written (the emulation poisons fresh outputs: it reads NaN)", True),
    Fault("iodin_row_overrun", "iodin.cu", "iodin.cu",
          "for (int64_t i64 = threadIdx.x; i64 < n; i64 += blockDim.x) {",
          "for (int64_t i64 = threadIdx.x; i64 <= n; i64 += blockDim.x) {",
          "iodin_rounds_kernel: the row loop reads one element past each row (past the tensor in the last row)",
          None, by="asan"),
    Fault("select_write_past_row", "select.cu", "select.cu",
          "  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {\n    const bits_t gb = s_bits[i];",
          "  for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) {\n    const bits_t gb = s_bits[i];",
          "select_small_kernel: the output loop writes one element past each row (past the tensor in the last row)",
          None, by="asan"),
]
EMULATOR_FAULTS = [f for f in FAULTS if f.by == "emulator"]


def make_copies(tmp: pathlib.Path, faults: list[Fault]) -> dict[str, list[str]]:
    """One directory per fault with common.cuh and the kernel file, one of them broken."""
    cuda_dir = emulation.source_dir() / "cuda"
    spec = {}
    for f in faults:
        d = tmp / f.name
        d.mkdir()
        for name in {"common.cuh", f.kernel}:
            text = (cuda_dir / name).read_text()
            if name == f.file:
                assert text.count(f.before) == 1, f"{f.name}: the line to break is not found exactly once in {name}"
                text = text.replace(f.before, f.after)
            (d / name).write_text(text)
        spec[f"ascood_fault_{f.name}"] = [str(d / f.kernel), f.kernel]
    return spec


@pytest.fixture(scope="module")
def fault_results(tmp_path_factory):
    spec = make_copies(tmp_path_factory.mktemp("faults"), EMULATOR_FAULTS)
    tests_dir = pathlib.Path(__file__).resolve().parents[1]  # tests/: emu_checks.py and the shared helpers
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(tests_dir / "emu_checks.py"), "faults", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=1500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAULT-RESULTS ")]
    assert proc.returncode == 0 and lines, f"fault run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("FAULT-RESULTS "):])
    print(f"\nfault variants: built in {result['build_seconds']} s, checks {result['race_check=1 seconds']} s "
          f"(race check) + {result['race_check=0 seconds']} s (without)")
    return result


@pytest.mark.parametrize("fault", EMULATOR_FAULTS, ids=lambda f: f.name)
def test_every_injected_fault_is_caught(fault, fault_results):
    ns = f"ascood_fault_{fault.name}"
    checked = fault_results["race_check=1"][ns]
    plain = fault_results["race_check=0"][ns]
    caught = checked["mismatch"] + checked["error"]
    print(f"\n{fault.name} ({fault.what}):\n  with the race check: {len(checked['mismatch'])} of "
          f"{checked['cases']} cases differ from the reference, {len(checked['error'])} stopped by the emulator; "
          f"first: {caught[0] if caught else 'none'}\n  without it: {len(plain['mismatch'])} differ, "
          f"{len(plain['error'])} stopped")
    assert caught, f"{fault.name} was not caught: {checked}"
    if fault.alone is True:
        assert plain["mismatch"], f"{fault.name}: expected the comparison alone to catch it"
    if fault.name == "unwritten_output_element":
        # The one unwritten element reads as the emulation's output poison (NaN), in every k = all case.
        assert len(plain["mismatch"]) == 2, plain
        assert all("Mismatched elements: 1 /" in m and "nan" in m.lower() for m in plain["mismatch"]), plain
    if fault.alone is False:
        # Blocks run one after another here, so the unsynchronised global adds give the right
        # counts: only the race check (the blocks of a launch are unordered) can see this fault.
        assert not plain["mismatch"] and not plain["error"]
        assert any("data race on global memory" in e for e in checked["error"])


def test_the_faults_break_distinct_lines():
    assert len({(f.file, f.before) for f in FAULTS}) == len(FAULTS)
    cuda_dir = emulation.source_dir() / "cuda"
    for f in FAULTS:
        assert (cuda_dir / f.file).read_text().count(f.before) == 1, f.name
