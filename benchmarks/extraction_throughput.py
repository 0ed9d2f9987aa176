"""Feature extraction images/s through the feature store: one process vs N torchrun processes (CPU, gloo).

    python benchmarks/extraction_throughput.py --images 1024 --model resnet18_32x32 --size 32 --repeats 3

Writes ``--images`` random 32x32 PNGs (an image list) into a scratch folder, then for each configuration
extracts the whole split into a fresh feature store and reports the median images/s over ``--repeats``:

* ``1 process, 1 thread`` and ``1 process, T threads`` (T = --threads, default the CPU count): one
  :class:`~ascood.scoring.store.StoreFeatureCache` pass, as ``ascood eval`` runs it in one process;
* ``N processes x 1 thread``: ``torchrun --nproc_per_node N`` (gloo) running
  :class:`~ascood.scoring.distributed.ShardedFeatureCache`, as ``torchrun ... ascood eval`` does (rank r
  extracts missing shards r, r+N, ...); timed by rank 0 from the first barrier to the finalized entry,
  so process start-up and the torch import are not counted (they are in the wall time printed beside).

Image decoding and the model forward are both in the measured time (the loader runs in the extracting
process: --workers 0), as in an evaluation. Random weights: the cost of a forward does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images(folder: str, n: int, size: int) -> str:
    """n random RGB PNGs and an image list 'path 0' beside them; returns the list's path."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"img_{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        lines.append(f"{name} {i % 10}")
    path = os.path.join(folder, "list.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def build(args):
    """(model, loader) of the benchmark: random weights, the image list read as ``ascood eval`` reads it."""
    import torch

    from ascood.data import datasets as D
    from ascood.nets.registry import build_model

    torch.manual_seed(0)
    model = build_model(args.model, 10).eval()
    tf = D.build_transforms(args.size, [0.5] * 3, [0.25] * 3, train=False)
    ds = D.dataset_from_path(args.list, tf, train=False, fmt="list")
    return model, D.make_loader(ds, args.batch_size, train=False, workers=0)


def worker(args) -> None:
    """One torchrun rank (or the single process): extract the split into a fresh store, print the time."""
    import torch
    import torch.distributed as dist

    from ascood.scoring.distributed import Ranks, ShardedFeatureCache
    from ascood.scoring.store import FeatureStore, StoreFeatureCache

    torch.set_num_threads(args.threads)
    model, loader = build(args)
    ranks, started = Ranks.from_env("cpu")
    store = FeatureStore(args.store, shard_rows=args.shard_rows, log=lambda m: None)
    if ranks.enabled:
        cache = ShardedFeatureCache(model, store, ranks)
        dist.barrier()
    else:
        cache = StoreFeatureCache(model, store)
    t = time.perf_counter()
    feats = cache.get(loader)
    seconds = time.perf_counter() - t
    if ranks.is_main:
        print(f"RESULT {len(feats)} {seconds:.4f}", flush=True)
    if started:
        dist.destroy_process_group()


def run_config(args, procs: int, threads: int) -> tuple[float, float]:
    """(images/s, wall seconds including start-up) of one extraction with a fresh store."""
    store = tempfile.mkdtemp(prefix="store.", dir=args.scratch)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--list", args.list, "--store", store,
           "--model", args.model, "--size", str(args.size), "--batch-size", str(args.batch_size),
           "--shard-rows", str(args.shard_rows), "--threads", str(threads)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    shutil.rmtree(store, ignore_errors=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")), None)
    if res.returncode or line is None:
        raise SystemExit(f"failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    n, seconds = line.split()[1:]
    return int(n) / float(seconds), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--model", default="resnet18_32x32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--procs", default="2", help="comma-separated process counts for torchrun (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scratch", help="folder for the images and stores (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--list", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    own = args.scratch is None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="ascood-extract-bench.")
    try:
        args.list = make_images(os.path.join(args.scratch, "images"), args.images, args.size)
        configs = [("1 process, 1 thread", 1, 1)]
        if args.threads > 1:
            configs.append((f"1 process, {args.threads} threads", 1, args.threads))
        configs += [(f"{n} processes x 1 thread (torchrun, gloo)", n, 1) for n in map(int, args.procs.split(","))]
        print(f"{args.images} images {args.size}x{args.size}, {args.model}, batch {args.batch_size}, shards of "
              f"{args.shard_rows} rows; median of {args.repeats} (interleaved)")
        results: dict[str, list] = {name: [] for name, _, _ in configs}
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every configuration alike
            for name, procs, threads in configs:
                results[name].append(run_config(args, procs, threads))
        for name, _, _ in configs:
            rates = [r for r, _ in results[name]]
            walls = [w for _, w in results[name]]
            print(f"  {name:40s} {statistics.median(rates):8.1f} images/s  (runs {', '.join(f'{r:.1f}' for r in rates)};"
                  f" wall with start-up {statistics.median(walls):.1f} s)")
    finally:
        if own:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
