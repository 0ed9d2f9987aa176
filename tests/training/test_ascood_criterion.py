"""ASCOODCriterion: the drop-in loss, in a plain loop, under autocast and under torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ascood
from ascood import _ops
from ascood.training.criterion import ASCOODCriterion, StepParts, unwrap_model
from ascood.training.outliers import true_class_saliency


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y


def _model():
    return ascood.build_model("small_cnn", 3, width=4)


def _manual_loss(model, x, y, alpha, p_inv=0.1, w=1.0):
    """The 7-line recipe the criterion replaces, written out by hand."""
    grad = true_class_saliency(model, x, y, "eval")
    xo = _ops.gradient_outlier(x, grad, p_inv, alpha).detach()
    logits = model(torch.cat([x, xo])).float()
    return _ops.ascood_loss(logits[: len(x)], y, logits[len(x):], w), logits


def test_criterion_equals_the_hand_written_step():
    x, y = _data()
    model = _model().train()
    twin = copy.deepcopy(model)
    crit = ASCOODCriterion("gradient", p_inv=0.1, alpha=(3.0, 1.0), w=0.7)
    crit.set_epoch(1, 4)
    parts = crit.forward_with_parts(model, x, y)
    want, logits = _manual_loss(twin, x, y, 2.5, w=0.7)  # epoch 1 of 4: (3 - 1) * (1 - 1/4) + 1
    torch.testing.assert_close(parts.loss, want, rtol=1e-6, atol=1e-6)
    assert isinstance(parts, StepParts) and parts.alpha == 2.5
    torch.testing.assert_close(parts.ce, F.cross_entropy(logits[:8], y), rtol=1e-5, atol=1e-6)
    kl = F.kl_div(logits[8:].log_softmax(1), torch.full_like(logits[8:], 1 / 3), reduction="batchmean")
    torch.testing.assert_close(parts.kl, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.ce + 0.7 * parts.kl, parts.loss.detach(), rtol=1e-6, atol=1e-6)
    assert crit.last is parts and not parts.ce.requires_grad and parts.loss.requires_grad
    # Both BatchNorm states moved the same way: the saliency pass did not touch running stats.
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_plain_loop_trains():
    x, y = _data(24)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = ASCOODCriterion("gradient", p_inv=0.1, alpha=(1.0, 0.5), w=1.0)
    first = last = None
    for epoch in range(1, 4):
        crit.set_epoch(epoch, 3)
        model.train()
        for i in range(0, 24, 8):
            loss = crit(model, x[i:i + 8], y[i:i + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            last = loss.item()
    assert last < first
    assert crit.alpha == pytest.approx(0.5)  # last epoch: alpha_min


def test_alpha_schedule_is_one_based():
    crit = ASCOODCriterion(alpha=(300, 30))
    assert crit.alpha == 300.0  # before set_epoch: the start value
    assert crit.set_epoch(1, 10) == pytest.approx(300 - 27)  # epoch 1 of 10: (300-30)*(1-1/10)+30
    assert crit.set_epoch(10, 10) == pytest.approx(30.0)  # the last epoch uses exactly alpha_min (reference-facts.md)
    assert ASCOODCriterion(alpha=5.0).set_epoch(7, 9) == 5.0
    with pytest.raises(ValueError, match=r"epoch must be an int in \[1, 10\]"):
        crit.set_epoch(0, 10)
    with pytest.raises(ValueError, match="epochs must be"):
        crit.set_epoch(1, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ood_type="mixup"), "ood_type"), (dict(p_inv=0.0), "p_inv"), (dict(alpha="big"), "alpha"),
    (dict(alpha=(1.0, float("inf"))), "alpha"), (dict(w=-1.0), "w must"), (dict(alpha_mode="x"), "alpha_mode"),
    (dict(saliency_mode="x"), "saliency_mode"), (dict(generator=3), "generator")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ASCOODCriterion(**kwargs)


def test_none_is_plain_cross_entropy():
    x, y = _data()
    model = _model().train()
    parts = ASCOODCriterion("none").forward_with_parts(model, x, y)
    assert parts.ood_logits.shape == (0, 3) and parts.kl.item() == 0.0
    torch.testing.assert_close(parts.loss, F.cross_entropy(parts.id_logits, y))


def test_saliency_pass_is_float32_under_autocast():
    x, y = _data()
    model = _model().train()
    crit = ASCOODCriterion("gradient", p_inv=0.2, alpha=2.0)
    want = crit.outliers(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit.outliers(model, x, y)
        loss = crit(model, x, y)
    assert torch.equal(got, want)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shuffle_uses_the_generator():
    x, y = _data()
    model = _model()
    outs = [ASCOODCriterion("shuffle", p_inv=0.5, generator=torch.Generator().manual_seed(s)).outliers(model, x, y)
            for s in (1, 1, 2)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_under_torch_compile_matches_eager():
    x, y = _data()
    model = _model().train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    assert unwrap_model(compiled) is model
    crit = ASCOODCriterion("gradient", p_inv=0.1, alpha=2.0)
    loss_c = crit(compiled, x, y)
    loss_e = crit(twin, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    loss_c.backward()
    loss_e.backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
