"""``torch.compile(fullgraph=True)`` of the ``auto`` ops on the GPU branch, checked without a GPU.

The dispatcher is made to take CPU tensors for a GPU (``_backend._gpu_candidates``
is the seam) whose "cuda" kernels are the CUDA kernels under the emulation, so
``auto`` goes through the first-use check exactly as on a CUDA device: probe,
verdict, warnings. Each op is compiled once before any eager call (no verdict
yet) and once after one (the verdict known), and compared with the reference.

The compile backend records the traced graph and runs it as it is: tracing
(Dynamo) is what the first-use check could break; Inductor would only add
minutes of C++ compilation on the test machine's two cores.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import _backend, _first_use, emulation
from ascood_kernels._compare import LOSS_TOL, TOL, ZSCORE_TOL, mismatch

pytestmark = pytest.mark.skipif(not (emulation.load() and _backend.extension_loaded()),
                                reason=f"needs the C++ extension and the CUDA emulation ({emulation.why_not()})")

EMU_OPS = f"{emulation.NAMESPACE}."


@pytest.fixture
def gpu_route(monkeypatch):
    """``auto`` takes CPU tensors for a GPU whose CUDA kernels are the emulated ones; no Triton."""
    real_namespace = _backend.op_namespace
    monkeypatch.setattr(_backend, "_gpu_candidates", lambda device: ["cuda"])
    monkeypatch.setattr(_backend, "op_namespace",
                        lambda backend: real_namespace("cuda-emulated" if backend == "cuda" else backend))
    monkeypatch.setattr(_backend, "triton_loaded", lambda: False)
    monkeypatch.setitem(_backend._state, "triton_error", "ImportError: no triton (test)")
    monkeypatch.setitem(_backend._state, "warned", False)
    monkeypatch.delenv("ASCOOD_BACKEND", raising=False)
    monkeypatch.delenv(_first_use.ENV, raising=False)
    _first_use.reset()
    torch._dynamo.reset()
    yield
    _first_use.reset()
    torch._dynamo.reset()


def _inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    g = torch.randn(2, 3, 4, 4, generator=gen)
    h = torch.randn(3, 8, generator=gen)
    zi, zo = torch.randn(3, 5, generator=gen), torch.randn(2, 5, generator=gen)
    y = torch.tensor([0, 4, 2])
    return x, g, h, zi, zi.new_tensor([0.5, 1.0, 2.0]), y, zo


# op -> (call(backend, x, g, h, zi, std, y, zo) -> output, first-use family or None, kernel in the graph, tolerance)
CASES = {
    "invariant_mask": (lambda b, x, g, h, zi, std, y, zo: ak.invariant_mask(g, 0.3, backend=b),
                       "select", "invariant_mask", None),
    "gradient_outlier": (lambda b, x, g, h, zi, std, y, zo: ak.gradient_outlier(x, g, 0.3, 2.5, backend=b),
                         "select", "gradient_outlier", TOL[torch.float32]),
    "zscore": (lambda b, x, g, h, zi, std, y, zo: ak.zscore(h, 0.5, 1e-2, backend=b),
               "zscore", "zscore", ZSCORE_TOL[torch.float32]),
    "iodin_perturb": (lambda b, x, g, h, zi, std, y, zo: ak.iodin_perturb(x, g, 0.07, std, 3, backend=b),
                      "iodin_perturb", "iodin_perturb", TOL[torch.float32]),
    "ascood_loss": (lambda b, x, g, h, zi, std, y, zo: ak.ascood_loss(zi, y, zo, 0.7, backend=b),
                    "ascood_loss", "ascood_loss", LOSS_TOL[torch.float32]),
    # No CUDA C++ kernel and no Triton: auto falls back to the reference, with its warning.
    "shuffle_outlier": (lambda b, x, g, h, zi, std, y, zo: ak.shuffle_outlier(x, g.abs(), 0.3, backend=b),
                        None, None, None),
}


def _compiled(call, graphs):
    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward
    return torch.compile(call, fullgraph=True, backend=record)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_auto_op_on_the_gpu_branch(gpu_route, name):
    call, family, kernel, tol = CASES[name]
    args = _inputs()
    torch.manual_seed(0)  # shuffle_outlier draws its permutation from the global generator
    want = call("reference", *args)
    key = (family, "cuda", "cpu", "float32")
    graphs: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Before any eager call: nothing known yet.
        torch.manual_seed(0)
        got = _compiled(call, graphs)("auto", *args)
        assert mismatch(got, want, tol) is None
        if family is not None:
            assert _first_use._verdicts.get(key) == []  # probed before the graph was built, and passed
        # An eager call, then a fresh trace: the verdict is read.
        torch.manual_seed(0)
        assert mismatch(call("auto", *args), want, tol) is None
        torch._dynamo.reset()
        torch.manual_seed(0)
        got = _compiled(call, graphs)("auto", *args)
        assert mismatch(got, want, tol) is None
    assert len(graphs) == 2
    if kernel is not None:  # the emulated CUDA kernel is what the compiled graphs run
        assert all(f"{EMU_OPS}{kernel}" in targets for targets in graphs), graphs
    else:
        assert not any(EMU_OPS in t for targets in graphs for t in targets), graphs
        reference_notes = [w for w in caught if "slow reference backend" in str(w.message)]
        assert len(reference_notes) == 1 and "shuffle_outlier has no CUDA C++ kernel" in str(reference_notes[0].message)
    assert not [w for w in caught if "first-use check" in str(w.message)]  # the emulated kernels are right


def test_compiled_backward_through_the_gpu_branch(gpu_route):
    """The fused backwards (registered autograd) of the emulated kernels run after a compiled forward."""
    x, g, h, zi, std, y, zo = _inputs()

    def step(h, zi, zo, backend):
        feats = ak.zscore(h, 0.5, 1e-2, backend=backend)
        return ak.ascood_loss(zi + feats[:, :5], y, zo, 0.7, backend=backend)

    h_ref, zi_ref, zo_ref = (t.clone().requires_grad_() for t in (h, zi, zo))
    want = step(h_ref, zi_ref, zo_ref, "reference")
    want_grads = torch.autograd.grad(want, (h_ref, zi_ref, zo_ref))
    h, zi, zo = (t.clone().requires_grad_() for t in (h, zi, zo))
    got = torch.compile(step, fullgraph=True, backend="eager")(h, zi, zo, "auto")
    assert mismatch(got, want, LOSS_TOL[torch.float32]) is None
    for what, g_got, g_want in zip(("h", "id logits", "ood logits"), torch.autograd.grad(got, (h, zi, zo)),
                                   want_grads):
        assert mismatch(g_got, g_want, LOSS_TOL[torch.float32]) is None, what
    assert _first_use._verdicts.get(("zscore", "cuda", "cpu", "float32")) == []


def test_a_wrong_kernel_found_while_tracing_is_not_compiled_in(gpu_route, monkeypatch):
    """The probe that runs before the graph is built catches a wrong kernel: one warning, the graph runs the next."""
    emu = getattr(torch.ops, emulation.NAMESPACE)
    right = emu.zscore
    monkeypatch.setattr(emu, "zscore", lambda *args: (right(*args)[0] + 1e-3, *right(*args)[1:]))
    x, g, h, zi, std, y, zo = _inputs()
    graphs: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _compiled(lambda h: ak.zscore(h, 0.5, 1e-2), graphs)(h)
    assert mismatch(got, ak.zscore(h, 0.5, 1e-2, backend="reference"), ZSCORE_TOL[torch.float32]) is None
    msgs = [str(w.message) for w in caught if "first-use check" in str(w.message)]
    assert len(msgs) == 1 and "kernel of zscore (float32) does not match" in msgs[0], msgs
    assert "Using the reference backend" in msgs[0]
    assert not any(EMU_OPS in t for t in graphs[0]), graphs


def test_no_probe_under_fake_tensors_then_the_next_eager_call_checks(gpu_route):
    """Under a fake-tensor mode (as in torch.export's non-strict tracing) a probe cannot run: nothing is judged."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = ("zscore", "cuda", "cpu", "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no probe ran, so none could fail or warn
        with FakeTensorMode() as mode:
            out = ak.zscore(mode.from_tensor(torch.randn(3, 8)))
    assert out.shape == (3, 8) and key not in _first_use._verdicts and key not in _first_use._unjudged
    h = torch.randn(3, 8)
    assert mismatch(ak.zscore(h), ak.zscore(h, backend="reference"), ZSCORE_TOL[torch.float32]) is None
    assert _first_use._verdicts[key] == []


def test_an_unjudged_probe_warns_once_and_the_kernel_runs_unchecked(gpu_route, monkeypatch):
    """The reference side of the probe fails: one warning saying so, the kernel's result, probed again later."""
    from ascood_kernels import reference

    h = torch.randn(3, 8)
    want = ak.zscore(h, 0.5, 1e-2, backend="reference")

    def refused(*args, **kwargs):
        raise RuntimeError("zscore_backward does not have a deterministic implementation")
    monkeypatch.setattr(reference, "zscore_backward", refused)
    key = ("zscore", "cuda", "cpu", "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(_first_use.UNJUDGED_TRIES + 1):
            assert mismatch(ak.zscore(h, 0.5, 1e-2), want, ZSCORE_TOL[torch.float32]) is None
    msgs = [str(w.message) for w in caught if "first-use check" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "could not check the CUDA C++ kernel of zscore (float32) on cpu" in msgs[0]
    assert "does not have a deterministic implementation" in msgs[0] and "unchecked" in msgs[0]
    assert key not in _first_use._verdicts and _first_use._unjudged[key] == _first_use.UNJUDGED_TRIES
