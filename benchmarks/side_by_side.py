"""Rough side-by-side ratios in one process, robust to a loaded machine.

    python benchmarks/side_by_side.py [--threads 1] [--rounds 11] [--only ops|step|scorer]

Times each case by the calling thread's CPU time (``time.thread_time``), median
of ``--rounds`` after a warm-up, single-threaded by default: on a machine
shared with other jobs this keeps the *ratios* between providers meaningful
where wall-clock medians are not (a parallel region waits for its slowest,
descheduled thread). The pytest-benchmark suite (``pytest benchmarks/``) stays
the reference on a quiet machine. Every pair is checked for equal outputs
first (as in the suite). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eager  # noqa: E402

import ascood_kernels as ak  # noqa: E402
from ascood_kernels.ops.permutations import draw_permutations  # noqa: E402


def cpu_ms(fn, rounds: int) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def _compiled(fn):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


def ops(rounds: int, with_compile: bool = False) -> None:
    if with_compile:
        shuffle_c, loss_c = _compiled(eager.shuffle_outlier_eager), _compiled(eager.ascood_loss_eager)
        print("| op | shape | torch.compile ms | eager ms | ours (call) ms | ours / compile speed-up |")
        print("|---|---|---|---|---|---|")
        for shape in [(128, 3, 32, 32), (256, 3, 32, 32), (32, 3, 224, 224), (64, 3, 224, 224)]:
            x, sal = torch.randn(shape), torch.randn(shape).abs()
            c = cpu_ms(lambda: shuffle_c(x, sal, 0.15), rounds)
            e = cpu_ms(lambda: eager.shuffle_outlier_eager(x, sal, 0.15), rounds)
            w = cpu_ms(lambda: ak.shuffle_outlier(x, sal, 0.15, backend="cpu"), rounds)
            print(f"| shuffle_outlier | {'x'.join(map(str, shape))} | {c:.2f} | {e:.2f} | {w:.2f} | {c / w:.2f} |")
        for B, C in [(128, 10), (128, 100), (256, 1000), (1024, 1000)]:
            zi, zo = torch.randn(B, C, requires_grad=True), torch.randn(B, C, requires_grad=True)
            y = torch.randint(0, C, (B,))
            c = cpu_ms(lambda: torch.autograd.grad(loss_c(zi, y, zo, 1.0), (zi, zo)), 3 * rounds)
            e = cpu_ms(lambda: torch.autograd.grad(eager.ascood_loss_eager(zi, y, zo, 1.0), (zi, zo)), 3 * rounds)
            o = cpu_ms(lambda: torch.autograd.grad(ak.ascood_loss(zi, y, zo, 1.0, backend="cpu"), (zi, zo)),
                       3 * rounds)
            print(f"| ascood_loss fwd+bwd | {B}x{C} | {c:.3f} | {e:.3f} | {o:.3f} | {c / o:.2f} |")
        print()
    print("| shuffle_outlier fp32 (p 0.15) | eager ms | ours (call) ms | x eager | ours (kernel, given perm) ms | "
          "x eager | permutation draw ms | clone ms | kernel / (1.5 x clone) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in [(128, 3, 32, 32), (256, 3, 32, 32), (32, 3, 224, 224), (64, 3, 224, 224)]:
        x, sal = torch.randn(shape), torch.randn(shape).abs()
        B, P = shape[0], shape[2] * shape[3]
        npix = int(0.15 * P)
        cpu = torch.device("cpu")
        perm = draw_permutations(B, npix, None, cpu)
        assert torch.equal(torch.ops.ascood.shuffle_outlier(x, sal, 0.15, perm),
                           ak.reference.shuffle_outlier(x, sal, 0.15, perm))
        e = cpu_ms(lambda: eager.shuffle_outlier_eager(x, sal, 0.15), rounds)
        w = cpu_ms(lambda: ak.shuffle_outlier(x, sal, 0.15, backend="cpu"), rounds)
        k = cpu_ms(lambda: torch.ops.ascood.shuffle_outlier(x, sal, 0.15, perm), rounds)
        a = cpu_ms(lambda: draw_permutations(B, npix, None, cpu), rounds)
        c = cpu_ms(lambda: x.clone(), rounds)
        print(f"| {'x'.join(map(str, shape))} | {e:.2f} | {w:.2f} | {e / w:.2f} | {k:.2f} | {e / k:.2f} | {a:.2f} | "
              f"{c:.2f} | {k / (1.5 * c):.2f} |")
    print("\n| ascood_loss fwd+bwd fp32 | eager ms | ours ms | x eager |")
    print("|---|---|---|---|")
    for B, C in [(128, 10), (128, 100), (256, 1000), (1024, 1000)]:
        zi = torch.randn(B, C, requires_grad=True)
        zo = torch.randn(B, C, requires_grad=True)
        y = torch.randint(0, C, (B,))
        for got, want in zip(torch.autograd.grad(ak.ascood_loss(zi, y, zo, 1.0, backend="cpu"), (zi, zo)),
                             torch.autograd.grad(eager.ascood_loss_eager(zi, y, zo, 1.0), (zi, zo))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        e = cpu_ms(lambda: torch.autograd.grad(eager.ascood_loss_eager(zi, y, zo, 1.0), (zi, zo)), 3 * rounds)
        o = cpu_ms(lambda: torch.autograd.grad(ak.ascood_loss(zi, y, zo, 1.0, backend="cpu"), (zi, zo)), 3 * rounds)
        print(f"| {B}x{C} | {e:.3f} | {o:.3f} | {e / o:.2f} |")


def step(rounds: int) -> None:
    import test_bench_step as S

    print("\n| model, batch | row | ms | / CE step |")
    print("|---|---|---|---|")
    for model in S.MODELS:
        rows = {}
        for row, ood, head, opts, use_eager in [
                ("CE step", "none", "linear", {}, False),
                ("ASCOOD step (ours)", "gradient", "zscore", {}, False),
                ("ASCOOD step (eager)", "gradient", "zscore", {}, True),
                ("ASCOOD shuffle step (ours)", "shuffle", "zscore", {}, False),
                ("ASCOOD step (ours, channels_last)", "gradient", "zscore", {"channels_last": True}, False)]:
            tr, x, y = S._setup(model, torch.device("cpu"), False, ood, head, **opts)
            with S.eager_ops() if use_eager else contextlib.nullcontext():
                rows[row] = cpu_ms(lambda: tr.train_step(x, y, 300.0), rounds)
            if row == "ASCOOD step (ours)":
                rows["saliency + op (ours)"] = cpu_ms(lambda: S.synthesize_outliers(
                    tr.saliency_model, x, y, ood_type="gradient", p_inv=0.1, alpha=300.0), rounds)
                grad = torch.randn_like(x) * 1e-3
                rows["op only (ours)"] = cpu_ms(lambda: ak.gradient_outlier(x, grad, 0.1, 300.0), rounds)
        for row, ms in rows.items():
            ratio = f"{ms / rows['CE step']:.2f}" if "step" in row else \
                f"{100 * ms / rows['ASCOOD step (ours)']:.1f}% of ASCOOD step (ours)"
            print(f"| {model}, {tuple(x.shape)[0]} | {row} | {ms:.1f} | {ratio} |")


def scorer(rounds: int) -> None:
    import test_bench_scorer as SC
    from ascood.scoring.scorers import get_scorer

    print("\n| scorer batch (small_cnn, 128x3x32x32) | authors' eager ms | ours ms | eager / ours |")
    print("|---|---|---|---|")
    model, x = SC._model_and_batch(torch.device("cpu"), False)
    std = torch.tensor(SC.STD)
    for name, k in [("i-ODIN", 1), ("ODIN", None)]:
        ours = get_scorer("iodin" if k else "odin", temperature=SC.T, eps=SC.EPS, std=SC.STD)
        want = eager.perturbation_score_eager(model, x, SC.T, SC.EPS, std, k)
        got = ours.score(model, x)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)

        def authors():
            model.zero_grad(set_to_none=True)
            return eager.perturbation_score_eager(model, x, SC.T, SC.EPS, std, k)
        e = cpu_ms(authors, rounds)
        o = cpu_ms(lambda: ours.score(model, x), rounds)
        print(f"| {name} | {e:.1f} | {o:.1f} | {e / o:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", choices=["ops", "step", "scorer"], default=None)
    ap.add_argument("--with-compile", action="store_true", help="ops: also torch.compile of the eager code")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), thread CPU time, median of {args.rounds}\n")
    for name, fn in [("ops", lambda r: ops(r, args.with_compile)), ("step", step), ("scorer", scorer)]:
        if args.only in (None, name):
            fn(args.rounds)


if __name__ == "__main__":
    main()
