"""Per-call latency of the CPU ``shuffle_outlier`` at 1 and 2 threads, with what each slow call was doing.

    python benchmarks/shuffle_latency.py --calls 80 --shape 64,3,224,224

For every call of ``ascood_kernels.shuffle_outlier`` (C++ backend, float32, p_inv 0.15) it records the
wall time and, from ``getrusage`` / ``/proc``: the CPU time of the process (all threads; and the part spent
in the kernel: page faults, zeroing fresh pages), its involuntary
context switches (the scheduler took a core away from one of its threads: another process or a kernel
thread wanted it), minor page faults (first touches of fresh memory), and the system's compaction stalls
and huge-page faults from ``/proc/vmstat``. A call is "slow" above 2x the median; the table compares the
slow calls with the others. Then, as a check of the explanation, the same batch split into 8 slices run by
a 2-worker thread pool (each slice single-threaded, a free worker takes the next slice: dynamic work
sharing) instead of one 2-thread call with a static half each.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import ascood_kernels as ak
from ascood_kernels.ops.permutations import draw_permutations

VMSTAT = ("compact_stall", "thp_fault_alloc", "thp_fault_fallback")


def _vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in VMSTAT:
                out[k] = int(v)
    return out


def measure(fn, calls: int) -> list[dict]:
    rows = []
    for _ in range(calls):
        r0, v0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), _vmstat(), time.process_time(), time.perf_counter()
        fn()
        t1, c1, v1, r1 = time.perf_counter(), time.process_time(), _vmstat(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall": 1000 * (t1 - t0), "cpu": 1000 * (c1 - c0), "sys": 1000 * (r1.ru_stime - r0.ru_stime),
                     "nivcsw": r1.ru_nivcsw - r0.ru_nivcsw,
                     "minflt": r1.ru_minflt - r0.ru_minflt, **{k: v1.get(k, 0) - v0.get(k, 0) for k in VMSTAT}})
    return rows


def summarize(label: str, rows: list[dict]) -> str:
    walls = sorted(r["wall"] for r in rows)
    med = statistics.median(walls)
    slow = [r for r in rows if r["wall"] > 2 * med]
    rest = [r for r in rows if r["wall"] <= 2 * med]

    def mean(rs, k):
        return statistics.mean(r[k] for r in rs) if rs else float("nan")

    p95 = walls[int(0.95 * (len(walls) - 1))]
    cells = [label, f"{med:.1f}", f"{p95:.1f}", f"{walls[-1]:.1f}", f"{walls[-1] / med:.1f}",
             f"{len(slow)}/{len(rows)}"]
    for rs in (rest, slow):
        cells += [f"{mean(rs, 'wall'):.1f}", f"{mean(rs, 'cpu'):.1f}", f"{mean(rs, 'sys'):.1f}",
                  f"{mean(rs, 'nivcsw'):.1f}", f"{mean(rs, 'minflt'):.0f}", f"{mean(rs, 'thp_fault_alloc'):.1f}",
                  f"{mean(rs, 'compact_stall'):.2f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=80)
    ap.add_argument("--shape", default="64,3,224,224")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    sal = torch.randn(shape[0], *shape[2:], generator=g)
    npix = int(0.15 * shape[2] * shape[3])
    perm = draw_permutations(shape[0], npix, torch.Generator().manual_seed(1), x.device)
    kernel = torch.ops.ascood.shuffle_outlier
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, shape {shape}, {args.calls} calls per row; "
          f"load average {os.getloadavg()}; THP: {open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip()}")
    head = ("| threads | median ms | p95 ms | max ms | max / median | slow calls (> 2x median) | "
            "other calls: wall ms | CPU ms | of which kernel ms | invol. switches | minor faults | THP faults | "
            "compaction stalls | slow calls: wall ms | CPU ms | of which kernel ms | invol. switches | minor faults | "
            "THP faults | compaction stalls |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        kernel(x, sal, 0.15, perm)  # warm-up
        print(summarize(str(threads), measure(lambda: kernel(x, sal, 0.15, perm), args.calls)), flush=True)
    # Dynamic sharing: 8 slices, 2 workers, 1 intra-op thread each (same output as the single call).
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(2)
    step = shape[0] // 8
    out = torch.empty_like(x)

    def sliced():
        def run(i):
            out[i:i + step] = kernel(x[i:i + step], sal[i:i + step], 0.15, perm[i:i + step])
        list(pool.map(run, range(0, shape[0], step)))
        return out

    assert torch.equal(sliced(), kernel(x, sal, 0.15, perm))
    print(summarize("2 (8 slices, 2-worker pool)", measure(sliced, args.calls)), flush=True)
    print(f"load average after {os.getloadavg()}")
    _ = ak  # the import registers the ops


if __name__ == "__main__":
    main()
