"""The feature store's cost: extraction images/s of the bundled demo model, and its size per million images.

    nice -n 10 python benchmarks/feature_store.py                 # 1 CPU thread, 5 repeats, 20,000 images
    python benchmarks/feature_store.py --threads 2 --images 50000

1. Extraction on one CPU process (``torch.set_num_threads(--threads)``) of the demo's network (``small_cnn``,
   width 16, the "conventional" bundled setting at 8x8 px, 10 classes, untrained: speed does not depend on the
   weights) over --images images (the bundled training digits tiled), three ways, interleaved per repeat,
   medians reported: plain :func:`extract_features` into RAM (the cache without a store), a first extraction
   into an empty :class:`FeatureStore` (forward + safetensors shards + checksums + fsync), and a second
   command's read of the stored split (verify every shard's sha256 in a fresh process state, then read every
   row chunk by chunk as a fit does).
2. The store's size per million images, float32 and float16 features, for the demo's widths and for
   ResNet-50's (2048 features, 1000 logits): bytes per row = 4 C + (4 or 2) m + 8 (labels), plus one
   safetensors header per shard. The arithmetic is checked against real shards written here (a full shard of
   --shard-rows rows of each shape: its data section must equal the arithmetic exactly; the header bytes
   measured are added per shard).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascood.data.bundled import load_bundled  # noqa: E402
from ascood.nets.registry import build_model  # noqa: E402
from ascood.scoring import shardfiles  # noqa: E402
from ascood.scoring.scorers import extract_features  # noqa: E402
from ascood.scoring.store import FeatureStore, StoreFeatureCache  # noqa: E402


def demo_data(n: int) -> tuple[torch.nn.Module, TensorDataset]:
    bench = load_bundled("conventional", seed=0, image_size=8)
    x, y = bench.train.tensors
    x = bench.normalize(x)
    reps = -(-n // len(x))
    x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
    torch.manual_seed(0)
    model = build_model("small_cnn", bench.num_classes, in_channels=bench.in_channels, width=16).eval()
    return model, TensorDataset(x.contiguous(), y.contiguous())


def time_extraction(model, ds, batch_size: int, shard_rows: int, repeats: int) -> dict[str, list[float]]:
    out = {"plain extract_features (RAM)": [], "store: first extraction": [], "store: later read (verify + read)": []}
    loader = DataLoader(ds, batch_size=batch_size)
    n = len(ds)
    for _ in range(repeats):
        t0 = time.perf_counter()
        extract_features(model, loader)
        out["plain extract_features (RAM)"].append(n / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory(prefix="ascood-store-bench.") as root:
            store = FeatureStore(root, shard_rows=shard_rows, log=lambda _: None)
            t0 = time.perf_counter()
            StoreFeatureCache(model, store).get(loader)
            out["store: first extraction"].append(n / (time.perf_counter() - t0))
            shardfiles._VERIFIED.clear()  # as a new process: every shard is hashed again
            shardfiles.clear_maps()
            t0 = time.perf_counter()
            cache = StoreFeatureCache(model, store)
            feats = cache.get(loader)
            for _ in feats.chunks(4096):
                pass
            assert cache.extractions == 0
            out["store: later read (verify + read)"].append(n / (time.perf_counter() - t0))
    return out


def shard_bytes(classes: int, width: int, dtype: str, rows: int) -> tuple[int, int]:
    """(data bytes, whole file bytes) of a real shard of ``rows`` rows written by the store."""
    arith = rows * (4 * classes + np.dtype(dtype).itemsize * width + 8)
    with tempfile.TemporaryDirectory(prefix="ascood-store-size.") as root:
        from ascood.scoring.store import SplitKey

        store = FeatureStore(root, shard_rows=rows, features_dtype=dtype, log=lambda _: None)
        key = SplitKey("state:x", "f", "p", "l", dtype, rows, label="size")
        entry = store.split(key)
        rng = np.random.default_rng(0)
        entry.write_shard(0, {"logits": rng.standard_normal((rows, classes), np.float32),
                              "features": rng.standard_normal((rows, width), np.float32),
                              "labels": rng.integers(0, classes, rows)})
        hdr = shardfiles.read_shard_header(entry.shard_path(0))
        data = hdr.size - hdr.data_start
        if data != arith:
            raise AssertionError(f"shard data {data} bytes, arithmetic {arith}")
        return data, hdr.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ds = demo_data(args.images)
    with torch.no_grad():
        m = model.features(ds.tensors[0][:1]).shape[1]
    classes = int(model.num_classes)
    print(f"torch {torch.__version__}, {args.threads} thread(s); demo model small_cnn width 16 "
          f"({m} features, {classes} logits), {args.images} images of 1x8x8, batch {args.batch_size}, "
          f"shards of {args.shard_rows} rows, {args.repeats} repeats (medians)")
    times = time_extraction(model, ds, args.batch_size, args.shard_rows, args.repeats)
    for name, v in times.items():
        print(f"  {name:36s} {statistics.median(v):>10,.0f} images/s  (min {min(v):,.0f}, max {max(v):,.0f})")
    print(f"size per million images (shards of {args.shard_rows} rows; bytes/row = 4 C + itemsize m + 8):")
    per_shard = -(-10 ** 6 // args.shard_rows)
    for label, c, w in (("demo small_cnn", classes, m), ("ResNet-50", 1000, 2048)):
        for dtype in ("float32", "float16"):
            data, whole = shard_bytes(c, w, dtype, args.shard_rows)
            row = 4 * c + np.dtype(dtype).itemsize * w + 8
            total = 10 ** 6 * row + per_shard * (whole - data)
            print(f"  {label:15s} C={c:<5d} m={w:<5d} {dtype}: {row:>6d} B/row -> {total / 1e9:7.3f} GB per 1M images "
                  f"({total / 2 ** 30:6.3f} GiB; checked: a real {args.shard_rows}-row shard is {whole:,} bytes, "
                  f"{whole - data} of them header)")


if __name__ == "__main__":
    main()
