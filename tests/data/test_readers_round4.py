"""Issue 30 (no silently wrong result, round 4): the data readers, through the API.

Each table row is a case that was read silently wrong before: a BOM taken as part of the first path,
``1_0`` read as 10, ``-2`` as "no label", a stray label 5000 making a 5001-class model, ``__MACOSX`` as a
class, NFD and NFC spellings of one name as two classes, list entries reaching outside the root through
a symlink, validation or OOD data that is the training / ID data again, epochs of 3 steps.
"""
import hashlib
import os
import unicodedata
import warnings

import numpy as np
import pytest
from PIL import Image

from ascood.apps.checks import InputError, check_distinct_data, training_num_classes
from ascood.data import datasets as D
from ascood.data.classes import check_label_span, class_names, fingerprint, match_classes, shared_files
from ascood.data.openood import read_image_list
from ascood.training.trainer import FEW_STEPS_PER_EPOCH, few_steps_note


def _png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


@pytest.fixture
def images(tmp_path):
    """tmp/imgs/{0..11}.png and a helper writing a list beside them."""
    for i in range(12):
        _png(tmp_path / "imgs" / f"{i}.png", i)

    def write(text, name="list.txt", raw=None):
        path = tmp_path / "imgs" / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)

    return tmp_path / "imgs", write


# -- item 1: encoding and labels ---------------------------------------------------------------------------------
def test_a_byte_order_mark_is_not_part_of_the_first_path(images):
    root, write = images
    path = write(None, raw="\ufeff0.png 0\n1.png 1\n".encode("utf-8"))
    ds = D.ImageListDataset(path, root)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["0.png", "1.png"] and ds.targets == [0, 1]
    check = read_image_list(path, str(root), num_classes=2)  # OpenOOD's reader too
    assert check.errors == [] and check.entries == 2


BAD_LABELS = [  # (label text, what the message must say)
    ("1_0", "'1_0' is not an integer class index in plain decimal"),  # int() read it as 10
    ("+1", "'+1' is not an integer class index in plain decimal"),
    ("\u0661", "is not an integer class index in plain decimal"),  # Arabic-Indic one: int() read it as 1
    ("1.5", "'1.5' is not an integer"),
    ("1e3", "'1e3' is not an integer"),
    ("-2", "label -2 is negative"),  # was taken as "no label"
    ("-17", "label -17 is negative"),
]


@pytest.mark.parametrize("label,message", BAD_LABELS, ids=[c[0].encode("unicode_escape").decode() for c in BAD_LABELS])
def test_labels_must_be_plain_decimal_and_not_below_minus_one(images, label, message):
    root, write = images
    path = write(f"0.png 0\n1.png {label}\n")
    with pytest.raises(D.DataError, match="list.txt:2: ") as err:
        D.ImageListDataset(path, root)
    assert message in str(err.value)
    check = read_image_list(path, str(root), num_classes=None)  # OpenOOD's lists: the same line refused
    assert check.errors and "list.txt:2:" in check.errors[0]


@pytest.mark.parametrize("label,expected", [("3", 3), ("007", 7), ("-1", -1), ("-0", 0)])
def test_plain_labels_still_read(images, label, expected):
    root, write = images
    ds = D.ImageListDataset(write(f"0.png {label}\n"), root)
    assert ds.targets == [expected]


def test_a_label_far_beyond_the_others_is_refused_with_its_line(images):
    root, write = images
    lines = [f"{i}.png {i}" for i in range(10)] + ["10.png 5000", "11.png 3"]
    ds = D.ImageListDataset(write("\n".join(lines) + "\n"), root)
    with pytest.raises(D.DataError, match=r"list.txt:11: label 5000 is far beyond the others \(the other labels "
                                          r"are 0..9 \(10 distinct\)\): 4990 of the 5001 classes"):
        check_label_span(ds.targets, ds)
    with pytest.raises(InputError, match="label 5000 is far beyond"):
        training_num_classes(ds, "list.txt")


def test_a_class_table_gives_the_class_count_so_a_large_label_is_fine(images):
    root, write = images
    path = write("0.png 0\n1.png 1\n2.png 49\n")
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(50)))
    assert training_num_classes(D.ImageListDataset(path, root), "list.txt") == 50


@pytest.mark.parametrize("labels,refused", [([0, 1, 2, 3], False), ([0, 2], False), ([0, 3], False),
                                            ([0, 1, 7], True), ([5], True), ([0, 9, 9], True)])
def test_the_label_span_rule(labels, refused):
    """Refused when more than half of the classes 0..max would have no sample."""
    if refused:
        with pytest.raises(D.DataError, match="far beyond"):
            check_label_span(labels)
    else:
        check_label_span(labels)


# -- item 2: class folders ---------------------------------------------------------------------------------------
def _tree(root, names):
    for k, name in enumerate(names):
        for i in range(2):
            _png(os.path.join(root, name, f"{i}.png"), 40 * k)
    return str(root)


def _folder(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = D.image_folder(root)
    return ds, [str(w.message) for w in caught]


@pytest.mark.parametrize("residue", ["__MACOSX", "empty", "only_text"])
def test_a_folder_without_images_is_not_a_class(tmp_path, residue):
    root = _tree(tmp_path / "train", ["green", "red"])
    os.makedirs(os.path.join(root, residue))
    if residue == "__MACOSX":  # what unzipping a macOS archive leaves: resource forks, hidden
        _png(os.path.join(root, "__MACOSX", "red", "._0.png"))
    if residue == "only_text":
        (tmp_path / "train" / "only_text" / "notes.txt").write_text("x")
    ds, said = _folder(root)
    assert ds.classes == ["green", "red"] and len(ds) == 4
    assert len(said) == 1 and f"1 folder(s) with no images, not classes: {residue}" in said[0], said


def test_nfd_and_nfc_names_are_one_class(tmp_path):
    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    ds, _ = _folder(_tree(tmp_path / "mac", [nfd, "tea"]))  # a tree copied from macOS
    assert class_names(ds) == [nfc, "tea"]
    assert not match_classes(ds, [nfc, "tea"], what="--id mac").missing  # a model trained on the NFC tree
    linux, _ = _folder(_tree(tmp_path / "linux", [nfc, "tea"]))
    assert not match_classes(linux, [nfd, "tea"], what="--id linux").missing  # a model trained on NFD names


def test_nfc_fingerprints_are_unchanged(tmp_path):
    """Checkpoints store fingerprint(ds): for NFC names it is the digest it always was (relative paths and
    labels, then the class names)."""
    ds, _ = _folder(_tree(tmp_path / "t", ["caf\u00e9", "tea"]))
    h = hashlib.sha256()
    for path, label in ds.samples:
        h.update(f"{os.path.relpath(path, str(tmp_path / 't'))}\t{label}\n".encode())
    h.update("caf\u00e9\ntea".encode())
    assert fingerprint(ds) == h.hexdigest()[:16]


def test_nfc_twins_in_one_tree_are_refused_with_code_points(tmp_path):
    root = _tree(tmp_path / "t", ["caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")])
    with pytest.raises(D.DataError, match=r"U\+0065 U\+0301.*same name in different Unicode forms"):
        D.image_folder(root)


@pytest.mark.parametrize("data_name,shown", [
    ("c\u0430t", "U+0430"),  # Cyrillic a
    ("cat\u200b", "U+200B"),  # a zero-width space
    ("\uff43\uff41\uff54", "U+FF43"),  # full-width letters
])
def test_a_look_alike_class_name_is_shown_with_code_points(tmp_path, data_name, shown):
    ds, _ = _folder(_tree(tmp_path / "t", [data_name, "dog"]))
    with pytest.raises(D.DataError, match="is not one of the model's classes") as err:
        match_classes(ds, ["cat", "dog"], what="--id t")
    assert "looks like the model's class 'cat'" in str(err.value) and shown in str(err.value)
    assert "U+0063 U+0061 U+0074" in str(err.value)


# -- item 3: list entries through symlinks -----------------------------------------------------------------------
@pytest.fixture
def linked(tmp_path):
    """data/ (a list's root) with ext -> outside/ (a folder elsewhere) and inner -> data/sub (inside)."""
    for i in range(2):
        _png(tmp_path / "outside" / f"{i}.png")
        _png(tmp_path / "data" / "sub" / f"{i}.png")
    os.symlink(tmp_path / "outside", tmp_path / "data" / "ext")
    os.symlink(tmp_path / "data" / "sub", tmp_path / "data" / "inner")
    (tmp_path / "data" / "out.txt").write_text("sub/0.png 0\next/1.png 1\n")
    (tmp_path / "data" / "in.txt").write_text("sub/0.png 0\ninner/1.png 1\n")
    return tmp_path


LINK_CASES = [  # (list, allowed roots (relative to tmp), refused)
    ("in.txt", [], False),  # a link that stays inside the root
    ("out.txt", [], True),  # a link leading outside: refused (was read)
    ("out.txt", ["outside"], False),  # ... unless its target is a folder the user named
    ("out.txt", ["data/sub"], True),  # naming another folder does not help
]


@pytest.mark.parametrize("name,allowed,refused", LINK_CASES)
def test_list_entries_through_symlinks(linked, name, allowed, refused):
    root = linked / "data"
    roots = [str(linked / a) for a in allowed]
    if refused:
        with pytest.raises(D.DataError, match=rf"{name}:2: 'ext/1.png' leads through a symlink to "
                                              rf"{os.path.realpath(linked / 'outside' / '1.png')}"):
            D.ImageListDataset(root / name, root, allowed_roots=roots)
    else:
        assert len(D.ImageListDataset(root / name, root, allowed_roots=roots)) == 2
    check = read_image_list(str(root / name), str(root), None, links=D.LinkRoots(str(root), roots))
    assert bool(check.errors) == refused
    if refused:
        assert f"{name}:2:" in check.errors[0] and "--allow-links-into" in check.errors[0]


def test_a_root_that_is_itself_a_link_is_fine(linked):
    os.symlink(linked / "data", linked / "alias")
    assert len(D.ImageListDataset(linked / "alias" / "in.txt", linked / "alias")) == 2


# -- item 4: the same data under two roles -----------------------------------------------------------------------
@pytest.fixture
def two_trees(tmp_path):
    train = _tree(tmp_path / "train", ["green", "red"])
    os.symlink(train, tmp_path / "alias")
    lines = "".join(f"{c}/{i}.png {k}\n" for k, c in enumerate(["green", "red"]) for i in range(2))
    (tmp_path / "train" / "same.txt").write_text(lines)
    (tmp_path / "train" / "half.txt").write_text("green/0.png 0\n")
    _tree(tmp_path / "other", ["green", "red"])
    return tmp_path


SAME_DATA = [  # (second path, relation)
    ("train", "same"),  # the same folder
    ("alias", "same"),  # a symlink to it
    ("train/same.txt", "same"),  # a list naming the same images
    ("train/half.txt", "overlap"),
    ("other", "distinct"),
]


@pytest.mark.parametrize("second,relation", SAME_DATA)
def test_the_same_images_under_two_roles(two_trees, second, relation):
    first = D.dataset_from_path(two_trees / "train", None, train=True)
    other = D.dataset_from_path(two_trees / second, None, train=False)
    shared = shared_files(first, other)
    if relation == "same":
        with pytest.raises(InputError, match=rf"--val {second} reads the same 4 images as DATA train"):
            check_distinct_data(first, "DATA train", other, f"--val {second}", "why")
    elif relation == "overlap":
        with pytest.warns(UserWarning, match=r"1 of the 1 images of --val"):
            check_distinct_data(first, "DATA train", other, f"--val {second}", "why")
    else:
        assert shared == (0, 4, 4)
        check_distinct_data(first, "DATA train", other, f"--val {second}", "why")


def test_in_memory_data_is_not_compared():
    a = D.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    assert shared_files(a, a) is None


# -- item 5: very few steps per epoch ----------------------------------------------------------------------------
@pytest.mark.parametrize("images,batch,steps,expected", [
    (300, 128, 3, "try --batch-size 8 (38 steps per epoch)"),
    (384, 128, 3, "try --batch-size 16 (24 steps per epoch)"),
    (12, 6, 2, "use more images or more --epochs"),
    (2560, 128, 20, None),
    (50000, 128, 391, None),
])
def test_few_steps_note(images, batch, steps, expected):
    note = few_steps_note(images, batch, steps)
    if expected is None:
        assert note is None
    else:
        assert f"only {steps} optimiser step(s)" in note and f"fewer than {FEW_STEPS_PER_EPOCH}" in note
        assert expected in note


def test_an_openood_tree_whose_image_folder_links_to_another_disk(tmp_path):
    """The OpenOOD layout links image folders on purpose: refused unless the target is named (--allow-links-into),
    then read through the link."""
    import shutil

    from fake_openood import make_tree
    from ascood.data.openood import BENCHMARKS, OpenOODTreeError, resolve_benchmark

    root = make_tree(str(tmp_path / "data"), benchmarks=["waterbirds"])
    spec = next(s for s in BENCHMARKS["waterbirds"].sets if s.role == "id_train")
    with open(os.path.join(root, spec.list)) as f:
        first = f.readline().rsplit(maxsplit=1)[0]
    top = first.split("/")[0]
    linked = os.path.join(root, spec.folder, top)
    shutil.move(linked, tmp_path / "disk")
    os.symlink(tmp_path / "disk", linked)
    with pytest.raises(OpenOODTreeError, match=rf"{spec.list}:1: '{first}' leads through a symlink to "
                                               rf"{os.path.realpath(tmp_path / 'disk')}"):
        resolve_benchmark("waterbirds", root)
    tree = resolve_benchmark("waterbirds", root, link_roots=[str(tmp_path / "disk")])
    ds = tree.dataset("id_train", None)
    assert len(ds) == tree.size("id_train") and ds[0][0].size


def test_a_flat_folder_with_macos_residue_stays_flat(tmp_path):
    for i in range(3):
        _png(tmp_path / "ood" / f"{i}.png")
    _png(tmp_path / "ood" / "__MACOSX" / "._0.png")
    assert D.detect_format(str(tmp_path / "ood")) == "flat"
    with pytest.warns(UserWarning, match=r"skipped 1 hidden file\(s\)/folder\(s\) \(e.g. __MACOSX/._0.png\)"):
        assert len(D.dataset_from_path(tmp_path / "ood", None, train=False)) == 3


def test_in_memory_data_read_from_one_path_is_the_same_data():
    a = D.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    check_distinct_data(a, "--id c", a, "--ood c", "why")  # nothing to compare: let through
    with pytest.raises(InputError, match="--ood c is the same data as --id c"):
        check_distinct_data(a, "--id c", a, "--ood c", "why", same_path=True)
