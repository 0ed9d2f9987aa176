"""Local-disk datasets and transforms (nothing is ever downloaded).

* :func:`image_folder`: class-per-folder trees (``root/<class>/<image>``).
* :class:`ImageListDataset`: OpenOOD-style lists, one ``relative/path label``
  per line, paths relative to a root directory.
* :class:`CIFARDataset`: the CIFAR-10/100 *python* pickle batches
  (``data_batch_1..5``/``test_batch`` or ``train``/``test``).
* :class:`ArrayDataset`: numpy arrays in memory (N, H, W[, C]) uint8 or float.
* :func:`build_transforms`: train (random crop pad 4 + flip for <= 64 px,
  RandomResizedCrop + flip otherwise) / test transforms, then normalise.

A missing or unreadable file raises :class:`DataError` naming the file.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataError", "IMAGE_EXTENSIONS", "build_transforms", "image_folder", "ImageListDataset", "CIFARDataset",
           "FlatImageDataset", "dataset_from_path", "detect_format", "DATA_FORMATS",
           "ArrayDataset", "open_image", "make_loader", "estimate_mean_std"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(RuntimeError):
    """A data file is missing, unreadable or malformed (the message names it)."""


def open_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open an image fully (so a truncated file fails here, naming the file)."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool):
    """torchvision transforms: PIL image -> normalised float tensor (C, image_size, image_size).

    Train: for image_size <= 64 a random crop with 4-pixel padding + horizontal
    flip (the CIFAR recipe), otherwise RandomResizedCrop + flip (the 224 recipe).
    Test: resize (shorter side to image_size * 256/224 above 64 px) + centre crop.
    """
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    if image_size <= 64:
        resize = [T.Resize(image_size), T.CenterCrop(image_size)]
        if train:
            return T.Compose(resize + [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()] + norm)
        return T.Compose(resize + norm)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + norm)
    return T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)] + norm)


class _Loader:
    """ImageFolder's loader, raising DataError with the file name."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        return open_image(path, self.mode)


def image_folder(root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB"):
    """torchvision ImageFolder over ``root/<class>/<image>`` (classes sorted by name).

    ``mode``: PIL mode the images are converted to ("RGB", "L", ...).
    """
    from torchvision.datasets import ImageFolder

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    try:
        return ImageFolder(root, transform=transform, loader=_Loader(mode), is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError as err:
        raise DataError(f"no class folders with images under {root}: {err}") from err


class ImageListDataset(Dataset):
    """OpenOOD-style image list: each non-empty line is ``relative/path label`` (label int, default -1).

    Paths may contain spaces (the label is the last whitespace-separated field).
    Returns (image tensor, label) pairs; OOD lists may omit the label.
    """

    def __init__(self, list_file: str | os.PathLike, root: str | os.PathLike, transform: Callable | None = None,
                 mode: str = "RGB") -> None:
        list_file, root = os.fspath(list_file), os.fspath(root)
        if not os.path.isfile(list_file):
            raise DataError(f"image list not found: {list_file}")
        if not os.path.isdir(root):
            raise DataError(f"image root not found: {root}")
        self.root, self.transform, self.mode = root, transform, mode
        self.samples: list[tuple[str, int]] = []
        with open(list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) == 2 and _is_int(parts[1]):
                    path, label = parts[0], int(parts[1])
                else:
                    path, label = line, -1
                self.samples.append((os.path.join(root, path), label))
        if not self.samples:
            raise DataError(f"image list {list_file} has no entries")
        self.targets = [lab for _, lab in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = open_image(path, self.mode)
        return (self.transform(img) if self.transform else img), label


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


class ArrayDataset(Dataset):
    """Images from numpy arrays in memory.

    ``images``: (N, H, W) or (N, H, W, C) uint8 (converted to PIL, so the usual
    transforms apply) or float (N, C, H, W) already-normalised tensors (returned
    as is, ``transform`` applied to the tensor if given). ``labels``: (N,) ints
    or None (-1).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | Sequence[int] | None = None,
                 transform: Callable | None = None) -> None:
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {images.shape}")
        self.images = images
        self.labels = np.full(len(images), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.transform = transform
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if img.dtype == np.uint8:
            pil = Image.fromarray(img if img.ndim == 2 or img.shape[-1] != 1 else img[..., 0])
            out = self.transform(pil) if self.transform else torch.from_numpy(np.ascontiguousarray(img))
        else:
            out = torch.as_tensor(img, dtype=torch.float32)
            out = self.transform(out) if self.transform else out
        return out, int(self.labels[i])


class CIFARDataset(ArrayDataset):
    """CIFAR-10/100 from the python pickle batches in ``root`` (e.g. ``cifar-10-batches-py``).

    CIFAR-10: ``data_batch_1..5`` (train) / ``test_batch``; CIFAR-100:
    ``train`` / ``test`` with ``fine_labels``. ``num_classes`` 10 or 100.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, num_classes: int = 10,
                 transform: Callable | None = None) -> None:
        root = os.fspath(root)
        if num_classes == 10:
            files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            key = "labels"
        elif num_classes == 100:
            files, key = (["train"] if train else ["test"]), "fine_labels"
        else:
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
        data, labels = [], []
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise DataError(f"CIFAR batch file not found: {path}")
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(entry[key])
            except Exception as err:  # truncated pickle, wrong keys, wrong sizes
                raise DataError(f"cannot read CIFAR batch {path}: {type(err).__name__}: {err}") from err
        super().__init__(np.concatenate(data).transpose(0, 2, 3, 1), np.asarray(labels), transform)
        self.classes = list(range(num_classes))


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int | None = None) -> DataLoader:
    """A DataLoader; train loaders shuffle with their own seeded generator (part of exact resume)."""
    gen = torch.Generator().manual_seed(seed) if (train and seed is not None) else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers, generator=gen,
                      drop_last=False, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def estimate_mean_std(dataset: Dataset, max_samples: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``max_samples`` evenly spaced items (tensors in [0, 1])."""
    n = len(dataset)
    if n == 0:
        raise DataError("dataset is empty")
    idx = np.linspace(0, n - 1, min(n, max_samples)).astype(int)
    total, total_sq, count = None, None, 0
    for i in idx:
        x = dataset[int(i)][0]
        x = x.reshape(x.shape[0], -1).double()
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


class FlatImageDataset(Dataset):
    """All images directly under (or anywhere below) ``root``, unlabelled (label -1): typical OOD folders."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB") -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}")
        self.paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.transform, self.mode = transform, mode
        self.targets = [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = open_image(self.paths[i], self.mode)
        return (self.transform(img) if self.transform else img), -1


DATA_FORMATS = ("auto", "folder", "flat", "list", "cifar10", "cifar100")


def detect_format(path: str) -> str:
    """Guess a dataset format from what is on disk (see :func:`dataset_from_path`)."""
    if os.path.isfile(path):
        return "list"
    if not os.path.isdir(path):
        raise DataError(f"data path not found: {path}")
    names = set(os.listdir(path))
    if "data_batch_1" in names or "test_batch" in names:
        return "cifar10"
    if {"train", "test"} & names and all(os.path.isfile(os.path.join(path, n)) for n in {"train", "test"} & names):
        return "cifar100"
    has_class_dirs = any(os.path.isdir(os.path.join(path, n)) for n in names)
    return "folder" if has_class_dirs else "flat"


def dataset_from_path(path: str | os.PathLike, transform: Callable | None, *, train: bool, fmt: str = "auto",
                      root: str | os.PathLike | None = None, mode: str = "RGB") -> Dataset:
    """A dataset from a path: class folders, a flat folder, an image list (with ``root``) or CIFAR batches.

    ``fmt="auto"`` detects: a file is an image list (root defaults to the
    list's directory); a directory with ``data_batch_1``/``test_batch`` is
    CIFAR-10, one with ``train``/``test`` files CIFAR-100; a directory with
    subdirectories is a class-per-folder tree; otherwise a flat folder of
    unlabelled images. For CIFAR, ``train`` picks the train or test batches.
    """
    path = os.fspath(path)
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {DATA_FORMATS}, got {fmt!r}")
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "list":
        return ImageListDataset(path, root if root is not None else os.path.dirname(os.path.abspath(path)),
                                transform, mode)
    if fmt in ("cifar10", "cifar100"):
        ds = CIFARDataset(path, train=train, num_classes=10 if fmt == "cifar10" else 100, transform=transform)
        return ds
    if fmt == "flat":
        return FlatImageDataset(path, transform, mode)
    return image_folder(path, transform, mode)
