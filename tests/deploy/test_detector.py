"""Detector: fit / save / load / predict for every scorer, the data it calibrates on, and bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ascood
import deployhelpers as H
from ascood.data.datasets import DataError
from ascood.deploy import Detector
from ascood.deploy.artifact import ARTIFACT_FILES
from ascood.scoring.scorers import SCORERS

ALL = list(SCORERS)


@pytest.mark.parametrize("name", ALL)
def test_fit_save_load_predict_round_trip(name, tmp_path):
    det = H.fitted(name)
    x = torch.cat([H.id_pixels(12, seed=20)[0], H.ood_pixels(12, seed=21)])
    before = det.predict(x, fdr=0.2)
    # The scores are the scorer's own, as `ascood eval` computes them (independent path: scorer.score on
    # the normalised batch).
    with torch.enable_grad() if det.scorer.needs_input else torch.no_grad():
        _, expected = det.scorer.score(det.model, H.normalise(x))
    torch.testing.assert_close(before.score, expected.float(), rtol=1e-5, atol=1e-6)
    assert before.label.tolist() == det.model(H.normalise(x)).argmax(1).tolist()

    path = det.save(tmp_path / "det", bank_dtype="float32")
    assert sorted(os.listdir(path)) == sorted(ARTIFACT_FILES)
    loaded = Detector.load(path)
    after = loaded.predict(x, fdr=0.2)
    torch.testing.assert_close(after.score, before.score, rtol=1e-6, atol=1e-6)
    assert after.is_ood.tolist() == before.is_ood.tolist()
    assert after.bh_ood.tolist() == before.bh_ood.tolist()
    assert after.p_value.tolist() == before.p_value.tolist()
    assert loaded.threshold == det.threshold and loaded.tpr == det.tpr
    assert loaded.classes == H.CLASSES and after.label_name == before.label_name
    assert loaded.scorer.get_params() == det.scorer.get_params()


def test_decisions_follow_the_p_value_and_the_threshold():
    det = H.fitted("msp")
    x = torch.cat([H.id_pixels(30, seed=22)[0], H.ood_pixels(30, seed=23)])
    p = det.predict(x)
    assert p.is_ood.tolist() == (p.score < det.threshold).tolist()
    assert p.is_ood.tolist() == (p.p_value <= det.alpha + 1e-12).tolist()
    brute = [(1 + int((det.calibration <= s).sum())) / (det.calibration.numel() + 1) for s in p.score.double()]
    assert p.p_value.tolist() == pytest.approx(brute)
    assert p.is_ood[30:].float().mean() > p.is_ood[:30].float().mean() + 0.3  # it detects something


def test_calibration_is_held_out_from_tuning():
    # ReAct fits on ID val: the calibration half must be disjoint from the half that fitted it.
    train, val, ood = H.splits()
    det = Detector.fit(H.trained_model(), id_train=train, id_val=val, ood_val=ood, scorer="react", tpr=0.9,
                       preprocessing=H.PREP, device="cpu")
    d = det.provenance["data"]
    assert d["n_tune"] + d["n_calibration"] == len(val) and d["n_calibration"] == det.calibration.numel() == 100
    assert det.provenance["scorer_choice"]["params"]["percentile"] in (85, 90, 95, 99)
    # The validation numbers, recomputed independently from the detector's own scores.
    from sklearn.metrics import roc_auc_score

    s_ood = det.predict(ood.tensors[0], normalized=True).score.double()
    s_cal = det.calibration
    auroc = roc_auc_score([1] * len(s_cal) + [0] * len(s_ood), torch.cat([s_cal, s_ood]).numpy())
    assert det.validation["ood_val_auroc"] == pytest.approx(auroc)
    assert det.validation["ood_val_fpr"] == pytest.approx(float((s_ood >= det.threshold).double().mean()))
    # A scorer fitted on ID train without APS calibrates on all of id_val.
    det2 = H.fitted("knn")
    assert det2.calibration.numel() == len(val) and det2.provenance["data"]["n_tune"] == 0


def test_aps_picks_the_best_candidate_by_validation_auroc():
    train, val, ood = H.splits()
    det = Detector.fit(H.trained_model(), id_train=train, id_val=val, ood_val=ood, scorer="aps", tpr=0.9,
                       preprocessing=H.PREP, device="cpu", candidates=("msp", "mls", "ebo", "mds"))
    trials = det.provenance["scorer_choice"]["trials"]
    assert [t["scorer"] for t in trials] == ["msp", "mls", "ebo", "mds"]
    best = max(trials, key=lambda t: t["val_auroc"])
    assert det.scorer.name == best["scorer"]


def test_run_folder_source_and_image_files(tmp_path):
    # A real run folder of `ascood train` (its checkpoint's extra gives the preprocessing and class names).
    from ascood.training.checkpoint import atomic_save

    model = H.trained_model()
    ckpt = {"format": "ascood-checkpoint-v1", "epoch": 1, "model": model.state_dict(),
            "model_build": model.build_args, "extra": {"image_size": 8, "mean": H.MEAN, "std": H.STD,
                                                       "channels": 3, "classes": H.CLASSES}}
    run = tmp_path / "run"
    run.mkdir()
    atomic_save(ckpt, run / "last.pt")
    val_dir = tmp_path / "val"
    x, y = H.id_pixels(60, seed=24)
    for c, name in enumerate(H.CLASSES):
        H.write_png_dir(str(val_dir / name), x[y == c], prefix=name)
    det = Detector.fit(str(run), id_val=str(val_dir), scorer="mls", tpr=0.9, device="cpu")
    assert det.classes == H.CLASSES and det.provenance["source"] == "run"
    files = H.write_png_dir(str(tmp_path / "new"), H.id_pixels(5, seed=25)[0])
    from_files = det.predict(files[:3] + [str(tmp_path / "new")])
    assert len(from_files) == 8 and from_files.source[:3] == files[:3]
    # Files go through the same preprocessing as tensors of their pixels (PNG is lossless at 8 bits).
    pix = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    torch.testing.assert_close(det.predict(pix).score, from_files.score[3:], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    det = H.fitted("msp")
    with pytest.raises(ValueError, match=r"inputs is 16x16, the model expects 8x8"):
        det.predict(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1 channel\(s\) \(greyscale\), the model expects 3 \(RGB\)"):
        det.predict(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected pixel values in \[0, 1\]"):
        det.predict(torch.randn(2, 3, 8, 8) * 5)
    with pytest.raises(ValueError, match="fdr must be in"):
        det.predict(torch.rand(2, 3, 8, 8), fdr=0)
    with pytest.raises(TypeError, match="tensor, PIL image"):
        det.predict([1, 2])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        det.predict(torch.rand(2, 3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="workers must be an integer >= 0, got -1"):
        det.predict(torch.rand(2, 3, 8, 8), workers=-1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 2.5"):
        Detector.fit(det.model, id_val=torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8)), scorer="msp",
                     batch_size=2.5)
    # A normalised batch is accepted when said so.
    det.predict(torch.randn(2, 3, 8, 8), normalized=True)


def test_bad_files_are_named(tmp_path):
    det = H.fitted("msp")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        det.predict([str(bad)])
    with pytest.raises(DataError, match="missing.png not found"):
        det.predict([str(tmp_path / "missing.png")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        det.predict([str(empty)])
    # A greyscale file for an RGB model is converted as in training (not refused).
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 128).save(grey)
    assert len(det.predict([str(grey)])) == 1


def test_fit_arguments_are_checked():
    train, val, ood = H.splits()
    model = H.trained_model()
    for tpr in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="tpr must be in"):
            Detector.fit(model, id_val=val, scorer="msp", tpr=tpr, preprocessing=H.PREP)
    with pytest.raises(ValueError, match="pass ood_val"):
        Detector.fit(model, id_val=val, scorer="aps", preprocessing=H.PREP)
    with pytest.raises(ValueError, match="'knn' fits ID training statistics: pass id_train"):
        Detector.fit(model, id_val=val, scorer="knn", preprocessing=H.PREP)
    with pytest.raises(ValueError, match="preprocessing is required"):
        Detector.fit(model, id_val=val, scorer="msp")
    with pytest.raises(ValueError, match="too few for tpr 0.99"):
        Detector.fit(model, id_val=torch.utils.data.Subset(val, range(50)), scorer="msp", tpr=0.99,
                     preprocessing=H.PREP)
    with pytest.raises(DataError, match="id_val not found"):
        Detector.fit(model, id_val="/nonexistent/val", scorer="msp", preprocessing=H.PREP)
    with pytest.raises(ValueError, match="classes has 2 names, the model has 3"):
        Detector.fit(model, id_val=val, scorer="msp", preprocessing=H.PREP, classes=["a", "b"])


def test_float16_bank_and_memory_mapped_bank(tmp_path):
    det = H.fitted("knn")
    x = torch.cat([H.id_pixels(10, seed=26)[0], H.ood_pixels(10, seed=27)])
    ref = det.predict(x)
    det.save(tmp_path / "half", bank_dtype="float16")
    half = Detector.load(tmp_path / "half")
    assert half.scorer.bank.dtype == torch.float16
    torch.testing.assert_close(half.predict(x).score, ref.score, rtol=0, atol=2e-3)
    # max_bank_mb=0: the bank is never held whole; it is read in chunks from the file per batch.
    det.save(tmp_path / "full")
    streamed = Detector.load(tmp_path / "full", max_bank_mb=0)
    streamed.scorer.bank.chunk = 7  # several chunks per batch
    torch.testing.assert_close(streamed.predict(x).score, ref.score, rtol=1e-6, atol=1e-6)
    assert streamed.scorer.bank._device_copy is None
    assert (tmp_path / "half" / "scorer.safetensors").stat().st_size < (tmp_path / "full" / "scorer.safetensors").stat().st_size * 0.6


def test_facade_and_model_card(tmp_path):
    assert ascood.Detector is Detector
    det = H.fitted("ebo")
    path = det.save(tmp_path / "det")
    card = (tmp_path / "det" / "README.md").read_text()
    assert f"{det.threshold:.6g}" in card and "exchangeable" in card and "ebo" in card
    assert str(len(det.calibration)) in card


def test_core_install_works_without_the_deploy_extra(monkeypatch, tmp_path):
    # Fitting and predicting need nothing extra; saving, loading and ONNX say which extra to install.
    import sys

    for mod in ("safetensors", "safetensors.torch", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError, as on a core install
    det = H.fitted("msp")
    assert len(det.predict(torch.rand(2, 3, 8, 8))) == 2
    with pytest.raises(ImportError, match=r"pip install 'ascood\[deploy\]'"):
        det.save(tmp_path / "d")
    from ascood.deploy.export import export

    with pytest.raises(ImportError, match=r"pip install 'ascood\[deploy\]'"):
        export(det, str(tmp_path / "d.onnx"), "onnx")


def test_memory_mapped_features_give_the_same_detector(tmp_path):
    train, val, _ = H.splits()
    kw = dict(id_train=train, id_val=val, tpr=0.9, preprocessing=H.PREP, device="cpu")
    from ascood.scoring.scorers import KNN

    in_ram = Detector.fit(H.trained_model(), scorer=KNN(K=5), **kw)
    mapped = Detector.fit(H.trained_model(), scorer=KNN(K=5), feature_dir=tmp_path / "feats", **kw)
    assert any(p.suffix == ".bin" for p in (tmp_path / "feats").iterdir())
    assert torch.equal(in_ram.calibration, mapped.calibration)
    mapped.save(tmp_path / "det")
    x = H.ood_pixels(5, seed=40)
    assert torch.equal(Detector.load(tmp_path / "det").predict(x).score, in_ram.predict(x).score)


def test_wrapped_torchvision_model(tmp_path):
    # ascood.wrap'ed models carry no build record: the artifact holds their weights, load takes the architecture.
    import torchvision

    from ascood.deploy.export import export, run_exported

    torch.manual_seed(0)
    model = ascood.wrap(torchvision.models.resnet18(num_classes=3)).eval()
    train, val, _ = H.splits()
    det = Detector.fit(model, id_train=train, id_val=val, scorer="scale", tpr=0.9, preprocessing=H.PREP,
                       device="cpu")
    x = torch.cat([H.id_pixels(6, seed=41)[0], H.ood_pixels(6, seed=42)])
    ref = det.predict(x)
    det.save(tmp_path / "det")
    with pytest.raises(ascood.deploy.ArtifactError, match="pass model="):
        Detector.load(tmp_path / "det")
    fresh = ascood.wrap(torchvision.models.resnet18(num_classes=3))
    loaded = Detector.load(tmp_path / "det", model=fresh)
    torch.testing.assert_close(loaded.predict(x).score, ref.score)
    got = run_exported(export(det, str(tmp_path / "d.onnx"), "onnx"), "onnx", x)
    spread = float(det.calibration.max() - det.calibration.min())
    tol = 1e-4 + 1e-3 * ref.score.abs().clamp(min=spread)
    assert bool(((torch.from_numpy(got["score"]) - ref.score).abs() <= tol).all())
