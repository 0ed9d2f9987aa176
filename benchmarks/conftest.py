"""pytest-benchmark suite for the fused ops: providers side by side, one table.

Run:  pytest benchmarks/ --benchmark-only [--quick] [--bench-device cpu|cuda]
      [--bench-md FILE] [--benchmark-json FILE]
or    ascood bench [--quick] [--json FILE]

Every case records (op, shape, dtype, provider, bytes that must move); at the
end a table prints median/min/max, the speed-up over eager PyTorch on the same
case, and the effective bandwidth (bytes / median) as a fraction of the copy
bandwidth measured in the same run (a large tensor clone).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import pytest
import torch

if not torch.cuda.is_available():
    # Triton cases are not benchmarked without a GPU, but importing the package
    # registers its ops; keep the interpreter setting consistent with the tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    group = parser.getgroup("ascood")
    group.addoption("--quick", action="store_true", default=os.environ.get("ASCOOD_BENCH_QUICK") == "1",
                    help="small shapes, few rounds (CI smoke run; numbers are not meaningful)")
    group.addoption("--check-shapes", action="store_true", default=False,
                    help="only the shapes of the GPU check (128x3x32x32, 64x3x224x224, 4096x2048, 128x100)")
    group.addoption("--bench-device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="device to benchmark on (auto: cuda when available)")
    group.addoption("--bench-md", default=None, help="also write the summary table as markdown to this file")


def _device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda but no CUDA device is available")
    return torch.device(choice)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large clone (read + write), median of several runs."""
    n = (8 if quick else 64 if device.type == "cpu" else 256) * 2 ** 20  # float32 elements
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    times = []
    for _ in range(3 if quick else 12):
        sync(device)
        t0 = time.perf_counter()
        src.clone()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times[1:])


@pytest.fixture(scope="session")
def bench_env(request):
    config = request.config
    device = _device(config)
    quick = config.getoption("--quick")
    if not hasattr(config, "_ascood_bw"):
        config._ascood_bw = measure_copy_bandwidth(device, quick)
        config._ascood_device = device
    return {"device": device, "quick": quick, "rounds": (2 if quick else (15 if device.type == "cpu" else 100)),
            "warmup": (1 if quick else (2 if device.type == "cpu" else 10))}


def run(benchmark, bench_env, fn, *, op: str, shape, dtype, provider: str, nbytes: int):
    """Time ``fn`` (synchronised on GPU) and record what the summary table needs."""
    device = bench_env["device"]

    def timed():
        out = fn()
        sync(device)
        return out

    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op=op, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                                provider=provider, device=str(device), bytes=int(nbytes))
    benchmark.pedantic(timed, rounds=bench_env["rounds"], warmup_rounds=bench_env["warmup"], iterations=1)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def summary_rows(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return []
    entries = [b for b in bs.benchmarks if b.extra_info.get("op") and b.stats.data]
    bw = copy_bandwidth(config, entries)
    eager = {(b.extra_info["op"], b.extra_info["shape"], b.extra_info["dtype"]): b.stats.median
             for b in entries if b.extra_info["provider"] == "eager"}
    rows = []
    for b in entries:
        e = b.extra_info
        med = b.stats.median
        base = eager.get((e["op"], e["shape"], e["dtype"]))
        eff = e["bytes"] / med if med > 0 else float("nan")
        rows.append({
            "op": e["op"], "shape": e["shape"], "dtype": e["dtype"], "provider": e["provider"],
            "median_ms": med * 1e3, "min_ms": b.stats.min * 1e3, "max_ms": b.stats.max * 1e3,
            "speedup": (base / med) if base else float("nan"),
            "gbps": eff / 1e9, "of_copy_bw": (eff / bw) if (bw and e["bytes"]) else float("nan"),
            "note": e.get("note", ""),
        })
    return rows


def copy_bandwidth(config, entries) -> float | None:
    """The copy bandwidth the table compares with: the benchmarked clone when it ran
    (as many rounds as every other case), else the session fixture's quick estimate."""
    clones = [b for b in entries if b.extra_info["op"] == "copy (clone)"]
    if clones:
        config._ascood_bw = clones[0].extra_info["bytes"] / clones[0].stats.median
    return getattr(config, "_ascood_bw", None)


HEADER = ["op", "shape", "dtype", "provider", "median ms", "min ms", "max ms", "x eager", "GB/s", "% copy BW"]


def _fmt(r):
    def num(v, spec):
        return "-" if v != v else format(v, spec)
    return [r["op"], r["shape"], r["dtype"], r["provider"], num(r["median_ms"], ".3f"), num(r["min_ms"], ".3f"),
            num(r["max_ms"], ".3f"), num(r["speedup"], ".2f"), num(r["gbps"], ".1f"),
            num(100 * r["of_copy_bw"], ".0f")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = summary_rows(config)
    if not rows:
        return
    device = config._ascood_device
    bw = config._ascood_bw
    head = (f"ascood benchmark: {_machine(device)}; copy bandwidth (clone, read+write) {bw / 1e9:.1f} GB/s"
            f"{'; QUICK mode: numbers not meaningful' if config.getoption('--quick') else ''}")
    table = [HEADER] + [_fmt(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    terminalreporter.write_sep("=", "ascood: fused ops vs eager PyTorch and torch.compile")
    terminalreporter.write_line(head)
    for row in table:
        terminalreporter.write_line("  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in
                                              enumerate(zip(row, widths))))
    for line in step_summary(rows):
        terminalreporter.write_line(line)
    for r in rows:
        if r["note"]:
            terminalreporter.write_line(f"note [{r['op']} {r['shape']} {r['provider']}]: {r['note']}")
    md_path = config.getoption("--bench-md")
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"{head}\n\n| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n")
            for r in rows:
                f.write("| " + " | ".join(_fmt(r)) + " |\n")
            for line in step_summary(rows):
                f.write(f"\n{line}\n")


def step_summary(rows) -> list[str]:
    """Per model: ASCOOD step / CE step for each step row, and the outlier synthesis' share of the step."""
    out = []
    models = sorted({r["op"][len("train step "):] for r in rows if r["op"].startswith("train step ")})
    for model in models:
        med = {r["provider"]: r["median_ms"] for r in rows
               if r["op"] in (f"train step {model}", f"outlier synthesis {model}")}
        ce = med.get("CE step")
        parts = []
        for prov, step in med.items():
            if not ce or "step" not in prov or prov.startswith("CE step"):
                continue
            base = med.get("CE step (compile)", ce) if "compile" in prov else ce
            parts.append(f"{prov} / CE = {step / base:.2f}x")
        step = med.get("ASCOOD step (ours)")
        for synth in ("saliency + op (ours)", "op only (ours)"):
            if step and med.get(synth):
                parts.append(f"{synth} = {100 * med[synth] / step:.1f}% of ASCOOD step (ours)")
        eager_step, eager_op = med.get("ASCOOD step (eager)"), med.get("op only (eager)")
        if eager_step and eager_op:
            parts.append(f"op only (eager) = {100 * eager_op / eager_step:.1f}% of ASCOOD step (eager)")
        if parts:
            out.append(f"end-to-end {model}: " + "; ".join(parts))
    for op in ("i-ODIN batch", "ODIN batch"):
        by = {r["provider"]: r["median_ms"] for r in rows if r["op"] == op}
        if by.get("ours") and by.get("eager (authors)"):
            out.append(f"{op}: authors' eager / ours = {by['eager (authors)'] / by['ours']:.2f}x")
    return out
