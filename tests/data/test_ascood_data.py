"""Loaders on files the tests write: class folders, image lists, CIFAR pickles, numpy arrays; errors name files."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ascood.data import datasets as D

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def write_png(path, value, size=10):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_build_transforms_shapes_and_normalisation():
    img = Image.fromarray(np.full((40, 50, 3), 255, dtype=np.uint8))
    x = D.build_transforms(32, MEAN, STD, train=False)(img)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - .5) / .25
    assert D.build_transforms(32, MEAN, STD, train=True)(img).shape == (3, 32, 32)
    assert D.build_transforms(96, MEAN, STD, train=True)(img).shape == (3, 96, 96)
    assert D.build_transforms(96, MEAN, STD, train=False)(img).shape == (3, 96, 96)


def test_image_folder_and_flat_and_errors(tmp_path):
    for c, v in (("cat", 10), ("dog", 200)):
        for i in range(3):
            write_png(tmp_path / "tree" / c / f"{i}.png", v)
    ds = D.dataset_from_path(tmp_path / "tree", D.build_transforms(8, MEAN, STD, False), train=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y == 1
    grey = D.image_folder(tmp_path / "tree", D.build_transforms(8, [0.5], [0.5], False), mode="L")
    assert grey[0][0].shape == (1, 8, 8)
    flat = D.dataset_from_path(tmp_path / "tree" / "cat", None, train=False)
    assert isinstance(flat, D.FlatImageDataset) and len(flat) == 3 and flat[0][1] == -1
    bad = tmp_path / "tree" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    ds = D.image_folder(tmp_path / "tree", None)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(D.DataError, match="broken.png"):
        ds[idx]
    with pytest.raises(D.DataError, match="nowhere"):
        D.dataset_from_path(tmp_path / "nowhere", None, train=True)


def test_image_list(tmp_path):
    write_png(tmp_path / "imgs" / "a b.png", 0)
    write_png(tmp_path / "imgs" / "c.png", 255)
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/a b.png 3\n\n# comment\nimgs/c.png 1\n")
    ds = D.dataset_from_path(lst, D.build_transforms(8, MEAN, STD, False), train=True, root=tmp_path)
    assert isinstance(ds, D.ImageListDataset) and len(ds) == 2 and ds.targets == [3, 1]
    x, y = ds[1]
    assert y == 1 and torch.allclose(x, torch.full_like(x, 2.0))
    # A listed image that does not exist is found when the list is read (file and line), not mid-epoch.
    lst.write_text("imgs/a b.png 3\n\n# comment\nimgs/c.png 1\nimgs/missing.png 0\n")
    with pytest.raises(D.DataError, match=r"list.txt:5: image .*missing.png not found"):
        D.dataset_from_path(lst, None, train=True, root=tmp_path)
    with pytest.raises(D.DataError, match="nolist.txt"):
        D.ImageListDataset(tmp_path / "nolist.txt", tmp_path)


def _write_cifar(root, names, key, n=4, classes=10):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         key: list(rng.integers(0, classes, n))}, f)


def test_cifar10_and_100_pickles(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    _write_cifar(c10, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels")
    train = D.dataset_from_path(c10, D.build_transforms(32, MEAN, STD, True), train=True)
    test = D.dataset_from_path(c10, None, train=False)
    assert isinstance(train, D.CIFARDataset) and len(train) == 20 and len(test) == 4
    assert train[0][0].shape == (3, 32, 32)
    raw = pickle.load(open(c10 / "test_batch", "rb"))
    # Pixel layout: the pickle's row is CHW-planar; item 0 as HWC uint8 must match it.
    np.testing.assert_array_equal(test.images[0], raw["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert test[0][1] == raw["labels"][0]
    c100 = tmp_path / "cifar-100-python"
    _write_cifar(c100, ["train", "test"], "fine_labels", classes=100)
    ds = D.dataset_from_path(c100, None, train=True)
    assert D.detect_format(str(c100)) == "cifar100" and len(ds.classes) == 100
    (c10 / "data_batch_3").write_bytes(b"\x80garbage")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.CIFARDataset(c10, train=True)
    os.remove(c10 / "data_batch_3")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.CIFARDataset(c10, train=True)


def test_array_dataset_and_loader():
    imgs = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    ds = D.ArrayDataset(imgs, [0, 1, 0, 1, 0, 1], D.build_transforms(8, MEAN, STD, False))
    x, y = ds[1]
    torch.testing.assert_close(x, (torch.from_numpy(imgs[1]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
    assert y == 1
    floats = D.ArrayDataset(np.zeros((3, 2, 4, 4), dtype=np.float32))
    assert floats[0][0].shape == (2, 4, 4) and floats[0][1] == -1
    loader = D.make_loader(ds, 4, train=True, seed=0)
    assert [b[0].shape[0] for b in loader] == [4, 2]
    with pytest.raises(ValueError, match="labels"):
        D.ArrayDataset(imgs, [0, 1])
    mean, std = D.estimate_mean_std(D.ArrayDataset(imgs, None, D.build_transforms(8, [0, 0, 0], [1, 1, 1], False)))
    np.testing.assert_allclose(mean, (imgs / 255).reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, (imgs / 255).reshape(-1, 3).std(0), rtol=1e-4)
