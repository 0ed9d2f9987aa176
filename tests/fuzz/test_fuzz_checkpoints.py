"""Fuzzing the checkpoint readers: load_checkpoint / load_model (``ascood eval``, ``Detector.fit(run)``) and
the Trainer's resume, with flipped bytes, edited contents (values and types anywhere in the dict) and pickle
payloads that would run code. Each example ends in the clean result or a named error naming the checkpoint
(fuzzhelpers), and no payload ever runs."""
from __future__ import annotations

import builtins
import copy
import io
import os
import pickle
import subprocess
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import ascood
import fuzzhelpers as F
from ascood.training.checkpoint import load_model
from ascood.training.trainer import TrainConfig, Trainer

BASE = dict(epochs=2, ood_type="gradient", p_inv=0.2, alpha_min=0.5, alpha_max=1.0, alpha_mode="relative", w=1.0,
            lr=0.05, seed=0)
PROBE = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _loader():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 3
    ds = TensorDataset(torch.randn(16, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y)
    return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return ascood.build_model("small_cnn", 3, width=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(a run folder stopped after its first of two epochs, its last.pt bytes, the model's clean logits)."""
    out = tmp_path_factory.mktemp("fuzz-run")

    def stop(trainer, metrics):
        raise KeyboardInterrupt

    tr = Trainer(_model(), _loader(), TrainConfig(**BASE), out_dir=out, progress=False, callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    path = os.path.join(out, "last.pt")
    model, _ = load_model(path)
    with torch.no_grad():
        logits = model(PROBE)
    return str(out), open(path, "rb").read(), logits


def _write(tmp_dir: str, data: bytes) -> str:
    path = os.path.join(tmp_dir, "fuzzed.pt")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _load_model_checked(path: str, clean_logits: torch.Tensor, must_match: bool, loader=load_model) -> str:
    """``loader`` (load_model, or a broken copy): a named error naming ``path``, or a model that runs (the clean
    logits when ``must_match``)."""
    def read():
        model, _ = loader(path)
        with torch.no_grad():
            return model(PROBE)

    kind, got = F.outcome(read, "checkpoint", path)
    if kind == "ok":
        assert got.shape == clean_logits.shape
        if must_match:
            assert torch.equal(got, clean_logits)
    return kind


def _resume_checked(path: str) -> str:
    """Trainer(resume=path): a named error naming ``path`` (a CheckpointError, or the settings-differ ValueError
    'cannot resume PATH: ...'), or a trainer that finishes the run."""
    kind, got = F.outcome(lambda: Trainer(_model(), _loader(), TrainConfig(**BASE), resume=path, progress=False),
                          "resume", path)
    if kind == "ok":
        assert 0 <= got.epoch <= BASE["epochs"]
        # What was accepted must train: a malformed optimizer or schedule state would fail here, mid-run.
        with F.hang_guard():
            got.fit()
        assert got.epoch == BASE["epochs"]
    return kind


# -- flipped bytes -------------------------------------------------------------------------------------------
_MUTATION = F.byte_mutations(2 ** 20)


@settings(max_examples=F.budget(250))
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=3))
def test_flipped_bytes(mutations, run, tmp_path_factory):
    """Bytes flipped, inserted, deleted or cut anywhere in last.pt (a zip: headers, data.pkl, tensor records)."""
    F.count("checkpoint: flipped bytes")
    _, data, logits = run
    new = F.mutate_bytes(data, mutations)
    path = _write(str(tmp_path_factory.getbasetemp()), new)
    # A changed byte of a tensor record is not detected (a zip's CRC is not checked by torch): such a model runs,
    # with other weights; everything else must be the clean model or refused.
    _load_model_checked(path, logits, must_match=new == data)


# -- edited contents -----------------------------------------------------------------------------------------
_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=10)
    | st.sampled_from([0, 1, -1, 10 ** 9, "small_cnn", "resnet18", "torchvision:resnet18", "timm:nope", "zscore"])
    | st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple))
    | st.sampled_from([torch.tensor(float("nan")), torch.ones(3, dtype=torch.int64), torch.ones(2, 2).half()]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    | st.tuples(inner, inner),
    max_leaves=8)


def _paths(node, prefix=(), depth=0):
    out = []
    if depth > 4:
        return out
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,), depth + 1)
    return out


@settings(max_examples=F.budget(250))
@given(data=st.data(), action=st.sampled_from(["replace", "delete", "add", "wrap"]), value=_VALUE,
       edits=st.integers(1, 3))
def test_edited_contents_load_model_and_resume(data, action, value, edits, run, tmp_path_factory):
    """Values anywhere in the checkpoint dict (format, model_build, weights, optimizer, rng, train_config, ...)
    replaced by any value or type, deleted, added or wrapped: load_model and the Trainer's resume each end in a
    named error or a working result."""
    F.count("checkpoint: edited contents (load_model + resume)")
    _, raw, logits = run
    ckpt = torch.load(io.BytesIO(raw), weights_only=True)
    touched = []
    for _ in range(edits):
        paths = _paths(ckpt)
        where = data.draw(st.sampled_from(paths), label="path")
        F.edit_tree(ckpt, where, action, copy.deepcopy(value))
        touched.append(where)
    path = _write(str(tmp_path_factory.getbasetemp()), b"")
    torch.save(ckpt, path)
    # Edits outside the model's weights and build record cannot change the model load_model returns.
    inert = all(w[0] not in ("model", "model_build", "format") for w in touched)
    _load_model_checked(path, logits, must_match=inert)
    _resume_checked(path)


# -- pickle payloads -----------------------------------------------------------------------------------------
class _Payload:
    """Unpickled, it calls ``func(*args)``: a command, exec or eval that writes the marker file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str):
    write = f"open({marker!r}, 'w').write('ran')"
    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "exec": (builtins.exec, (write,)),
        "eval": (builtins.eval, (write,)),
        "subprocess": (subprocess.call, (["touch", marker],)),
        "open": (builtins.open, (marker, "w")),
    }


def _packed(kind: str, payload, run_bytes: bytes) -> bytes:
    """The payload as a checkpoint file: torch.save's zip, the legacy pickle format, a bare pickle, or spliced
    into a real last.pt's data.pkl (the zip otherwise intact)."""
    obj = {"format": "ascood-checkpoint-v1", "model": {"w": payload}, "epoch": 1}
    buf = io.BytesIO()
    if kind == "zip":
        torch.save(obj, buf)
    elif kind == "legacy":
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
    elif kind == "pickle":
        buf.write(pickle.dumps(obj, protocol=2))
    else:  # spliced: a genuine checkpoint whose data.pkl is replaced
        src = zipfile.ZipFile(io.BytesIO(run_bytes))
        with zipfile.ZipFile(buf, "w") as dst:
            for info in src.infolist():
                body = pickle.dumps(obj, protocol=2) if info.filename.endswith("data.pkl") else src.read(info)
                dst.writestr(info, body)
    return buf.getvalue()


def payload_property(func: str, kind: str, reader: str, run, base: str, loader=load_model) -> None:
    """A checkpoint whose pickle would run code is refused naming the file, and the code never runs (``loader``:
    load_model, or a broken copy in test_fuzz_catches_broken_readers.py)."""
    marker = os.path.join(base, "PAYLOAD_RAN")
    if os.path.exists(marker):
        os.unlink(marker)
    path = _write(base, _packed(kind, _Payload(*_payloads(marker)[func]), run[1]))
    try:
        if reader == "load_model":
            kind_got = _load_model_checked(path, run[2], must_match=True, loader=loader)
        else:
            kind_got = _resume_checked(path)
        assert kind_got == "error"
    finally:  # checked even when the reader failed otherwise: code that ran is the worse finding
        assert not os.path.exists(marker), f"the {func} payload ran ({kind} checkpoint, {reader})"


PAYLOAD_CASES = dict(func=st.sampled_from(["os.system", "exec", "eval", "subprocess", "open"]),
                     kind=st.sampled_from(["zip", "legacy", "pickle", "spliced"]),
                     reader=st.sampled_from(["load_model", "resume"]))


@settings(max_examples=F.budget(60))
@given(**PAYLOAD_CASES)
def test_pickle_payloads_never_run(func, kind, reader, run, tmp_path_factory):
    """os.system, exec, eval, subprocess and open payloads in a torch zip, a legacy torch file, a bare pickle or
    a genuine last.pt's data.pkl, read by load_model and by resume."""
    F.count("checkpoint: pickle payloads")
    payload_property(func, kind, reader, run, str(tmp_path_factory.getbasetemp()))


def test_the_payloads_would_run_under_plain_pickle(tmp_path):
    """The payload test can fail: each payload does write its marker when unpickled without weights_only."""
    for name, payload in _payloads(str(tmp_path / "m")).items():
        marker = tmp_path / "m"
        pickle.loads(pickle.dumps(_Payload(*payload)))
        assert marker.exists(), name
        marker.unlink()
