"""Local-disk datasets and transforms (nothing is ever downloaded).

* :func:`image_folder`: class-per-folder trees (``root/<class>/<image>``).
* :class:`ImageListDataset`: OpenOOD-style lists, one ``relative/path label``
  per line, paths relative to a root directory.
* :class:`CIFARDataset`: the CIFAR-10/100 *python* pickle batches
  (``data_batch_1..5``/``test_batch`` or ``train``/``test``), read with a
  restricted unpickler that only rebuilds numpy arrays, dicts, lists, strings
  and numbers (a crafted batch file cannot run code).
* :class:`ArrayDataset`: numpy arrays in memory (N, H, W[, C]) uint8 or float.
* :func:`build_transforms`: train (random crop pad 4 + flip for <= 64 px,
  RandomResizedCrop + flip otherwise) / test transforms, then normalise.

A missing or unreadable file raises :class:`DataError` naming the file.
16-bit greyscale images (PIL modes ``I;16*``/``I``) are scaled to 8 bits
(value / 257), not clipped.
"""
from __future__ import annotations

import os
import pickle
import re
import unicodedata
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataError", "IMAGE_EXTENSIONS", "build_transforms", "image_folder", "ImageListDataset", "CIFARDataset",
           "FlatImageDataset", "dataset_from_path", "detect_format", "DATA_FORMATS",
           "ArrayDataset", "open_image", "make_loader", "estimate_mean_std", "read_cifar_batch",
           "looks_like_pickle", "unpack_batch", "scan_images", "find_images", "list_entry_path", "CLASS_TABLE_NAME",
           "ImageReadError", "to_mode", "ALPHA_NOTE", "read_text_list", "LinkRoots", "parse_label",
           "split_list_line"]

#: The folder macOS's Archive Utility adds to zip files (resource forks as ``._name``): never data.
MACOS_RESIDUE = "__MACOSX"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(RuntimeError):
    """A data file is missing, unreadable or malformed (the message names it)."""


#: PIL modes of 16-bit greyscale images (PNG/TIFF); ``I`` is what some Pillow versions give 16-bit PNGs.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit "L", scaled by 255/65535 (PIL's own convert clips at 255)."""
    a = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")


class ImageReadError(DataError):
    """One image file cannot be read: ``path`` and a short ``reason`` in our words (not the decoder's text)."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:  # one argument: the whole message, as torch re-raises an error from a DataLoader
            # worker ("Caught ImageReadError in DataLoader worker ... Original Traceback ..."): keep its last line
            lines = [ln.strip() for ln in str(path).splitlines() if ln.strip()]
            last = lines[-1] if lines else str(path)
            path = last.split("ImageReadError: ", 1)[-1]
        super().__init__(path if reason is None else f"cannot read image {path}: {reason}")
        self.path, self.reason = (None, None) if reason is None else (path, reason)


#: Said once per process: images with an alpha channel lose it (see :func:`to_mode`).
ALPHA_NOTE = ("images with transparency (an alpha channel) are read as training reads them: the alpha channel is "
              "dropped and the colour stored under transparent pixels is kept (PIL convert); flatten them onto the "
              "background you want beforehand if that colour is arbitrary")


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """``img`` in PIL ``mode``: the one conversion training, evaluation and prediction share.

    16-bit greyscale is scaled to 8 bits; an alpha channel (RGBA, LA, or a palette with transparency) is
    dropped as PIL's ``convert`` drops it, keeping the stored colour of transparent pixels (what training
    has always done, so a detector scores such images as its model learnt them); :data:`ALPHA_NOTE` is
    warned once per process.
    """
    if img.mode in _WIDE_GREY_MODES:
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns per image when converting such a palette straight to RGB
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") and mode not in ("RGBA", "LA"):
        warnings.warn(ALPHA_NOTE, stacklevel=2)  # one fixed text: Python's warning registry shows it once
    return img.convert(mode)


def open_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open an image fully (so a truncated file fails here, naming the file), converted with :func:`to_mode`.

    An unreadable file raises :class:`ImageReadError` naming the file and the reason in plain words.
    """
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_mode(img, mode)
    except Image.DecompressionBombError:
        raise ImageReadError(path, f"more pixels than the decompression-bomb guard allows (PIL's "
                                   f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); not read") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file in a format PIL reads (damaged, or another kind of "
                                   "file)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageReadError(path, f"damaged or truncated image data ({type(err).__name__})") from err


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


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


class _Skipped:
    """What a folder scan left out, said once per dataset (hidden entries, symlinks leaving the root, loops)."""

    def __init__(self) -> None:
        self.hidden: list[str] = []
        self.outside: list[str] = []
        self.loops: list[str] = []
        #: class-level entries, each named in full: folders without images, class folders linking out.
        self.empty_classes: list[str] = []
        self.outside_classes: list[str] = []

    def describe(self, root: str) -> str:
        """What was skipped, one clause per cause ("" when nothing was)."""
        parts = []
        if self.empty_classes:
            parts.append(f"{len(self.empty_classes)} folder(s) with no images, not classes: "
                         + _some(os.path.basename(p) for p in self.empty_classes))
        if self.outside_classes:
            parts.append(f"{len(self.outside_classes)} class folder link(s) leading out of {root}: "
                         + _some(f"{os.path.basename(p)} -> {os.path.realpath(p)}" for p in self.outside_classes))
        for items, what in ((self.hidden, "hidden file(s)/folder(s)"),
                            (self.outside, "symlink(s) leading out of the data folder"),
                            (self.loops, "symlink loop(s)")):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {os.path.relpath(items[0], root)})")
        return "; ".join(parts)

    def warn(self, root: str) -> None:
        text = self.describe(root)
        if text:
            warnings.warn(f"{root}: skipped " + text, stacklevel=3)


def _some(items, shown: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


def scan_images(top: str, root: str, skipped: _Skipped) -> list[str]:
    """Image files under ``top`` (sorted), for a data folder ``root`` (a class folder, or a flat folder).

    Hidden entries (names starting with ".") are skipped; symlinks are followed
    only while they stay inside ``root``; a directory reached twice (a symlink
    loop, or a link back to an ancestor) is read once. What was skipped is
    recorded in ``skipped`` (said once by the caller).
    """
    root_real = os.path.realpath(root)
    found: list[str] = []
    seen: set[str] = set()
    stack = [top]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            skipped.loops.append(d)
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"cannot list {d}: {err}") from err
        for e in entries:
            if e.name.startswith("."):
                skipped.hidden.append(e.path)
                continue
            if e.is_symlink() and not _inside(os.path.realpath(e.path), root_real):
                skipped.outside.append(e.path)
                continue
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
            except OSError:  # ELOOP: a symlink cycle that never reaches a file or folder
                skipped.loops.append(e.path)
                continue
            if is_dir:
                stack.append(e.path)
            elif is_file and e.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(e.path)
    return sorted(found)


def _image_folder_class():
    from torchvision.datasets import DatasetFolder

    class SafeImageFolder(DatasetFolder):
        """torchvision's ImageFolder with a safe scan (:func:`scan_images`): hidden folders are not classes."""

        def find_classes(self, directory: str):
            """Class folders: sub-folders holding at least one image (an empty folder or macOS's ``__MACOSX``
            residue is not a class; each skipped folder is named once). Names must differ after NFC."""
            root_real = os.path.realpath(directory)
            classes = []
            self._images: dict[str, list[str]] = {}
            for e in sorted(os.scandir(directory), key=lambda e: e.name):
                if e.name.startswith("."):
                    self._skipped.hidden.append(e.path)
                elif e.is_symlink() and not _inside(os.path.realpath(e.path), root_real):
                    self._skipped.outside_classes.append(e.path)
                elif e.is_dir():
                    # Each class folder is its own root: a link out of it (to the parent, to another class)
                    # would give other images this class's label.
                    found = scan_images(e.path, e.path, self._skipped)
                    if found:
                        classes.append(e.name)
                        self._images[e.name] = found
                    else:
                        self._skipped.empty_classes.append(e.path)
            if not classes:
                why = self._skipped.describe(directory)
                raise FileNotFoundError(f"no class folders in {directory}" + (f" (skipped {why})" if why else ""))
            _refuse_nfc_twins(classes, directory)
            return classes, {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            samples = []
            for name, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
                folder = os.path.join(directory, name)
                found = self._images.get(name)
                samples += [(p, idx) for p in (found if found is not None else
                                               scan_images(folder, folder, self._skipped))]
            if not samples:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of "
                                        f"{directory}")
            return samples

        def __init__(self, root: str, transform=None, mode: str = "RGB") -> None:
            self._skipped = _Skipped()
            super().__init__(root, loader=_Loader(mode), extensions=IMAGE_EXTENSIONS, transform=transform)
            self.imgs = self.samples
            self._skipped.warn(root)

    return SafeImageFolder


def code_points(name: str) -> str:
    """``name`` as its code points (U+0065 U+0301), to tell apart names that look the same."""
    return " ".join(f"U+{ord(c):04X}" for c in name)


def _refuse_nfc_twins(names: Sequence[str], where: str) -> None:
    """Two names equal after Unicode NFC normalisation (a macOS NFD folder beside its NFC twin) are one class."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise DataError(f"{where}: {seen[key]!r} ({code_points(seen[key])}) and {name!r} ({code_points(name)}) "
                            "are the same name in different Unicode forms (NFC / NFD); merge the two folders")
        seen[key] = name


def image_folder(root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB"):
    """A class-per-folder dataset over ``root/<class>/<image>`` (classes sorted by name), as torchvision's
    ImageFolder but with a safe scan: hidden entries skipped, symlinks not followed out of ``root``,
    loops read once (each said once, as a warning).

    ``mode``: PIL mode the images are converted to ("RGB", "L", ...).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    loose = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
             and os.path.isfile(os.path.join(root, n))]
    if loose:
        warnings.warn(f"{root}: {len(loose)} image(s) directly beside the class folders are ignored "
                      f"(e.g. {sorted(loose)[0]}); only root/<class>/<image> is read", stacklevel=2)
    try:
        return _image_folder_class()(root, transform=transform, mode=mode)
    except FileNotFoundError as err:
        raise DataError(f"no class folders with images under {root}: {err}") from err


def list_entry_path(list_file: str, lineno: int, entry: str, root: str,
                    allowed_roots: "LinkRoots | Sequence[str] | None" = None) -> str:
    """``root/entry`` for one image-list line; an absolute path or one that climbs out of ``root`` is refused.

    With ``allowed_roots`` the entry is also resolved on disk: a symlink on its way that leads outside both
    ``root`` and every folder of ``allowed_roots`` is refused (see :class:`LinkRoots`). Without it only the
    text is checked (the callers that pass nothing keep their old behaviour).
    """
    norm = os.path.normpath(entry)
    if os.path.isabs(entry):
        rel = os.path.relpath(norm, os.path.abspath(root))
        hint = (f" (inside the root: write it as {rel!r})" if rel != ".." and not rel.startswith(".." + os.sep)
                else "")
        raise DataError(f"{list_file}:{lineno}: path {entry!r} is absolute; training and OpenOOD image lists "
                        f"hold paths relative to the image root {root}{hint}")
    if norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(f"{list_file}:{lineno}: path {entry!r} leaves the image root {root} ('..' climbs above "
                        "it); list paths must stay inside the root")
    full = os.path.join(root, norm)
    if allowed_roots is not None:
        guard = allowed_roots if isinstance(allowed_roots, LinkRoots) else LinkRoots(root, allowed_roots)
        guard.check(full, f"{list_file}:{lineno}", entry)
    return full


class LinkRoots:
    """Where the symlinks met by image-list entries may lead: the rule for data reached through links.

    OpenOOD trees link image folders on purpose (``images_classic/cifar10 -> /disk/cifar10``), so links are
    followed, but only to places the user chose: inside the image ``root`` itself (resolved, so a root that
    is a link is fine), inside the data root of an OpenOOD tree, or inside one of ``allowed`` (the other
    data folders named on the command line, and ``--allow-links-into DIR``). An entry that resolves
    anywhere else (``/etc``, another user's home) is refused with its file, line and where it leads.
    Resolution is cached per folder, so a list of a million entries costs one ``lstat`` per entry.
    """

    def __init__(self, root: str, allowed: Sequence[str | os.PathLike] = ()) -> None:
        self.root = os.fspath(root)
        self.allowed = [os.path.realpath(os.fspath(root))] + [os.path.realpath(os.fspath(a)) for a in allowed]
        self._dirs: dict[str, str] = {}

    def resolve(self, full: str) -> str:
        """``full`` with every symlink resolved (folders cached)."""
        folder, name = os.path.split(full)
        real_dir = self._dirs.get(folder)
        if real_dir is None:
            real_dir = self._dirs[folder] = os.path.realpath(folder)
        target = os.path.join(real_dir, name)
        return os.path.realpath(target) if os.path.islink(target) else target

    def check(self, full: str, where: str, entry: str) -> None:
        """DataError naming ``where`` when ``full`` resolves outside every allowed folder."""
        real = self.resolve(full)
        if any(_inside(real, top) for top in self.allowed):
            return
        shown = ", ".join(self.allowed[:4]) + (" ..." if len(self.allowed) > 4 else "")
        raise DataError(f"{where}: {entry!r} leads through a symlink to {real}, outside the image root "
                        f"{self.root} and the folders allowed for links ({shown}); links may lead only into the "
                        "data root or a data folder named on the command line (add its target with "
                        "--allow-links-into DIR, or allowed_roots= in the API)")


#: A class-name table beside an image list: one class name per line, line i naming label i.
CLASS_TABLE_NAME = "classes.txt"


class ImageListDataset(Dataset):
    """OpenOOD-style image list: each non-empty line is ``relative/path label`` (label int, default -1).

    Paths may contain spaces (the label is the last whitespace-separated field, ASCII decimal digits; a
    negative label other than -1 is refused); the file is UTF-8 with or without a byte-order mark. Paths
    are relative to ``root`` and may not leave it (no absolute paths, no ``..`` above it, and a symlink on
    the way must resolve inside ``root`` or one of ``allowed_roots``: :class:`LinkRoots`); every listed
    image must exist (checked here, not mid-epoch).
    Returns (image tensor, label) pairs; OOD lists may omit the label. A
    ``classes.txt`` beside the list (one name per line, line i naming label i)
    gives the labels names, so splits are matched to a model's classes by name.
    """

    def __init__(self, list_file: str | os.PathLike, root: str | os.PathLike, transform: Callable | None = None,
                 mode: str = "RGB", allowed_roots: Sequence[str | os.PathLike] = ()) -> None:
        list_file, root = os.fspath(list_file), os.fspath(root)
        if not os.path.isfile(list_file):
            raise DataError(f"image list not found: {list_file}")
        if not os.path.isdir(root):
            raise DataError(f"image root not found: {root}")
        self.root, self.transform, self.mode = root, transform, mode
        #: Entries reached through symlinks must resolve inside ``root`` or one of these (:class:`LinkRoots`).
        self.allowed_roots = LinkRoots(root, allowed_roots)
        self.list_file = list_file
        self.samples: list[tuple[str, int]] = []
        #: line number in ``list_file`` of each sample (for messages that point at a line).
        self.lines: list[int] = []
        for lineno, line in enumerate(_read_text_list(list_file), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, label = split_list_line(line, f"{list_file}:{lineno}")
            full = list_entry_path(list_file, lineno, path, root, allowed_roots=self.allowed_roots)
            if not os.path.isfile(full):  # found now, not mid-epoch
                raise DataError(f"{list_file}:{lineno}: image {full} not found")
            self.samples.append((full, label))
            self.lines.append(lineno)
        if not self.samples:
            raise DataError(f"image list {list_file} has no entries")
        self.targets = [lab for _, lab in self.samples]
        #: label i -> class name, from ``classes.txt`` beside the list (None: labels are bare indices).
        self.class_names: list[str] | None = self._read_class_table()

    def _read_class_table(self) -> list[str] | None:
        table = os.path.join(os.path.dirname(os.path.abspath(self.list_file)), CLASS_TABLE_NAME)
        if not os.path.isfile(table):
            return None
        names = [ln.strip() for ln in _read_text_list(table) if ln.strip()]
        top = max(self.targets)
        if top >= len(names):
            raise DataError(f"{self.list_file}: label {top} has no name in {table} ({len(names)} names)")
        if len(set(names)) != len(names):
            raise DataError(f"{table}: class names must be unique")
        _refuse_nfc_twins(names, table)
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = open_image(path, self.mode)
        return (self.transform(img) if self.transform else img), label


def read_text_list(list_file: str) -> list[str]:
    """The lines of a UTF-8 text list; a binary file (an image, a checkpoint) is a DataError saying so."""
    return _read_text_list(list_file)


def _read_text_list(list_file: str) -> list[str]:
    """The lines of a UTF-8 text file; a binary file (an image, a checkpoint) is a DataError saying so."""
    with open(list_file, "rb") as f:
        raw = f.read()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        return raw.decode("utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError:
        raise DataError(f"{list_file} is not a text image list (expected UTF-8 lines 'relative/path label'); "
                        "for a folder of images pass the folder") from None


#: A label as OpenOOD writes it: plain ASCII decimal digits, "-" only for -1 (int() also takes "1_0",
#: "+1" and other scripts' digits such as Arabic-Indic ones; those are refused, not read as another number).
_PLAIN_INT = re.compile(r"-?[0-9]+")


def parse_label(text: str) -> int | None:
    """``text`` as a plain decimal integer (ASCII digits, optional leading "-"), else None."""
    return int(text) if _PLAIN_INT.fullmatch(text) else None


def split_list_line(line: str, where: str) -> tuple[str, int]:
    """(path, label) of one stripped, non-comment image-list line; the label is -1 when the line has none.

    The label is the last whitespace-separated field when it is a number; paths may hold spaces. A last
    field that Python would read as a number but that is not a plain decimal integer (``1.5``, ``1_0``,
    ``+1``, ``١``) and a negative label other than -1 (OOD / unlabelled) raise :class:`DataError` naming
    ``where`` ("file:line").
    """
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
        return line, -1
    label = parse_label(parts[1])
    if label is None:
        if parses_as(parts[1], int) or parses_as(parts[1], float):
            raise DataError(f"{where}: label {parts[1]!r} is not an integer class index in plain decimal "
                            "(expected ASCII digits such as 3, or -1 for OOD / unlabelled)")
        return line, -1
    if label < -1:
        raise DataError(f"{where}: label {label} is negative; labels are class indices 0, 1, ... or -1 "
                        "(OOD / unlabelled)")
    return parts[0], label


def parses_as(s: str, kind: type) -> bool:
    try:
        kind(s)
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
            entry = read_cifar_batch(path)
            try:
                images = entry["data"]
                if not (isinstance(images, np.ndarray) and images.dtype.kind in "ui"):
                    raise TypeError(f"'data' must be an integer numpy array, got {type(images).__name__}")
                data.append(np.asarray(images, dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in entry[key])
            except Exception as err:  # wrong keys, wrong sizes, non-numeric labels
                raise DataError(f"cannot read CIFAR batch {path}: {type(err).__name__}: {err}") from err
        super().__init__(np.concatenate(data).transpose(0, 2, 3, 1), np.asarray(labels), transform)
        self.classes = list(range(num_classes))


def _allowed_global(module: str, name: str):
    import importlib

    for mod in (module.replace("numpy.core", "numpy._core"), module):  # numpy 2 renamed numpy.core
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


#: The only globals a CIFAR batch needs: numpy's array reconstruction (protocols 0-5). None of these calls
#: back into arbitrary code; object arrays are refused after loading.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),  # numpy scalars (labels)
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # Python 3's protocol-2 pickles store bytes as _codecs.encode(str, "latin1"): a pure string function.
    ("_codecs", "encode"),
}


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays and plain containers only (refuses every other global)."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            obj = _allowed_global(module, name)
            if obj is not None:
                return obj
        raise DataError(f"{self.path} is not a plain CIFAR batch: it references the Python global "
                        f"{module}.{name}, which is refused (a CIFAR batch holds only numpy arrays, lists "
                        "and strings; a file that names other globals could run code)")

    def persistent_load(self, pid):
        raise DataError(f"{self.path} is not a plain CIFAR batch (persistent references are refused)")


def looks_like_pickle(path: str) -> bool:
    """True when ``path`` is a file starting with a pickle protocol-2+ header (byte 0x80), as CIFAR batches do."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def read_cifar_batch(path: str) -> dict:
    """One CIFAR python batch as a dict (keys as str), via :class:`_CIFARUnpickler`; DataError naming the file."""
    if not looks_like_pickle(path):
        raise DataError(f"{path} is not a CIFAR python batch (it does not start with a pickle header)")
    try:
        with open(path, "rb") as f:
            entry = _CIFARUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as err:  # truncated or corrupt pickle
        raise DataError(f"cannot read CIFAR batch {path}: {type(err).__name__}: {err}") from err
    if not isinstance(entry, dict):
        raise DataError(f"cannot read CIFAR batch {path}: expected a dict, got {type(entry).__name__}")
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    for k, v in entry.items():
        if isinstance(v, np.ndarray) and v.dtype.hasobject:
            raise DataError(f"cannot read CIFAR batch {path}: {k!r} is an object array (refused)")
    return entry


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a (x, y, ...) tuple/list or a {"data", "label"} dict (OpenOOD style)."""
    if isinstance(batch, dict):
        return batch["data"], batch["label"]
    return batch[0], batch[1]


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


def find_images(folder: str | os.PathLike) -> list[str]:
    """Every image file below ``folder``, sorted, scanned as the data folders are (:func:`scan_images`:
    hidden entries skipped, symlinks followed only inside ``folder``, loops read once; what was skipped is
    said once as a warning). An empty list when there is none."""
    folder = os.fspath(folder)
    skipped = _Skipped()
    found = scan_images(folder, folder, skipped)
    skipped.warn(folder)
    return found


class FlatImageDataset(Dataset):
    """All images directly under (or anywhere below) ``root``, unlabelled (label -1): typical OOD folders.

    Scanned like :func:`image_folder` (hidden entries skipped, symlinks kept inside ``root``, loops read once).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB") -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}")
        self.paths = find_images(root)
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
    # CIFAR needs unpickling (with a restricted unpickler); only pick it for files that are pickles at all.
    def pickles(*files: str) -> bool:
        present = [n for n in files if n in names]
        return bool(present) and all(looks_like_pickle(os.path.join(path, n)) for n in present)

    if pickles("data_batch_1", "test_batch"):
        return "cifar10"
    if pickles("train", "test"):
        return "cifar100"
    # macOS's zip residue is never a class folder: a flat folder unzipped with it stays flat.
    has_class_dirs = any(os.path.isdir(os.path.join(path, n)) for n in names
                         if not n.startswith(".") and n != MACOS_RESIDUE)
    return "folder" if has_class_dirs else "flat"


def dataset_from_path(path: str | os.PathLike, transform: Callable | None, *, train: bool, fmt: str = "auto",
                      root: str | os.PathLike | None = None, mode: str = "RGB",
                      allowed_roots: Sequence[str | os.PathLike] = ()) -> Dataset:
    """A dataset from a path: class folders, a flat folder, an image list (with ``root``) or CIFAR batches.

    ``fmt="auto"`` detects: a file is an image list (root defaults to the
    list's directory); a directory with ``data_batch_1``/``test_batch`` pickle
    files is CIFAR-10, one with ``train``/``test`` pickle files CIFAR-100
    (read with a restricted unpickler: no code runs); a directory with
    subdirectories is a class-per-folder tree; otherwise a flat folder of
    unlabelled images. For CIFAR, ``train`` picks the train or test batches.
    ``allowed_roots``: for image lists, folders that symlinked entries may lead into besides the root
    (:class:`LinkRoots`).
    """
    path = os.fspath(path)
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {DATA_FORMATS}, got {fmt!r}")
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "list":
        return ImageListDataset(path, root if root is not None else os.path.dirname(os.path.abspath(path)),
                                transform, mode, allowed_roots=allowed_roots)
    if fmt in ("cifar10", "cifar100"):
        ds = CIFARDataset(path, train=train, num_classes=10 if fmt == "cifar10" else 100, transform=transform)
        return ds
    if fmt == "flat":
        return FlatImageDataset(path, transform, mode)
    return image_folder(path, transform, mode)
