"""No code runs from a data folder: CIFAR batches are read with a restricted unpickler, and
auto-detection only treats pickle files as CIFAR. A payload that would create a marker file is put in
every file name the CIFAR reader opens, then fed to every API and CLI entry point that reads data."""
import os
import pickle

import numpy as np
import pytest

from ascood.data import datasets as D
from ascood.apps.main import main
from clihelpers import TINY_TRAIN, make_class_tree, run_cli

CIFAR_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
               "train", "test")


class _Payload:
    """Unpickling this calls os.system (protocol >= 2 pickles start with 0x80, so they look like CIFAR)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A directory whose CIFAR-named files are payloads, a marker path, and a tiny trained run."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "MARKER"
    evil_dir = root / "cifar"
    evil_dir.mkdir()
    for i, name in enumerate(CIFAR_NAMES):
        payload = (_Payload if i % 2 else _ExecPayload)(marker)
        with open(evil_dir / name, "wb") as f:
            pickle.dump({"data": payload, "labels": [0]}, f, protocol=2 + i % 4)
    good = make_class_tree(root / "good")
    run = root / "run"
    assert main(["train", good, "--out", str(run), *TINY_TRAIN]) == 0
    return {"dir": str(evil_dir), "marker": marker, "good": good, "ckpt": str(run / "last.pt")}


def test_payload_pickles_look_like_pickles(evil):
    # The test must be able to fail: the files really are payloads that plain pickle would run.
    assert all(D.looks_like_pickle(os.path.join(evil["dir"], n)) for n in CIFAR_NAMES)
    probe = os.path.join(os.path.dirname(evil["dir"]), "PROBE")
    unsafe = pickle.dumps({"data": _Payload(probe)}, protocol=2)
    pickle.loads(unsafe)  # plain pickle runs it ...
    assert os.path.exists(probe)  # ... and the marker appears
    os.unlink(probe)


API_CALLS = [
    ("auto train", lambda d: D.dataset_from_path(d, None, train=True)),
    ("auto test", lambda d: D.dataset_from_path(d, None, train=False)),
    ("cifar10 train", lambda d: D.dataset_from_path(d, None, train=True, fmt="cifar10")),
    ("cifar10 test", lambda d: D.dataset_from_path(d, None, train=False, fmt="cifar10")),
    ("cifar100 train", lambda d: D.dataset_from_path(d, None, train=True, fmt="cifar100")),
    ("cifar100 test", lambda d: D.dataset_from_path(d, None, train=False, fmt="cifar100")),
    ("CIFARDataset 10", lambda d: D.CIFARDataset(d, train=True, num_classes=10)),
    ("CIFARDataset 100", lambda d: D.CIFARDataset(d, train=False, num_classes=100)),
]


@pytest.mark.parametrize("what,call", API_CALLS, ids=[c[0] for c in API_CALLS])
def test_api_entry_points_refuse_payload(evil, what, call):
    with pytest.raises(D.DataError) as e:
        call(evil["dir"])
    assert evil["dir"] in str(e.value) and "refused" in str(e.value)
    assert not evil["marker"].exists()


def _cli_cases(e):
    d, good, ckpt = e["dir"], e["good"], e["ckpt"]
    base = ["eval", ckpt, "--batch-size", "4", "--scorers", "msp"]
    return [
        ["train", d, "--out", os.path.join(os.path.dirname(d), "evil_run"), *TINY_TRAIN],
        ["train", d, "--data-format", "cifar10", "--out", os.path.join(os.path.dirname(d), "evil_run2"), *TINY_TRAIN],
        [*base, "--id", d, "--ood", good],
        [*base, "--id", good, "--ood", d],
        [*base, "--id", good, "--near", f"n={d}"],
        [*base, "--id", good, "--far", f"f={d}"],
        ["eval", ckpt, "--batch-size", "4", "--scorers", "knn", "--id", good, "--ood", good, "--train", d],
        [*base[:4], "--scorers", "ebo", "--id", good, "--ood", good, "--aps-id", d, "--aps-ood", good],
        [*base[:4], "--scorers", "ebo", "--id", good, "--ood", good, "--aps-id", good, "--aps-ood", d],
    ]


def test_cli_entry_points_refuse_payload(evil, capsys):
    for argv in _cli_cases(evil):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 1, (argv, err)
        assert "refused" in err and os.path.join(evil["dir"], "") in err, (argv, err)
        assert "Traceback" not in err
        assert not evil["marker"].exists(), argv


def test_cli_subprocess_refuses_payload(evil):
    r = run_cli("train", evil["dir"], "--out", os.path.join(os.path.dirname(evil["dir"]), "sub_run"), *TINY_TRAIN)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is not a plain CIFAR batch" in r.stderr and evil["dir"] in r.stderr
    assert not evil["marker"].exists()


def test_non_pickle_cifar_names_are_not_detected_as_cifar(tmp_path):
    # Protocol 0 (text) pickles, or any file that is not a pickle, never reach the unpickler by auto-detection.
    marker = tmp_path / "M"
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "test_batch", "wb") as f:
        pickle.dump({"data": _Payload(marker)}, f, protocol=0)
    assert D.detect_format(str(tmp_path / "d")) == "flat"
    with pytest.raises(D.DataError, match="does not start with a pickle header"):
        D.CIFARDataset(str(tmp_path / "d"), train=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("classes", [10, 100])
def test_real_cifar_layout_still_loads(tmp_path, protocol, classes):
    rng = np.random.default_rng(protocol)
    if classes == 10:
        files = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 2}
        key = b"labels"
    else:
        files, key = {"train": 5, "test": 2}, b"fine_labels"
    written = {}
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, n)]
        # The real files are Python 2 pickles with bytes keys, filenames and batch labels.
        entry = {b"batch_label": b"batch", key: labels, b"data": data, b"filenames": [b"f.png"] * n}
        if classes == 100:
            entry[b"coarse_labels"] = np.asarray(labels, dtype=np.int64) // 5  # numpy scalars/arrays are fine
        with open(tmp_path / name, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
        written[name] = (data, labels)
    assert D.detect_format(str(tmp_path)) == f"cifar{classes}"
    ds = D.dataset_from_path(str(tmp_path), None, train=True)
    train_names = [n for n in files if n not in ("test_batch", "test")]
    want = np.concatenate([written[n][0] for n in train_names]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.images, want)
    assert ds.targets == sum((written[n][1] for n in train_names), [])
    test = D.CIFARDataset(str(tmp_path), train=False, num_classes=classes)
    assert len(test) == 2 and test.targets == written["test_batch" if classes == 10 else "test"][1]


def test_object_arrays_are_refused(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.array([1, "x"], dtype=object), "labels": [0]}, f, protocol=2)
    with pytest.raises(D.DataError, match="refused"):
        D.CIFARDataset(str(tmp_path), train=False)
