"""End to end: one ASCOOD training step vs one cross-entropy step, per model.

Models: the small CNN and ResNet-18 (32x32 variant), batch 128x3x32x32 (on the
CPU ResNet-18 uses batch 32 to keep the run short; ``--quick``: batch 16/8).
Rows per model (op "train step <model>"):
* ``CE step``: ood_type="none", linear head (the baseline's cost);
* ``ASCOOD step (ours)``: gradient outliers, z-score head, fused ops;
* ``ASCOOD step (eager)``: the same step with the eager PyTorch code of the
  reference implementation patched in for the three ops (topk mask, mean/std
  z-score, CE + KLDivLoss);
* ``ASCOOD shuffle step (ours)``: ood_type="shuffle" (the paper's CIFAR setting);
* ``ASCOOD step (ours, channels_last)`` and, unless ``--quick``,
  ``ASCOOD step (ours, compile)`` / ``CE step (compile)``: the trainer options;
* op "outlier synthesis <model>": ``saliency + op (ours)`` = the whole
  ``synthesize_outliers`` call (the input-gradient pass and the op), and
  ``op only (ours|eager)`` = the ``gradient_outlier`` call alone.
The conftest summary prints ASCOOD step / CE step and the synthesis share.
Before timing, ours and eager must give the same first-step loss.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import eager
from conftest import run

ascood = pytest.importorskip("ascood")
from ascood import _ops  # noqa: E402
from ascood.training.outliers import synthesize_outliers  # noqa: E402
from ascood.training.trainer import TrainConfig, Trainer  # noqa: E402

MODELS = ["small_cnn", "resnet18_32x32"]


@contextlib.contextmanager
def eager_ops():
    """Swap the fused ops used by ascood for the eager reference-code versions."""
    saved = {n: getattr(_ops, n) for n in ("gradient_outlier", "zscore", "ascood_loss")}
    _ops.gradient_outlier = eager.gradient_outlier_eager
    _ops.zscore = eager.zscore_eager
    _ops.ascood_loss = eager.ascood_loss_eager
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(_ops, n, f)


def _batch(name, device, quick):
    if quick:
        return 16 if name == "small_cnn" else 8
    return 32 if (device.type == "cpu" and name != "small_cnn") else 128


def _setup(name, device, quick, ood_type, head, **opts):
    batch, shape, classes = _batch(name, device, quick), (3, 32, 32), 10
    torch.manual_seed(0)
    model = ascood.build_model(name, classes, in_channels=shape[0], head=head)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    cfg = TrainConfig(epochs=1, ood_type=ood_type, p_inv=0.1, alpha_min=30.0, alpha_max=300.0, lr=0.01, amp=False,
                      seed=0, **opts)
    trainer = Trainer(model, loader, cfg, device=device, progress=False)
    return trainer, x.to(device), y.to(device)


ROWS = ["CE step", "ASCOOD step (ours)", "ASCOOD step (eager)", "ASCOOD shuffle step (ours)",
        "ASCOOD step (ours, channels_last)", "CE step (compile)", "ASCOOD step (ours, compile)",
        "saliency + op (ours)", "op only (ours)", "op only (eager)"]


def _first_step_loss(name, device, quick, use_eager):
    trainer, x, y = _setup(name, device, quick, "gradient", "zscore")
    with eager_ops() if use_eager else contextlib.nullcontext():
        return trainer.train_step(x, y, 300.0)[0]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("row", ROWS)
def test_training_step(benchmark, bench_env, model, row):
    device, quick = bench_env["device"], bench_env["quick"]
    if "compile" in row and quick:
        pytest.skip("torch.compile rows: full runs only (compilation dominates a quick run)")
    ce = row.startswith("CE step")
    opts = {}
    if "channels_last" in row:
        opts["channels_last"] = True
    if "compile" in row:
        opts["compile"] = True
    ood_type = "none" if ce else ("shuffle" if "shuffle" in row else "gradient")
    trainer, x, y = _setup(model, device, quick, ood_type, "linear" if ce else "zscore", **opts)
    if row == "ASCOOD step (eager)":
        # same first step with the eager ops and with ours (fresh trainers, same seed)
        torch.testing.assert_close(_first_step_loss(model, device, quick, True),
                                   _first_step_loss(model, device, quick, False), rtol=1e-4, atol=1e-5)
    use_eager = "eager" in row
    with eager_ops() if use_eager else contextlib.nullcontext():
        if row.startswith("op only"):
            grad = torch.randn_like(x) * 1e-3  # the saliency pass is the same in both: time the op it feeds
            fn = lambda: _ops.gradient_outlier(x, grad, 0.1, 300.0)  # noqa: E731
            nbytes = 3 * x.numel() * x.element_size()
        elif row.startswith("saliency"):
            fn = lambda: synthesize_outliers(trainer.saliency_model, x, y, ood_type="gradient", p_inv=0.1,  # noqa: E731
                                             alpha=300.0)
            nbytes = 0
        else:
            fn = lambda: trainer.train_step(x, y, 300.0)  # noqa: E731
            nbytes = 0
        kind = "train step" if "step" in row else "outlier synthesis"
        run(benchmark, bench_env, fn, op=f"{kind} {model}", shape=tuple(x.shape), dtype=x.dtype, provider=row,
            nbytes=nbytes)
