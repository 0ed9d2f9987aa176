"""Small OOD benchmarks built at run time from images that installed packages ship.

Nothing is downloaded. The in-distribution (ID) images are scikit-learn's 1,797
8x8 handwritten digits (``sklearn/datasets/data/digits.csv.gz``, the file
:func:`sklearn.datasets.load_digits` reads); the textures and photographs are
PNG/JPEG files inside the installed ``skimage/data`` folder (brick, grass,
gravel, camera, coins, ...). Those files are read directly with Pillow;
``skimage.data``'s loader functions (which route through ``pooch``, a
downloader) are never called, and neither package is imported for it.

Each benchmark mirrors one of the paper's three settings in miniature
(:data:`SETTINGS`; :func:`load_bundled` is the entry point):

``"fine-grained"`` (the paper's Aircraft/Car "90/10" class split)
    ID = 8 digit classes (0-7), OOD = the 2 held-out classes (8, 9) drawn by
    the same writers with the same pen. OOD differs from ID only in the
    semantic class, never in style, exactly as the 10 held-out aircraft
    variants differ from the 90 ID ones. 1 channel (grey).

``"spurious"`` (the paper's Waterbirds construction, Sagawa et al. / Ming et al.)
    Each digit is drawn in white ink over a coloured texture: environment 0 is
    a red-tinted crop of ``brick.png`` (the "land" background), environment 1 a
    green-tinted crop of ``grass.png`` (the "water" background). Classes 0-3
    form label group 0, classes 4-7 group 1 (group = the first / second half
    of the ID classes, like landbird / waterbird). In *train*, a fraction
    ``correlation`` (default 0.9) of every class lies on its group's majority
    background (group 0 -> brick, group 1 -> grass), the rest on the other one:
    exactly ``round(correlation * n_c)`` images of each class, so the reached
    correlation equals the target up to rounding. As in Waterbirds, *val* and
    *test* are balanced (``test_correlation`` = 0.5: each class half on each
    background), so accuracy and OOD detection cannot lean on the background.
    OOD = the held-out classes (8, 9) on the *same* two backgrounds, half each:
    the spurious-OOD construction psi(x'_inv, e) of the paper (different
    invariant object, shared environment). "Correlation" here is Ming et al.'s
    r = P(background = the class group's majority background); the phi
    (Pearson) coefficient between the binary group and the binary background
    is ``2 r - 1`` for balanced groups, and both are in :meth:`describe`.
    3 channels (RGB).

``"conventional"`` (the paper's CIFAR vs Textures / Places / iSUN ...)
    ID = all 10 digit classes, grey. OOD sets, both grey (converted with
    Pillow's ITU-R 601-2 luma) and resized to the ID size:

    * ``"textures"``: random square crops of brick, grass and gravel (the
      stand-in for the Describable Textures set);
    * ``"photos"``: random square crops of astronaut, camera, chelsea, coffee,
      coins, moon, rocket and motorcycle_left (the stand-in for Places /
      iSUN scenes). Photos of text (page, text) and the dark star field
      (hubble) are left out: conventional OOD must be unlike digits in every
      way (content, style, intensity statistics).

Splits and sizes (independent of the seed; the seed decides *which* images):

* ID digits are split per class 60 / 10 / 30 % into train / val / test
  (``round`` per class, the remainder goes to test); held-out-class digits
  25 / 75 % into OOD val / OOD test. Each source digit is in exactly one split,
  and the 1,797 digits contain no exact duplicates, so no image is in two
  splits.
* Texture / photo crops are cut from disjoint horizontal bands of each source
  image: for the spurious backgrounds rows [0, 60 %) for train, [60, 70 %) for
  val and [70, 100 %) for test and OOD test; for the conventional OOD sets
  rows [0, 25 %) for OOD val and [25, 100 %) for OOD test. No (size, position)
  crop is drawn twice within a source image.

==============  =====  ===  ====  ==========================================
setting         train  val  test  OOD test (OOD val)
==============  =====  ===  ====  ==========================================
fine-grained     866   144   433  held_out 265 (89)
spurious         866   144   433  spurious 265 (89)
conventional    1078   179   540  textures 540 (90), photos 540 (90)
==============  =====  ===  ====  ==========================================

(``train_shifts=k`` multiplies the train size by ``1 + k``; other splits are
unchanged.)

Augmentation: with ``train_shifts=k`` (default 0) every train digit gets ``k``
extra copies, each shifted by a distinct non-zero offset (dy, dx) in
{-s, 0, s}^2 with s = max(1, image_size // 16) pixels (1 pixel at 16x16, i.e.
half a pixel of the 8x8 original), zero-filled; the offsets are drawn from the
seed. Copies stay in train (and, in the spurious setting, get their own
background), so val and test never see a shifted copy of a train digit.

Images are float32 tensors (N, C, H, W) with values in [0, 1], *not*
normalised; :attr:`BundledBenchmark.mean` / :attr:`BundledBenchmark.std` are
the per-channel statistics of the train split (population std, over N, H, W)
and :meth:`BundledBenchmark.normalize` applies them. Labels are int64 in
[0, num_classes): ID digit ``id_classes[i]`` has label ``i``.

Digits are upsampled from 8x8 with bilinear interpolation (align_corners=False);
crops are resized with antialiased bilinear interpolation. Everything is
deterministic from ``seed`` (NumPy PCG64 streams keyed by seed, setting and
purpose; CPU torch interpolation), builds in well under a second, and the raw
files are read once per process (cached).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "SETTINGS",
    "BundledBenchmark",
    "load_bundled",
    "fine_grained",
    "spurious",
    "conventional",
    "load_digit_arrays",
    "skimage_image_path",
    "ID_FRACTIONS",
    "OOD_VAL_FRACTION",
    "TEXTURES",
    "PHOTOS",
    "SPURIOUS_BACKGROUNDS",
]

SETTINGS: tuple[str, ...] = ("fine-grained", "spurious", "conventional")

#: Per-class fractions of the ID digits in (train, val, test).
ID_FRACTIONS: tuple[float, float, float] = (0.6, 0.1, 0.3)
#: Fraction of each held-out digit class that goes to OOD val (the rest: OOD test).
OOD_VAL_FRACTION: float = 0.25

#: skimage texture files used as the conventional "textures" OOD set.
TEXTURES: tuple[str, ...] = ("brick.png", "grass.png", "gravel.png")
#: skimage photographs used as the conventional "photos" OOD set.
PHOTOS: tuple[str, ...] = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "moon.png",
                           "rocket.jpg", "motorcycle_left.png")
#: Spurious environments: (texture file, RGB tint). Env 0 ~ "land", env 1 ~ "water".
SPURIOUS_BACKGROUNDS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("brick.png", (1.0, 0.55, 0.35)),
    ("grass.png", (0.4, 0.95, 0.45)),
)

_DEFAULT_OOD_CLASSES = (8, 9)
# Spurious backgrounds: row bands (fractions of the texture height) per split.
_SPURIOUS_BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.7), "test": (0.7, 1.0)}
_SPURIOUS_SIDE = (24, 48)          # background crop side in source pixels (textures are 512x512)
# Conventional OOD: row bands per split and crop sides.
_CONV_BANDS = {"val": (0.0, 0.25), "test": (0.25, 1.0)}
_TEXTURE_SIDE = (24, 64)            # source pixels
_PHOTO_SIDE_FRAC = (0.1, 0.3)       # fraction of min(H, W) of the photo
_CONV_OOD_SIZES = {"test": 540, "val": 90}   # per OOD set
# Background intensity: bg = tint * (_BG_LO + _BG_SPAN * texture), so bg <= 0.8 < white ink.
_BG_LO, _BG_SPAN = 0.2, 0.6


# ----------------------------------------------------------------------------- raw files

def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        extra = "scikit-learn" if name == "sklearn" else "scikit-image"
        raise ImportError(f"the bundled benchmarks need {extra} installed (pip install 'ascood[demo]')")
    return list(spec.submodule_search_locations)[0]


def skimage_image_path(name: str) -> str:
    """Absolute path of an image file shipped inside the installed ``skimage/data`` folder.

    Raises FileNotFoundError (never downloads) if this scikit-image build lacks it.
    """
    path = os.path.join(_package_dir("skimage"), "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not shipped with the installed scikit-image; the bundled "
                                f"benchmarks use only files inside the package and never download")
    return path


def _digits_path() -> str:
    return os.path.join(_package_dir("sklearn"), "datasets", "data", "digits.csv.gz")


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[np.ndarray, np.ndarray]:
    path = _digits_path()
    if os.path.isfile(path):
        raw = np.loadtxt(path, delimiter=",")
        images, labels = raw[:, :-1], raw[:, -1]
    else:  # a scikit-learn that stores the file elsewhere: go through its loader (also local)
        from sklearn.datasets import load_digits
        images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8).astype(np.uint8)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read from the installed package.

    Returns:
        images: uint8 (1797, 8, 8) with values 0..16; labels: int64 (1797,) in 0..9.
        Read-only arrays (cached); the same data as ``sklearn.datasets.load_digits``.
    """
    return _digits_cached()


@functools.lru_cache(maxsize=None)
def _grey_image(name: str) -> np.ndarray:
    """float32 (H, W) in [0, 1]: a shipped skimage image converted to grey (ITU-R 601-2 luma)."""
    from PIL import Image

    with Image.open(skimage_image_path(name)) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    arr.flags.writeable = False
    return arr


# ----------------------------------------------------------------------------- helpers

_SETTING_KEYS = {"fine-grained": 1, "spurious": 2, "conventional": 3}


def _rng(seed: int, setting: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SETTING_KEYS[setting], purpose])


def _upsample_digits(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, 8, 8) 0..16 -> float32 (N, S, S) in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0)
    if image_size != 8:
        x = F.interpolate(x[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < 8)[:, 0]
    return x.clamp_(0.0, 1.0).contiguous()


def _split_classes(labels: np.ndarray, classes: Sequence[int], fractions: Sequence[float],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Per-class split of the indices of ``classes`` into len(fractions) parts (last = remainder)."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for k, frac in enumerate(fractions):
            n = len(idx) - start if k == len(fractions) - 1 else int(round(frac * len(idx)))
            parts[k].append(idx[start:start + n])
            start += n
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]


_SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (N, H, W) by (dy, dx) pixels with zero fill."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def _add_shifted_copies(x: torch.Tensor, src: np.ndarray, copies: int, image_size: int,
                        rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Append ``copies`` shifted copies of every (N, S, S) digit; returns (x, source indices)."""
    if copies == 0:
        return x, src
    if not 0 <= copies <= len(_SHIFTS):
        raise ValueError(f"train_shifts must be in [0, {len(_SHIFTS)}], got {copies}")
    step = max(1, image_size // 16)
    choice = np.stack([rng.permutation(len(_SHIFTS))[:copies] for _ in range(len(x))])  # (N, copies)
    xs, srcs = [x], [src]
    for k in range(copies):
        xk = torch.empty_like(x)
        for j, (dy, dx) in enumerate(_SHIFTS):
            sel = torch.from_numpy(np.flatnonzero(choice[:, k] == j))
            if len(sel):
                xk[sel] = _shift(x[sel], dy * step, dx * step)
        xs.append(xk)
        srcs.append(src)
    return torch.cat(xs), np.concatenate(srcs)


def _crops(img: np.ndarray, n: int, band: tuple[float, float], side: tuple[int, int], out: int,
           rng: np.random.Generator) -> torch.Tensor:
    """``n`` distinct random square crops inside a row band of a (H, W) image, resized to (out, out).

    Returns float32 (n, out, out) in [0, 1].
    """
    h, w = img.shape
    r0, r1 = int(round(band[0] * h)), int(round(band[1] * h))
    lo, hi = side
    hi = min(hi, r1 - r0, w)
    lo = min(lo, hi)
    seen: set[tuple[int, int, int]] = set()
    res = torch.empty(n, out, out)
    k = tries = 0
    while k < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot cut {n} distinct crops from a {r1 - r0}x{w} band")
        s = int(rng.integers(lo, hi + 1))
        top = int(rng.integers(r0, r1 - s + 1))
        left = int(rng.integers(0, w - s + 1))
        if (s, top, left) in seen:
            continue
        seen.add((s, top, left))
        patch = torch.from_numpy(np.ascontiguousarray(img[top:top + s, left:left + s]))[None, None]
        res[k] = F.interpolate(patch, size=(out, out), mode="bilinear", align_corners=False,
                               antialias=True)[0, 0]
        k += 1
    return res.clamp_(0.0, 1.0)


def _even_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _single_threaded(fn: Callable[..., BundledBenchmark]) -> Callable[..., BundledBenchmark]:
    """Run a builder with one intra-op torch thread (restored after).

    The build is thousands of tiny tensor ops; with several OpenMP threads on a
    busy machine each op pays the thread-pool hand-off (10x slower measured on
    2 shared cores), and one thread gives the same result bit for bit.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapper


def _check_common(seed: int, image_size: int, train_shifts: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
    if not isinstance(train_shifts, (int, np.integer)) or not 0 <= train_shifts <= len(_SHIFTS):
        raise ValueError(f"train_shifts must be an int in [0, {len(_SHIFTS)}], got {train_shifts!r}")


def _check_ood_classes(ood_classes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ood = tuple(sorted({int(c) for c in ood_classes}))
    if not ood or any(c < 0 or c > 9 for c in ood) or len(ood) > 8:
        raise ValueError(f"ood_classes must be 1..8 distinct digits in 0..9, got {tuple(ood_classes)}")
    return tuple(c for c in range(10) if c not in ood), ood


def _permute(rng: np.random.Generator, *arrays):
    n = len(arrays[0])
    p = rng.permutation(n)
    pt = torch.from_numpy(p)
    return tuple(a[pt] if isinstance(a, torch.Tensor) else a[p] for a in arrays)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return (x.mean(dim=(0, 2, 3)).float(),
            x.std(dim=(0, 2, 3), correction=0).float())


# ----------------------------------------------------------------------------- container

@dataclass
class BundledBenchmark:
    """One bundled OOD benchmark; every image tensor is float32 (N, C, H, W) in [0, 1].

    Attributes:
        setting: one of :data:`SETTINGS`.
        seed: the seed it was built from.
        train, val, test: ID ``TensorDataset(x, y)``; x float32 (N, C, S, S), y int64 (N,)
            in [0, num_classes). ``val`` is for hyperparameter selection only.
        ood: OOD test sets, name -> float32 (M, C, S, S) (insertion order = report order).
        val_ood: OOD validation sets with the same names, disjoint from ``ood``.
        num_classes, in_channels, image_size: model shapes.
        mean, std: float32 (C,), per-channel mean / population std of ``train`` images.
        id_classes: original digit of each label (label i is digit ``id_classes[i]``).
        ood_classes: held-out digits used as OOD (empty for "conventional").
        source: split key ("train", "val", "test", "ood/<name>", "val_ood/<name>") -> int64 (N,)
            index of the source digit in :func:`load_digit_arrays` (-1 for crops of
            textures / photos). Shifted train copies share their original's index.
        env: spurious setting only: split key -> int64 (N,) background id
            (0 = brick, 1 = grass); empty otherwise.
        info: extra facts (targets and reached correlations, files used, construction).
    """

    setting: str
    seed: int
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    ood: dict[str, torch.Tensor]
    val_ood: dict[str, torch.Tensor]
    num_classes: int
    in_channels: int
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor
    id_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]
    source: dict[str, torch.Tensor] = field(default_factory=dict)
    env: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel; x is (N, C, H, W) or (C, H, W)."""
        shape = (-1, 1, 1)
        return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    def images(self) -> dict[str, torch.Tensor]:
        """Every image tensor by split key (same keys as :attr:`source`)."""
        out = {"train": self.train.tensors[0], "val": self.val.tensors[0], "test": self.test.tensors[0]}
        out.update({f"val_ood/{k}": v for k, v in self.val_ood.items()})
        out.update({f"ood/{k}": v for k, v in self.ood.items()})
        return out

    def sizes(self) -> dict[str, int]:
        """Number of images per split key."""
        return {k: int(v.shape[0]) for k, v in self.images().items()}

    def describe(self) -> str:
        """Human-readable summary: split sizes, classes and (spurious) the correlation reached."""
        lines = [f"bundled '{self.setting}' benchmark (seed {self.seed}): {self.num_classes} ID classes "
                 f"(digits {list(self.id_classes)}), {self.in_channels}x{self.image_size}x{self.image_size} "
                 f"images in [0, 1]"]
        if self.ood_classes:
            lines.append(f"  held-out OOD digits: {list(self.ood_classes)}")
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in self.sizes().items()))
        if self.setting == "spurious":
            c = self.info["correlation"]
            lines.append(f"  background-label correlation r = P(bg = group's majority bg): "
                         f"train {c['train']:.3f} (target {self.info['correlation_target']}, "
                         f"phi {c['train_phi']:.3f}), val {c['val']:.3f}, test {c['test']:.3f}; "
                         f"OOD on brick: {c['ood_brick_fraction']:.3f}")
        lines.append(f"  construction: {self.info.get('construction', '')}")
        return "\n".join(lines)


def _finish(setting: str, seed: int, image_size: int, parts: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]],
            ood: dict[str, tuple[torch.Tensor, np.ndarray]], val_ood: dict[str, tuple[torch.Tensor, np.ndarray]],
            id_classes: tuple[int, ...], ood_classes: tuple[int, ...], env: dict[str, np.ndarray],
            info: dict) -> BundledBenchmark:
    """parts: split -> (x (N,C,S,S), labels (original digits), source idx); ood / val_ood: name -> (x, src)."""
    remap = np.full(10, -1, np.int64)
    remap[list(id_classes)] = np.arange(len(id_classes))
    ds = {}
    source = {}
    for split, (x, digit, src) in parts.items():
        y = torch.from_numpy(remap[digit])
        ds[split] = TensorDataset(x.contiguous(), y)
        source[split] = torch.from_numpy(src.astype(np.int64))
    for prefix, group in (("val_ood", val_ood), ("ood", ood)):
        for name, (x, src) in group.items():
            source[f"{prefix}/{name}"] = torch.from_numpy(src.astype(np.int64))
    mean, std = _stats(ds["train"].tensors[0])
    return BundledBenchmark(
        setting=setting, seed=int(seed), train=ds["train"], val=ds["val"], test=ds["test"],
        ood={k: v[0].contiguous() for k, v in ood.items()}, val_ood={k: v[0].contiguous() for k, v in val_ood.items()},
        num_classes=len(id_classes), in_channels=int(parts["train"][0].shape[1]), image_size=int(image_size),
        mean=mean, std=std, id_classes=id_classes, ood_classes=ood_classes, source=source,
        env={k: torch.from_numpy(v.astype(np.int64)) for k, v in env.items()}, info=info)


def _digit_splits(setting: str, seed: int, image_size: int, id_classes: tuple[int, ...],
                  ood_classes: tuple[int, ...], train_shifts: int):
    """Common digit part: returns (parts split -> (x (N,S,S), digit, src), ood_parts split -> (x, src))."""
    images, labels = load_digit_arrays()
    rng = _rng(seed, setting, 0)
    tr, va, te = _split_classes(labels, id_classes, ID_FRACTIONS, rng)
    parts = {}
    for split, idx in (("train", tr), ("val", va), ("test", te)):
        x = _upsample_digits(images[idx], image_size)
        if split == "train":
            x, idx = _add_shifted_copies(x, idx, train_shifts, image_size, _rng(seed, setting, 1))
        x, idx = _permute(_rng(seed, setting, 2 + len(parts)), x, idx)
        parts[split] = (x, labels[idx], idx)
    ood_parts = {}
    if ood_classes:
        ova, ote = _split_classes(labels, ood_classes, (OOD_VAL_FRACTION, 1 - OOD_VAL_FRACTION), rng)
        for split, idx in (("val", ova), ("test", ote)):
            x, idx = _permute(_rng(seed, setting, 10 + len(ood_parts)), _upsample_digits(images[idx], image_size), idx)
            ood_parts[split] = (x, idx)
    return parts, ood_parts


# ----------------------------------------------------------------------------- settings

@_single_threaded
def fine_grained(seed: int = 0, image_size: int = 16, *, ood_classes: Sequence[int] = _DEFAULT_OOD_CLASSES,
                 train_shifts: int = 0) -> BundledBenchmark:
    """Fine-grained setting: ID = the digits not in ``ood_classes``, OOD (``"held_out"``) = ``ood_classes``.

    Mirrors the paper's Aircraft/Car ID/OOD class split (90/10 variants): OOD
    images come from the same domain (writers, pen, scanner) and differ from ID
    only in the class. 1 channel; sizes in the module docstring.
    """
    _check_common(seed, image_size, train_shifts)
    id_classes, ood = _check_ood_classes(ood_classes)
    parts, ood_parts = _digit_splits("fine-grained", seed, image_size, id_classes, ood, train_shifts)
    parts = {k: (x[:, None], d, s) for k, (x, d, s) in parts.items()}
    info = {"construction": f"ID = digits {list(id_classes)}, OOD 'held_out' = digits {list(ood)} "
                            f"(class split, like Aircraft/Car 90/10); train_shifts={train_shifts}",
            "files": [_digits_path()], "train_shifts": int(train_shifts)}
    return _finish("fine-grained", seed, image_size, parts,
                   {"held_out": (ood_parts["test"][0][:, None], ood_parts["test"][1])},
                   {"held_out": (ood_parts["val"][0][:, None], ood_parts["val"][1])},
                   id_classes, ood, {}, info)


def _assign_env(digits: np.ndarray, id_classes: tuple[int, ...], r: float, rng: np.random.Generator) -> np.ndarray:
    """Per class: exactly round(r * n_c) images on the class group's majority background."""
    half = len(id_classes) // 2
    env = np.empty(len(digits), np.int64)
    for pos, c in enumerate(id_classes):
        idx = np.flatnonzero(digits == c)
        idx = idx[rng.permutation(len(idx))]
        major = 0 if pos < half else 1
        n_major = int(round(r * len(idx)))
        env[idx[:n_major]] = major
        env[idx[n_major:]] = 1 - major
    return env


def _composite(digit: torch.Tensor, env: np.ndarray, band: tuple[float, float], image_size: int,
               rng: np.random.Generator) -> torch.Tensor:
    """White digit ink (alpha = digit intensity) over a tinted texture crop; (N, S, S) -> (N, 3, S, S)."""
    out = torch.empty(len(digit), 3, image_size, image_size)
    for e, (name, tint) in enumerate(SPURIOUS_BACKGROUNDS):
        sel = np.flatnonzero(env == e)
        if len(sel) == 0:
            continue
        tex = _crops(_grey_image(name), len(sel), band, _SPURIOUS_SIDE, image_size, rng)   # (n, S, S)
        bg = torch.tensor(tint).view(1, 3, 1, 1) * (_BG_LO + _BG_SPAN * tex[:, None])
        a = digit[torch.from_numpy(sel)][:, None]
        out[torch.from_numpy(sel)] = (1.0 - a) * bg + a * 1.0
    return out


def _agreement(digits: np.ndarray, env: np.ndarray, id_classes: tuple[int, ...]) -> float:
    half = len(id_classes) // 2
    group = np.isin(digits, id_classes[half:]).astype(np.int64)
    return float(np.mean(group == env))


def _phi(digits: np.ndarray, env: np.ndarray, id_classes: tuple[int, ...]) -> float:
    half = len(id_classes) // 2
    group = np.isin(digits, id_classes[half:]).astype(np.float64)
    e = env.astype(np.float64)
    if group.std() == 0 or e.std() == 0:
        return float("nan")
    return float(np.corrcoef(group, e)[0, 1])


@_single_threaded
def spurious(seed: int = 0, image_size: int = 16, *, ood_classes: Sequence[int] = _DEFAULT_OOD_CLASSES,
             correlation: float = 0.9, test_correlation: float = 0.5, train_shifts: int = 0) -> BundledBenchmark:
    """Spurious setting (the Waterbirds construction); 3 channels, sizes in the module docstring.

    Args:
        correlation: r in train, the fraction of each class on its group's
            majority background (group 0 = first half of the ID classes ->
            brick, group 1 -> grass). Ming et al. use r = 0.9 for Waterbirds.
        test_correlation: the same fraction in ID val and test; 0.5 (default)
            = balanced, as Waterbirds' val/test; set it to ``correlation`` for a
            test split with the train correlation.
        ood_classes: held-out digits; OOD ``"spurious"`` = them on the same two
            backgrounds, half on each (the same environments, another object).

    :attr:`BundledBenchmark.env` holds each image's background (0 brick, 1 grass),
    ``info["correlation"]`` the reached values.
    """
    _check_common(seed, image_size, train_shifts)
    for nm, v in (("correlation", correlation), ("test_correlation", test_correlation)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{nm} must be in [0, 1], got {v}")
    id_classes, ood = _check_ood_classes(ood_classes)
    if len(id_classes) < 2:
        raise ValueError("the spurious setting needs at least 2 ID classes")
    setting = "spurious"
    parts, ood_parts = _digit_splits(setting, seed, image_size, id_classes, ood, train_shifts)
    env: dict[str, np.ndarray] = {}
    out_parts = {}
    for i, (split, (x, d, s)) in enumerate(parts.items()):
        r = correlation if split == "train" else test_correlation
        e = _assign_env(d, id_classes, float(r), _rng(seed, setting, 20 + i))
        env[split] = e
        band = _SPURIOUS_BANDS[split]
        out_parts[split] = (_composite(x, e, band, image_size, _rng(seed, setting, 30 + i)), d, s)
    ood_out = {}
    for i, (split, (x, s)) in enumerate(ood_parts.items()):
        e = np.zeros(len(x), np.int64)
        e[_rng(seed, setting, 40 + i).permutation(len(x))[len(x) // 2:]] = 1  # half brick, half grass
        key = f"{'val_ood' if split == 'val' else 'ood'}/spurious"
        env[key] = e
        ood_out[split] = (_composite(x, e, _SPURIOUS_BANDS[split], image_size, _rng(seed, setting, 50 + i)), s)
    # Crops of one band are drawn in two passes (ID test, OOD test) from different streams:
    # identical (size, position) crops are possible but the digits differ, so images never coincide.
    corr = {split: _agreement(parts[split][1], env[split], id_classes) for split in parts}
    corr["train_phi"] = _phi(parts["train"][1], env["train"], id_classes)
    corr["ood_brick_fraction"] = float(np.mean(env["ood/spurious"] == 0))
    half = len(id_classes) // 2
    info = {
        "construction": (f"white digits on tinted textures; env 0 = red brick, env 1 = green grass; digits "
                         f"{list(id_classes[:half])} mostly on brick, {list(id_classes[half:])} mostly on grass "
                         f"(train r={correlation}, val/test r={test_correlation}); OOD 'spurious' = digits "
                         f"{list(ood)} on both backgrounds (Waterbirds construction); train_shifts={train_shifts}"),
        "correlation_target": float(correlation), "test_correlation_target": float(test_correlation),
        "correlation": corr, "files": [_digits_path()] + [skimage_image_path(n) for n, _ in SPURIOUS_BACKGROUNDS],
        "backgrounds": [n for n, _ in SPURIOUS_BACKGROUNDS], "train_shifts": int(train_shifts),
    }
    return _finish(setting, seed, image_size, out_parts, {"spurious": ood_out["test"]},
                   {"spurious": ood_out["val"]}, id_classes, ood, env, info)


def _ood_crop_set(files: Sequence[str], n: int, band: tuple[float, float], side_of: Callable[[np.ndarray], tuple],
                  image_size: int, rng: np.random.Generator) -> torch.Tensor:
    xs = []
    for name, k in zip(files, _even_counts(n, len(files))):
        img = _grey_image(name)
        xs.append(_crops(img, k, band, side_of(img), image_size, rng))
    x = torch.cat(xs)
    return x[torch.from_numpy(rng.permutation(len(x)))][:, None]


@_single_threaded
def conventional(seed: int = 0, image_size: int = 16, *, n_ood_test: int = _CONV_OOD_SIZES["test"],
                 n_ood_val: int = _CONV_OOD_SIZES["val"], train_shifts: int = 0) -> BundledBenchmark:
    """Conventional setting: ID = all 10 digits; OOD ``"textures"`` and ``"photos"`` crops, grey, 1 channel.

    Args:
        n_ood_test, n_ood_val: images per OOD set (spread evenly over its source
            files), cut from disjoint row bands (test rows [25 %, 100 %), val
            rows [0, 25 %) of every source image).
    """
    _check_common(seed, image_size, train_shifts)
    if n_ood_test < 1 or n_ood_val < 1:
        raise ValueError("n_ood_test and n_ood_val must be >= 1")
    setting = "conventional"
    id_classes = tuple(range(10))
    parts, _ = _digit_splits(setting, seed, image_size, id_classes, (), train_shifts)
    parts = {k: (x[:, None], d, s) for k, (x, d, s) in parts.items()}
    sides = {
        "textures": lambda img: _TEXTURE_SIDE,
        "photos": lambda img: tuple(int(round(f * min(img.shape))) for f in _PHOTO_SIDE_FRAC),
    }
    files = {"textures": TEXTURES, "photos": PHOTOS}
    ood, val_ood = {}, {}
    for j, name in enumerate(("textures", "photos")):
        for split, n, target in (("test", n_ood_test, ood), ("val", n_ood_val, val_ood)):
            x = _ood_crop_set(files[name], n, _CONV_BANDS[split], sides[name], image_size,
                              _rng(seed, setting, 60 + 2 * j + (split == "val")))
            target[name] = (x, np.full(len(x), -1, np.int64))
    info = {"construction": (f"ID = all digits (grey); OOD 'textures' = crops of {list(TEXTURES)}, 'photos' = "
                             f"crops of {list(PHOTOS)}, grey, resized to {image_size}x{image_size}; "
                             f"train_shifts={train_shifts}"),
            "files": [_digits_path()] + [skimage_image_path(n) for n in TEXTURES + PHOTOS],
            "train_shifts": int(train_shifts)}
    return _finish(setting, seed, image_size, parts, ood, val_ood, id_classes, (), {}, info)


_BUILDERS: dict[str, Callable[..., BundledBenchmark]] = {
    "fine-grained": fine_grained, "spurious": spurious, "conventional": conventional,
}


def load_bundled(setting: str, seed: int = 0, image_size: int = 16, **kwargs) -> BundledBenchmark:
    """Build one bundled benchmark (no download).

    Args:
        setting: "fine-grained", "spurious" or "conventional" ("_" or no
            separator accepted, case-insensitive).
        seed: decides which digits go to which split, the background of each
            spurious image and every crop; same seed -> identical tensors.
        image_size: side S of the square images (digits are 8x8 upsampled).
        **kwargs: passed to :func:`fine_grained`, :func:`spurious` or
            :func:`conventional` (e.g. ``train_shifts``, ``correlation``).

    Returns:
        :class:`BundledBenchmark` with float32 (N, C, S, S) images in [0, 1].
    """
    key = str(setting).strip().lower().replace("_", "-")
    key = {"finegrained": "fine-grained", "fine grained": "fine-grained"}.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {SETTINGS}")
    return _BUILDERS[key](seed, image_size, **kwargs)
