"""Data discovery and class names (issue 25): hidden entries are not data, symlinks stay inside the data
folder, loops end, and labelled splits are matched to a model's classes by name."""
import os
import warnings

import numpy as np
import pytest

from ascood.data import datasets as D
from ascood.data.classes import class_names, fingerprint, match_classes
from clihelpers import make_class_tree, write_images


def _folder(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = D.image_folder(path)
    return ds, [str(w.message) for w in caught]


def test_hidden_folders_and_files_are_not_data(tmp_path):
    root = make_class_tree(tmp_path / "train", n_per_class=3)
    write_images(tmp_path / "train" / ".ipynb_checkpoints", 2, (1, 2, 3))
    write_images(tmp_path / "train" / "red" / ".cache", 2, (1, 2, 3))
    (tmp_path / "train" / "red" / ".hidden.png").write_bytes(b"x")
    ds, said = _folder(root)
    assert ds.classes == ["green", "red"] and len(ds) == 6
    assert len(said) == 1 and "3 hidden" in said[0] and ".ipynb_checkpoints" in said[0]
    # a flat folder whose only sub-folder is hidden stays a flat folder
    write_images(tmp_path / "flat", 2, (5, 5, 5))
    write_images(tmp_path / "flat" / ".thumbs", 2, (5, 5, 5))
    assert D.detect_format(str(tmp_path / "flat")) == "flat"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(D.dataset_from_path(tmp_path / "flat", None, train=False)) == 2


def test_symlink_to_the_parent_does_not_relabel_other_classes(tmp_path):
    root = make_class_tree(tmp_path / "train", n_per_class=4)
    os.symlink("..", tmp_path / "train" / "red" / "up")  # the issue's `ln -s .. train/cat/up`
    ds, said = _folder(root)
    assert len(ds) == 8 and sorted(ds.targets) == [0] * 4 + [1] * 4
    assert any("1 symlink(s) leading out of the data folder (e.g. red/up)" in s for s in said), said


def test_symlinks_leaving_the_data_folder_are_skipped(tmp_path):
    root = make_class_tree(tmp_path / "train", n_per_class=2)
    write_images(tmp_path / "elsewhere", 3, (9, 9, 9))
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "red" / "more")
    os.symlink(tmp_path / "elsewhere" / "0.png", tmp_path / "train" / "green" / "x.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "blue")  # a class folder outside the root
    os.symlink("../green/0.png", tmp_path / "train" / "red" / "g.png")  # another class's image
    ds, said = _folder(root)
    assert ds.classes == ["green", "red"] and len(ds) == 4
    # the class folder link is named with its target (issue 30), the three file links counted
    assert any("3 symlink(s) leading out of the data folder" in s and "1 class folder link(s) leading out" in s
               and "blue -> " in s for s in said), said
    # a symlink that stays inside the root is followed
    os.symlink(os.path.join(root, "red", "0.png"), os.path.join(root, "red", "copy.png"))
    assert len(_folder(root)[0]) == 5


def test_two_symlink_loops_end(tmp_path):
    root = make_class_tree(tmp_path / "train", n_per_class=2)
    os.symlink("b", tmp_path / "train" / "red" / "a")
    os.symlink("a", tmp_path / "train" / "red" / "b")  # a <-> b: ELOOP
    os.symlink("../green", tmp_path / "train" / "red" / "g")
    os.symlink("../red", tmp_path / "train" / "green" / "r")  # red <-> green through two links
    ds, said = _folder(root)
    assert len(ds) >= 4 and said  # finishes, and says what it skipped


def test_match_classes_by_name_subset_unknown_unlabelled(tmp_path):
    write_images(tmp_path / "test" / "red", 2, (200, 0, 0))
    ds = D.image_folder(tmp_path / "test")
    assert ds.targets == [0, 0]  # position 0 of a one-class folder
    m = match_classes(ds, ["blue", "green", "red"], what="--id test")
    assert ds.targets == [2, 2] and [t for _, t in ds.samples] == [2, 2]  # moved to the model's index of "red"
    assert m.missing == ["blue", "green"] and "holds 1 of the model's 3 classes" in m.describe("--id test")
    write_images(tmp_path / "more" / "fish", 1, (0, 0, 200))
    write_images(tmp_path / "more" / "red", 1, (200, 0, 0))
    with pytest.raises(D.DataError, match="class 'fish' is not one of the model's classes"):
        match_classes(D.image_folder(tmp_path / "more"), ["green", "red"], what="--id more")
    write_images(tmp_path / "flat", 2, (1, 1, 1))
    with pytest.raises(D.DataError, match="--val flat has no labels"):
        match_classes(D.dataset_from_path(tmp_path / "flat", None, train=False), ["a", "b"], what="--val flat")


def test_match_classes_for_index_labels_and_class_tables(tmp_path):
    arr = D.ArrayDataset(np.zeros((3, 4, 4), np.uint8), [0, 1, 3])
    assert class_names(arr) is None
    with pytest.raises(D.DataError, match="label 3 is not a class of the model"):
        match_classes(arr, ["a", "b", "c"], what="--val x")
    assert match_classes(D.ArrayDataset(np.zeros((2, 4, 4), np.uint8), [0, 2]), ["a", "b", "c"],
                         what="x").missing == ["b"]
    # an image list with a class table beside it is matched by name
    write_images(tmp_path / "img", 2, (10, 10, 10))
    (tmp_path / "test.txt").write_text("img/0.png 0\nimg/1.png 1\n")
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    ds = D.dataset_from_path(tmp_path / "test.txt", None, train=False)
    assert class_names(ds) == ["dog", "cat"]
    match_classes(ds, ["cat", "dog"], what="--id test.txt")
    assert ds.targets == [1, 0]


def test_fingerprint_tells_data_apart(tmp_path):
    a = make_class_tree(tmp_path / "a", n_per_class=2)
    b = make_class_tree(tmp_path / "b", n_per_class=2)
    assert fingerprint(D.image_folder(a)) == fingerprint(D.image_folder(b))  # same files, same labels
    os.rename(os.path.join(b, "red"), os.path.join(b, "blue"))
    assert fingerprint(D.image_folder(a)) != fingerprint(D.image_folder(b))
