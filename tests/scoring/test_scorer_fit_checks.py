"""Issue 30, scorer fits: bad fit data is refused the same way on every path.

The paths: ``fit(model, loader)`` (streamed for MDS, RMDS, SHE, DICE, KL-Matching; extracted in RAM for the
others), ``fit_features(extract_features(model, loader))`` (in RAM) and ``fit_features`` of a memory-mapped
record (``extract_features(..., directory=)``). Each table names the scorers a check applies to."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import SCORERS, Features, LinearHead, extract_features, get_scorer
from ascood.scoring.scorers.features import StreamedFeatures
from scorerhelpers import ConvBody

C = 4
N = 40
BAD_ROW = 13  # in the second batch of 8: the row named must be the global one, not the batch's


def _Body():
    return ConvBody(12)


def _model():
    torch.manual_seed(0)
    return ascood.ASCOODNet(_Body(), C, head="linear", input_mean=[0.0] * 3, input_std=[1.0] * 3).eval()


def _images(n=N, seed=0):
    x = torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    return x, torch.arange(n) % C


def _labels_that_the_model_predicts(model, x):
    with torch.no_grad():
        return model(x).argmax(1)  # every row correctly classified: SHE has a pattern for each predicted class


def _loader(x, y, bs=8):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


SMALL = {"knn": {"K": 3}, "nnguide": {"K": 3, "bank": "all"}, "vim": {"dim": 4}}
FITTED = sorted(name for name, cls in SCORERS.items() if cls.needs_fit)
LABEL_READERS = sorted(name for name, cls in SCORERS.items() if cls.needs_fit and getattr(cls, "uses_labels", False))
PATHS = ("model", "features", "memmap")


def _make(name, **kw):
    return get_scorer(name, **{**SMALL.get(name, {}), **kw})


def _fit(scorer, path, model, loader, tmp_path):
    if path == "model":
        return scorer.fit(model, loader)
    if path == "features":
        return scorer.fit_features(extract_features(model, loader))
    return scorer.fit_features(extract_features(model, loader, directory=tmp_path / "feats", name="fit"))


def test_the_tables_cover_the_scorers_they_are_about():
    assert set(LABEL_READERS) == {"mds", "rmds", "she", "tempscale", "mdspp"}, LABEL_READERS
    assert {"mds", "rmds", "dice", "klm", "she", "mdspp", "fdbd", "nci", "neco"} <= {n for n in FITTED if SCORERS[n].streams_fit}


# -- item 1: NaN / inf in what a fit reads, on every path ------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", FITTED)
def test_nonfinite_model_outputs_are_refused_with_scorer_array_and_global_row(name, path, tmp_path):
    model = _model()
    x, _ = _images()
    y = _labels_that_the_model_predicts(model, x)
    x[BAD_ROW, 0, 2, 2] = float("nan")  # the image gives NaN features, and NaN logits with them
    with pytest.raises(ValueError, match=rf"^{name}: the fit set's logits hold NaN or inf \(first at row {BAD_ROW}\)"):
        _fit(_make(name), path, model, _loader(x, y), tmp_path)


@pytest.mark.parametrize("path", PATHS)
def test_inf_is_refused_like_nan(path, tmp_path):
    model = _model()
    x, _ = _images()
    x[BAD_ROW] = float("inf")
    with pytest.raises(ValueError, match=rf"dice: the fit set's logits hold NaN or inf \(first at row {BAD_ROW}\)"):
        _fit(_make("dice"), path, model, _loader(x, _labels_that_the_model_predicts(model, _images()[0])), tmp_path)


def test_memmap_record_remembers_its_first_nonfinite_row_without_rereading(tmp_path):
    h = torch.randn(30, 5)
    h[21, 3] = float("inf")
    Features(torch.randn(30, 3), h, torch.arange(30) % 3).save(tmp_path, "rec")
    rec = Features.load(tmp_path, "rec")
    assert isinstance(rec.features, np.memmap) and rec.nonfinite == {"features": 21}
    with pytest.raises(ValueError, match=r"knn: the fit set's features hold NaN or inf \(first at row 21\)"):
        get_scorer("knn", K=2).fit_features(rec)


# -- item 2: labels against the model's classes; the head against the logits; strings --------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LABEL_READERS)
@pytest.mark.parametrize("label, says", [
    (7, rf"label 7 at row {BAD_ROW} is outside the model's {C} classes \[0, {C}\)"),
    (C, rf"label {C} at row {BAD_ROW} is outside the model's {C} classes"),
    (-1, rf"label -1 at row {BAD_ROW} is not a class index"),
])
def test_label_outside_the_models_classes_is_refused_with_value_and_row(name, path, label, says, tmp_path):
    model = _model()
    x, _ = _images()
    y = _labels_that_the_model_predicts(model, x)
    y[BAD_ROW] = label
    with pytest.raises(ValueError, match=rf"^{name}: {says}"):
        _fit(_make(name), path, model, _loader(x, y), tmp_path)


@pytest.mark.parametrize("name", ["mds", "rmds"])  # the label readers that fit without logits
def test_label_checked_against_the_heads_classes_without_logits(name):
    """Cached features with a head but no logits: C comes from the head's rows."""
    h = torch.randn(30, 6)
    y = torch.arange(30) % 3
    y[4] = 3
    head = LinearHead(torch.randn(3, 6), torch.zeros(3))
    with pytest.raises(ValueError, match=rf"{name}: label 3 at row 4 is outside the model's 3 classes"):
        get_scorer(name).fit_features(h, y, head=head)


def test_head_of_other_classes_than_the_logits_is_refused():
    h, z = torch.randn(20, 6), torch.randn(20, 3)
    head5 = LinearHead(torch.randn(5, 6), torch.zeros(5))
    with pytest.raises(ValueError, match=r"head weight is \(5, 6\) \(5 classes\), the logits have C = 3 columns"):
        get_scorer("vim", dim=2).fit_features(h, torch.arange(20) % 3, logits=z, head=head5)
    sc = get_scorer("react").fit_features(h.abs(), logits=z, head=LinearHead(torch.randn(3, 6), torch.zeros(3)))
    with pytest.raises(ValueError, match=r"react: head has 5 rows \(classes\), the logits have C = 3 columns"):
        sc.score_features(z[:4], h[:4].abs(), head=head5)


def test_string_labels_are_refused_by_parameter_name():
    h, z = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"Features labels must be integer class indices, got str values such as "
                                         r"'cat'"):
        get_scorer("mds").fit_features(h, ["cat", "dog", "cat", "dog"], logits=z)
    model = _model()
    x, _ = _images(8)
    named = DataLoader([(x[i], ["cat", "dog"][i % 2]) for i in range(8)], batch_size=4)
    for fit in (lambda: get_scorer("mds").fit(model, named), lambda: extract_features(model, named)):
        with pytest.raises(ValueError, match=r"the loader's labels must be integer class indices, got str values "
                                             r"such as 'cat'"):
            fit()


def test_tempscale_without_logits_is_named():
    for feats in (torch.randn(10, 4), None):  # features but no logits; labels alone
        with pytest.raises(ValueError, match=r"tempscale needs logits: pass logits \(N, C\)"):
            get_scorer("tempscale").fit_features(feats, torch.arange(10) % 2)
    with pytest.raises(ValueError, match="klm needs logits"):
        get_scorer("klm").fit_features(torch.randn(10, 4))


# -- item 3: degenerate fits: refused where the result is meaningless, warned where it is weak -------------------
def _arrays(n_per_class, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per_class)])
    h = torch.randn(len(y), m, generator=g) + 3 * nn.functional.one_hot(y, m).double().float()
    head = LinearHead(torch.eye(len(n_per_class), m), torch.zeros(len(n_per_class)))
    return h, y, head.fc(h), head


def _fit_arrays(scorer, path, h, y, z, head, tmp_path):
    """The feature path (arrays), the memory-mapped record, and the stream (a loader of cached rows)."""
    if path == "features":
        return scorer.fit_features(h, y, logits=z, head=head)
    if path == "memmap":
        Features(z, h, y, head).save(tmp_path, "rec")
        return scorer.fit_features(Features.load(tmp_path, "rec", head=head))

    return scorer.fit(_Rows(head), _loader(h, y, bs=4))


class _Rows(nn.Module):
    """A "model" whose features are its input rows, and whose head is ``head``: a loader of (h, y) then
    streams cached rows through the model path."""

    def __init__(self, head: LinearHead):
        super().__init__()
        self.fc = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(head.weight)
            self.fc.bias.copy_(head.bias_or_zero())

    def features(self, x):
        return x

    def head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.head(x)


DEGENERATE = [  # (scorer, kwargs, rows per class, error message)
    ("mds", {}, [1, 1, 1], r"mds: 3 row\(s\) in 3 class\(es\) have no within-class spread: needs at least 4 rows"),
    ("rmds", {}, [1, 1], r"rmds: 2 row\(s\) in 2 class\(es\) have no within-class spread"),
    ("vim", {"dim": 4}, [2, 2], r"vim: dim = 4 principal dimensions need more than 4 ID-train rows, the fit has 4"),
]


DEGENERATE_PATHS = [(*d, path) for d in DEGENERATE for path in ("features", "memmap", "model")]


@pytest.mark.parametrize("name, kw, counts, says, path", DEGENERATE_PATHS,
                         ids=[f"{d[0]}-{d[-1]}" for d in DEGENERATE_PATHS])
def test_meaningless_fits_are_refused_with_the_numbers(name, kw, counts, says, path, tmp_path):
    h, y, z, head = _arrays(counts)
    with pytest.raises(ValueError, match=says):
        _fit_arrays(get_scorer(name, **kw), path, h, y, z, head, tmp_path)


@pytest.mark.parametrize("path", ("features", "memmap", "model"))
@pytest.mark.parametrize("name", ["mds", "rmds"])
def test_features_constant_within_every_class_are_refused(name, path, tmp_path):
    h, y, z, head = _arrays([3, 3, 3])
    h = 3 * nn.functional.one_hot(y, h.shape[1]).float()  # each class's rows identical: no spread at all
    with pytest.raises(ValueError, match=rf"{name}: the features do not vary within any class"):
        _fit_arrays(get_scorer(name), path, h, y, head.fc(h), head, tmp_path)


@pytest.mark.parametrize("path", ("features", "memmap", "model"))
@pytest.mark.parametrize("name", ["mds", "rmds"])
def test_a_class_of_one_row_is_warned_about(name, path, tmp_path):
    h, y, z, head = _arrays([5, 5, 1])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sc = _fit_arrays(get_scorer(name), path, h, y, z, head, tmp_path)
    assert [str(w.message) for w in seen] == [f"{name}: class 2 has 1 row, needs at least 2 for a class mean that is "
                                              "more than one sample (fit on more ID-train rows of that class)"]
    assert torch.isfinite(sc.score_features(z[:3], h[:3])).all()


@pytest.mark.parametrize("name, kw, fix", [("knn", {"K": 50}, "pass a smaller K"),
                                          ("nnguide", {"K": 50, "bank": "all"}, "bank='all'")])
def test_k_larger_than_the_bank_is_warned_with_the_numbers(name, kw, fix):
    h, y, z, head = _arrays([4, 3, 3])
    sc = get_scorer(name, **kw).fit_features(h, y, logits=z, head=head)
    with pytest.warns(UserWarning, match=rf"{name}: K = 50 is larger than its bank of 10 ID features; using K = 10"
                      ) as rec:
        sc.score_features(z[:2], h[:2])
    assert fix in str(rec[0].message)


# -- item 4: integer hyperparameters, empty loaders ------------------------------------------------------------
INT_PARAMS = [("knn", "K"), ("nnguide", "K"), ("gen", "M"), ("iodin", "k"), ("relation", "pow"), ("vim", "dim"),
              ("tempscale", "max_iter"), ("tempscale", "max_steps"), ("neco", "dim"), ("adascale_a", "k1"),
              ("adascale_a", "k2"), ("adascale_a", "num_samples"), ("adascale_l", "k1"), ("adascale_l", "k2"),
              ("adascale_l", "num_samples")]


@pytest.mark.parametrize("name, param", INT_PARAMS, ids=[f"{n}-{p}" for n, p in INT_PARAMS])
def test_integer_parameters_take_numpy_integers_and_refuse_bools(name, param):
    sc = get_scorer(name, **{param: np.int64(5)})
    assert getattr(sc, param) == 5 and type(getattr(sc, param)) is int  # JSON-writable (APS results)
    for bad in (True, 2.0, "5"):
        with pytest.raises(ValueError, match=rf"^{name} {param} must be an integer >= 1.*got {bad!r}"):
            get_scorer(name, **{param: bad})
    with pytest.raises(ValueError, match=rf"{name} {param} must be an integer >= 1, got 0"):
        get_scorer(name, **{param: 0})
    if param in sc.get_params():
        with pytest.raises(ValueError, match=rf"{name} {param} must be an integer"):
            sc.set_params(**{param: False})
        assert type(sc.set_params(**{param: np.int32(3)}).get_params()[param]) is int


def test_every_integer_parameter_of_every_scorer_is_in_the_table():
    """Constructor parameters annotated int: a new one must join INT_PARAMS (and the shared validator)."""
    import inspect

    found = {(n, p) for n, cls in SCORERS.items() for p, v in inspect.signature(cls.__init__).parameters.items()
             if str(v.annotation).split(" | ")[0] == "int"}
    assert ("knn", "K") in found
    assert found <= set(INT_PARAMS), found - set(INT_PARAMS)


def test_empty_loader_is_refused_before_any_file_is_created(tmp_path):
    empty = _loader(*_images(0))
    target = tmp_path / "feats"
    with pytest.raises(ValueError, match="loader is empty"):
        extract_features(_model(), empty, directory=target, name="train")
    assert not target.exists()
    with pytest.raises(ValueError, match="mds: the fit set is empty"):
        get_scorer("mds").fit(_model(), empty)
    with pytest.raises(ValueError, match="loader is empty"):
        list(StreamedFeatures(_model(), empty).chunks(8))


# -- item 5: a warning once per cause ----------------------------------------------------------------------------
def test_repeated_fits_warn_once_per_cause_even_across_catch_warnings_blocks():
    h, y, z, head = _arrays([4, 3, 3])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # Python's own once-filter is off: the dedup is the scorers'
        for _ in range(3):  # the demo fits a fresh NNGuide per network
            get_scorer("nnguide", K=100, bank="all").fit_features(h, y, logits=z, head=head).score_features(z, h)
            with warnings.catch_warnings():  # torch opens such blocks; they reset Python's registry
                warnings.simplefilter("ignore", DeprecationWarning)
        h2, y2, z2, head2 = _arrays([3, 3, 3])  # another bank smaller than K: the same cause, not said again
        get_scorer("nnguide", K=100, bank="all").fit_features(h2, y2, logits=z2, head=head2).score_features(z2, h2)
        get_scorer("nnguide", K=200, bank="all").fit_features(h, y, logits=z, head=head).score_features(z, h)
    messages = [str(w.message) for w in seen]
    assert len(messages) == 2, messages
    assert "K = 100 is larger than its bank of 10" in messages[0]
    assert "K = 200 is larger" in messages[1]  # another cause still warns
