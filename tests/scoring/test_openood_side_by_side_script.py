"""benchmarks/openood_evaluator_side_by_side.py: its arguments, its ViM grid rule and its data tree (no timing,
no OpenOOD: the benchmark itself needs a fetched OpenOOD tree and is run by hand)."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "openood_evaluator_side_by_side.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("openood_side_by_side", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_openood(tmp_path) -> str:
    """The two things the script checks before it runs anything: the evaluator file and the configs folder."""
    root = tmp_path / "OpenOOD"
    (root / "openood" / "evaluation_api").mkdir(parents=True)
    (root / "openood" / "evaluation_api" / "evaluator.py").write_text("")
    (root / "configs" / "postprocessors").mkdir(parents=True)
    return str(root)


def _exit_message(bench, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_names_the_openood_argument(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--openood" in out and "--openood-python" in out and "--scorers" in out


def test_openood_path_is_required_and_checked(bench, capsys, tmp_path):
    assert "--openood PATH is required" in _exit_message(bench, capsys, [])
    missing = str(tmp_path / "nowhere")
    err = _exit_message(bench, capsys, ["--openood", missing])
    assert missing in err and "not an OpenOOD source tree" in err
    # A folder without configs/postprocessors is not a source tree either.
    half = tmp_path / "half" / "openood" / "evaluation_api"
    half.mkdir(parents=True)
    (half / "evaluator.py").write_text("")
    assert "not an OpenOOD source tree" in _exit_message(bench, capsys, ["--openood", str(tmp_path / "half")])


def test_bad_scorers_and_sizes_are_named(bench, capsys, tmp_path):
    oo = _fake_openood(tmp_path)
    err = _exit_message(bench, capsys, ["--openood", oo, "--scorers", "msp,entropy,nope"])
    assert "--scorers" in err and "entropy" in err and "nope" in err
    assert "--n-train must be >= 1" in _exit_message(bench, capsys, ["--openood", oo, "--n-train", "0"])
    args = bench.parse_args(["--openood", oo, "--scorers", "MSP, knn", "--small"])
    assert args.scorer_list == ["msp", "knn"] and args.width == 16 and args.n_train == 400


def test_vim_grid_keeps_openood_dims_below_the_feature_size(bench):
    assert bench.vim_grid(512) == [256]  # OpenOOD's CIFAR ResNet-18: 1000 >= 512 has no residual space
    assert bench.vim_grid(2048) == [256, 1000]
    assert bench.vim_grid(256) == [128]  # none below m: m // 2
    assert bench.grids_for(128)["vim"] == {"dim": [64]}
    assert bench.grids_for(128)["knn"] == bench.APS_GRIDS["knn"]
    # Every APS scorer is one both libraries have.
    assert set(bench.APS_GRIDS) <= set(bench.SCORERS)


def test_fake_tree_is_an_openood_cifar10_tree(bench, tmp_path):
    from ascood.data.openood import resolve_benchmark

    counts = bench.make_tree(str(tmp_path), n_train=12, n_val=3, n_test=4, n_ood=2)
    tree = resolve_benchmark("cifar10", str(tmp_path))
    assert tree.size("id_train") == 12 and tree.size("id_val") == 3 and tree.size("id_test") == 4
    groups = tree.ood_groups(None)
    assert set(groups["near"]) == set(bench.NEAR) and set(groups["far"]) == set(bench.FAR)
    assert all(len(ds) == 2 for g in groups.values() for ds in g.values())
    assert counts["test_cifar10c"] == 10
    # OpenOOD's data_setup downloads a set whose images_classic/<name> folder is empty or missing.
    for name in ("cifar10", "cifar100", "tin", *bench.FAR):
        assert os.listdir(tmp_path / "images_classic" / name)


def test_openood_python_without_its_packages_is_named(bench, tmp_path):
    import sys

    missing = bench.openood_python_problem(sys.executable)
    # This environment has torch, torchvision, scikit-learn, scipy and tqdm; whatever of faiss, pandas and
    # pyyaml it lacks is named with its pip name (and nothing is named when it has them all).
    lacking = [m for m in ("faiss", "pandas", "yaml") if importlib.util.find_spec(m) is None]
    if lacking:
        assert missing is not None and all(bench.OPENOOD_NEEDS[m] in missing for m in lacking)
        assert "torchvision" not in missing.split("install")[0]
    else:
        assert missing is None
    bad = bench.openood_python_problem(str(tmp_path / "no-python"))
    assert bad is not None and "cannot run it" in bad
