"""End to end: one ASCOOD training step vs one cross-entropy step.

Same model and batch: ResNet-18 (32x32 variant) at batch 128x3x32x32 on GPU,
the small CNN at the same batch on CPU. Rows:
* ``CE step``: ood_type="none", linear head (the baseline's cost);
* ``ASCOOD step (ours)``: gradient outliers, z-score head, fused ops;
* ``ASCOOD step (eager)``: the same step with the eager PyTorch code of the
  reference implementation patched in for the three ops (topk mask, mean/std
  z-score, CE + KLDivLoss);
* ``synthesis (ours|eager)``: the outlier synthesis alone (saliency pass
  excluded: only what the fused op replaces), reported as a share of its step.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import eager
from conftest import run

ascood = pytest.importorskip("ascood")
from ascood import _ops  # noqa: E402
from ascood.trainer import TrainConfig, Trainer  # noqa: E402


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


def _setup(device, quick, ood_type, head):
    if device.type == "cuda":
        name, batch, shape, classes = "resnet18_32x32", 128, (3, 32, 32), 10
    else:
        name, batch, shape, classes = "small_cnn", (16 if quick else 128), (3, 32, 32), 10
    torch.manual_seed(0)
    model = ascood.build_model(name, classes, in_channels=shape[0], head=head)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    cfg = TrainConfig(epochs=1, ood_type=ood_type, p_inv=0.1, alpha_min=30.0, alpha_max=300.0, lr=0.01, amp=False,
                      seed=0)
    trainer = Trainer(model, loader, cfg, device=device, progress=False)
    return trainer, x.to(device), y.to(device)


ROWS = ["CE step", "ASCOOD step (ours)", "ASCOOD step (eager)", "synthesis (ours)", "synthesis (eager)"]


@pytest.mark.parametrize("row", ROWS)
def test_training_step(benchmark, bench_env, row):
    device = bench_env["device"]
    ce = row == "CE step"
    trainer, x, y = _setup(device, bench_env["quick"], "none" if ce else "gradient", "linear" if ce else "zscore")
    use_eager = "eager" in row
    ctx = eager_ops() if use_eager else contextlib.nullcontext()
    with ctx:
        if row.startswith("synthesis"):
            grad = torch.randn_like(x) * 1e-3  # the saliency pass is the same in both: time the op it feeds
            fn = lambda: _ops.gradient_outlier(x, grad, 0.1, 300.0)  # noqa: E731
            nbytes = 3 * x.numel() * x.element_size()
        else:
            fn = lambda: trainer.train_step(x, y, 300.0)  # noqa: E731
            nbytes = 0
        run(benchmark, bench_env, fn, op="train step" if not row.startswith("synthesis") else "outlier synthesis",
            shape=tuple(x.shape), dtype=x.dtype, provider=row, nbytes=nbytes)
