"""The CUDA emulation itself, against the CUDA programming guide's definitions.

Self-test kernels (csrc/cuda/emulation/selftest.cpp) check the intrinsics, the
shuffle variants, barriers, atomics and shared memory, and that code which
would hang or misbehave on a GPU fails here with a named error instead.
"""
from __future__ import annotations

import time

import pytest
import torch

from ascood_kernels import emulation

pytestmark = pytest.mark.skipif(not emulation.load(), reason=f"CUDA emulation unavailable: {emulation.why_not()}")


def _popc(v):
    return bin(v).count("1")


def _ffs(v):
    return (v & -v).bit_length()


def _clz(v, bits):
    return bits - v.bit_length()


def test_integer_and_float_intrinsics():
    out = emulation.selftest("intrinsics").tolist()
    want = []
    for v in (0, 1, 0x80000000, 0xFFFFFFFF, 0x00F0F000):
        want += [_popc(v), _ffs(v), _clz(v, 32)]
    for v in (0, 1 << 40, 2 ** 64 - 1):
        want += [_popc(v), _ffs(v), _clz(v, 64)]
    assert out[: len(want)] == want
    # reinterpretations, exactly rounded arithmetic, device math overloads (each 1 = true)
    assert out[len(want): len(want) + 10] == [1] * 10
    assert set(out[len(want) + 10:]) == {-1}  # nothing else written


def test_shuffles_and_ballot_follow_the_guide():
    out = emulation.selftest("shuffles")
    for t in range(64):
        warp, lane = divmod(t, 32)
        v = lambda src: 1000 * warp + src  # noqa: E731  (value held by lane src of this warp)
        row = out[t].tolist()
        group8, group4 = lane // 8 * 8, lane // 4 * 4
        xor4 = lane ^ 6
        want = [
            v((5 * lane + 3) % 32),                              # srcLane taken modulo the width (32)
            v(group8 + 3),                                       # width 8: lane 3 of each group of 8
            v(31),                                               # srcLane -1 == 31 modulo 32
            v(lane - 3) if lane >= 3 else v(lane),               # up: the lowest delta lanes keep their value
            v(lane - 3) if lane % 8 >= 3 else v(lane),           # up, width 8: within each group
            v(lane + 5) if lane + 5 < 32 else v(lane),           # down: the highest delta lanes keep theirs
            v(lane + 5) if lane % 16 + 5 < 16 else v(lane),      # down, width 16
            v(lane ^ 9),                                         # xor 9
            v(xor4) if xor4 // 4 * 4 <= group4 else v(lane),     # xor 6, width 4: later groups give own value
            sum(1 << i for i in range(32) if i % 3 == 0),       # ballot(lane % 3 == 0)
            2 * (v(lane ^ 1)) + 1,                               # a double through a shuffle
            v(lane - 1) if lane >= 1 else v(lane),               # an 8-byte integer through shfl_up
            v(0 if lane < 16 else 16),                           # half-warp groups with disjoint masks
        ]
        assert row == want, (t, row, want)


def test_many_exchanges_in_every_warp():
    reps = 40
    out = emulation.selftest("exchanges", reps).tolist()
    v = list(range(512))
    for r in range(reps):
        m = 1 + r % 31
        v = [v[t] + v[(t & ~31) | ((t & 31) ^ m)] for t in range(512)]
    assert out == v


@pytest.mark.parametrize("threads", [1, 32, 33, 250, 1024])
def test_barriers_order_every_thread_of_the_block(threads):
    out = emulation.selftest("barrier", threads).tolist()
    rounds = 20
    want = [sum(((t + 1 + r) % threads) * 3 + r for r in range(rounds)) for t in range(threads)]
    assert out == want


def test_atomics_on_shared_and_global_memory():
    blocks, per = 3, 96
    n = blocks * per
    out = emulation.selftest("atomics", blocks).tolist()
    gi, g_last_max, gu, gull, gf, gd, gmax, gmin, gcas = out
    assert gi == n and gu == 2 * n  # the shared count (2 per thread) of each block, summed
    assert gull == n * 2 ** 33 and gf == 0.5 * n and gd == 0.25 * n
    assert gmax == n - 1 and gmin == -(n - 1) and gcas == n
    assert g_last_max == n - 1  # atomicExch of the last block's shared atomicMax


def test_shared_memory_is_fresh_and_poisoned_per_block():
    out = emulation.selftest("static_smem").tolist()
    for b in range(3):
        assert out[3 * b: 3 * b + 3] == [0xFFFFFFFF, 1, 7 + b]  # the previous block's value is not visible
    dyn = emulation.selftest("dynamic_smem", 100).tolist()
    assert dyn == [0xFFFFFFFF, sum(7 * i for i in range(100))] * 2  # per block: poison first, then the sum
    with emulation.options(poison=0):
        assert emulation.selftest("dynamic_smem", 10).tolist()[0] == 0


def test_builtin_variables():
    out = emulation.selftest("ids")
    rows = out.tolist()
    seen = set()
    for row in rows:
        bx, by, bz, tx, ty, tz, grid, block = row
        assert 0 <= bx < 3 and 0 <= by < 2 and 0 <= bz < 2 and 0 <= tx < 5 and 0 <= ty < 3 and 0 <= tz < 2
        assert grid == 322 and block == 320532  # gridDim (3,2,2), blockDim (5,3,2), warpSize 32
        seen.add((bx, by, bz, tx, ty, tz))
    assert len(seen) == len(rows) == 3 * 2 * 2 * 5 * 3 * 2


@pytest.mark.parametrize("name, message", [
    # Which comes first depends on the OS: a lane arriving after others returned, or one returning while others wait.
    ("divergent_shfl_exit", r"named in the mask have returned from the kernel: they can never arrive"
                            r"|returned without reaching __shfl_sync\(mask 0xffffffff\) selftest\.cpp:\d+, "
                            r"where lanes"),
    ("divergent_syncthreads", r"reached __syncthreads selftest\.cpp:\d+ after \d+ threads of the block returned"
                              r"|returned while \d+ threads wait at __syncthreads"),
    ("different_barriers", r"the threads of a block must reach the same barrier"),
    ("mask_mismatch", r"every lane named in a mask must execute the same intrinsic with the same mask"),
    ("op_mismatch", r"every lane named in a mask must execute the same intrinsic with the same mask"),
    ("mask_without_self", r"with a mask that does not name its own lane"),
    ("read_inactive_lane", r"reads lane 20, which is not in the mask"),
    ("partial_warp", r"the mask names lanes 0xffffff00 that do not exist \(the block has 40 threads\)"),
    ("static_smem_over", r"__shared__ big brings the block's shared memory to 32768 static \+ 20480 dynamic bytes"),
    ("smem_overflow", r"wrote past the 64 bytes of dynamic shared memory"),
    ("too_many_threads", r"invalid configuration argument: at most 1024 threads per block"),
    ("too_much_smem", r"too much dynamic shared memory: 65536 bytes > 48 KiB"),
    ("grid_too_large", r"invalid configuration argument: grid dims"),
])
def test_code_that_is_wrong_on_a_gpu_fails_with_a_named_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        emulation.selftest(name, 3)
    assert emulation.selftest("barrier", 64).numel() == 64  # the emulator is usable afterwards


def test_device_assert_names_the_condition():
    with pytest.raises(RuntimeError, match=r"kernel device_assert_kernel .*device-side assert triggered: x >= 0"):
        emulation.selftest("device_assert", 3)
    emulation.selftest("device_assert", 0)  # no negative value: no assert


def test_divergent_full_mask_shuffle_fails_after_the_deadlock_timeout_instead_of_hanging():
    """Lanes 0-15 wait in a full-mask __shfl_sync that lanes 16-31 never reach (they wait at __syncthreads)."""
    with emulation.options(deadlock_timeout_ms=300):
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError) as info:
            emulation.selftest("divergent_shfl_deadlock")
        elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert "deadlock: no thread of the block can proceed" in msg and "a GPU would hang here" in msg
    assert "lanes 0-15 at __shfl_sync(mask 0xffffffff) selftest.cpp" in msg
    assert "lanes 16-31 at __syncthreads selftest.cpp" in msg
    assert 0.3 <= elapsed < 10


def test_race_check_finds_a_missing_atomic_that_the_result_may_hide():
    """512 threads increment one shared counter without atomics. The threads interleave too rarely
    for lost updates to be likely; the race check reports the race whatever the result."""
    assert emulation.selftest("nonatomic", 50).numel() == 1  # unchecked: runs, result unreliable
    with emulation.options(race_check=1):
        with pytest.raises(RuntimeError, match=r"data race on __shared__ counter \(byte 0\)"):
            emulation.selftest("nonatomic", 50)
        emulation.selftest("atomics", 2)  # atomics do not race with each other
        emulation.selftest("barrier", 256)  # accesses ordered by barriers do not race


def test_race_check_finds_conflicting_writes_of_two_blocks():
    """Both blocks write out[0]: on a GPU they run concurrently."""
    with emulation.options(race_check=1):
        with pytest.raises(RuntimeError, match=r"data race on global memory .* block \(1,0,0\) .* block \(0,0,0\)"):
            emulation.selftest("two_blocks_write", 0)


_REPORT_RACES_IN_A_LOOP = """
from ascood_kernels import emulation
assert emulation.load(), emulation.why_not()
for _ in range(400):
    with emulation.options(race_check=1):
        for name, arg in (("two_blocks_write", 0), ("nonatomic", 50)):
            try:
                emulation.selftest(name, arg)
            except RuntimeError as err:
                assert "data race" in str(err), err
            else:
                raise AssertionError(name + ": the race was not reported")
print("reported every race")
"""


def test_reporting_a_race_never_hangs_the_checker():
    """Regression: building a report's strings ran the instrumented std::string code, which
    re-entered the check and waited forever on the shard lock it held whenever the string's
    heap memory hashed to that shard (one process in six hung). The loop gives every
    run hundreds of reports; in a subprocess so a hang fails this test instead of the suite."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _REPORT_RACES_IN_A_LOOP], capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the race check hung while reporting a race")
    assert proc.returncode == 0 and "reported every race" in proc.stdout, proc.stderr[-2000:]


def test_unknown_option_and_selftest_are_errors():
    with pytest.raises(ValueError, match="unknown option .num_smz."):
        with emulation.options(num_smz=3):
            pass
    with pytest.raises(ValueError, match="unknown emulator self-test"):
        emulation.selftest("nope")
