"""OpenOOD v1.5 data trees (ascood.openood) and presets (ascood.presets) on a miniature fake tree."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ascood.data import datasets as D
from ascood.apps.main import main
from ascood.data.openood import BENCHMARKS, OpenOODTreeError, read_image_list, resolve_benchmark
from ascood.apps.presets import (PRESETS, PUBLISHED, TRAIN_KEYS, get_preset, pretrained_weights_error, resolve, eval_pre_size)
from fake_openood import CLASS_LIST_NAME, OTHER_LABELS, SUBSET_LABELS, list_entry_path, make_tree, wnid


@pytest.fixture(scope="module")
def tree_root(tmp_path_factory):
    return make_tree(str(tmp_path_factory.mktemp("openood") / "data"))


@pytest.fixture
def own_tree(tmp_path):
    """A private tree a test may damage."""
    return make_tree(str(tmp_path / "data"), benchmarks=["cifar10", "waterbirds"])


def _names(tree, role):
    return [s.name for s in tree.present if s.role == role]


# -- every benchmark resolves, with the sets of benchmarks.md --------------------------------------------------
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_resolves_and_loads(tree_root, name):
    extra = {"class_list": os.path.join(tree_root, CLASS_LIST_NAME)} if name == "imagenet100" else {}
    tree = resolve_benchmark(name, tree_root, **extra)
    assert not tree.skipped
    assert len(tree.present) == len(BENCHMARKS[name].sets)
    tf = D.build_transforms(8, [0.5] * 3, [0.5] * 3, train=False)
    x, y = tree.dataset("id_train", tf)[0]
    assert x.shape == (3, 8, 8) and 0 <= y < BENCHMARKS[name].num_classes
    for group, sets in tree.ood_groups(tf).items():
        assert group in ("near", "far")
        for ds in sets.values():
            assert ds[len(ds) - 1][1] == -1  # OOD labels are -1
    assert tree.dataset("ood_val", tf)[0][1] == -1


def test_sets_match_benchmarks_md(tree_root):
    c10 = resolve_benchmark("cifar10", tree_root)
    assert _names(c10, "near") == ["cifar100", "tin"]
    assert _names(c10, "far") == ["mnist", "svhn", "texture", "places365", "isun"]
    isun = [s for s in c10.present if s.name == "isun"][0]
    assert (isun.folder, isun.list) == ("images_classic/iSUN/", "benchmark_imglist/cifar10/test_isun.txt")
    assert c10.spec("ood_val").list == "benchmark_imglist/cifar10/val_tin.txt"
    assert [s.list for s in c10.present if s.role == "csid"] == ["benchmark_imglist/cifar10/test_cifar10c.txt"]
    c100 = resolve_benchmark("cifar100", tree_root)
    assert _names(c100, "near") == ["cifar10", "tin"]
    assert [s for s in c100.present if s.name == "isun"][0].list == "benchmark_imglist/cifar10/test_isun.txt"
    assert c100.spec("id_train").list == "benchmark_imglist/cifar100/train_cifar100.txt"
    i200 = resolve_benchmark("imagenet200", tree_root)
    assert _names(i200, "near") == ["ssb_hard", "ninco"]
    assert _names(i200, "far") == ["inaturalist", "openimage_o", "textures"]
    assert [s for s in i200.present if s.name == "textures"][0].folder == "images_classic/"
    assert _names(i200, "csid") == ["imagenet_v2", "imagenet_c", "imagenet_r"]
    wb = resolve_benchmark("waterbirds", tree_root)
    assert wb.spec("id_train").folder == "images_largescale/waterbirds/"
    assert wb.spec("id_val").list == "benchmark_imglist/waterbirds/waterbirds_val.txt"
    assert [(s.name, s.folder) for s in wb.present if s.role == "near"] == [
        ("waterbirds_ood", "images_largescale/waterbirds_ood/")]
    assert _names(wb, "far") == ["ninco", "openimage_o", "inaturalist", "sun", "texture"]
    assert [s for s in wb.present if s.name == "sun"][0].list == "benchmark_imglist/sun/sun.txt"
    assert [s for s in wb.present if s.name == "texture"][0].list == "benchmark_imglist/cifar100/test_texture.txt"
    assert wb.spec("ood_val").list == "benchmark_imglist/imagenet200/val_openimage_o.txt"
    for name, near in (("celeba", "celeba_spurious_ood"), ("cars", "cars_finegrained_ood"),
                       ("aircraft", "aircraft_finegrained_ood")):
        t = resolve_benchmark(name, tree_root)
        assert [s.list for s in t.present if s.role == "near"] == [f"benchmark_imglist/{name}/{near}.txt"]
        assert t.benchmark.num_classes == {"celeba": 2, "cars": 150, "aircraft": 90}[name]


def test_imagenet100_is_the_class_list_subset_of_imagenet_1k(tree_root, tmp_path):
    classes = os.path.join(tree_root, CLASS_LIST_NAME)
    tree = resolve_benchmark("imagenet100", tree_root, class_list=classes)
    assert tree.benchmark.num_classes == 100
    assert tree.spec("id_train").list == "benchmark_imglist/imagenet/train_imagenet.txt"
    assert _names(tree, "near") == ["ssb_hard"] and _names(tree, "far") == ["inaturalist", "openimage_o", "textures"]
    assert tree.spec("ood_val").list == "benchmark_imglist/imagenet/val_openimage_o.txt"
    # The class list's order gives the labels; every other ImageNet class of the lists is left out.
    order = [ln for ln in open(classes).read().splitlines() if not ln.startswith("#")]
    expected = {SUBSET_LABELS[[wnid(l) for l in SUBSET_LABELS].index(w)]: i for i, w in enumerate(order)}
    train = tree.dataset("id_train", None)
    assert len(train) == 2 * len(SUBSET_LABELS) and tree.size("id_train") == len(train)
    assert sorted(set(train.targets)) == list(range(100))
    with open(os.path.join(tree_root, tree.spec("id_train").list)) as f:
        source = [ln.rsplit(maxsplit=1) for ln in f.read().splitlines()]
    kept = [(p, int(l)) for p, l in source if int(l) not in OTHER_LABELS]
    assert [(os.path.relpath(p, os.path.join(tree_root, "images_largescale")), t) for p, t in train.samples] == [
        (p, expected[l]) for p, l in kept]
    assert train.line_numbers == [i + 1 for i, (p, l) in enumerate(source) if int(l) not in OTHER_LABELS]
    assert len(tree.dataset("id_test", None)) == 100
    # ImageNet-1K label indices work as well as WordNet ids.
    by_label = tmp_path / "labels.txt"
    by_label.write_text("\n".join(str(l) for l in SUBSET_LABELS) + "\n")
    t2 = resolve_benchmark("imagenet100", tree_root, class_list=str(by_label))
    assert t2.label_map == {l: i for i, l in enumerate(SUBSET_LABELS)}


def test_imagenet100_class_list_errors(tree_root, tmp_path):
    with pytest.raises(OpenOODTreeError, match="needs --class-list FILE"):
        resolve_benchmark("imagenet100", tree_root)
    with pytest.raises(OpenOODTreeError, match="--class-list applies only to a class subset"):
        resolve_benchmark("cifar10", tree_root, class_list=os.path.join(tree_root, CLASS_LIST_NAME))
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join([wnid(l) for l in SUBSET_LABELS[:98]] + ["bogus", wnid(0)]) + "\n")
    with pytest.raises(OpenOODTreeError) as exc:
        resolve_benchmark("imagenet100", tree_root, class_list=str(bad))
    assert f"{bad}:99: 'bogus' is neither a WordNet id" in str(exc.value)
    assert f"{bad}:100: {wnid(0)} repeats line 1" in str(exc.value)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("\n".join([wnid(l) for l in SUBSET_LABELS[:99]] + ["n99999999"]) + "\n")
    with pytest.raises(OpenOODTreeError,
                       match="1 class\\(es\\) not found as a folder of .*train_imagenet.txt: n99999999"):
        resolve_benchmark("imagenet100", tree_root, class_list=str(unknown))
    short = tmp_path / "short.txt"
    short.write_text("1\n2\n")
    with pytest.raises(OpenOODTreeError, match="2 classes, expected 100"):
        resolve_benchmark("imagenet100", tree_root, class_list=str(short))


def test_isun_is_optional_and_fingerprint_follows_the_lists(own_tree):
    shutil.rmtree(os.path.join(own_tree, "images_classic/iSUN"))
    os.remove(os.path.join(own_tree, "benchmark_imglist/cifar10/test_isun.txt"))
    tree = resolve_benchmark("cifar10", own_tree)  # no --allow-missing needed: OpenOOD's download has no iSUN
    assert tree.skipped_names() == ["far:isun"]
    assert "not part of OpenOOD v1.5's download" in tree.skipped[0][1]
    fp = tree.fingerprint(["id_train"])
    assert list(fp) == ["benchmark_imglist/cifar10/train_cifar10.txt"]
    path = os.path.join(own_tree, "benchmark_imglist/cifar10/train_cifar10.txt")
    import hashlib
    assert fp[list(fp)[0]] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    with open(path, "a") as f:
        f.write("# a comment changes the bytes\n")
    assert resolve_benchmark("cifar10", own_tree).fingerprint(["id_train"]) != fp


# -- missing pieces -------------------------------------------------------------------------------------------
def test_missing_pieces_listed_in_one_error(own_tree):
    root = own_tree
    os.remove(os.path.join(root, "benchmark_imglist/cifar10/test_svhn.txt"))
    shutil.rmtree(os.path.join(root, "images_classic/iSUN"))
    tin = [s for s in BENCHMARKS["cifar10"].sets if s.name == "tin" and s.role == "near"][0]
    os.remove(list_entry_path(root, tin, 2))  # a list with a missing image
    with pytest.raises(OpenOODTreeError) as exc:
        resolve_benchmark("cifar10", root)
    msg = str(exc.value)
    assert "benchmark cifar10" in msg and "OpenOOD v1.5" in msg and "--allow-missing" in msg
    assert "benchmark_imglist/cifar10/test_svhn.txt not found" in msg
    assert "image folder images_classic/iSUN/ not found" in msg
    assert "test_tin.txt:2: image" in msg and "1 of 6 listed images missing" in msg
    tree = resolve_benchmark("cifar10", root, allow_missing=True)
    assert sorted(tree.skipped_names()) == ["far:isun", "far:svhn", "near:tin"]
    assert _names(tree, "far") == ["mnist", "texture", "places365"]


def test_id_sets_are_never_optional(own_tree):
    os.remove(os.path.join(own_tree, "benchmark_imglist/waterbirds/waterbirds_val.txt"))
    os.remove(os.path.join(own_tree, "benchmark_imglist/sun/sun.txt"))
    for allow in (False, True):
        with pytest.raises(OpenOODTreeError) as exc:
            resolve_benchmark("waterbirds", own_tree, allow_missing=allow)
        msg = str(exc.value)
        assert "id_val waterbirds: list benchmark_imglist/waterbirds/waterbirds_val.txt not found" in msg
        assert "far sun" in msg  # every missing piece, not only the first


def test_cli_prints_every_missing_piece(own_tree, capsys):
    os.remove(os.path.join(own_tree, "benchmark_imglist/cifar10/test_mnist.txt"))
    os.remove(os.path.join(own_tree, "benchmark_imglist/cifar10/test_places365.txt"))
    rc = main(["train", "--preset", "cifar10", "--data-root", own_tree, "--epochs", "1", "--model", "small_cnn",
               "--out", os.path.join(own_tree, "..", "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "test_mnist.txt not found" in err and "test_places365.txt not found" in err and "OpenOOD v1.5" in err
    assert not os.path.exists(os.path.join(own_tree, "..", "run", "last.pt"))


# -- bad input ------------------------------------------------------------------------------------------------
def test_unknown_benchmark_and_wrong_root(tree_root, tmp_path):
    with pytest.raises(OpenOODTreeError, match="unknown benchmark 'cifar11'; choose from cifar10, cifar100"):
        resolve_benchmark("cifar11", tree_root)
    with pytest.raises(OpenOODTreeError, match="does not exist"):
        resolve_benchmark("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(OpenOODTreeError, match=r"no benchmark_imglist/ folder \(did you mean .*data\?\)"):
        resolve_benchmark("cifar10", os.path.dirname(tree_root))
    with pytest.raises(OpenOODTreeError, match="pass its parent"):
        resolve_benchmark("cifar10", os.path.join(tree_root, "benchmark_imglist"))


def test_malformed_lines_and_labels_name_file_and_line(own_tree):
    path = os.path.join(own_tree, "benchmark_imglist/waterbirds/waterbirds_train.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    lines[1] = lines[1].rsplit(maxsplit=1)[0]  # no label
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + " 2"  # waterbirds has 2 classes
    lines[4] = lines[4].rsplit(maxsplit=1)[0] + " x1"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(OpenOODTreeError) as exc:
        resolve_benchmark("waterbirds", own_tree, allow_missing=True)
    msg = str(exc.value)
    assert f"{path}:2: malformed line" in msg
    assert f"{path}:4: label 2 out of range for 2 classes (expected 0..1)" in msg
    assert f"{path}:5: malformed line" in msg


def test_ood_lists_accept_minus_one_and_id_lists_do_not(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a b.png").write_bytes(b"")  # paths may hold spaces; only existence is checked here
    lst = tmp_path / "l.txt"
    lst.write_text("# comment\n\na b.png -1\n")
    assert read_image_list(str(lst), str(img_dir), None).entries == 1
    res = read_image_list(str(lst), str(img_dir), 10)
    assert res.errors == [f"{lst}:3: label -1 out of range for 10 classes (expected 0..9)"]


def test_undecodable_image_names_list_and_line(own_tree):
    tree = resolve_benchmark("waterbirds", own_tree)
    spec = tree.spec("id_train")
    with open(list_entry_path(own_tree, spec, 3), "wb") as f:
        f.write(b"not a png at all")
    ds = tree.dataset("id_train", None)
    ds[0]
    with pytest.raises(D.DataError, match=r"waterbirds_train\.txt:3: cannot read image .*img_002\.png"):
        ds[2]


# -- presets --------------------------------------------------------------------------------------------------
def test_resolution_order_and_sources():
    defaults = {"epochs": 100, "lr": 0.1, "seed": 0, "image_size": 32}
    r = resolve("cars", {"epochs": 2, "image_size": 64}, defaults)
    assert (r.values["epochs"], r.sources["epochs"]) == (2, "flag")
    assert (r.values["lr"], r.sources["lr"]) == (0.01, "preset")
    assert (r.values["batch_size"], r.sources["batch_size"]) == (32, "preset")
    assert (r.values["seed"], r.sources["seed"]) == (0, "default")
    assert (r.values["pre_size"], r.sources["pre_size"]) == (64, "derived")  # from the overridden size
    assert (r.values["pretrained"], r.sources["pretrained"]) == (True, "preset")
    r2 = resolve("cars", {"model": "small_cnn"}, defaults)
    assert r2.values["pretrained"] is False and r2.sources["pretrained"] == "derived"
    assert pretrained_weights_error(r2, None) is None
    msg = pretrained_weights_error(resolve("cars", {}, defaults), None)
    assert "--weights" in msg and "resnet50" in msg and "nothing is ever downloaded" in msg
    none = resolve(None, {"lr": 0.5}, defaults)
    assert none.sources == {"epochs": "default", "lr": "flag", "seed": "default", "image_size": "default",
                            "pre_size": "derived", "train_aug": "derived"}
    with pytest.raises(ValueError, match="unknown preset 'svhn'"):
        get_preset("svhn")


def test_presets_match_the_paper_settings():
    c10, c100, wb, cb = (PRESETS[k] for k in ("cifar10", "cifar100", "waterbirds", "celeba"))
    assert (c10.ood_type, c10.p_inv, c10.w, c10.epochs, c10.lr, c10.batch_size) == ("shuffle", 0.15, 1.0, 100, 0.1, 128)
    assert (c100.w, c100.fc_lr_factor, c100.scorer, c100.mean) == (5.0, 0.05, "scale", (0.5071, 0.4867, 0.4408))
    assert c100.std == (0.2675, 0.2565, 0.2761)  # OpenOOD's normalization_dict['cifar100']
    assert (wb.model, wb.pretrained, wb.w, wb.alpha_max, wb.alpha_min, wb.scorer) == ("resnet18", True, 0.1, 300, 30,
                                                                                     "odin")
    assert (cb.ood_type, cb.alpha_max, cb.alpha_min) == ("gaussian", 0.1, 0.1)
    for name in ("cars", "aircraft"):
        p = PRESETS[name]
        assert (p.model, p.image_size, p.pre_size, p.batch_size, p.alpha_max, p.alpha_min) == (
            "resnet50", 448, 512, 32, 0.1, 0.1)
    assert (PRESETS["cars"].scorer, PRESETS["aircraft"].scorer) == ("relation", "nnguide")
    assert set(PUBLISHED) == set(PRESETS) - {"imagenet200"}
    assert PUBLISHED["waterbirds"].ascood_fpr95 == (11.37, 0.42)
    for p in PRESETS.values():  # the preset's pre-size is what the test transform does
        assert p.pre_size == eval_pre_size(p.image_size)
        assert p.scorer in p.scorers and "msp" in p.scorers
        assert set(p.train_values()) == set(TRAIN_KEYS)


def test_test_transform_uses_the_pre_size():
    for size in (32, 224, 448):
        tf = D.build_transforms(size, [0.5] * 3, [0.5] * 3, train=False)
        resize = [t for t in tf.transforms if type(t).__name__ == "Resize"][0]
        assert resize.size == eval_pre_size(size)


def test_print_config_shows_sources(capsys, tree_root):
    rc = main(["train", "--preset", "cifar100", "--print-config", "--epochs", "3", "--no-nesterov",
               "--data-root", tree_root])
    out = capsys.readouterr().out
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln.startswith("  ")}
    assert lines["epochs"].endswith("[flag]") and " 3 " in lines["epochs"]
    assert lines["nesterov"].endswith("[flag]")
    assert lines["w"].endswith("[preset]") and " 5.0 " in lines["w"]
    assert lines["fc_lr_factor"].endswith("[preset]")
    assert lines["momentum"].endswith("[default]")
    assert "16 train images -> 3 training steps" in out


def test_train_and_eval_with_preset_on_the_tree(tree_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "cifar10", "--data-root", tree_root, "--model", "small_cnn", "--epochs", "2",
                 "--out", out, "--no-progress", "--no-figures"]) == 0
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]][-1] >= 1 and "val_acc" in ckpt["history"][0]
    assert ckpt["extra"]["mean"] == pytest.approx(list(PRESETS["cifar10"].mean))
    assert ckpt["train_config"]["ood_type"] == "shuffle" and ckpt["train_config"]["p_inv"] == 0.15
    capsys.readouterr()
    assert main(["eval", os.path.join(out, "best.pt"), "--preset", "cifar10", "--data-root", tree_root,
                 "--scorers", "msp,ebo", "--out", os.path.join(out, "eval")]) == 0
    text = capsys.readouterr().out
    assert "APS ebo" in text and "near mean" in text and "isun" in text
    assert os.path.isfile(os.path.join(out, "eval", "results.csv"))


def test_readme_preset_table_is_the_presets():
    from ascood.apps.presets import preset_table_rows
    from ascood.apps.reproduce import OUTPUT_FILES

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")).read()
    for row in preset_table_rows():
        assert "| " + " | ".join(row) + " |" in readme
    for name in OUTPUT_FILES:
        assert f"`{name}`" in readme


def test_docs_list_every_benchmark_file():
    # The README points newcomers at docs/OPENOOD_TREE.md: it must be what BENCHMARKS says.
    from ascood.data.openood import tree_markdown

    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                       "OPENOOD_TREE.md")
    with open(doc, encoding="utf-8") as f:
        assert f.read() == tree_markdown(), "regenerate docs/OPENOOD_TREE.md from ascood.data.openood.tree_markdown()"
