"""The first-use check of the GPU kernels (ascood_kernels._first_use).

No GPU here, so the probes run on the CPU: with the C++ kernels and with the
CUDA kernels under the emulation (the very code a GPU runs), and with wrong
kernels substituted to show that a mismatch is caught, warned about once and
routed around. How ``auto`` on CUDA tensors reaches the check is tested with
the device faked, as in test_op_gpu_paths.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from ascood_kernels import _backend, _first_use, emulation

CPU = torch.device("cpu")
FAMILIES = ("select", "zscore", "iodin_perturb", "ascood_loss")
needs_ext = pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    _first_use.reset()
    monkeypatch.delenv(_first_use.ENV, raising=False)
    yield
    _first_use.reset()


def _wrong(fn, how="perturb"):
    def wrong(*args):
        if how == "raise":
            raise RuntimeError("kernel exploded")
        out = fn(*args)
        if isinstance(out, tuple):
            return (out[0] * 1.001 + 1e-3, *out[1:])
        return out * 1.001 + 1e-3 if out.is_floating_point() else ~out
    return wrong


@needs_ext
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_probe_passes_on_correct_kernels(family, dtype):
    """The probes' tolerances raise no false alarm on a correct kernel (the C++ ones)."""
    assert _first_use.probe(family, "cpu", CPU, dtype) == []


@pytest.mark.skipif(not emulation.load(), reason=f"CUDA emulation unavailable: {emulation.why_not()}")
@pytest.mark.parametrize("family, dtype", [(f, torch.float32) for f in FAMILIES] + [("select", torch.float16)],
                         ids=str)
def test_probe_passes_on_the_cuda_kernels_under_emulation(family, dtype, record_property):
    assert _first_use.probe(family, "cuda-emulated", CPU, dtype) == []
    record_property("emu_cases", 1)


@needs_ext
@pytest.mark.parametrize("family, op, how, expect", [
    ("select", "invariant_mask", "perturb", "invariant_mask"),
    ("select", "gradient_outlier", "perturb", "gradient_outlier"),
    ("zscore", "zscore_backward", "perturb", "zscore_backward"),
    ("iodin_perturb", "iodin_perturb", "raise", "kernel exploded"),
    ("ascood_loss", "ascood_loss_backward", "perturb", "ascood_loss_backward d_id"),
])
def test_probe_catches_a_substituted_wrong_kernel(monkeypatch, family, op, how, expect):
    ns = torch.ops.ascood
    monkeypatch.setattr(ns, op, _wrong(getattr(ns, op), how))
    problems = _first_use.probe(family, "cpu", CPU, torch.float32)
    assert problems and any(expect in p for p in problems), problems


@pytest.mark.skipif(not emulation.load(), reason=f"CUDA emulation unavailable: {emulation.why_not()}")
@needs_ext
def test_choose_warns_once_and_uses_the_next_backend(monkeypatch):
    """A wrong CUDA kernel (the emulated zscore, substituted) loses to the next candidate, with one warning."""
    emu = getattr(torch.ops, emulation.NAMESPACE)
    monkeypatch.setattr(emu, "zscore", _wrong(emu.zscore))
    calls = []
    real_probe = _first_use.probe
    monkeypatch.setattr(_first_use, "probe", lambda *a: calls.append(a) or real_probe(*a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _first_use.choose("zscore", CPU, torch.float32, ["cuda-emulated", "cpu"]) == "cpu"
        assert _first_use.choose("zscore", CPU, torch.float32, ["cuda-emulated", "cpu"]) == "cpu"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "first-use check" in msgs[0] and "zscore (float32)" in msgs[0] and "on cpu" in msgs[0]
    assert "ascood_kernels._C built with torch" in msgs[0]  # the build
    assert "Using the cpu backend" in msgs[0] and _first_use.ENV in msgs[0]
    assert len(calls) == 2  # each backend probed once, then remembered
    # Every candidate wrong: the reference.
    monkeypatch.setattr(torch.ops.ascood, "zscore", _wrong(torch.ops.ascood.zscore, "raise"))
    _first_use.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _first_use.choose("zscore", CPU, torch.float32, ["cuda-emulated", "cpu"]) == "reference"
    assert len([w for w in caught if "first-use check" in str(w.message)]) == 2
    # Other ops and dtypes have verdicts of their own.
    assert _first_use.choose("ascood_loss", CPU, torch.float32, ["cpu"]) == "cpu"


def _fake_cuda(monkeypatch, verdicts):
    monkeypatch.setattr(_backend, "cuda_built", lambda: True)
    monkeypatch.setattr(_backend, "triton_loaded", lambda: True)
    monkeypatch.delenv("ASCOOD_BACKEND", raising=False)
    calls = []

    def probe(family, backend, device, dtype):
        calls.append((family, backend))
        verdict = verdicts[backend]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict
    monkeypatch.setattr(_first_use, "probe", probe)
    return calls


def test_auto_on_cuda_tensors_goes_through_the_check(monkeypatch):
    cuda = torch.device("cuda")
    calls = _fake_cuda(monkeypatch, {"cuda": ["zscore: 3 of 10 elements differ"], "triton": []})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "triton"
        assert _backend.resolve(None, cuda, "zscore", torch.float32) == "triton"
    assert calls == [("zscore", "cuda"), ("zscore", "triton")]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "the CUDA C++ kernel of zscore (float32)" in msgs[0] and "cuda" in msgs[0]
    assert "3 of 10 elements differ" in msgs[0] and "Using the triton backend" in msgs[0]
    # An explicit request is never redirected, and calls without an op name are not checked.
    assert _backend.resolve("cuda", cuda, "zscore", torch.float32) == "cuda"
    assert _backend.resolve("auto", cuda) == "cuda"
    # gradient_outlier shares invariant_mask's probe: one probe per backend for both.
    with pytest.warns(RuntimeWarning, match=r"kernel of invariant_mask \(float16\)"):
        assert _backend.resolve("auto", cuda, "invariant_mask", torch.float16) == "triton"
    assert _backend.resolve("auto", cuda, "gradient_outlier", torch.float16) == "triton"
    assert calls[2:] == [("select", "cuda"), ("select", "triton")]


def test_the_check_can_be_turned_off_and_is_skipped_where_no_probe_can_run(monkeypatch):
    cuda = torch.device("cuda")
    calls = _fake_cuda(monkeypatch, {"cuda": ["wrong"], "triton": []})
    monkeypatch.setenv(_first_use.ENV, "0")
    assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "cuda" and calls == []
    monkeypatch.setenv(_first_use.ENV, "1")
    # Under a dispatch mode (fake tensors: non-strict export, make_fx) or CUDA graph capture: unchecked.
    monkeypatch.setattr(_first_use, "_real_tensors_here", lambda: False)
    assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "cuda" and calls == []
    monkeypatch.setattr(_first_use, "_real_tensors_here", lambda: True)
    monkeypatch.setattr(_first_use, "_capturing", lambda device: True)
    assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "cuda" and calls == []
    monkeypatch.setattr(_first_use, "_capturing", lambda device: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "triton"
    # Where no probe can run, an earlier verdict still applies.
    monkeypatch.setattr(_first_use, "_real_tensors_here", lambda: False)
    assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "triton"


def test_no_dispatch_mode_means_real_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _first_use._real_tensors_here()
    with FakeTensorMode():
        assert not _first_use._real_tensors_here()


def test_an_unjudgeable_probe_is_no_pass(monkeypatch):
    """A failure outside the kernel: one warning, the kernel used unchecked, probed again up to UNJUDGED_TRIES."""
    cuda = torch.device("cuda")
    verdicts = {"cuda": _first_use.Unjudged("OutOfMemoryError: CUDA out of memory"), "triton": []}
    calls = _fake_cuda(monkeypatch, verdicts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(_first_use.UNJUDGED_TRIES + 2):
            assert _backend.resolve("auto", cuda, "ascood_loss", torch.float32) == "cuda"
    assert calls == [("ascood_loss", "cuda")] * _first_use.UNJUDGED_TRIES  # then no more probes
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert "could not check the CUDA C++ kernel of ascood_loss (float32) on cuda" in msgs[0]
    assert "OutOfMemoryError: CUDA out of memory" in msgs[0] and "unchecked" in msgs[0]
    # A later probe that judges decides, as a first one would: here a mismatch moves auto to Triton.
    _first_use.reset()
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "cuda"
        verdicts["cuda"] = ["zscore: 1 of 10 elements differ"]
        assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "triton"
        assert _backend.resolve("auto", cuda, "zscore", torch.float32) == "triton"
    assert calls == [("zscore", "cuda"), ("zscore", "cuda"), ("zscore", "triton")]
    assert ["could not check" in str(w.message) for w in caught] == [True, False]


@needs_ext
def test_reference_errors_are_not_blamed_on_the_kernel(monkeypatch):
    from ascood_kernels import reference

    def broken(*args, **kwargs):
        raise RuntimeError("deterministic algorithms: not supported")
    monkeypatch.setattr(reference, "zscore_backward", broken)
    with pytest.raises(_first_use.Unjudged, match="RuntimeError: deterministic algorithms: not supported"):
        _first_use.probe("zscore", "cpu", CPU, torch.float32)


def test_a_backend_without_the_op_fails_the_probe(monkeypatch):
    """A namespace that lacks the op (e.g. a library not loaded) is the kernel's failure, not 'unjudgeable'."""
    monkeypatch.setattr(_backend, "op_namespace", lambda backend: object())
    problems = _first_use.probe("zscore", "cuda", CPU, torch.float32)
    assert problems and "zscore" in problems[0] and "AttributeError" in problems[0]
