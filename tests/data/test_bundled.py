"""Bundled OOD benchmarks (ascood.bundled): sizes, determinism, disjointness, spurious correlation, no download."""
from __future__ import annotations

import hashlib
import itertools
import os
import socket
import sys

import numpy as np
import pytest
import torch

import ascood.data.bundled as bundled
from ascood.data.bundled import SETTINGS, load_bundled, load_digit_arrays

# Documented sizes (module docstring table): split key -> images, for any seed.
EXPECTED_SIZES = {
    "fine-grained": {"train": 866, "val": 144, "test": 433, "val_ood/held_out": 89, "ood/held_out": 265},
    "spurious": {"train": 866, "val": 144, "test": 433, "val_ood/spurious": 89, "ood/spurious": 265},
    "conventional": {"train": 1078, "val": 179, "test": 540, "val_ood/textures": 90, "val_ood/photos": 90,
                     "ood/textures": 540, "ood/photos": 540},
}
CHANNELS = {"fine-grained": 1, "spurious": 3, "conventional": 1}


@pytest.fixture(scope="module")
def benches():
    return {s: load_bundled(s, seed=0) for s in SETTINGS}


def _all_tensors(b):
    out = dict(b.images())
    out.update({f"y/{k}": d.tensors[1] for k, d in (("train", b.train), ("val", b.val), ("test", b.test))})
    out.update({f"src/{k}": v for k, v in b.source.items()})
    out.update({f"env/{k}": v for k, v in b.env.items()})
    out["mean"], out["std"] = b.mean, b.std
    return out


def _hashes(x: torch.Tensor) -> set[bytes]:
    return {hashlib.sha1(img.numpy().tobytes()).digest() for img in x.contiguous()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_builds_shapes_dtypes_sizes(benches, setting):
    b = benches[setting]
    assert b.setting == setting and b.image_size == 16
    assert b.in_channels == CHANNELS[setting]
    assert b.num_classes == len(b.id_classes) == (10 if setting == "conventional" else 8)
    assert b.sizes() == EXPECTED_SIZES[setting]
    assert list(b.ood) == list(b.val_ood)
    for key, x in b.images().items():
        assert x.dtype == torch.float32 and x.shape[1:] == (b.in_channels, 16, 16), key
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1, key
        assert x.std() > 0.01, key
        assert b.source[key].shape == (x.shape[0],) and b.source[key].dtype == torch.int64
    for ds in (b.train, b.val, b.test):
        y = ds.tensors[1]
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < b.num_classes
        assert torch.bincount(y, minlength=b.num_classes).min() > 0  # every class in every split
    text = b.describe()
    for key, n in EXPECTED_SIZES[setting].items():
        assert f"{key}: {n}" in text


def test_sizes_do_not_depend_on_seed_and_shift_copies():
    for s in SETTINGS:
        assert load_bundled(s, seed=3).sizes() == EXPECTED_SIZES[s]
    b = load_bundled("fine-grained", seed=0, train_shifts=2)
    assert b.sizes() == {**EXPECTED_SIZES["fine-grained"], "train": 3 * 866}
    # each train digit appears 3 times: the original plus two distinct shifted copies
    src = b.source["train"]
    assert torch.bincount(src[src >= 0]).max() == 3 and len(torch.unique(src)) == 866
    assert len(_hashes(b.train.tensors[0])) == 3 * 866


@pytest.mark.parametrize("setting", SETTINGS)
def test_deterministic_from_seed(benches, setting):
    a, again, other = benches[setting], load_bundled(setting, seed=0), load_bundled(setting, seed=1)
    ta, tb, tc = _all_tensors(a), _all_tensors(again), _all_tensors(other)
    assert ta.keys() == tb.keys() == tc.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for k in ("train", "test") + tuple(f"ood/{n}" for n in a.ood):
        assert not torch.equal(ta[k], tc[k]), k
    # a different seed picks different digits for the train split, not just another order
    assert set(ta["src/train"].tolist()) != set(tc["src/train"].tolist())


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("train_shifts", [0, 1])
def test_no_image_in_two_splits(setting, train_shifts):
    b = load_bundled(setting, seed=2, train_shifts=train_shifts)
    hashes = {k: _hashes(x) for k, x in b.images().items()}
    for (k1, h1), (k2, h2) in itertools.combinations(hashes.items(), 2):
        assert not (h1 & h2), f"{k1} and {k2} share {len(h1 & h2)} images"
    # and no source digit is shared between splits (shifted copies stay in train)
    srcs = {k: set(v[v >= 0].tolist()) for k, v in b.source.items()}
    for (k1, s1), (k2, s2) in itertools.combinations(srcs.items(), 2):
        assert not (s1 & s2), f"{k1} and {k2} share source digits"
    assert sum(len(s) for s in srcs.values()) == 1797  # every digit used, in one split only


@pytest.mark.parametrize("setting", ["fine-grained", "spurious"])
def test_ood_classes_never_in_id(benches, setting):
    b = benches[setting]
    _, digit = load_digit_arrays()
    assert b.ood_classes == (8, 9) and b.id_classes == tuple(range(8))
    for key, ds in (("train", b.train), ("val", b.val), ("test", b.test)):
        d = digit[b.source[key].numpy()]
        assert set(d.tolist()) <= set(b.id_classes), key
        # label i is digit id_classes[i]
        assert np.array_equal(np.asarray(b.id_classes)[ds.tensors[1].numpy()], d), key
    for key in (k for k in b.source if "ood/" in k):
        assert set(digit[b.source[key].numpy()].tolist()) == set(b.ood_classes), key
    # together the splits use every digit of the dataset exactly once
    all_src = torch.cat([v for v in b.source.values()])
    assert sorted(all_src.tolist()) == list(range(1797))


def test_custom_ood_classes():
    b = load_bundled("fine-grained", seed=0, ood_classes=(1, 7))
    assert b.id_classes == (0, 2, 3, 4, 5, 6, 8, 9) and b.num_classes == 8
    _, digit = load_digit_arrays()
    assert set(digit[b.source["ood/held_out"].numpy()].tolist()) == {1, 7}
    assert not set(digit[b.source["train"].numpy()].tolist()) & {1, 7}


def _env_from_pixels(x: torch.Tensor) -> torch.Tensor:
    """Background read off the image: white ink has R == G, so sign(mean(R - G)) is the tint (brick > 0)."""
    return ((x[:, 0] - x[:, 1]).mean(dim=(1, 2)) < 0).long()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spurious_correlation_reached(seed):
    b = load_bundled("spurious", seed=seed)
    imgs = b.images()
    for key, e in b.env.items():
        assert torch.equal(_env_from_pixels(imgs[key]), e), key  # stored env = what the pixels show
    _, digit = load_digit_arrays()

    def agreement(key: str) -> float:
        group = torch.from_numpy((digit[b.source[key].numpy()] >= 4).astype(np.int64))
        return (group == _env_from_pixels(imgs[key])).double().mean().item()

    r_train = agreement("train")
    assert abs(r_train - 0.9) < 0.03, r_train
    assert abs(agreement("val") - 0.5) < 0.03 and abs(agreement("test") - 0.5) < 0.03  # balanced, as Waterbirds
    # the correlation holds per class, not only on average
    env, d = _env_from_pixels(imgs["train"]).numpy(), digit[b.source["train"].numpy()]
    for c in range(8):
        assert abs(np.mean(env[d == c] == (c >= 4)) - 0.9) < 0.03, c
    # OOD: the held-out digits on the same two backgrounds, half each
    for key in ("ood/spurious", "val_ood/spurious"):
        assert abs(_env_from_pixels(imgs[key]).double().mean().item() - 0.5) < 0.03
    c = b.info["correlation"]
    assert c["train"] == pytest.approx(r_train) and c["train_phi"] == pytest.approx(2 * r_train - 1, abs=0.02)
    assert f"train {r_train:.3f}" in b.describe()


def test_spurious_options():
    b = load_bundled("spurious", seed=0, correlation=0.75, test_correlation=0.75)
    for key in ("train", "val", "test"):
        assert abs(b.info["correlation"][key] - 0.75) < 0.03, key
    b = load_bundled("spurious", seed=0, correlation=1.0)
    assert b.info["correlation"]["train"] == 1.0


@pytest.mark.parametrize("setting", SETTINGS)
def test_normalisation_stats_match_train(benches, setting):
    b = benches[setting]
    x = b.train.tensors[0].double()
    assert b.mean.shape == b.std.shape == (b.in_channels,)
    assert torch.allclose(b.mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(b.std.double(), x.std(dim=(0, 2, 3), correction=0), atol=1e-6)
    z = b.normalize(b.train.tensors[0]).double()
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(b.in_channels, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), correction=0), torch.ones(b.in_channels, dtype=torch.float64),
                          atol=1e-5)
    assert b.normalize(b.train.tensors[0][0]).shape == b.train.tensors[0][0].shape


@pytest.mark.parametrize("size", [8, 32])
def test_other_image_sizes(size):
    for s in SETTINGS:
        b = load_bundled(s, seed=0, image_size=size)
        assert b.sizes() == EXPECTED_SIZES[s]
        for x in b.images().values():
            assert x.shape[2:] == (size, size) and torch.isfinite(x).all()


def test_nothing_downloads(monkeypatch):
    """Builds with the network and every downloader blocked; reads only files inside installed packages."""
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled benchmarks tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for mod in ("pooch", "skimage.data", "skimage.data._fetchers", "requests", "urllib.request"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import mod` now raises ImportError
    bundled._digits_cached.cache_clear()
    bundled._grey_image.cache_clear()
    try:
        built = [load_bundled(s, seed=0) for s in SETTINGS]
    finally:
        bundled._digits_cached.cache_clear()
        bundled._grey_image.cache_clear()
    import importlib.util
    roots = [os.path.realpath(importlib.util.find_spec(p).submodule_search_locations[0])
             for p in ("sklearn", "skimage")]
    files = {f for b in built for f in b.info["files"]}
    assert len(files) == 1 + len(set(bundled.TEXTURES + bundled.PHOTOS))
    for f in files:
        real = os.path.realpath(f)
        assert os.path.isfile(real) and any(real.startswith(r + os.sep) for r in roots), f


def test_digits_match_sklearn_loader():
    from sklearn.datasets import load_digits

    images, labels = load_digit_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images, ref.images.astype(np.uint8)) and np.array_equal(labels, ref.target)
    assert len(np.unique(images.reshape(1797, -1), axis=0)) == 1797  # no duplicate digits to leak across splits


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown setting"):
        load_bundled("imagenet")
    assert load_bundled("Fine_Grained").setting == "fine-grained"
    with pytest.raises(ValueError):
        load_bundled("spurious", correlation=1.5)
    with pytest.raises(ValueError):
        load_bundled("fine-grained", ood_classes=(10,))
    with pytest.raises(ValueError):
        load_bundled("fine-grained", ood_classes=())
    with pytest.raises(ValueError):
        load_bundled("conventional", train_shifts=9)
    with pytest.raises(ValueError):
        load_bundled("conventional", seed=-1)
    with pytest.raises(FileNotFoundError, match="never download"):
        bundled.skimage_image_path("no_such_image.png")
