"""The fuzz properties can fail: test-only copies of readers with a bug put back are caught by the same
properties (a small example budget, no shrinking), so a green fuzz run means something.

* the OpenOOD list check as it was before the fuzzers found it reading lists with ``open(encoding="utf-8")``
  (a non-UTF-8 byte escaped as UnicodeDecodeError);
* the list dataset without its path-inside-the-root check (``../x`` entries read files outside the root);
* load_model with ``torch.load(weights_only=False)`` (a pickle payload runs).

Nothing in the package is patched: each broken reader is a copy here, handed to the property as its reader.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import fuzzhelpers as F
from ascood.data.datasets import DataError, parses_as
from ascood.data.openood import ListCheck
from ascood.training.checkpoint import FORMAT, load_state_dict_checked
from test_fuzz_checkpoints import PAYLOAD_CASES, payload_property, run  # noqa: F401 (run: a fixture)
from test_fuzz_image_lists import (OPENOOD_CHECK_CASES, _SEGMENTS, openood_check_property,  # noqa: F401
                                   root, stays_inside_property)

#: A short search without shrinking: enough to find each planted bug, quick to fail.
BROKEN = settings(max_examples=60, phases=[Phase.generate], report_multiple_bugs=False)


def old_read_image_list(list_path, image_dir, num_classes, check_images=True, max_reported=5, keep=None):
    """read_image_list before the fuzzers: the list opened as UTF-8 text, so a bad byte raised while iterating."""
    check = ListCheck(list_path)
    try:
        f = open(list_path, encoding="utf-8")
    except OSError as err:
        check.errors.append(f"{list_path}: cannot read: {err}")
        return check
    with f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parses_as(parts[1], int):
                check.errors.append(f"{list_path}:{lineno}: malformed line")
                continue
            check.entries += 1
    return check


class ListWithoutRootCheck:
    """ImageListDataset's parsing with list_entry_path's refusal of '..' and absolute paths left out."""

    def __init__(self, list_file: str, root: str) -> None:
        self.samples, self.lines = [], []
        with open(list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f.read().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                path, label = (parts[0], int(parts[1])) if len(parts) == 2 and parses_as(parts[1], int) else (line, -1)
                full = os.path.join(root, path)  # the bug: no check that it stays inside root
                if not os.path.isfile(full):
                    raise DataError(f"{list_file}:{lineno}: image {full} not found")
                self.samples.append((full, label))
                self.lines.append(lineno)
        if not self.samples:
            raise DataError(f"image list {list_file} has no entries")
        self.targets = [lab for _, lab in self.samples]


def load_model_unpickling(path):
    """load_model with the full unpickler (weights_only=False): what the package must never do."""
    from ascood.nets.registry import build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not an ascood checkpoint")
    model = build_model(**ckpt["model_build"])
    load_state_dict_checked(model, ckpt["model"], path)
    return model, ckpt


def test_a_reader_letting_unicode_errors_escape_is_caught(root):
    @BROKEN
    @given(**OPENOOD_CHECK_CASES)
    def prop(case, mutations, num_classes):
        F.count("broken copy caught: list check letting UnicodeDecodeError escape")
        openood_check_property(old_read_image_list, case, mutations, num_classes, root)

    with pytest.raises(F.PropertyFailure, match="bare builtins.UnicodeDecodeError"):
        prop()


def test_a_reader_without_the_root_check_is_caught(root):
    @BROKEN
    @given(segments=_SEGMENTS, absolute=st.booleans())
    def prop(segments, absolute):
        F.count("broken copy caught: list reader without the root check")
        stays_inside_property(ListWithoutRootCheck, segments, absolute, root)

    with pytest.raises(AssertionError, match="escape.txt"):
        prop()


def test_a_reader_that_unpickles_is_caught(run, tmp_path_factory):  # noqa: F811
    @BROKEN
    @given(func=PAYLOAD_CASES["func"], kind=PAYLOAD_CASES["kind"])
    def prop(func, kind):
        F.count("broken copy caught: load_model that unpickles")
        payload_property(func, kind, "load_model", run, str(tmp_path_factory.getbasetemp()),
                         loader=load_model_unpickling)

    with pytest.raises(AssertionError, match="payload ran"):
        prop()
