"""One-time cost of the first-use check (ascood_kernels._first_use), per op family.

    python benchmarks/first_use_cost.py --device cuda --backend cuda    # on a GPU (gpu_check.sh runs it)
    python benchmarks/first_use_cost.py --device cpu --backend cpu      # the same probes, C++ kernels

The check runs each family's probe once per process, device and dtype, the
first time ``backend="auto"`` uses that op on a CUDA device. Printed per
family: the first probe (what a user's first call pays; on a GPU it also
loads the kernels' code, which that call would pay anyway) and the fastest
repeat (the probe itself), each synchronised; then the sum over families.
"""
from __future__ import annotations

import argparse
import time

import torch

from ascood_kernels import _first_use


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", help="cuda, triton, cpu or cuda-emulated (default: cuda on GPUs, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype)
    from ascood_kernels import _backend

    _backend.resolve(backend, device)  # loads (or builds) the backend; raises if it cannot run here
    first_total = again_total = 0.0
    print(f"first-use check cost: backend {backend}, device {device}, dtype {args.dtype}, torch {torch.__version__}")
    for family in _first_use.PROBES:
        times = []
        for _ in range(max(2, args.repeat)):
            _sync(device)
            t0 = time.perf_counter()
            try:
                problems = _first_use.probe(family, backend, device, dtype)
            except _first_use.Unjudged as err:
                print(f"  {family}: could not be judged ({err})")
                return 1
            _sync(device)
            times.append(time.perf_counter() - t0)
            if problems:
                print(f"  {family}: MISMATCH {problems}")
                return 1
        first_total += times[0]
        again_total += min(times[1:])
        print(f"  {family:14s} first {times[0] * 1e3:9.1f} ms   repeat {min(times[1:]) * 1e3:9.1f} ms")
    print(f"  {'all four':14s} first {first_total * 1e3:9.1f} ms   repeat {again_total * 1e3:9.1f} ms"
          "   (paid once per process, device and dtype)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
