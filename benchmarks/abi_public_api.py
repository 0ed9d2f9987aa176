"""Per-call time of two small ops through the public API (forward + backward), for the stable-ABI comparison.

    cd TREE && python /path/to/benchmarks/abi_public_api.py LABEL

Run it in each tree whose ``ascood_kernels`` build is compared (the old build's checkout, then this one),
on a quiet machine: 1 thread, 200 warm-up calls, the median of 15 rounds of 500 calls. The raw-op
comparison is ``abi_side_by_side.py``; this one shows what a training loop sees at tiny shapes.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import ascood_kernels as ak


def per_call_us(fn, warmup: int = 200, rounds: int = 15, calls: int = 500) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this build"
    torch.set_num_threads(1)
    h = torch.randn(8, 128, requires_grad=True)
    zi, zo = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    cases = {"zscore 8x128 fwd+bwd": lambda: ak.zscore(h, 0.5, 1e-6, backend="cpu").sum().backward(),
             "ascood_loss 8x10 fwd+bwd": lambda: ak.ascood_loss(zi, y, zo, 1.0, backend="cpu").backward()}
    for name, fn in cases.items():
        print(f"{label} {name} (public API): {per_call_us(fn):.1f} us/call")


if __name__ == "__main__":
    main()
