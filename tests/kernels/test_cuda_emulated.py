"""The CUDA kernels, run on the CPU under the CUDA emulation, against the reference.

The op tests (test_op_*.py) already run every CUDA test as "cuda-emulated" at
small shapes. This module adds what those shapes do not reach: the shapes the
GPU paths are built for (rows just above and below the one-block select's 32
KiB, multi-block rows split into 1..n blocks, the multi-launch large-row path
with its scratch reused over chunks of samples, i-ODIN's rounds / radix /
all paths with several tiles per block, zscore rows shorter than a warp, loss
rows of any class count), the device assert, and a random sweep. Every launch
here runs with the emulator's race check on (shared and global memory, see
csrc/cuda/emulation/runtime.cpp), so a missing barrier or atomic fails a test
even where the result happens to come out right.

ASCOOD_EMU_FULL=1 runs the long random sweep (thousands of cases) instead of
CI's short one.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

import ascood_kernels as ak
import emu_checks
from ascood_kernels import emulation
from emu_checks import ALL, ITEM

FULL = os.environ.get("ASCOOD_EMU_FULL", "0") == "1"

pytestmark = pytest.mark.skipif(not emulation.load(), reason=f"CUDA emulation unavailable: {emulation.why_not()}")

NS = getattr(torch.ops, emulation.NAMESPACE) if emulation.available() else None


@pytest.fixture(autouse=True)
def _race_checked():
    with emulation.options(race_check=1):
        yield


def _check_select(shape, dtype, p, kind, seed=0):
    return emu_checks.select(NS, shape, dtype, p, kind, seed)


def _check_iodin(shape, dtype, k, kind, seed=0):
    problems = emu_checks.iodin(NS, shape, dtype, k, kind, seed)
    return problems[0] if problems else None


# ---------------------------------------------------------------------------------------------
# invariant_mask / gradient_outlier
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("where", ["at", "above"])
def test_select_rows_at_and_above_the_one_block_limit(dtype, where):
    """n * itemsize == 32 KiB is the last one-block row (32 KiB of dynamic shared memory); one more: multi-block."""
    n = 32768 // ITEM[dtype] + (1 if where == "above" else 0)
    assert _check_select((2, n), dtype, 0.1, "ties") == []


@pytest.mark.parametrize("num_sms, kind", [(1, "ties"), (3, "nan"), (3, "normal"), (64, "inf")])
def test_select_multi_block_rows(num_sms, kind):
    """Float32 rows of 9000 (3 samples) in 2 blocks each (num_sms=1), 4, and one per 1024-element tile (9)."""
    with emulation.options(num_sms=num_sms):
        assert _check_select((3, 9000), torch.float32, 0.3, kind, seed=num_sms) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_select_multi_block_rows_other_dtypes(dtype):
    n = 32768 // ITEM[dtype] + 777
    with emulation.options(num_sms=8):
        assert _check_select((2, n), dtype, 0.05, "ties", seed=3) == []
        assert _check_select((1, n), dtype, 0.6, "nan", seed=4) == []


def test_select_large_row_path_reuses_scratch_over_sample_chunks():
    """cand_budget = 2n: chunks of 2 samples (2, 2, 1) share the scratch; each chunk re-initialises it."""
    n = 9000
    with emulation.options(cand_budget=2 * n, num_sms=2):
        assert _check_select((5, n), torch.float32, 0.2, "ties", seed=5) == []
        assert _check_select((5, n), torch.float32, 0.01, "normal", seed=6) == []


@pytest.mark.parametrize("n", [1, 2, 33, 1025, 3000])
@pytest.mark.parametrize("p", ["1/n", 0.5, 1.0])
def test_select_large_row_path_on_short_rows(n, p):
    """small_bytes = 0 sends every row down the multi-block path: rows shorter than a tile, k = 1, k = n."""
    kind = "nan" if p == 0.5 else "ties"
    p = 1.0 / n if p == "1/n" else p
    with emulation.options(small_bytes=0, num_sms=4):
        assert _check_select((3, n), torch.float32, p, kind, seed=n) == []


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_select_all_equal_and_all_nan_rows(dtype):
    """Every element ties at the threshold: all are selected (small and large path)."""
    for small_bytes in (32768, 0):
        with emulation.options(small_bytes=small_bytes):
            g = torch.full((2, 300), 0.5, dtype=dtype)
            g[1] = float("nan")
            assert bool(NS.invariant_mask(g, 0.1).all())
            assert _check_select((2, 300), dtype, 0.1, "zeros") == []


def test_select_channels_last_through_the_public_op():
    x = torch.randn(2, 3, 30, 40).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 30, 40).to(memory_format=torch.channels_last)
    out = ak.gradient_outlier(x, g, 0.2, 1.5, backend="cuda-emulated")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ak.gradient_outlier(x, g, 0.2, 1.5, backend="reference"), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# iodin_perturb: one block per sample
@pytest.mark.parametrize("k, kind", [(1, "ties"), (2, "nan"), (8, "zeros"), (9, "ties"), (40, "nan"), (600, "ties"),
                                     (3266, "zeros"), (3267, "ties"), (10 ** 6, "nan")])
def test_iodin_paths_with_several_tiles(k, kind):
    """n = 3*33*33 = 3267 > 512 threads: 7 tiles of the ballot scan; k <= 8 rounds, 9..n-1 radix, >= n all."""
    assert _check_iodin((2, 3, 33, 33), torch.float32, k, kind, seed=k) is None


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("k", [1, 20])
def test_iodin_dtypes(dtype, k):
    assert _check_iodin((3, 3, 10, 10), dtype, k, "ties", seed=k) is None


# ---------------------------------------------------------------------------------------------
# zscore: one block per row, 32..256 threads
@pytest.mark.parametrize("m", [2, 3, 31, 32, 33, 127, 128, 129, 513, 1025])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_zscore_short_and_long_rows(m, dtype):
    """One block per row of 32 (m <= 128) to 256 threads; rows shorter than a warp; a constant row."""
    assert emu_checks.zscore(NS, 5, m, dtype, seed=m) == []


def test_zscore_grid_stride_over_rows_and_autograd():
    """More rows than a grid of 4 * num_sms ... zscore launches min(rows, 2^20) blocks: 700 rows, through autograd."""
    h = torch.randn(700, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(700, 40, dtype=torch.float64)
    out = ak.zscore(h, 0.5, 1e-6, backend="cuda-emulated")
    (dh,) = torch.autograd.grad(out, h, up)
    h2 = h.detach().requires_grad_()
    want = ak.zscore(h2, 0.5, 1e-6, backend="reference")
    (want_dh,) = torch.autograd.grad(want, h2, up)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dh, want_dh, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# ascood_loss: one warp per row, a one-block final sum, an elementwise backward
@pytest.mark.parametrize("B,B2,C", [(5, 7, 10), (1, 0, 1), (0, 3, 31), (9, 9, 33), (17, 3, 1000), (40, 40, 2)])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_loss_forward_backward(B, B2, C, dtype):
    """One warp per row (8 rows a block), the one-block final sum, the elementwise backward."""
    assert emu_checks.loss(NS, B, B2, C, dtype, seed=B * 100 + C) == []


def test_loss_out_of_range_target_trips_the_device_assert():
    """The kernel's CUDA_KERNEL_ASSERT fires (the Python wrapper checks CPU targets before, so call the op)."""
    zi, zo = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: t >= 0 && t < C"):
        NS.ascood_loss(zi, torch.tensor([0, 4, 1]), zo, 1.0)
    lse = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered"):
        NS.ascood_loss_backward(torch.tensor(1.0), zi, torch.tensor([0, -1, 1]), zo, 1.0, lse, torch.zeros(2))


def test_bad_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda-emulated' runs the CUDA kernels on CPU tensors"):
        ak.zscore(torch.empty(2, 3, device="meta"), backend="cuda-emulated")
    with pytest.raises(RuntimeError, match="shuffle_outlier has no CUDA C\\+\\+ kernel to emulate"):
        ak.shuffle_outlier(torch.randn(1, 3, 4, 4), torch.rand(1, 3, 4, 4), 0.3, backend="cuda-emulated")


# ---------------------------------------------------------------------------------------------
# Random sweep: every op, dtype, input kind and path, against the reference.
SWEEP_CHUNKS = 40 if FULL else 6
SWEEP_PER_CHUNK = 80 if FULL else 35


def _random_case(rng: random.Random) -> tuple[str, list[str]]:
    op = rng.choice(["select", "select", "select", "iodin", "zscore", "loss"])
    dtype = rng.choice(ALL)
    kind = rng.choice(["normal", "ties", "ties", "nan", "inf", "zeros"])
    seed = rng.randrange(2 ** 31)
    if op == "select":
        B = rng.randint(1, 3)
        n = rng.choice([rng.randint(1, 64), rng.randint(65, 700), rng.randint(700, 2500)])
        p = rng.choice([1.0 / n, rng.random() or 1.0, 1.0, rng.uniform(1e-6, 0.05)])
        opts = dict(num_sms=rng.choice([1, 2, 4, 16]), small_bytes=rng.choice([32768, 32768, 0]))
        with emulation.options(**opts):
            return f"select {dtype} B={B} n={n} p={p:.4g} {kind} {opts}", _check_select((B, n), dtype, p, kind, seed)
    if op == "iodin":
        shape = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 12), rng.randint(1, 12))
        n = math.prod(shape[1:])
        k = rng.choice([1, rng.randint(1, 8), rng.randint(9, max(9, n)), n, n + 3])
        return f"iodin {dtype} {shape} k={k} {kind}", emu_checks.iodin(NS, shape, dtype, k, kind, seed)
    if op == "zscore":
        rows, m = rng.randint(1, 6), rng.choice([rng.randint(2, 40), rng.randint(40, 600)])
        kind = "normal" if kind in ("nan", "inf") else kind
        return (f"zscore {dtype} {rows}x{m} {kind}",
                emu_checks.zscore(NS, rows, m, dtype, seed, constant_row=rng.random() < 0.3, kind=kind))
    B, B2, C = rng.randint(0, 9), rng.randint(0, 9), rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 300)])
    w, grad = rng.choice([0.0, 0.5, 1.0, 3.0]), rng.choice([1.0, 0.7, -2.0])
    return f"loss {dtype} B={B} B2={B2} C={C} w={w}", emu_checks.loss(NS, B, B2, C, dtype, w, grad, seed)


@pytest.mark.parametrize("chunk", range(SWEEP_CHUNKS))
def test_random_sweep(chunk, record_property):
    rng = random.Random(1000 + chunk)
    failures = []
    for _ in range(SWEEP_PER_CHUNK):
        name, problems = _random_case(rng)
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    record_property("emu_cases", SWEEP_PER_CHUNK)
    assert not failures, f"{len(failures)} of {SWEEP_PER_CHUNK} random cases differ:\n" + "\n".join(failures[:10])
