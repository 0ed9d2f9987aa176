"""Post-hoc scorers on cached features: ascood beside pytorch-ood (and ascood before issue 22), same data.

    # the speed table, ascood and its peer interleaved in one process (medians, IQR, ratios); PAIRS below
    # holds one line per (ascood scorer, peer): add new scorers there
    python benchmarks/scorers_side_by_side.py ab --n 20000 --m 512 --classes 100 --queries 2000 --rounds 40
    # the per-scorer table: fit time, scoring samples/s, peak memory, rank agreement with pytorch-ood
    python benchmarks/scorers_side_by_side.py table --n 20000 --m 512 --classes 100 --queries 2000
    # the same rows from ascood as it was before (a checkout of main without issue 22's changes)
    python benchmarks/scorers_side_by_side.py table ... --before /path/to/old/checkout
    # ImageNet-1K-sized bank from a memory-mapped file: KNN / NNGuide / MDS / ViM fit and scoring
    python benchmarks/scorers_side_by_side.py big --n 1280000 --m 512 --classes 1000 --queries 256 --dir /tmp/bank
    # the scorers that need the images (ODIN, MDS with input preprocessing, GradNorm), images/s
    python benchmarks/scorers_side_by_side.py images --rounds 5

Every (library, scorer) runs in its own Python process: peak memory is that process's resident-set high
water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the fit) minus its resident set
at that moment, so it counts what the fit and the scoring allocate, not the data or the imports. Times are
medians (fit: of ``--rounds`` fits; scoring: of ``--rounds`` passes over the queries) of the process's CPU
time (``--clock cpu``, the default, with ``--threads 1``: what a shared, loaded machine still measures
fairly) or of wall-clock time (``--clock wall``). The data
are synthetic: non-negative class-structured features h (N, m) float32, labels, a linear head W (C, m), b,
logits = W h + b; queries are half ID-like, half shifted, and are given to each library in the form it
scores (logits, features, or (B, m, 1, 1) feature maps for pytorch-ood's ReAct / ASH / SCALE), prepared
outside the timing, as cached features are. Nothing is downloaded.

"before": ascood's pre-issue-22 scorers only took a model and a loader, so they get an ``ASCOODNet``
whose backbone is the identity on (B, m) inputs, with the same W, b, a loader of the same features
(batch 1000) for the fit, and scoring in batches of 1000 queries (the identity backbone costs nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

@dataclass
class Pair:
    """One row of the tables: ascood's scorer ``get_scorer(name, **kwargs)`` beside its peer.

    ``peer(D, fc, W, b)`` builds the peer detector (D = ``pytorch_ood.detector``, fc = the head as a frozen
    ``torch.nn.Linear``, W (C, m), b (C,)), or None for a scorer without one. ``takes``: what the peer
    scores, "logits", "features" or "maps" ((B, m, 1, 1) feature maps); ``fit``: how it is fitted, None,
    "logits" (``fit_logits(logits)``), "logits+labels", "features+labels" (``fit_features(h, y)``) or
    "maps+labels" (``fit_feature_maps``). Same hyperparameters on both sides.
    """

    kwargs: dict
    peer: Callable | None = None
    takes: str = "logits"
    fit: str | None = None


class Normalised:
    """A peer detector fed L2-normalised features (e.g. pytorch-ood's Mahalanobis as Mahalanobis++)."""

    def __init__(self, det) -> None:
        self.det = det

    @staticmethod
    def _n(h):
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def fit_features(self, h, y):
        return self.det.fit_features(self._n(h), y)

    def predict_features(self, h):
        return self.det.predict_features(self._n(h))


# One line per (ascood scorer, peer). To add a scorer: its ascood name, kwargs, and the peer's constructor.
PAIRS: dict[str, Pair] = {
    "msp": Pair({}, lambda D, fc, W, b: D.MaxSoftmax(None)),
    "tempscale": Pair({}, lambda D, fc, W, b: D.TemperatureScaling(None), fit="logits+labels"),
    "ebo": Pair({}, lambda D, fc, W, b: D.EnergyBased(None)),
    "mls": Pair({}, lambda D, fc, W, b: D.MaxLogit(None)),
    "gen": Pair({"gamma": 0.1, "M": 100}, lambda D, fc, W, b: D.GEN(None, gamma=0.1, M=100)),
    "entropy": Pair({}, lambda D, fc, W, b: D.Entropy(None)),
    "klm": Pair({}, lambda D, fc, W, b: D.KLMatching(None), fit="logits"),
    "react": Pair({"percentile": 90}, lambda D, fc, W, b: D.ReAct(None, _maps_head(fc), percentile=0.9), "maps",
                  "maps+labels"),
    "ash": Pair({"percentile": 90}, lambda D, fc, W, b: D.ASH(None, _maps_head(fc), variant="ash-b", percentile=0.9),
                "maps"),
    "scale": Pair({"percentile": 85}, lambda D, fc, W, b: D.SCALE(None, _maps_head(fc), percentile=0.85), "maps"),
    "dice": Pair({"p": 90}, lambda D, fc, W, b: D.DICE(None, W, b, p=0.9), "features", "features+labels"),
    "gradnorm": Pair({}),
    "knn": Pair({"K": 50}, lambda D, fc, W, b: D.KNN(None, k=50), "features", "features+labels"),
    "mds": Pair({}, lambda D, fc, W, b: D.Mahalanobis(None), "features", "features+labels"),
    "rmds": Pair({}, lambda D, fc, W, b: D.RMD(None), "features", "features+labels"),
    "vim": Pair({"dim": 256}, lambda D, fc, W, b: D.ViM(None, d=256, w=W, b=b), "features", "features+labels"),
    "nnguide": Pair({"K": 100, "bank": "all"}, lambda D, fc, W, b: D.NNGuide(None, fc, k=100), "features",
                    "features+labels"),
    "relation": Pair({}),
    "she": Pair({}, lambda D, fc, W, b: D.SHE(None, fc), "features", "features+labels"),
    # Issue 32's new scorers: pytorch-ood 0.4.0 has fDBD and NCI; Mahalanobis++ is its Mahalanobis on
    # L2-normalised features (the paper's definition); NECO and AdaSCALE have no pytorch-ood peer.
    "fdbd": Pair({}, lambda D, fc, W, b: D.fDBD(None, fc), "features", "features+labels"),
    "nci": Pair({"alpha": 0.0001}, lambda D, fc, W, b: D.NCI(None, fc, alpha=0.0001), "features", "features+labels"),
    "mdspp": Pair({}, lambda D, fc, W, b: Normalised(D.Mahalanobis(None)), "features", "features+labels"),
    "neco": Pair({}),
}

# ascood name -> (ascood kwargs, peer name or None): the per-process table's view of PAIRS
SCORERS = {name: (pair.kwargs, name if pair.peer else None) for name, pair in PAIRS.items()}


def _maps_head(fc):
    return lambda x: fc(x.flatten(1))


# ----------------------------------------------------------------------------------------------- data
def make_data(n: int, m: int, classes: int, queries: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, m, generator=g) * 2
    y = torch.arange(n) % classes
    h = (centres[y] + torch.randn(n, m, generator=g)).relu()
    # A nearest-class-mean head, scaled: accurate but not perfect on h (SHE needs correct samples per class).
    W = centres * 0.05
    b = -0.025 * (centres * centres).sum(1)
    qy = torch.arange(queries) % classes
    q = (centres[qy] + torch.randn(queries, m, generator=g)).relu()
    q[queries // 2:] = (torch.randn(queries - queries // 2, m, generator=g) * 1.5 + 0.5).relu()  # OOD-like
    return h, y, W, b, q


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``: heap, tensors; not the pages of memory-mapped files,
    which ``VmHWM`` would count) above its value at start, sampled every 2 ms by a thread."""

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_kb("RssAnon")
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_kb("RssAnon"))

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kb("RssAnon"))

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 1024


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _rss_kb("VmRSS")


# ----------------------------------------------------------------------------------------------- adapters
def ascood_adapter(name: str, kw: dict, h, y, W, b):
    import torch  # noqa: F401

    from ascood.scoring.scorers import Features, LinearHead, features_scores, get_scorer

    head = LinearHead(W, b)
    train = Features(h @ W.T + b, h, y, head)
    sc = get_scorer(name, **kw)

    def fit():
        sc.fit_features(train)

    def prepare(q):  # the cached query features: logits and features, outside the timing
        return Features(q @ W.T + b, q, None, head)

    def score(queries):
        return features_scores(sc, queries)[1]

    return fit, score, prepare


def before_adapter(name: str, kw: dict, h, y, W, b):
    """ascood as it was: model + loader only (identity backbone on (B, m) inputs)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import ascood
    from ascood.scoring.scorers import get_scorer

    class Identity(nn.Module):
        feature_dim = h.shape[1]

        def forward(self, x):
            return x

    model = ascood.ASCOODNet(Identity(), W.shape[0], head="linear").eval()
    with torch.no_grad():
        model.fc.weight.copy_(W)
        model.fc.bias.copy_(b)
    kw = {k: v for k, v in kw.items() if k != "bank"}  # no bank choice before: its random 1% was the only one
    sc = get_scorer(name, **kw)
    loader = DataLoader(TensorDataset(h, y), batch_size=1000)

    def fit():
        if sc.needs_fit:
            sc.fit(model, loader)

    def score(q):
        return torch.cat([sc.score(model, q[i:i + 1000])[1] for i in range(0, len(q), 1000)])

    return fit, score, lambda q: q  # the model path: images (here the features themselves) in


def pood_adapter(name: str, h, y, W, b):
    import torch
    from pytorch_ood import detector as D

    pair = PAIRS[name]
    fc = torch.nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        fc.weight.copy_(W)
        fc.bias.copy_(b)
    fc.requires_grad_(False)
    logits = (h @ W.T + b)
    det = pair.peer(D, fc, W, b)
    kind = pair.takes

    def fit():
        if pair.fit == "logits+labels":
            det.fit_logits(logits, y)
        elif pair.fit == "logits":
            det.fit_logits(logits)
        elif pair.fit == "maps+labels":
            det.fit_feature_maps(h[:, :, None, None], y)
        elif pair.fit == "features+labels":
            det.fit_features(h, y)

    def prepare(q):  # what the detector takes, outside the timing
        return q @ W.T + b if kind == "logits" else q[:, :, None, None] if kind == "maps" else q

    def score(queries):
        with torch.no_grad():
            if kind == "logits":
                s = det.predict_logits(queries)
            elif kind == "maps":
                s = det.predict_feature_maps(queries)
            else:
                s = det.predict_features(queries)
        return -s.double()  # outlier score -> higher = more ID

    return fit, score, prepare


def one(args) -> None:
    """Child process: fit + score one (library, scorer); prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    h, y, W, b, q = make_data(args.n, args.m, args.classes, args.queries)
    kw = SCORERS[args.scorer][0]
    if args.lib == "pytorch-ood":
        fit, score, prepare = pood_adapter(args.scorer, h, y, W, b)
    elif args.lib == "before":
        fit, score, prepare = before_adapter(args.scorer, kw, h, y, W, b)
    else:
        fit, score, prepare = ascood_adapter(args.scorer, kw, h, y, W, b)
    q = prepare(q)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rss0 = _reset_peak()
    fit_times, score_times = [], []
    with torch.no_grad():
        for _ in range(args.rounds):
            t0 = clock()
            fit()
            fit_times.append(clock() - t0)
        for _ in range(args.rounds):
            t0 = clock()
            s = score(q)
            score_times.append(clock() - t0)
    peak = _rss_kb("VmHWM") - rss0
    np.save(args.scores_out, s.double().numpy())
    print(json.dumps({"fit_ms": 1000 * statistics.median(fit_times), "score_ms": 1000 * statistics.median(score_times),
                      "peak_mb": peak / 1024}))


def _child(lib: str, scorer: str, args, scores_out: str, pythonpath: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "_one", "--lib", lib, "--scorer", scorer, "--n", str(args.n),
           "--m", str(args.m), "--classes", str(args.classes), "--queries", str(args.queries), "--rounds",
           str(args.rounds), "--threads", str(args.threads), "--clock", args.clock, "--scores-out", scores_out]
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {lib} {scorer} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def table(args) -> None:
    libs = [("ascood", ROOT)] + ([("pytorch-ood", ROOT)]) + ([("before", args.before)] if args.before else [])
    print(f"n={args.n} m={args.m} classes={args.classes} queries={args.queries} rounds={args.rounds} "
          f"threads={args.threads} clock={args.clock}; load average before: {os.getloadavg()}", flush=True)
    head = ["scorer", "ascood fit ms", "ascood samples/s", "ascood peak MiB", "pytorch-ood fit ms",
            "pytorch-ood samples/s", "pytorch-ood peak MiB", "Spearman vs pytorch-ood"]
    if args.before:
        head += ["before fit ms", "before samples/s", "before peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (args.only or SCORERS):
            res = {}
            for lib, path in libs:
                if lib == "pytorch-ood" and SCORERS[name][1] is None:
                    continue
                if lib == "before" and name in ("dice", "gradnorm", "entropy", "klm", "she", "mdspp", "fdbd", "nci",
                                                "neco"):
                    continue  # did not exist
                out = os.path.join(tmp, f"{lib}-{name}.npy")
                r = _child(lib, name, args, out, path)
                if r is not None:
                    r["scores"] = np.load(out)
                    res[lib] = r
            rows[name] = res

            def cells(lib):
                r = res.get(lib)
                if r is None:
                    return ["-", "-", "-"]
                return [f"{r['fit_ms']:.1f}", f"{args.queries / (r['score_ms'] / 1000):,.0f}", f"{r['peak_mb']:.1f}"]

            rho = (f"{_spearman(res['ascood']['scores'], res['pytorch-ood']['scores']):.4f}"
                   if "ascood" in res and "pytorch-ood" in res else "-")
            row = [name] + cells("ascood") + cells("pytorch-ood") + [rho] + (cells("before") if args.before else [])
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- A/B in one process
def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _interleaved(fns: dict, rounds: int, max_s: float, clock) -> dict[str, list[float]]:
    """Each callable run ``rounds`` times, interleaved (the order flips every round, so a drift in the
    machine's load hits both sides alike), stopping early once a side has used ``max_s`` seconds (after
    at least 3 rounds). Returns each side's times in seconds."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            fns[k]()
            times[k].append(clock() - t0)
        if r >= 2 and max(sum(t) for t in times.values()) > max_s:
            break
    return times


def _q(xs: list[float], f: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(f * (len(xs) - 1))))]


def ab(args) -> None:
    """ascood and its peer in one process, interleaved: fit ms and cached-scoring rows/s, medians with the
    interquartile range, and the ratios (ascood's rate / the peer's; the peer's fit time / ascood's: > 1
    means ascood is faster). Memory is the ``table`` mode's (one process per library)."""
    import torch

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    h, y, W, b, q = make_data(args.n, args.m, args.classes, args.queries)
    print(f"n={args.n} m={args.m} classes={args.classes} queries={args.queries} rounds={args.rounds} "
          f"fit_rounds={args.fit_rounds} threads={args.threads} clock={args.clock}; medians [p25-p75]; "
          f"load average before: {os.getloadavg()}", flush=True)
    head = ["scorer", "ascood fit ms", "peer fit ms", "fit: peer / ascood", "ascood rows/s", "peer rows/s",
            "rate: ascood / peer", "Spearman"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(lines[0] + "\n" + lines[1], flush=True)
    for name in args.only or PAIRS:
        pair = PAIRS[name]
        sides = {"ascood": ascood_adapter(name, pair.kwargs, h, y, W, b)}
        if pair.peer is not None:
            sides["peer"] = pood_adapter(name, h, y, W, b)
        queries = {k: prep(q) for k, (_, _, prep) in sides.items()}
        out = {}
        with torch.no_grad():
            for fit, _, _ in sides.values():  # warm-up (and the fitted state the scoring uses)
                fit()
            fits = _interleaved({k: v[0] for k, v in sides.items()}, args.fit_rounds, args.max_seconds, clock)
            for k, (_, score, _) in sides.items():
                out[k] = score(queries[k])  # warm-up, and the scores compared
            scores = _interleaved({k: (lambda sc=v[1], qq=queries[k]: sc(qq)) for k, v in sides.items()},
                                  args.rounds, args.max_seconds, clock)

        def fit_cell(k):
            if k not in fits or not PAIRS_NEEDS_FIT.get(name, True):
                return "-"
            t = fits[k]
            return f"{1e3 * statistics.median(t):.1f} [{1e3 * _q(t, .25):.1f}-{1e3 * _q(t, .75):.1f}]"

        def rate_cell(k):
            if k not in scores:
                return "-"
            t = scores[k]
            return (f"{_fmt_rate(args.queries / statistics.median(t))} [{_fmt_rate(args.queries / _q(t, .75))}-"
                    f"{_fmt_rate(args.queries / _q(t, .25))}]")

        both = "peer" in sides
        fit_ratio = (f"{statistics.median(fits['peer']) / statistics.median(fits['ascood']):.2f}"
                     if both and PAIRS_NEEDS_FIT.get(name, True) else "-")
        rate_ratio = (f"{statistics.median(scores['peer']) / statistics.median(scores['ascood']):.2f}" if both else "-")
        rho = f"{_spearman(out['ascood'].double().numpy(), out['peer'].double().numpy()):.4f}" if both else "-"
        row = [name, fit_cell("ascood"), fit_cell("peer"), fit_ratio, rate_cell("ascood"), rate_cell("peer"),
               rate_ratio, rho]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


#: Scorers whose fit is a no-op on one side or both (no fit column).
PAIRS_NEEDS_FIT = {k: False for k in ("msp", "ebo", "mls", "gen", "entropy", "ash", "scale", "gradnorm")}


# ----------------------------------------------------------------------------------------------- images
def images(args) -> None:
    """The scorers that need the images (input gradients): ascood vs pytorch-ood, images/s on a small CNN."""
    print(f"threads={args.threads} clock={args.clock}; load average before: {os.getloadavg()}", flush=True)
    print("| scorer (small_cnn, batch 128x3x32x32) | ascood images/s | ascood peak MiB | pytorch-ood images/s | "
          "pytorch-ood peak MiB | Spearman |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("odin", "mds_eps", "gradnorm"):
            res = {}
            for lib in ("ascood", "pytorch-ood"):
                out = os.path.join(tmp, f"{lib}-{name}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), "_images_one", "--lib", lib, "--scorer", name,
                       "--rounds", str(args.rounds), "--threads", str(args.threads), "--clock", args.clock,
                       "--scores-out", out]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
                if proc.returncode:
                    print(f"  {lib} {name} failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                    continue
                res[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
                res[lib]["scores"] = np.load(out)
            cells = [name]
            for lib in ("ascood", "pytorch-ood"):
                r = res.get(lib)
                cells += ["-", "-"] if r is None else [f"{128 / (r['score_ms'] / 1000):,.0f}", f"{r['peak_mb']:.1f}"]
            cells.append(f"{_spearman(res['ascood']['scores'], res['pytorch-ood']['scores']):.4f}"
                         if len(res) == 2 else "-")
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def images_one(args) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import ascood
    from ascood.scoring.scorers import get_scorer

    torch.set_num_threads(args.threads)
    std = [0.2470, 0.2435, 0.2616]
    torch.manual_seed(0)
    model = ascood.build_model("small_cnn", 10, in_channels=3, head="linear", input_mean=[0.0] * 3,
                               input_std=std).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 32, 32, generator=g)
    train = TensorDataset(torch.randn(512, 3, 32, 32, generator=g), torch.arange(512) % 10)
    if args.lib == "ascood":
        sc = {"odin": lambda: get_scorer("odin", temperature=1000, eps=0.0014, std=std),
              "mds_eps": lambda: get_scorer("mds", eps=0.0014, std=std),
              "gradnorm": lambda: get_scorer("gradnorm")}[args.scorer]()
        if sc.needs_fit:
            sc.fit(model, DataLoader(train, batch_size=128))

        def score():
            return sc.score(model, x)[1].double()
    else:
        from pytorch_ood import detector as D

        if args.scorer == "odin":
            det = D.ODIN(model, eps=0.0014, temperature=1000.0, norm_std=std)
        elif args.scorer == "mds_eps":
            det = D.MahalanobisODIN(model.features, eps=0.0014, norm_std=std)
            with torch.no_grad():
                det.fit_features(model.features(train.tensors[0]), train.tensors[1])
        else:
            det = D.GradNorm(model, param_filter=lambda n: n == "fc.weight")

        def score():
            return -det.predict(x).double()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    score()
    rss0 = _reset_peak()
    times = []
    for _ in range(args.rounds):
        t0 = clock()
        s = score()
        times.append(clock() - t0)
    np.save(args.scores_out, s.detach().numpy())
    print(json.dumps({"score_ms": 1000 * statistics.median(times), "peak_mb": (_rss_kb("VmHWM") - rss0) / 1024}))


# ----------------------------------------------------------------------------------------------- big bank
def big(args) -> None:
    """KNN / NNGuide (whole bank) / MDS / ViM fitted from a memory-mapped N x m file, in one process each.

    Peak memory here is anonymous memory (:class:`AnonPeak`): the file's pages the kernel maps in are page
    cache, shared and reclaimable, not the fit's own allocations."""
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.dir, "train.json")):
        t0 = time.perf_counter()
        _write_bank(args)
        print(f"wrote the {args.n} x {args.m} bank in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    print(f"threads={args.threads} clock={args.clock}")
    print("| scorer | fit s | fit wall s | fit peak MiB (anon) | score ms / query | scoring peak MiB (anon) | notes |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or ("knn", "nnguide", "mds", "vim"):
        cmd = [sys.executable, os.path.abspath(__file__), "_big_one", "--scorer", name, "--dir", args.dir,
               "--queries", str(args.queries), "--threads", str(args.threads), "--clock", args.clock]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['fit_s']:.1f} | {r['fit_wall_s']:.1f} | {r['fit_peak_mb']:.0f} | "
              f"{r['score_ms_per_query']:.2f} | "
              f"{r['score_peak_mb']:.0f} | {r['notes']} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def _write_bank(args) -> None:
    """train.* files in the extract_features format, written 65536 rows at a time (bounded RAM)."""
    import torch

    from ascood.files import write_json

    g = torch.Generator().manual_seed(0)
    centres = torch.rand(args.classes, args.m, generator=g) * 2
    W = torch.randn(args.classes, args.m, generator=g) / args.m ** 0.5 + centres / args.m
    b = torch.randn(args.classes, generator=g) * 0.1
    torch.save({"W": W, "b": b, "centres": centres}, os.path.join(args.dir, "head.pt"))
    names = {"features": "train.features.bin", "logits": "train.logits.bin", "labels": "train.labels.bin"}
    files = {k: open(os.path.join(args.dir, v), "wb") for k, v in names.items()}
    for start in range(0, args.n, 65536):
        stop = min(args.n, start + 65536)
        y = torch.arange(start, stop) % args.classes
        h = (centres[y] + torch.randn(stop - start, args.m, generator=g)).relu()
        files["features"].write(h.numpy().astype("<f4").tobytes())
        files["logits"].write((h @ W.T + b).numpy().astype("<f4").tobytes())
        files["labels"].write(y.numpy().astype("<i8").tobytes())
    for f in files.values():
        f.close()
    write_json({"format": "ascood-features-v1", "n": args.n, "batch_size": None, "arrays": {
        "features": {"file": names["features"], "shape": [args.n, args.m], "dtype": "<f4"},
        "logits": {"file": names["logits"], "shape": [args.n, args.classes], "dtype": "<f4"},
        "labels": {"file": names["labels"], "shape": [args.n], "dtype": "<i8"}}},
        os.path.join(args.dir, "train.json"))


def big_one(args) -> None:
    import torch

    from ascood.scoring.scorers import Features, LinearHead, features_scores, get_scorer

    torch.set_num_threads(args.threads)
    hd = torch.load(os.path.join(args.dir, "head.pt"))
    head = LinearHead(hd["W"], hd["b"])
    train = Features.load(args.dir, "train", head=head)
    m = train.features.shape[1]
    g = torch.Generator().manual_seed(1)
    qy = torch.arange(args.queries) % hd["W"].shape[0]
    q = (hd["centres"][qy] + torch.randn(args.queries, m, generator=g)).relu()
    queries = Features(q @ hd["W"].T + hd["b"], q, None, head)
    kw = {"knn": {"K": 50}, "nnguide": {"K": 100, "bank": "all"}, "mds": {}, "vim": {"dim": 256}}[args.scorer]
    sc = get_scorer(args.scorer, **kw)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with AnonPeak() as fit_mem:
        t0, w0 = clock(), time.perf_counter()
        sc.fit_features(train)
        fit_s, fit_wall = clock() - t0, time.perf_counter() - w0
    with AnonPeak() as score_mem:
        t0 = clock()
        features_scores(sc, queries, rows=args.queries)
        score_s = clock() - t0
    fit_peak, score_peak = fit_mem.mib * 1024, score_mem.mib * 1024
    bank = getattr(sc, "bank", None) if args.scorer == "knn" else getattr(sc, "bank_rows", None)
    notes = (f"chunk_rows {sc.chunk_rows}" if bank is None else
             f"bank {bank.n} x {bank.width} kept normalised in RAM ({bank.nbytes / 2 ** 20:.0f} MiB)" if bank.resident
             else f"bank {bank.n} x {bank.width} streamed from the file in {bank.chunk}-row blocks")
    print(json.dumps({"fit_s": fit_s, "fit_wall_s": fit_wall, "fit_peak_mb": fit_peak / 1024,
                      "score_ms_per_query": 1000 * score_s / args.queries,
                      "score_peak_mb": score_peak / 1024, "notes": notes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["table", "ab", "big", "images", "_one", "_big_one", "_images_one"])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fit-rounds", type=int, default=5, help="ab: fits per side")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="ab: stop a pair's rounds after this much time "
                    "on one side (at least 3 rounds)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None)
    ap.add_argument("--before", help="PYTHONPATH of an ascood checkout without issue 22 (the 'before' columns)")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ascood-bank"))
    ap.add_argument("--lib")
    ap.add_argument("--scorer")
    ap.add_argument("--scores-out")
    args = ap.parse_args()
    {"table": table, "ab": ab, "big": big, "images": images, "_one": one, "_big_one": big_one,
     "_images_one": images_one}[args.mode](args)


if __name__ == "__main__":
    main()
