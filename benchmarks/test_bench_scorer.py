"""End to end: one ODIN / i-ODIN scoring batch, the package's scorer vs the authors' eager code.

Same model (small CNN on CPU, ResNet-18 32x32 on GPU, eval mode) and batch
(128x3x32x32). ``eager (authors)`` is ``eager.perturbation_score_eager``:
``loss.backward()`` (parameter gradients included), sign step, division by
std, a second forward with autograd on. ``ours`` is ``ascood.scorers`` (input
gradient only, fused ``iodin_perturb``, second forward under inference mode).
Both must give the same predictions and scores before anything is timed.
"""
from __future__ import annotations

import pytest
import torch

import eager
from conftest import run

ascood = pytest.importorskip("ascood")
from ascood.scoring.scorers import get_scorer  # noqa: E402

STD = (0.2470, 0.2435, 0.2616)  # CIFAR-10's normalisation std
T, EPS = 1000.0, 0.0014


def _model_and_batch(device, quick):
    torch.manual_seed(0)
    name = "resnet18_32x32" if device.type == "cuda" else "small_cnn"
    model = ascood.build_model(name, 10, in_channels=3).to(device).eval()
    x = torch.randn(16 if quick else 128, 3, 32, 32, device=device)
    return model, x


@pytest.mark.parametrize("scorer", ["iodin", "odin"])
@pytest.mark.parametrize("provider", ["eager (authors)", "ours"])
def test_perturbation_scorer(benchmark, bench_env, scorer, provider):
    device = bench_env["device"]
    model, x = _model_and_batch(device, bench_env["quick"])
    std = torch.tensor(STD, device=device)
    k = None if scorer == "odin" else 1
    ours = get_scorer(scorer, temperature=T, eps=EPS, std=STD)
    want_pred, want_score = eager.perturbation_score_eager(model, x, T, EPS, std, k)
    pred, score = ours.score(model, x)
    assert torch.equal(pred, want_pred)
    torch.testing.assert_close(score, want_score, rtol=1e-5, atol=1e-6)
    if provider == "ours":
        fn = lambda: ours.score(model, x)  # noqa: E731
    else:
        def fn():
            model.zero_grad(set_to_none=True)  # what a per-batch loop over the authors' code keeps paying
            return eager.perturbation_score_eager(model, x, T, EPS, std, k)
    run(benchmark, bench_env, fn, op=f"{'i-ODIN' if k else 'ODIN'} batch", shape=tuple(x.shape), dtype=x.dtype,
        provider=provider, nbytes=0)
