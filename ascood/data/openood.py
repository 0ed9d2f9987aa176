"""OpenOOD v1.5 data trees: the image lists and folders of every benchmark the paper reports.

    tree = resolve_benchmark("waterbirds", "/data/openood")   # raises OpenOODTreeError listing what is missing
    train = tree.dataset("id_train", transform)
    groups = tree.ood_groups(transform)                     # {"near": {name: ds}, "far": {name: ds}}

A data root is what OpenOOD's download script makes: image lists under
``<root>/benchmark_imglist/`` (``relative/path label`` lines, paths relative
to the set's image folder, OOD labels -1) and images under
``<root>/images_classic/`` and ``<root>/images_largescale/``. The list and
folder of every set are those of ``/work/shared/paper/benchmarks.md``
(OpenOOD v1.5 plus the authors' iSUN and spurious / fine-grained sets).

iSUN is one of the paper's five conventional CIFAR sets but not part of
OpenOOD v1.5's download: it is *optional* (``SetSpec.optional``), so a tree
without it resolves with iSUN listed as skipped, and the reproduce table
says its conventional mean is then over the sets present.

``imagenet100`` (the paper's Table 3, DreamOOD's setup) is a 100-class
subset of ImageNet-1K: its ID sets are OpenOOD's ImageNet-1K lists
(``benchmark_imglist/imagenet/{train,val,test}_imagenet.txt``) filtered to
the classes of a class-list file the user gives (``class_list=``: one class
per line, a WordNet id such as ``n01440764`` -- looked up in the train list's
folder names -- or an ImageNet-1K label index), relabelled 0..99 in the
file's order. The list is not part of OpenOOD's tree.

:meth:`ResolvedBenchmark.fingerprint` hashes the bytes of the lists (and the
class list) a step reads, so a run can tell when the tree it was made from
changed.

Every list is checked before anything trains: each line must be
``path label`` with an integer label (in ``[0, classes)`` for ID lists) and
every listed image must exist; errors name the file and line. An OOD set
whose list, folder or images are missing is a *missing piece*: all missing
pieces are reported in one error, or skipped with ``allow_missing=True``
(ID train/val/test are never optional; full-spectrum sets are always
optional because the paper's table does not use them).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from .datasets import DataError, ImageListDataset, LinkRoots, list_entry_path, parse_label, read_text_list

__all__ = ["SetSpec", "Benchmark", "BENCHMARKS", "OpenOODTreeError", "ResolvedBenchmark", "resolve_benchmark",
           "read_image_list", "read_class_list", "ID_ROLES", "OOD_ROLES", "CONVENTIONAL_SETS", "ISUN_NOTE",
           "tree_markdown"]

ID_ROLES = ("id_train", "id_val", "id_test")
OOD_ROLES = ("ood_val", "near", "far")
CSID_ROLE = "csid"
TREE_TEXT = ("OpenOOD v1.5's data tree is expected: <root>/benchmark_imglist/<benchmark>/*.txt image lists and the "
             "images under <root>/images_classic/ and <root>/images_largescale/ (as OpenOOD's download script "
             "makes them)")


class OpenOODTreeError(DataError):
    """The data root is not an OpenOOD tree, pieces are missing, or a list is malformed (message lists all)."""

    user_facing = True  # the CLI prints the whole (multi-line) message, exit status 2


@dataclass(frozen=True)
class SetSpec:
    """One image list: ``role`` (id_train, id_val, id_test, ood_val, near, far, csid), its name, its image
    folder and list file (both relative to the data root)."""

    role: str
    name: str
    folder: str
    list: str
    #: Non-empty: why this OOD set may be absent without --allow-missing (it is then skipped and reported).
    optional: str = ""

    @property
    def is_id(self) -> bool:
        return self.role in ID_ROLES or self.role == CSID_ROLE


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's sets. ``source_classes``: its ID lists are those of a larger label space (ImageNet-1K's
    1000 for imagenet100), filtered to ``num_classes`` classes named by a class-list file."""

    name: str
    num_classes: int
    sets: tuple[SetSpec, ...]
    source_classes: int | None = None

    def by_role(self, role: str) -> list[SetSpec]:
        return [s for s in self.sets if s.role == role]


_IC, _IL = "images_classic/", "images_largescale/"
_LIST = "benchmark_imglist/"
ISUN_NOTE = "iSUN is not part of OpenOOD v1.5's download: add images_classic/iSUN/ and its list to use it"

#: The paper's conventional OOD sets (Sec. 4), by benchmark, as this module names them: the CIFAR rows of
#: Table 1 average over these five (no near set); ImageNet-100's Table 3 over iNaturalist, Textures, OpenImage-O.
CONVENTIONAL_SETS: dict[str, tuple[str, ...]] = {
    "cifar10": ("mnist", "svhn", "isun", "texture", "places365"),
    "cifar100": ("mnist", "svhn", "isun", "texture", "places365"),
    "imagenet100": ("inaturalist", "textures", "openimage_o"),
}


def _cifar(name: str, classes: int, other: str, csid: tuple[SetSpec, ...] = ()) -> Benchmark:
    lst = f"{_LIST}{name}/"
    sets = [SetSpec(r, name, _IC, f"{lst}{split}_{name}.txt") for r, split in zip(ID_ROLES, ("train", "val", "test"))]
    sets.append(SetSpec("ood_val", "tin", _IC, f"{lst}val_tin.txt"))
    sets += [SetSpec("near", n, _IC, f"{lst}test_{n}.txt") for n in (other, "tin")]
    sets += [SetSpec("far", n, _IC, f"{lst}test_{n}.txt") for n in ("mnist", "svhn", "texture", "places365")]
    # Both CIFARs read cifar10's iSUN list (benchmarks.md); optional: OpenOOD's download has no iSUN.
    sets.append(SetSpec("far", "isun", f"{_IC}iSUN/", f"{_LIST}cifar10/test_isun.txt", optional=ISUN_NOTE))
    return Benchmark(name, classes, tuple(sets) + csid)


def _finetune(name: str, classes: int, folder: str, id_prefix: str, near_name: str, near_folder: str,
              near_list: str) -> Benchmark:
    """Waterbirds, CelebA, Cars, Aircraft: own ID and near sets; shared OOD val and far (conventional) sets."""
    lst = f"{_LIST}{name}/"
    sets = [SetSpec(r, name, folder, f"{lst}{id_prefix}_{split}.txt")
            for r, split in zip(ID_ROLES, ("train", "val", "test"))]
    sets.append(SetSpec("ood_val", "openimage_o", _IL, f"{_LIST}imagenet200/val_openimage_o.txt"))
    sets.append(SetSpec("near", near_name, near_folder, f"{lst}{near_list}"))
    sets += [SetSpec("far", n, _IL, f"{_LIST}imagenet200/test_{n}.txt") for n in ("ninco", "openimage_o", "inaturalist")]
    sets.append(SetSpec("far", "sun", _IL, f"{_LIST}sun/sun.txt"))
    sets.append(SetSpec("far", "texture", _IC, f"{_LIST}cifar100/test_texture.txt"))
    return Benchmark(name, classes, tuple(sets))


def _imagenet200() -> Benchmark:
    lst = f"{_LIST}imagenet200/"
    sets = [SetSpec(r, "imagenet200", _IL, f"{lst}{split}_imagenet200.txt")
            for r, split in zip(ID_ROLES, ("train", "val", "test"))]
    sets.append(SetSpec("ood_val", "openimage_o", _IL, f"{lst}val_openimage_o.txt"))
    sets += [SetSpec("near", n, _IL, f"{lst}test_{n}.txt") for n in ("ssb_hard", "ninco")]
    sets += [SetSpec("far", n, _IL, f"{lst}test_{n}.txt") for n in ("inaturalist", "openimage_o")]
    sets.append(SetSpec("far", "textures", _IC, f"{lst}test_textures.txt"))
    # Full-spectrum (covariate-shifted ID) sets: OpenOOD v1.5's evaluation_api lists.
    sets += [SetSpec(CSID_ROLE, n, _IL, f"{lst}test_imagenet200_{s}.txt")
             for n, s in (("imagenet_v2", "v2"), ("imagenet_c", "c"), ("imagenet_r", "r"))]
    return Benchmark("imagenet200", 200, tuple(sets))


def _imagenet100() -> Benchmark:
    """ImageNet-1K's OpenOOD lists (ID: filtered by the class list) and OOD sets (benchmarks.md, Table 3)."""
    lst = f"{_LIST}imagenet/"
    sets = [SetSpec(r, "imagenet100", _IL, f"{lst}{split}_imagenet.txt")
            for r, split in zip(ID_ROLES, ("train", "val", "test"))]
    sets.append(SetSpec("ood_val", "openimage_o", _IL, f"{lst}val_openimage_o.txt"))
    sets.append(SetSpec("near", "ssb_hard", _IL, f"{lst}test_ssb_hard.txt"))
    sets += [SetSpec("far", n, _IL, f"{lst}test_{n}.txt") for n in ("inaturalist", "openimage_o")]
    sets.append(SetSpec("far", "textures", _IC, f"{lst}test_textures.txt"))
    return Benchmark("imagenet100", 100, tuple(sets), source_classes=1000)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _cifar("cifar10", 10, "cifar100", (SetSpec(CSID_ROLE, "cifar10c", _IC, f"{_LIST}cifar10/test_cifar10c.txt"),)),
    _cifar("cifar100", 100, "cifar10"),
    _imagenet200(),
    _imagenet100(),
    _finetune("waterbirds", 2, f"{_IL}waterbirds/", "waterbirds", "waterbirds_ood", f"{_IL}waterbirds_ood/",
              "waterbirds_spurious_ood.txt"),
    _finetune("celeba", 2, f"{_IL}celeba/", "celeba", "celeba_ood", f"{_IL}celeba/", "celeba_spurious_ood.txt"),
    _finetune("cars", 150, f"{_IL}cars/", "cars", "cars_ood", f"{_IL}cars/", "cars_finegrained_ood.txt"),
    _finetune("aircraft", 90, f"{_IL}aircraft/", "aircraft", "aircraft_ood", f"{_IL}aircraft/",
              "aircraft_finegrained_ood.txt"),
)}


# -- list checking ------------------------------------------------------------------------------------------
@dataclass
class ListCheck:
    """What :func:`read_image_list` found: entries, bad lines (fatal) and missing images (a missing piece)."""

    path: str
    entries: int = 0
    errors: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    missing_count: int = 0


def read_image_list(list_path: str, image_dir: str, num_classes: int | None, check_images: bool = True,
                    max_reported: int = 5, keep: Mapping[int, int] | None = None,
                    links: LinkRoots | None = None) -> ListCheck:
    """Check an OpenOOD list: ``path label`` per non-empty line (``#`` comments allowed).

    ``num_classes``: ID lists need labels in ``[0, num_classes)``; None (OOD
    lists) accepts any integer (OpenOOD writes -1). Errors and missing images
    are reported as ``file:line: ...``, up to ``max_reported`` of each.
    ``keep``: only lines with these labels count as entries and have their
    image checked (imagenet100's subset of ImageNet-1K's lists). ``links``: where symlinked entries may
    lead (:class:`~ascood.data.datasets.LinkRoots`; default: inside ``image_dir``). The list is UTF-8 with
    or without a byte-order mark; labels are plain decimal integers.
    """
    links = links if links is not None else LinkRoots(image_dir)
    check = ListCheck(list_path)
    try:
        # The same decoding and line splitting as ImageListDataset, which reads the list later: a binary or
        # non-UTF-8 file is a bad list (not a UnicodeDecodeError), and line numbers agree between the two.
        lines = read_text_list(list_path)
    except OSError as err:
        check.errors.append(f"{list_path}: cannot read: {err}")
        return check
    except DataError as err:
        check.errors.append(str(err))
        return check
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{lineno}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or parse_label(parts[1]) is None:
            if len(check.errors) < max_reported:
                check.errors.append(f"{where}: malformed line {line[:80]!r} (expected 'relative/path label', "
                                    "label a plain decimal integer such as 3 or -1)")
            continue
        label = int(parts[1])
        if label < -1:
            if len(check.errors) < max_reported:
                check.errors.append(f"{where}: label {label} is negative (expected a class index, or -1 for OOD)")
            continue
        if num_classes is not None and not 0 <= label < num_classes:
            if len(check.errors) < max_reported:
                check.errors.append(f"{where}: label {label} out of range for {num_classes} classes "
                                    f"(expected 0..{num_classes - 1})")
            continue
        try:
            list_entry_path(list_path, lineno, parts[0], image_dir, allowed_roots=links)
        except DataError as err:
            if len(check.errors) < max_reported:
                check.errors.append(str(err))
            continue
        if keep is not None and label not in keep:
            continue
        check.entries += 1
        if check_images and not os.path.isfile(os.path.join(image_dir, parts[0])):
            check.missing_count += 1
            if len(check.missing_images) < max_reported:
                check.missing_images.append(f"{where}: image {os.path.join(image_dir, parts[0])} not found")
    if check.entries == 0 and not check.errors:
        check.errors.append(f"{list_path}: the list has no entries"
                            + (" of the classes in the class list" if keep is not None else ""))
    return check


_WNID = re.compile(r"^n\d{8}$")


def read_class_list(path: str, num_classes: int, source_classes: int, flag: str = "--class-list") -> list[str]:
    """The classes of a class-list file: one per line (``#`` comments and blank lines skipped), each a WordNet
    id (``n01440764``) or an integer label of the source label space; exactly ``num_classes`` distinct ones.

    Raises :class:`OpenOODTreeError` naming ``flag``, the file and the line of every problem found.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except OSError as err:
        raise OpenOODTreeError(f"{flag} {path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise OpenOODTreeError(f"{flag} {path} is not a UTF-8 text file (one class per line)") from None
    classes, errors, seen = [], [], {}
    for lineno, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if _WNID.match(item):
            key = item
        elif parse_label(item) is not None and 0 <= int(item) < source_classes:
            key = str(int(item))
        else:
            errors.append(f"{path}:{lineno}: {item[:40]!r} is neither a WordNet id (n01440764) nor a label "
                          f"0..{source_classes - 1}")
            continue
        if key in seen:
            errors.append(f"{path}:{lineno}: {item} repeats line {seen[key]}")
            continue
        seen[key] = lineno
        classes.append(key)
    if not errors and len(classes) != num_classes:
        errors.append(f"{path}: {len(classes)} classes, expected {num_classes}")
    if errors:
        raise OpenOODTreeError(f"{flag} {path}: bad class list:\n  " + "\n  ".join(errors[:10]))
    return classes


def _label_map(classes: Sequence[str], train_list: str, class_list: str, flag: str) -> dict[int, int]:
    """Source label -> new label (the class's position in the class list). WordNet ids are looked up in the
    folder names of the train list's paths (OpenOOD's ``imagenet_1k/train/<wnid>/...``)."""
    wnid_label: dict[str, int] = {}
    if any(_WNID.match(c) for c in classes):
        with open(train_list, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                parts = line.strip().rsplit(maxsplit=1)
                if len(parts) != 2 or parse_label(parts[1]) is None:
                    continue
                for folder in parts[0].replace("\\", "/").split("/")[:-1]:
                    if _WNID.match(folder):
                        wnid_label.setdefault(folder, int(parts[1]))
                        break
    out: dict[int, int] = {}
    unknown = []
    for i, c in enumerate(classes):
        if _WNID.match(c):
            if c not in wnid_label:
                unknown.append(c)
                continue
            out[wnid_label[c]] = i
        else:
            out[int(c)] = i
    if unknown:
        raise OpenOODTreeError(f"{flag} {class_list}: {len(unknown)} class(es) not found as a folder of "
                               f"{train_list}: {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
    if len(out) != len(classes):
        raise OpenOODTreeError(f"{flag} {class_list}: two entries name the same class (a WordNet id and its label)")
    return out


# -- resolution ---------------------------------------------------------------------------------------------
class _LineNamedDataset(ImageListDataset):
    """ImageListDataset whose read errors also name the list file and line (a corrupt image mid-epoch).

    ``label_map`` (source label -> label): keep only the samples of those labels, relabelled (imagenet100).
    """

    def __init__(self, list_file: str, root: str, transform, mode: str = "RGB",
                 label_map: Mapping[int, int] | None = None, allowed_roots: Sequence[str] = ()) -> None:
        super().__init__(list_file, root, transform, mode, allowed_roots=allowed_roots)
        self.list_file = list_file
        # ImageListDataset's own line numbers: a second count of the file's lines (open() splits only at
        # \n and \r, str.splitlines also at \f, \x85, U+2028, ...) named other lines, or none (IndexError).
        self.line_numbers = list(self.lines)
        if label_map is not None:
            keep = [i for i, (_, lab) in enumerate(self.samples) if lab in label_map]
            self.samples = [(self.samples[i][0], label_map[self.samples[i][1]]) for i in keep]
            self.lines = [self.lines[i] for i in keep]
            self.line_numbers = [self.line_numbers[i] for i in keep]
            self.targets = [lab for _, lab in self.samples]

    def __getitem__(self, i: int):
        try:
            return super().__getitem__(i)
        except DataError as err:
            raise DataError(f"{self.list_file}:{self.line_numbers[i]}: {err}") from err


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ResolvedBenchmark:
    """A benchmark's sets found under ``root``: ``present`` specs (with sizes) and ``skipped`` (spec, why).

    ``class_list`` / ``label_map``: imagenet100's class-list file and its source label -> label map (None
    for the other benchmarks).
    """

    benchmark: Benchmark
    root: str
    present: list[SetSpec]
    sizes: dict[str, int]
    skipped: list[tuple[SetSpec, str]]
    class_list: str | None = None
    label_map: dict[int, int] | None = None
    #: Folders that symlinked list entries may lead into besides the tree's root (:class:`LinkRoots`).
    link_roots: tuple[str, ...] = ()
    _digests: dict[str, str] = field(default_factory=dict, repr=False)

    def size(self, role: str) -> int:
        """Number of images in the list of a single-set role (id_train, id_val, id_test, ood_val)."""
        return self.sizes[self.spec(role).list]

    def spec(self, role: str) -> SetSpec:
        for s in self.present:
            if s.role == role:
                return s
        raise KeyError(f"{self.benchmark.name} has no {role} set here")

    def _dataset(self, spec: SetSpec, transform: Callable | None, mode: str = "RGB") -> ImageListDataset:
        subset = self.label_map if spec.role in ID_ROLES else None
        return _LineNamedDataset(os.path.join(self.root, spec.list), os.path.join(self.root, spec.folder),
                                 transform, mode, label_map=subset, allowed_roots=(self.root, *self.link_roots))

    def dataset(self, role: str, transform: Callable | None, mode: str = "RGB") -> ImageListDataset:
        """The dataset of a single-set role: id_train, id_val, id_test or ood_val."""
        return self._dataset(self.spec(role), transform, mode)

    def ood_groups(self, transform: Callable | None, mode: str = "RGB") -> dict[str, dict[str, ImageListDataset]]:
        """{"near": {name: dataset}, "far": {...}} of the present OOD test sets (empty groups left out)."""
        out: dict[str, dict[str, ImageListDataset]] = {}
        for s in self.present:
            if s.role in ("near", "far"):
                out.setdefault(s.role, {})[s.name] = self._dataset(s, transform, mode)
        return out

    def csid(self, transform: Callable | None, mode: str = "RGB") -> dict[str, ImageListDataset]:
        """Full-spectrum (covariate-shifted ID) sets that are present."""
        return {s.name: self._dataset(s, transform, mode) for s in self.present if s.role == CSID_ROLE}

    def fingerprint(self, roles: Iterable[str] | None = None) -> dict[str, str]:
        """sha256 of the bytes of every present list of ``roles`` (default all), keyed by the list's path
        relative to the root, plus the class list's under "class_list" (imagenet100). Two trees with the
        same fingerprint list the same images with the same labels (the images themselves are not hashed)."""
        wanted = None if roles is None else set(roles)
        out = {}
        for s in self.present:
            if wanted is None or s.role in wanted:
                if s.list not in self._digests:
                    self._digests[s.list] = _sha256(os.path.join(self.root, s.list))
                out[s.list] = self._digests[s.list]
        if self.class_list is not None:
            out["class_list"] = _sha256(self.class_list)
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """JSON-able: every present set with its size and every skipped one with the reason."""
        return {"benchmark": self.benchmark.name, "root": self.root, "class_list": self.class_list,
                "sets": [{"role": s.role, "name": s.name, "folder": s.folder, "list": s.list,
                          "images": self.sizes[s.list]} for s in self.present],
                "skipped": [{"role": s.role, "name": s.name, "list": s.list, "reason": why}
                            for s, why in self.skipped]}

    def skipped_names(self) -> list[str]:
        return [f"{s.role}:{s.name}" for s, _ in self.skipped]


def _root_problem(root: str) -> str | None:
    if not os.path.isdir(root):
        return f"data root {root} does not exist or is not a directory"
    if not os.path.isdir(os.path.join(root, "benchmark_imglist")):
        hint = ""
        for sub in ("data", "openood_data"):
            if os.path.isdir(os.path.join(root, sub, "benchmark_imglist")):
                hint = f" (did you mean {os.path.join(root, sub)}?)"
        if os.path.basename(os.path.normpath(root)) == "benchmark_imglist":
            hint = f" (pass its parent, {os.path.dirname(os.path.normpath(root))})"
        return f"{root} is not an OpenOOD data root: it has no benchmark_imglist/ folder{hint}"
    return None


def _optional_note(spec: SetSpec) -> str:
    if spec.role == CSID_ROLE:
        return " (optional: full-spectrum)"
    return f" (optional: {spec.optional})" if spec.optional else ""


def resolve_benchmark(name: str, root: str | os.PathLike, *, allow_missing: bool = False, check_images: bool = True,
                      progress: bool = False, class_list: str | os.PathLike | None = None,
                      link_roots: Sequence[str | os.PathLike] = ()) -> ResolvedBenchmark:
    """Find and check every set of benchmark ``name`` under ``root``.

    Raises :class:`OpenOODTreeError`: unknown benchmark; root not an OpenOOD
    tree; malformed lists or out-of-range labels (always, with file:line);
    missing lists, folders or images (one message listing all of them,
    unless ``allow_missing`` and only OOD/full-spectrum sets are missing,
    which are then skipped and recorded in ``skipped``). Optional sets
    (full-spectrum, iSUN) are skipped when missing even without ``allow_missing``.
    ``class_list``: imagenet100's class-list file (required there, refused elsewhere).
    Symlinks met by list entries must lead inside ``root`` or one of ``link_roots`` (the rule of
    :class:`~ascood.data.datasets.LinkRoots`: OpenOOD trees link image folders on purpose, a link to
    anywhere else is an error naming the list, line and target).
    """
    key = str(name).lower()
    if key not in BENCHMARKS:
        raise OpenOODTreeError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[key]
    if bench.source_classes is None and class_list is not None:
        raise OpenOODTreeError(f"--class-list applies only to a class subset (imagenet100), not to {bench.name}")
    if bench.source_classes is not None and class_list is None:
        raise OpenOODTreeError(f"benchmark {bench.name} needs --class-list FILE: its {bench.num_classes} ImageNet "
                               "classes, one per line (a WordNet id such as n01440764, or an ImageNet-1K label); "
                               "the list is not part of OpenOOD's tree (DreamOOD's ImageNet-100 classes)")
    root = os.path.abspath(os.fspath(root))
    problem = _root_problem(root)
    if problem:
        raise OpenOODTreeError(f"{problem}. {TREE_TEXT}.")
    label_map = None
    if class_list is not None:
        class_list = os.path.abspath(os.fspath(class_list))
        label_map = _subset_label_map(bench, root, class_list)
    id_classes = bench.source_classes or bench.num_classes
    present, sizes, skipped = [], {}, []
    missing: list[tuple[SetSpec, str]] = []
    errors: list[str] = []
    checked: dict[tuple[str, str, bool], ListCheck] = {}
    sets: Iterable[SetSpec] = bench.sets
    if progress:
        from tqdm.auto import tqdm
        sets = tqdm(bench.sets, desc=f"checking {bench.name} lists", leave=False)
    for spec in sets:
        list_path, folder = os.path.join(root, spec.list), os.path.join(root, spec.folder)
        reasons = []
        if not os.path.isfile(list_path):
            reasons.append(f"list {spec.list} not found")
        if not os.path.isdir(folder):
            reasons.append(f"image folder {spec.folder} not found")
        if not reasons:
            ck = (list_path, folder, spec.is_id)
            if ck not in checked:  # the same list can serve two roles (openimage_o: OOD val and far)
                keep = label_map if spec.role in ID_ROLES else None
                checked[ck] = read_image_list(list_path, folder, id_classes if spec.is_id else None,
                                              check_images, keep=keep, links=LinkRoots(folder, (root, *link_roots)))
            res = checked[ck]
            errors.extend(res.errors)
            if res.missing_count:
                first = "; ".join(res.missing_images)
                reasons.append(f"{res.missing_count} of {res.entries} listed images missing ({first})")
            sizes[spec.list] = res.entries
        if reasons:
            missing.append((spec, "; ".join(reasons)))
        elif not res.errors:
            present.append(spec)
    if errors:
        raise OpenOODTreeError(f"{bench.name}: bad image lists under {root}:\n  " + "\n  ".join(dict.fromkeys(errors)))
    skipped = _refuse_missing(bench, root, present, missing, allow_missing)
    return ResolvedBenchmark(bench, root, present, sizes, skipped, class_list=class_list, label_map=label_map,
                             link_roots=tuple(os.path.abspath(os.fspath(p)) for p in link_roots))


def _subset_label_map(bench: Benchmark, root: str, class_list: str) -> dict:
    """imagenet100's map from ImageNet-1K labels to the class list's order, read from the ID train list."""
    if not os.path.isfile(class_list):
        raise OpenOODTreeError(f"--class-list file not found: {class_list}")
    classes = read_class_list(class_list, bench.num_classes, bench.source_classes)
    train = os.path.join(root, bench.by_role("id_train")[0].list)
    if not os.path.isfile(train):
        raise OpenOODTreeError(f"benchmark {bench.name} needs pieces missing under {root}:\n  id_train "
                               f"{bench.name}: list {bench.by_role('id_train')[0].list} not found\n{TREE_TEXT}.")
    return _label_map(classes, train, class_list, "--class-list")


def _refuse_missing(bench: Benchmark, root: str, present: list, missing: list, allow_missing: bool) -> list:
    """The missing sets that may be skipped, as (spec, why); an error for any the run cannot do without
    (an ID set, an OOD set without ``allow_missing``, the OOD validation set, every OOD test set)."""
    fatal = [(s, why) for s, why in missing
             if s.role in ID_ROLES or (s.role in OOD_ROLES and not allow_missing and not s.optional)]
    if fatal:
        lines = [f"{s.role} {s.name}: {why}{_optional_note(s)}" for s, why in missing]
        hint = ("" if any(s.role in ID_ROLES for s, _ in fatal)
                else "\n(--allow-missing runs with the OOD sets that are present and says which were skipped)")
        raise OpenOODTreeError(f"benchmark {bench.name} needs pieces missing under {root}:\n  " + "\n  ".join(lines)
                               + f"\n{TREE_TEXT}." + hint)
    skipped = [(s, why + _optional_note(s)) for s, why in missing]
    if not any(s.role == "ood_val" for s in present):
        raise OpenOODTreeError(f"benchmark {bench.name}: the OOD validation set is missing, and APS needs it to "
                               "choose scorer hyperparameters:\n  "
                               + "\n  ".join(f"{s.role} {s.name}: {why}" for s, why in skipped) + f"\n{TREE_TEXT}.")
    if not any(s.role in ("near", "far") for s in present):
        raise OpenOODTreeError(f"benchmark {bench.name}: no OOD test set is present under {root}:\n  "
                               + "\n  ".join(f"{s.role} {s.name}: {why}" for s, why in skipped) + f"\n{TREE_TEXT}.")
    return skipped


def tree_markdown() -> str:
    """Every benchmark's list files and the image folder their paths are relative to (docs/OPENOOD_TREE.md)."""
    out = ["# The OpenOOD v1.5 data tree, list by list", "",
           "Generated from `ascood.data.openood.BENCHMARKS` (`tests/data/test_openood_tree.py` checks that this",
           "file matches it). Paths are relative to `--data-root`. Each line of a list is `relative/path label`:",
           "the path is relative to the set's image folder and may not leave it (no absolute paths, no `..`); the",
           "label is the class index for ID lists and -1 for OOD lists. A `classes.txt` beside the lists (one",
           "class name per line, line i naming label i) gives the labels names.", ""]
    for name, bench in BENCHMARKS.items():
        out += [f"## {name} ({bench.num_classes} classes)", "", "| role | set | list | image folder |",
                "|---|---|---|---|"]
        out += [f"| {s.role} | {s.name} | `{s.list}` | `{s.folder}` |" for s in bench.sets]
        out.append("")
    return "\n".join(out)
