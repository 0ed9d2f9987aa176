"""Where the time goes: torch.profiler breakdown of one ASCOOD step and one i-ODIN batch.

Run (from the repository root):

    python benchmarks/profile_step.py [--model small_cnn] [--batch 128] [--device cpu]
                                      [--ood-type gradient] [--steps 3] [--top 15]

Prints, for the training step and for the scorer batch, (1) the phases,
labelled with ``record_function`` around the functions the package calls
(saliency pass, outlier op, forward, loss, backward, optimiser step; ODIN's
input-gradient pass, perturbation, second forward) with their share of the
whole, and (2) the top operators by self time. Timed after warm-up steps;
CPU and, on a GPU, CUDA time.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ascood  # noqa: E402
from ascood import _ops  # noqa: E402
from ascood.training import outliers
from ascood.training import trainer as trainer_mod  # noqa: E402
from ascood.scoring.scorers import get_scorer  # noqa: E402
from ascood.scoring.scorers import perturb  # noqa: E402

PHASES = ["saliency pass", "outlier op", "forward", "loss", "backward", "optimizer step",
          "first forward", "backward to the input", "perturbation", "second forward"]


def _labelled(label, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def labels(trainer):
    """Wrap the package's calls in record_function labels (restored afterwards)."""
    saved = []

    def patch(obj, name, label):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, _labelled(label, getattr(obj, name)))

    in_saliency = {"on": False}
    saliency = outliers.true_class_saliency

    def labelled_saliency(*a, **k):
        in_saliency["on"] = True
        try:
            with record_function("saliency pass"):
                return saliency(*a, **k)
        finally:
            in_saliency["on"] = False
    saved.append((outliers, "true_class_saliency", saliency))
    outliers.true_class_saliency = labelled_saliency
    for op in ("gradient_outlier", "shuffle_outlier"):
        patch(_ops, op, "outlier op")
    patch(_ops, "ascood_loss", "loss")
    patch(_ops, "iodin_perturb", "perturbation")
    if trainer is not None:
        patch(trainer.scaler, "step", "optimizer step")
        model = trainer.model
        orig_forward = model.forward

        def forward(*a, **k):  # the step's forward on [x, x'] (not the saliency pass's own forward)
            if in_saliency["on"]:
                return orig_forward(*a, **k)
            with record_function("forward"):
                return orig_forward(*a, **k)
        model.forward = forward
        saved.append((model, "forward", None))
        scale = trainer.scaler.scale

        class _Backward:
            def __init__(self, t):
                self.t = t

            def backward(self):
                with record_function("backward"):
                    self.t.backward()
        patch(trainer.scaler, "scale", "scale")
        trainer.scaler.scale = lambda loss: _Backward(scale(loss))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def phase_table(prof, total_label: str, names) -> str:
    events = {e.key: e for e in prof.key_averages()}
    use_cuda = any(getattr(e, "device_time_total", 0) for e in events.values())
    attr = "device_time_total" if use_cuda else "cpu_time_total"
    total = getattr(events[total_label], attr) if total_label in events else 0
    lines = [f"| phase | {'CUDA' if use_cuda else 'CPU'} ms per call | share |", "|---|---|---|"]
    for name in names:
        e = events.get(name)
        if e is None:
            continue
        t = getattr(e, attr) / max(1, events[total_label].count) / 1e3
        lines.append(f"| {name} | {t:.3f} | {100 * getattr(e, attr) / total:.1f}% |")
    lines.append(f"| (whole {total_label}) | {total / max(1, events[total_label].count) / 1e3:.3f} | 100% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ood-type", default="gradient", choices=["gradient", "shuffle"])
    ap.add_argument("--steps", type=int, default=3, help="profiled steps / batches (after 2 warm-ups)")
    ap.add_argument("--top", type=int, default=15, help="operators listed by self time")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ascood.build_model(args.model, 10, in_channels=3, head="zscore")
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
    cfg = trainer_mod.TrainConfig(epochs=1, ood_type=args.ood_type, p_inv=0.1, alpha_min=30.0, alpha_max=300.0,
                                  lr=0.01, amp=False, seed=0)
    tr = trainer_mod.Trainer(model, loader, cfg, device=device, progress=False)
    x, y = x.to(device), y.to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    with labels(tr):
        for _ in range(2):
            tr.train_step(x, y, 300.0)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                with record_function("ASCOOD step"):
                    tr.train_step(x, y, 300.0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    print(f"## One ASCOOD step ({args.ood_type} outliers): {args.model}, batch {tuple(x.shape)}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(phase_table(prof, "ASCOOD step", PHASES[:6]))
    print()
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))

    model.eval()
    scorer = get_scorer("iodin", temperature=1000.0, eps=0.0014, std=(0.2470, 0.2435, 0.2616))
    orig_score = perturb._Perturbation.score

    with labels(None):
        for _ in range(2):
            scorer.score(model, x)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                with record_function("i-ODIN batch"):
                    _profiled_score(scorer, orig_score, model, x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    print(f"\n## One i-ODIN batch: {args.model}, batch {tuple(x.shape)}, {device}\n")
    print(phase_table(prof, "i-ODIN batch", PHASES[6:]))
    print()
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))


def _profiled_score(scorer, orig_score, model, x):
    """scorer.score with its two model passes labelled (the call itself is unchanged)."""
    calls = {"n": 0}
    forward, grad = model.forward, torch.autograd.grad

    def labelled_forward(*a, **k):
        calls["n"] += 1
        with record_function("first forward" if calls["n"] == 1 else "second forward"):
            return forward(*a, **k)

    def labelled_grad(*a, **k):
        with record_function("backward to the input"):
            return grad(*a, **k)
    model.forward, torch.autograd.grad = labelled_forward, labelled_grad
    try:
        return orig_score(scorer, model, x)
    finally:
        del model.forward
        torch.autograd.grad = grad


if __name__ == "__main__":
    main()
