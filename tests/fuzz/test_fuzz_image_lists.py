"""Fuzzing the image-list readers: ImageListDataset (``ascood train/eval LIST``, predict's lists), the OpenOOD
tree's list check (read_image_list) and its line-naming dataset, with random bytes, encodings, separators and
labels. Each example ends in the clean list's result or a DataError naming the list (fuzzhelpers)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import fuzzhelpers as F
from ascood.data.datasets import ImageListDataset
from ascood.data.openood import _LineNamedDataset, read_image_list

#: Images under the root (relative paths): spaces, non-ASCII names, a '#' inside a name, a folder.
IMAGES = ["a.png", "sub/b c.png", "ünï/ñ.png", "x#y.png", "12.png"]
BAD_IMAGE = "bad.png"  # exists, but is not an image (read errors must name the list line)

#: Line breaks str.splitlines knows; the first three are what editors write.
LINE_BREAKS = ["\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"]
SEPARATORS = [" ", "\t", "  ", " \t ", "\u3000"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    top = tmp_path_factory.mktemp("lists")
    images = top / "images"
    for rel in IMAGES:
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 7 * len(rel), np.uint8)).save(path)
    (images / BAD_IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return str(top)


def _write(root: str, data: bytes, name: str = "list.txt") -> str:
    path = os.path.join(root, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@st.composite
def listed(draw, images=IMAGES, line_breaks=LINE_BREAKS):
    """(list text, expected [(relative path, label)]): well-formed lines in any of the accepted spellings."""
    entries = draw(st.lists(st.tuples(st.sampled_from(images), st.none() | st.integers(-1, 10 ** 6)),
                            min_size=1, max_size=6))
    lines, expected = [], []
    for rel, label in entries:
        for _ in range(draw(st.integers(0, 2))):  # blank and comment lines around entries
            lines.append(draw(st.sampled_from(["", "   ", "\t", "# a comment", "  #x 3"])))
        shown = draw(st.sampled_from([rel, "./" + rel, rel.replace("/", "//")]))
        text = shown if label is None else shown + draw(st.sampled_from(SEPARATORS)) + str(label)
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\t "])))
        expected.append((rel, -1 if label is None else label))
    brk = draw(st.sampled_from(line_breaks))
    text = brk.join(lines) + draw(st.sampled_from(["", brk]))
    return text, expected


def _samples(ds: ImageListDataset, images: str) -> list[tuple[str, int]]:
    return [(os.path.relpath(p, images).replace(os.sep, "/"), lab) for p, lab in ds.samples]


@settings(max_examples=F.budget(300))
@given(case=listed())
def test_well_formed_lists_read_the_same_in_every_spelling(case, root):
    """Separators, line breaks, blank and comment lines, './' and '//' never change what a list says."""
    F.count("image lists: well-formed spellings")
    text, expected = case
    images = os.path.join(root, "images")
    path = _write(root, text.encode("utf-8"))
    kind, ds = F.outcome(lambda: ImageListDataset(path, images), "image list", path)
    assert kind == "ok", f"a well-formed list was refused: {ds}"
    assert _samples(ds, images) == expected


def _check_invariants(ds: ImageListDataset, images: str) -> None:
    """What any list the reader accepts must satisfy: listed files inside the root, integer labels, one line each."""
    real_root = os.path.realpath(images)
    assert ds.samples and len(ds.samples) == len(ds.lines) == len(ds.targets)
    assert ds.lines == sorted(set(ds.lines))
    for p, label in ds.samples:
        assert os.path.isfile(p)
        assert os.path.realpath(p).startswith(real_root + os.sep), p
        assert isinstance(label, int) and not isinstance(label, bool)


# Inserts favour the bytes list readers must handle: NUL, invalid UTF-8, a BOM, line breaks other than \n,
# path pieces and label spellings.
_MUTATION = F.byte_mutations(
    10 ** 6, max_delete=8,
    inserts=st.sampled_from([b"\0", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\r", b"\x85", b"\xe2\x80\xa8", b" ", b"..",
                             b"/", b"../", b"#", b"-", b"1.5", b"\t", b"\\", b"\x0c"]) | st.binary(max_size=8))


@settings(max_examples=F.budget(500))
@given(case=listed(images=IMAGES + [BAD_IMAGE]), mutations=st.lists(_MUTATION, min_size=1, max_size=4),
       classes=st.none() | st.binary(max_size=40) | st.just("red\ngreen\nblue\n".encode() * 300))
def test_mutated_lists_are_read_or_refused_naming_the_list(case, mutations, classes, root):
    """Flipped, inserted and deleted bytes (NUL, invalid UTF-8, BOM, '..', odd line breaks), with or without a
    classes.txt beside the list: a DataError naming the list (or its classes.txt), or a list that keeps every
    promise (files inside the root, integer labels, one line per sample)."""
    F.count("image lists: mutated bytes (+ classes.txt)")
    text, _ = case
    images = os.path.join(root, "images")
    folder = os.path.join(root, "mut")
    os.makedirs(folder, exist_ok=True)
    table = os.path.join(folder, "classes.txt")
    if classes is None:
        if os.path.exists(table):
            os.unlink(table)
    else:
        _write(folder, classes, "classes.txt")
    path = _write(folder, F.mutate_bytes(text.encode("utf-8"), mutations))
    kind, ds = F.outcome(lambda: ImageListDataset(path, images), "image list", path, table)
    if kind == "ok":
        _check_invariants(ds, images)


@settings(max_examples=F.budget(200))
@given(data=st.binary(max_size=200))
def test_random_bytes_are_refused_or_read(data, root):
    """Whatever the bytes (an image, a checkpoint, noise): a named DataError or a list keeping its promises."""
    F.count("image lists: random bytes")
    images = os.path.join(root, "images")
    path = _write(root, data, "noise.txt")
    kind, ds = F.outcome(lambda: ImageListDataset(path, images), "image list", path)
    if kind == "ok":
        _check_invariants(ds, images)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "shift_jis", "cp437"]


@settings(max_examples=F.budget(150))
@given(case=listed(line_breaks=["\n", "\r\n"]), encoding=st.sampled_from(ENCODINGS))
def test_other_encodings_read_the_same_or_are_refused(case, encoding, root):
    """A list saved in another encoding reads as the UTF-8 one would, or is refused naming the list: never a
    list of other (mis-decoded) paths."""
    F.count("image lists: encodings")
    text, expected = case
    images = os.path.join(root, "images")
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return
    path = _write(root, data, "enc.txt")
    kind, ds = F.outcome(lambda: ImageListDataset(path, images), "image list", path)
    if kind == "ok":
        assert _samples(ds, images) == expected


_LABEL_TOKENS = st.one_of(
    st.integers(-10 ** 30, 10 ** 30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["+3", "-0", "0x1", "1_000", "٣", "１２", "1e3", "nan", "inf", "True", "0b1", "1.", ".5",
                     "3.0", "−1", "", "label", "#", "4 # note"]),
    st.text(max_size=6),
)


@settings(max_examples=F.budget(300))
@given(token=_LABEL_TOKENS, sep=st.sampled_from(SEPARATORS))
def test_any_label_token_is_an_integer_label_or_a_named_refusal(token, sep, root):
    """The last field of a line: an integer label (the same int Python reads), or a DataError naming the list
    line: a float label, a path that is not there. Never a silently different label."""
    F.count("image lists: label tokens")
    images = os.path.join(root, "images")
    path = _write(root, f"a.png{sep}{token}\n".encode("utf-8", "surrogatepass"), "labels.txt")
    kind, ds = F.outcome(lambda: ImageListDataset(path, images), "image list", path)
    if kind == "ok":
        _check_invariants(ds, images)
        if token and not any(c.isspace() for c in token):
            assert _samples(ds, images) == [("a.png", int(token))]


def openood_check_property(reader, case, mutations, num_classes, root) -> None:
    """The OpenOOD list check's property for ``reader`` (read_image_list, or a broken copy in
    test_fuzz_catches_broken_readers.py): every problem is a 'file:line: ...' entry of its result."""
    text, _ = case
    images = os.path.join(root, "images")
    path = _write(root, F.mutate_bytes(text.encode("utf-8"), mutations), "openood.txt")
    kind, check = F.outcome(lambda: reader(path, images, num_classes), "image list", path)
    if kind == "ok":
        assert all(e.startswith(path) for e in check.errors + check.missing_images), check
        assert check.entries >= 0 and check.missing_count >= len(check.missing_images)


OPENOOD_CHECK_CASES = dict(case=listed(images=IMAGES + [BAD_IMAGE]), mutations=st.lists(_MUTATION, max_size=3),
                           num_classes=st.none() | st.integers(1, 20))


@settings(max_examples=F.budget(300))
@given(**OPENOOD_CHECK_CASES)
def test_openood_list_check_collects_errors_and_never_raises(case, mutations, num_classes, root):
    """read_image_list (resolve_benchmark's check) reports every bad line as 'file:line: ...' in its result."""
    F.count("image lists: OpenOOD list check")
    openood_check_property(read_image_list, case, mutations, num_classes, root)


#: Path pieces of list entries that try to leave the root: '..', absolute paths, the list itself (a file that
#: exists one level up), links' targets are not needed: the reader must refuse '..' before looking.
_SEGMENTS = st.lists(st.sampled_from(["..", ".", "", "sub", "images", "a.png", "escape.txt", "x#y.png", "..."]),
                     min_size=1, max_size=5)


def stays_inside_property(reader, segments, absolute, root) -> None:
    """An entry built from '..', '.', empty and real segments (optionally absolute) is refused naming the list,
    or is a file inside the root: never a file outside it (``reader``: ImageListDataset or a broken copy)."""
    images = os.path.join(root, "images")
    entry = ("/" + root.lstrip("/") + "/" if absolute else "") + "/".join(segments)
    path = _write(root, f"{entry} 0\n".encode("utf-8"), "escape.txt")
    kind, ds = F.outcome(lambda: reader(path, images), "image list", path)
    if kind == "ok":
        _check_invariants(ds, images)


@settings(max_examples=F.budget(200))
@given(segments=_SEGMENTS, absolute=st.booleans())
def test_entries_never_leave_the_root(segments, absolute, root):
    """'../escape.txt' (the list itself, one level above the image root), '/abs/path', 'sub/../../x': refused."""
    F.count("image lists: entries leaving the root")
    stays_inside_property(ImageListDataset, segments, absolute, root)


@settings(max_examples=F.budget(200))
@given(case=listed(images=IMAGES + [BAD_IMAGE]))
def test_read_errors_name_the_list_line_they_come_from(case, root):
    """An unreadable image found while reading an OpenOOD list names the list and the line it is on (the same
    line numbers the list's own messages use), whatever line breaks the list has."""
    F.count("image lists: OpenOOD read errors")
    text, expected = case
    images = os.path.join(root, "images")
    path = _write(root, text.encode("utf-8"), "lined.txt")
    ds = _LineNamedDataset(path, images, None)
    for i, (rel, _) in enumerate(expected):
        kind, got = F.outcome(lambda: ds[i], "image list", path)
        if rel == BAD_IMAGE:
            assert kind == "error" and f"{path}:{ds.lines[i]}:" in str(got), got
        else:
            assert kind == "ok"
