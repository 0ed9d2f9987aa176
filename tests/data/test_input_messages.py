"""Bad or surprising input at the API level gets a clear message (or a warning), and 16-bit images are
scaled, not clipped."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import ascood
import ascood_kernels as ak
from ascood.data import datasets as D
from ascood.apps.checks import InputError, training_num_classes
from ascood.scoring.evaluator import evaluate
from ascood.scoring.scorers import ViM, sweep
from ascood_kernels import reference
from backends import _skip_reason as case_skip_reason


@pytest.mark.parametrize("scale", [1, 257, 65535 // 63])
def test_16bit_png_is_scaled_to_8bit(tmp_path, scale):
    a = (np.arange(64).reshape(8, 8) * scale).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for mode in ("L", "RGB"):
        got = np.asarray(D.open_image(str(tmp_path / "g16.png"), mode)).astype(int)
        want = np.rint(a / 257.0).astype(int)
        np.testing.assert_array_equal(got if mode == "L" else got[..., 0], want)
    if scale == 65535 // 63:  # full range: not saturated (PIL's own convert would make 98% of pixels 255)
        assert (want == 255).mean() < 0.05


def test_8bit_png_is_unchanged(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(np.asarray(D.open_image(str(tmp_path / "g8.png"), "L")), a)


def test_float_label_names_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "list.txt").write_text("a.png 0\n# comment\na.png 1.5\n")
    with pytest.raises(D.DataError, match=r"list.txt:3: label '1.5' is not an integer"):
        D.ImageListDataset(tmp_path / "list.txt", tmp_path)


def test_png_given_as_list_file(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(D.DataError, match=r"x.png is not a text image list"):
        D.dataset_from_path(tmp_path / "x.png", None, train=True)


def test_images_beside_class_folders_warn_with_count(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / c / "1.png")
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"loose{i}.png")
    with pytest.warns(UserWarning, match=r"3 image\(s\) directly beside the class folders are ignored"):
        ds = D.image_folder(tmp_path)
    assert len(ds) == 2


def test_label_gaps_warn_and_unlabelled_lines_fail(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    # a gap that leaves at most half the classes empty warns (a larger one is refused: test_readers_round4)
    (tmp_path / "gaps.txt").write_text("0.png 0\n1.png 3\n2.png 3\n")
    ds = D.ImageListDataset(tmp_path / "gaps.txt", tmp_path)
    with pytest.warns(UserWarning, match=r"no samples for 2 class\(es\) \(1, 2\); training 4 classes"):
        assert training_num_classes(ds, "gaps.txt") == 4
    (tmp_path / "half.txt").write_text("0.png 0\n\n1.png\n2.png 1\n")
    with pytest.raises(InputError, match=r"half.txt:3: no label"):
        training_num_classes(D.ImageListDataset(tmp_path / "half.txt", tmp_path), "half.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gaps: no warning
        (tmp_path / "ok.txt").write_text("0.png 0\n1.png 1\n")
        assert training_num_classes(D.ImageListDataset(tmp_path / "ok.txt", tmp_path), "ok.txt") == 2


PERM_BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", PERM_BACKENDS)
def test_shuffle_perm_that_is_not_a_permutation_is_refused(backend):
    reason = case_skip_reason(backend, "cpu") if backend != "reference" else None
    if reason:
        pytest.skip(reason)
    x, s = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    npix = 8  # int(0.5 * 16)
    good = torch.stack([torch.randperm(npix), torch.randperm(npix)])
    run = (reference.shuffle_outlier if backend == "reference"
           else getattr(torch.ops, "ascood" if backend == "cpu" else "ascood_triton").shuffle_outlier)
    out = run(x, s, 0.5, good)
    assert out.shape == x.shape
    dup = good.clone()
    dup[1, 0] = dup[1, 1]  # one pixel would be copied twice, another lost
    with pytest.raises((ValueError, RuntimeError), match=r"perm must hold a permutation.*row 1"):
        run(x, s, 0.5, dup)
    with pytest.raises((ValueError, RuntimeError), match=r"perm"):
        run(x, s, 0.5, good + npix)  # out of range


def test_iodin_huge_k_names_k_and_the_range():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\*\*63 - 1\] .*ODIN.*got 1180591620717411303424"):
        ak.iodin_perturb(x, torch.randn_like(x), 0.01, 1.0, k=2 ** 70)
    # Any k >= C*H*W is ODIN (every element moves): still accepted.
    ak.iodin_perturb(x, torch.randn_like(x), 0.01, 1.0, k=2 ** 40)


def _loader(n, classes=2, labels=True):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % classes if labels else torch.full((n,), -1)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _model():
    torch.manual_seed(0)
    return ascood.build_model("small_cnn", 2, width=4).eval()


def test_unlabelled_id_data_gives_na_accuracy_not_zero():
    table = evaluate(_model(), _loader(8, labels=False), {"o": _loader(8)}, scorers=["msp"])
    assert table.rows[0]["id_acc"] is None
    assert "n/a" in table.format()
    labelled = evaluate(_model(), _loader(8), {"o": _loader(8)}, scorers=["msp"])
    assert labelled.rows[0]["id_acc"] is not None


def test_empty_ood_loader_names_the_set():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match=r"OOD set 'svhn' yields no batches"):
        evaluate(_model(), _loader(8), {"far": {"svhn": empty}}, scorers=["msp"])


def test_aps_without_a_valid_combination_says_why():
    # small_cnn width 4 has 16-d features: every ViM dim in the default grid is too large.
    with pytest.raises(ValueError, match=r"no valid hyperparameter combination for vim among 2: .*dim.*must be in"):
        sweep(ViM(), _model(), _loader(8), _loader(8), id_train_loader=_loader(16))
