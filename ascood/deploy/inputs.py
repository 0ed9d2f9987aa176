"""What a detector accepts: its preprocessing, and the checks that turn bad input into a clear message.

:class:`Preprocessing` is the test-time pipeline the model was trained with
(:func:`ascood.data.datasets.build_transforms` with ``train=False``): resize the
shorter side to ``resize``, centre-crop ``image_size``, convert to ``channels``
(1: greyscale "L", 3: "RGB"), scale to [0, 1], then normalise with ``mean`` /
``std`` per channel. The exported graphs take the [0, 1] tensor (after the
crop, before the normalisation) and normalise inside.

:func:`expand_paths` turns the command line's PATH arguments into image files:
an image file is itself, a folder is every image below it (sorted; hidden entries
skipped and symlinks followed only inside it, as for training data), any other
file is an image list (one path per line, absolute or relative to the list's
folder, an optional trailing integer label ignored; ``find $PWD -name '*.png'
> list.txt`` makes one). Only training and OpenOOD lists keep their paths
inside an image root; a list of images to score may name any file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.datasets import (IMAGE_EXTENSIONS, DataError, ImageReadError, build_transforms, find_images,
                             open_image, parses_as, read_text_list)

__all__ = ["Preprocessing", "expand_paths", "check_image_tensor", "PathDataset", "device_problem", "resolve_device"]


def device_problem(text: str) -> str | None:
    """What is wrong with a device name on this machine (cpu, cuda or cuda:N), or None when it is usable.

    One wording for the CLI's --device and the API's ``device=``."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"expected cpu, cuda or cuda:N, got {text!r}"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"expected cpu, cuda or cuda:N, got {text!r} (device type {dev.type!r} is not supported)"
    if not torch.cuda.is_available():
        return f"{text!r}: no CUDA device is available on this machine (use cpu)"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def resolve_device(device, name: str = "device") -> str:
    """``device`` (None: cuda when available, else cpu) checked like the CLI's --device; ValueError naming ``name``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    problem = device_problem(text)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return text


@dataclass
class Preprocessing:
    """image_size S (crop), mean / std (one float per channel), channels (1 or 3)."""

    image_size: int
    mean: list[float]
    std: list[float]
    channels: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"preprocessing image_size must be an integer >= 1, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 (greyscale) or 3 (RGB), got {self.channels!r}")
        try:
            self.mean = [float(v) for v in self.mean]
            self.std = [float(v) for v in self.std]
        except (TypeError, ValueError):
            raise ValueError(f"preprocessing mean and std must be lists of numbers, got {self.mean!r}, "
                             f"{self.std!r}") from None
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"preprocessing mean and std need {self.channels} value(s) (channels), got "
                             f"{len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"preprocessing mean must be finite and std finite and > 0, got {self.mean}, {self.std}")

    @property
    def mode(self) -> str:
        """PIL mode images are converted to."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop (build_transforms: S up to 64 px, round(S * 256/224) above)."""
        return self.image_size if self.image_size <= 64 else int(round(self.image_size * 256 / 224))

    def transform(self):
        """PIL image -> normalised float32 tensor (channels, S, S): exactly ``ascood eval``'s test transform."""
        return build_transforms(self.image_size, self.mean, self.std, train=False)

    def pixel_transform(self):
        """PIL image -> float32 tensor (channels, S, S) in [0, 1] (resize + crop, no normalisation)."""
        from torchvision import transforms as T

        return T.Compose([T.Resize(self.resize), T.CenterCrop(self.image_size), T.ToTensor()])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (x - mean) / std per channel (x's dtype and device)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return (x - mean) / std

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "resize": self.resize, "crop": self.image_size, "mean": self.mean,
                "std": self.std, "channels": self.channels, "interpolation": "bilinear",
                "input": f"float32 (B, {self.channels}, {self.image_size}, {self.image_size}) pixel values in "
                         "[0, 1] (after resize + centre crop, before mean/std)"}

    @classmethod
    def from_json(cls, data, where: str = "preprocessing") -> "Preprocessing":
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
        try:
            return cls(image_size=data.get("image_size"), mean=data.get("mean"), std=data.get("std"),
                       channels=data.get("channels", 3))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def from_checkpoint_extra(cls, extra: dict) -> "Preprocessing":
        """From a run checkpoint's ``extra`` (image_size, mean, std, channels, as ``ascood train`` stores them)."""
        channels = int(extra.get("channels", 3))
        return cls(int(extra.get("image_size", 32)), extra.get("mean", [0.5] * channels),
                   extra.get("std", [0.5] * channels), channels)


def check_image_tensor(x: torch.Tensor, prep: Preprocessing, normalized: bool, name: str = "x") -> torch.Tensor:
    """(B, C, S, S) or (C, S, S) images -> float32 (B, C, S, S); ValueError naming ``name`` and what was expected.

    uint8 tensors are pixel values 0..255; float tensors are [0, 1] pixel
    values, or already normalised with ``normalized=True``.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor, PIL image(s) or image path(s), got {type(x).__name__}")
    source_dim = x.dim()
    if x.dim() == 3:
        x = x[None]
    want = f"(B, {prep.channels}, {prep.image_size}, {prep.image_size})"
    if x.dim() != 4:
        raise ValueError(f"{name} must be an image batch {want}, got shape {tuple(x.shape)}")
    if x.shape[1] != prep.channels and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        order, fix = ("(H, W, C)", "x.transpose(2, 0, 1)") if source_dim == 3 else ("(B, H, W, C)",
                                                                                    "x.transpose(0, 3, 1, 2)")
        shape = tuple(x.shape[1:]) if source_dim == 3 else tuple(x.shape)
        raise ValueError(f"{name} has shape {shape}: a channels-last {order} array (as numpy and PIL give); the "
                         f"model takes channels first {want}: pass {fix} (or PIL images / files, which are "
                         "converted as in training)")
    if x.shape[1] != prep.channels:
        kind = {1: "greyscale", 3: "RGB"}
        got = kind.get(x.shape[1], f"{x.shape[1]}-channel")
        raise ValueError(f"{name} has {x.shape[1]} channel(s) ({got}), the model expects {prep.channels} "
                         f"({kind[prep.channels]}): shape {tuple(x.shape)}, expected {want}; convert the images "
                         "(image files and PIL images are converted as in training)")
    if tuple(x.shape[2:]) != (prep.image_size, prep.image_size):
        raise ValueError(f"{name} is {x.shape[2]}x{x.shape[3]}, the model expects {prep.image_size}x{prep.image_size} "
                         f"(shape {want}); pass image files or PIL images to resize (shorter side {prep.resize}) and "
                         "centre-crop them as in training")
    if x.dtype == torch.uint8:
        if normalized:
            raise ValueError(f"{name} is uint8 pixel values; normalized=True expects float tensors")
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ValueError(f"{name} must be float (pixel values in [0, 1]) or uint8 (0..255), got {x.dtype}")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf values")
    if not normalized and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name} holds values in [{lo:.3g}, {hi:.3g}], expected pixel values in [0, 1] (before "
                             "mean/std); pass normalized=True for tensors already normalised like the training data")
    return x


def _image_list(path: str, name: str) -> list[str]:
    """The images an image list names: one per line, absolute or relative to the list's folder (a trailing
    integer label and '#' comment lines are ignored); DataError naming the list, the line and the file."""
    folder = os.path.dirname(os.path.abspath(path))
    files = []
    for lineno, line in enumerate(read_text_list(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        entry = parts[0] if len(parts) == 2 and parses_as(parts[1], int) and not os.path.exists(
            os.path.join(folder, line)) else line
        full = os.path.join(folder, entry)  # an absolute entry stays itself
        if not os.path.isfile(full):
            what = "is not a file" if os.path.exists(full) else "not found"
            raise DataError(f"{name} {path}:{lineno}: image {full} {what}")
        files.append(full)
    if not files:
        raise DataError(f"{name} {path}: the image list has no entries")
    return files


def expand_paths(paths: Sequence[str | os.PathLike], name: str = "PATH") -> list[str]:
    """Image files from files, folders and image lists (see the module docstring); DataError naming a bad one."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for raw in paths:
        path = os.fspath(raw)
        if not os.path.exists(path):
            raise DataError(f"{name} {path} not found")
        if os.path.isdir(path):
            found = find_images(path)  # the data folders' scan: hidden files (macOS ._*) skipped, links kept inside
            if not found:
                raise DataError(f"{name} {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files.extend(found)
        elif path.lower().endswith(IMAGE_EXTENSIONS):
            files.append(path)
        else:
            files.extend(_image_list(path, name))
    if not files:
        raise DataError(f"no images given ({name})")
    return files


class PathDataset(torch.utils.data.Dataset):
    """Image files -> (pixel tensor in [0, 1] (C, S, S), index, error); an unreadable file raises
    :class:`~ascood.data.datasets.ImageReadError` naming it, or with ``skip=True`` gives a zero tensor and
    the reason in ``error`` ("" for a file read fine)."""

    def __init__(self, files: Sequence[str], prep: Preprocessing, skip: bool = False) -> None:
        self.files, self.prep, self.skip = list(files), prep, skip
        self.tf = prep.pixel_transform()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.tf(open_image(self.files[i], self.prep.mode)), i, ""
        except (ImageReadError, DataError) as err:
            if not self.skip:
                raise
            reason = err.reason if isinstance(err, ImageReadError) else str(err)
            p = self.prep
            return torch.zeros(p.channels, p.image_size, p.image_size), i, reason
