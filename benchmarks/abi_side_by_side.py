"""Two builds of the compiled CPU kernels side by side: per-call time of every op, and equal outputs.

    python benchmarks/abi_side_by_side.py --old TREE_A --new TREE_B [--threads 1] [--rounds 15]
                                          [--min-batch-ms 30] [--only zscore,loss]

TREE_A / TREE_B are folders from which ``import ascood_kernels`` loads a build:
a source checkout built in place (``python setup.py build_ext --inplace``) or a
site-packages folder with an installed wheel. Written for issue 31's port to
the LibTorch stable ABI ("no op slower than before"): e.g. the last commit
before the port and this one, both built against the same torch:

    git worktree add /tmp/ascood-old cb6af46
    (cd /tmp/ascood-old && USE_CUDA=0 python setup.py build_ext --inplace)
    USE_CUDA=0 python setup.py build_ext --inplace
    python benchmarks/abi_side_by_side.py --old /tmp/ascood-old --new .

Each build runs in its own worker process (two builds of one op library cannot
share a process); the parent times each case in both, alternating which goes
first, ``--rounds`` batches each, and reports the medians per call of the raw
ops (``torch.ops.ascood.*``, the C++ glue and kernel the port touched; the
Python wrappers are the same in both). Before timing, every case's outputs
must be bit-identical between the builds. Run it on a quiet machine: the
numbers are wall-clock.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

WORKER_FLAG = "--worker"


# ---------------------------------------------------------------------------------------------
# Worker side: one build, the cases, timing on request.
def _cases(torch) -> dict:
    """name -> zero-argument callable running one op once on fixed inputs (the same in both workers)."""
    ops = torch.ops.ascood
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = {}
    for tag, shape in (("64x3x224x224", (64, 3, 224, 224)), ("8x3x32x32", (8, 3, 32, 32))):
        x, grad = randn(*shape), randn(*shape)
        xcl, gcl = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
        b, _, h, w = shape
        sal = randn(b, h, w).abs()
        npix = int(0.1 * h * w)
        perm = torch.stack([torch.randperm(npix, generator=g) for _ in range(b)])
        std = torch.tensor([0.229, 0.224, 0.225])
        cases[f"invariant_mask {tag}"] = lambda grad=grad: ops.invariant_mask(grad, 0.1)
        cases[f"gradient_outlier {tag}"] = lambda x=x, grad=grad: ops.gradient_outlier(x, grad, 0.1, 0.02)
        cases[f"gradient_outlier {tag} channels-last"] = lambda x=xcl, grad=gcl: ops.gradient_outlier(x, grad, 0.1, 0.02)
        cases[f"shuffle_outlier {tag}"] = lambda x=x, s=sal, p=perm: ops.shuffle_outlier(x, s, 0.1, p)
        cases[f"iodin_perturb k=1 {tag}"] = lambda x=x, grad=grad, s=std: ops.iodin_perturb(x, grad, 0.0014, s, 1)
        cases[f"iodin_perturb k=all {tag}"] = lambda x=x, grad=grad, s=std: ops.iodin_perturb(x, grad, 0.0014, s,
                                                                                             x[0].numel())
    for tag, shape in (("512x2048", (512, 2048)), ("8x128", (8, 128))):
        for dtype in (torch.float32, torch.float16):
            h = randn(*shape, dtype=dtype)
            out, mean, rstd = ops.zscore(h, 1.0, 1e-6)
            go = randn(*shape, dtype=dtype)
            name = f"{tag} {str(dtype).replace('torch.', '')}"
            cases[f"zscore {name}"] = lambda h=h: ops.zscore(h, 1.0, 1e-6)
            cases[f"zscore_backward {name}"] = lambda go=go, h=h, m=mean, r=rstd: ops.zscore_backward(go, h, m, r, 1.0)
    for tag, (b, c) in (("256x1000", (256, 1000)), ("8x10", (8, 10))):
        for dtype in (torch.float32, torch.float16):
            zi, zo = randn(b, c, dtype=dtype), randn(b, c, dtype=dtype)
            t = torch.randint(0, c, (b,), generator=g)
            loss, li, lo = ops.ascood_loss(zi, t, zo, 0.5)
            gl = torch.ones((), dtype=dtype)
            name = f"{tag} {str(dtype).replace('torch.', '')}"
            cases[f"ascood_loss {name}"] = lambda zi=zi, t=t, zo=zo: ops.ascood_loss(zi, t, zo, 0.5)
            cases[f"ascood_loss_backward {name}"] = (
                lambda gl=gl, zi=zi, t=t, zo=zo, li=li, lo=lo: ops.ascood_loss_backward(gl, zi, t, zo, 0.5, li, lo))
    seeds = torch.arange(64, dtype=torch.int64)
    cases["random_permutations 64x50176"] = lambda: ops.random_permutations(seeds, 50176)
    cases["random_permutations 8x100"] = lambda: ops.random_permutations(seeds[:8], 100)
    return cases


def _digest(torch, result) -> str:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.stride(), t.dtype)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def worker(tree: str, threads: int) -> None:
    sys.path.insert(0, tree)
    import torch

    import ascood_kernels
    from ascood_kernels import _backend

    torch.set_num_threads(threads)
    cases = _cases(torch)
    print(json.dumps({"ready": True, "file": ascood_kernels.__file__, "cpu": _backend.extension_loaded(),
                      "cases": list(cases)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        fn = cases[req["case"]]
        if req["cmd"] == "digest":
            print(json.dumps({"digest": _digest(torch, fn())}), flush=True)
            continue
        n = req["n"]
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(json.dumps({"seconds": (time.perf_counter() - t0) / n}), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side
class Build:
    def __init__(self, label: str, tree: str, threads: int):
        self.label = label
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG, tree, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = json.loads(self.proc.stdout.readline())
        if not hello["cpu"]:
            raise SystemExit(f"{label} build ({tree}): the compiled CPU kernels did not load")
        self.file = hello["file"]
        self.cases = hello["cases"]

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="folder from which the baseline build's ascood_kernels imports")
    ap.add_argument("--new", required=True, help="folder from which the build under test's ascood_kernels imports")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each worker (default 1)")
    ap.add_argument("--rounds", type=int, default=15, help="timed batches per case and build (median reported)")
    ap.add_argument("--min-batch-ms", type=float, default=30.0, help="each timed batch runs at least this long")
    ap.add_argument("--only", default="", help="comma-separated substrings: only cases whose name has one")
    args = ap.parse_args(argv)
    old, new = Build("old", args.old, args.threads), Build("new", args.new, args.threads)
    print(f"old: {old.file}\nnew: {new.file}\nthreads {args.threads}, {args.rounds} rounds, wall-clock medians\n")
    wanted = [c for c in old.cases if not args.only or any(s in c for s in args.only.split(","))]
    rows, worst = [], 0.0
    for case in wanted:
        d_old, d_new = old.ask(cmd="digest", case=case)["digest"], new.ask(cmd="digest", case=case)["digest"]
        if d_old != d_new:
            raise SystemExit(f"{case}: the builds' outputs differ ({d_old} vs {d_new})")
        once = old.ask(cmd="time", case=case, n=1)["seconds"]
        n = max(1, int(args.min_batch_ms / 1e3 / max(once, 1e-7)))
        for b in (old, new):  # warm-up batch
            b.ask(cmd="time", case=case, n=n)
        times = {"old": [], "new": []}
        for r in range(args.rounds):
            for b in ((old, new) if r % 2 == 0 else (new, old)):
                times[b.label].append(b.ask(cmd="time", case=case, n=n)["seconds"])
        t_old, t_new = statistics.median(times["old"]), statistics.median(times["new"])
        worst = max(worst, t_new / t_old)
        rows.append((case, t_old, t_new))
    old.close()
    new.close()
    print("| op (torch.ops.ascood, CPU) | old us/call | new us/call | new/old |")
    print("|---|---:|---:|---:|")
    for case, t_old, t_new in rows:
        print(f"| {case} | {t_old * 1e6:.1f} | {t_new * 1e6:.1f} | {t_new / t_old:.3f} |")
    print(f"\noutputs bit-identical in all {len(rows)} cases; worst new/old {worst:.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == WORKER_FLAG:
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
