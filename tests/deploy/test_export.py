"""Export: every exportable scorer in each format gives Detector.predict's scores and decisions.

Tolerance (documented in the README's Deploy section and ascood.deploy.export):
|score_export - score_predict| <= 1e-4 + 1e-3 * max(|score|, spread), spread = the range of the
calibration scores, i.e. 0.1% of the detector's score scale. Sources: float32 kernels of another
runtime (ONNX Runtime's convolutions) and the lowered z-score vs the fused op; MDS / RMDS amplify
them most (squared distances through the pseudo-inverse of a near-singular covariance). p-values
and decisions are equal except for a score within that tolerance of a calibration score (where a
rounding difference may flip a decision).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import deployhelpers as H
from ascood.data.bundled import skimage_image_path
from ascood.deploy.detector import FORWARD_ONLY
from ascood.deploy.export import export, read_metadata, run_exported

RTOL, ATOL = 1e-3, 1e-4
EXT = {"onnx": "onnx", "torch-export": "pt2", "torchscript": "ts"}
CASES = [(s, f) for s in FORWARD_ONLY for f in EXT] + [(s, f) for s in ("odin", "iodin")
                                                      for f in ("torch-export", "torchscript")]


def bundled_pixels(det) -> torch.Tensor:
    """Photographs scikit-image ships (one greyscale), through the detector's resize + crop, as [0, 1] pixels."""
    tf = det.preprocessing.pixel_transform()
    imgs = [Image.open(skimage_image_path(n)).convert("RGB") for n in ("astronaut.png", "coffee.png", "camera.png",
                                                                       "brick.png", "grass.png")]
    return torch.stack([tf(i) for i in imgs])


def inputs(det) -> torch.Tensor:
    return torch.cat([H.id_pixels(9, seed=30)[0], H.ood_pixels(6, seed=31), torch.rand(5, 3, 8, 8,
                      generator=torch.Generator().manual_seed(32)), bundled_pixels(det)])


def tolerance(det, score: torch.Tensor) -> torch.Tensor:
    spread = float(det.calibration.max() - det.calibration.min())
    return ATOL + RTOL * score.double().abs().clamp(min=spread)


def check_parity(det, got: dict, ref) -> None:
    score = torch.from_numpy(got["score"]).float()
    tol = tolerance(det, ref.score)
    diff = (score.double() - ref.score.double()).abs()
    assert bool((diff <= tol).all()), f"max excess {float((diff - tol).max()):.3g}, max diff {float(diff.max()):.3g}"
    near = ((det.calibration[None, :] - ref.score.double()[:, None]).abs() <= tol[:, None]).any(1)
    p = torch.from_numpy(got["p_value"])
    assert p.dtype == torch.float64 and got["is_ood"].dtype == np.bool_
    assert torch.equal(p[~near], ref.p_value[~near])
    assert torch.equal(torch.from_numpy(got["is_ood"])[~near], ref.is_ood[~near])
    torch.testing.assert_close(torch.from_numpy(got["logits"]), ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,fmt", CASES)
def test_export_parity(name, fmt, tmp_path):
    det = H.fitted(name)
    x = inputs(det)
    ref = det.predict(x)
    path = export(det, str(tmp_path / f"det.{EXT[fmt]}"), fmt, check=False)
    got = run_exported(path, fmt, x)
    check_parity(det, got, ref)
    # Another batch size than the one exported with: the batch dimension is dynamic.
    one = run_exported(path, fmt, x[:1])
    assert one["score"].shape == (1,)
    if (name, fmt) in WITHOUT_ASCOOD:
        runs_without_ascood(det, path, fmt, x, tmp_path)
    meta = read_metadata(path, fmt)
    assert meta["classes"] == H.CLASSES and meta["decision"]["threshold"] == det.threshold
    prep = meta["preprocessing"]  # as detector.json calls it (issue 30)
    assert prep["image_size"] == 8 and prep["mean"] == H.MEAN and meta["scorer"]["name"] == name


def test_gradient_scorers_refuse_onnx_naming_a_forward_only_scorer(tmp_path):
    for name in ("odin", "iodin"):
        with pytest.raises(ValueError, match=r"ONNX inference graph cannot compute.*forward-only scorer \(e\.g\. ebo"):
            export(H.fitted(name), str(tmp_path / "x.onnx"), "onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_arguments_are_checked(tmp_path):
    det = H.fitted("msp")
    with pytest.raises(ValueError, match="format must be one of onnx, torch-export, torchscript"):
        export(det, str(tmp_path / "x"), "tflite")
    with pytest.raises(ValueError, match=r"must be named \*\.pt2"):
        export(det, str(tmp_path / "x.pt"), "torch-export")


BLOCKER = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ascood', 'ascood_kernels'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
fmt, path = sys.argv[1], sys.argv[2]
x = np.load(sys.argv[3])
if fmt == 'onnx':
    import onnxruntime as ort
    out = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'images': x})
else:
    import torch
    m = torch.export.load(path).module() if fmt == 'torch-export' else torch.jit.load(path)
    out = [o.detach().numpy() for o in m(torch.from_numpy(x))]
np.save(sys.argv[4], out[1])
assert not any(k.split('.')[0] in ('ascood', 'ascood_kernels') for k in sys.modules)
"""


#: The exported files that are also run in a fresh interpreter where ascood / ascood_kernels cannot be imported
#: (a z-score model with a bank; the input-gradient graph in both torch formats).
WITHOUT_ASCOOD = {("knn", "onnx"), ("iodin", "torch-export"), ("iodin", "torchscript")}


def runs_without_ascood(det, path: str, fmt: str, x: torch.Tensor, tmp_path) -> None:
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Run from an empty folder so neither the checkout nor tests/ is on the path; the blocker refuses the rest.
    proc = subprocess.run([sys.executable, "-c", BLOCKER, fmt, path, str(tmp_path / "x.npy"),
                           str(tmp_path / "s.npy")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = det.predict(x).score
    assert bool(((torch.from_numpy(np.load(tmp_path / "s.npy")) - ref).abs().double() <= tolerance(det, ref)).all())


@pytest.mark.parametrize("fmt", ["torch-export", "torchscript"])
def test_mds_with_input_preprocessing_exports_to_torch_formats(fmt, tmp_path):
    # MDS with eps > 0 (Lee et al.'s input step) needs the input gradient, like ODIN: torch formats only.
    import ascood
    from ascood.scoring.scorers import MDS

    train, val, _ = H.splits()
    det = ascood.Detector.fit(H.trained_model(), id_train=train, id_val=val, scorer=MDS(eps=0.002, std=H.STD),
                              tpr=0.9, preprocessing=H.PREP, device="cpu")
    x = inputs(det)
    check_parity(det, run_exported(export(det, str(tmp_path / f"d.{EXT[fmt]}"), fmt, check=False), fmt, x),
                 det.predict(x))
    with pytest.raises(ValueError, match="ONNX inference graph cannot compute"):
        export(det, str(tmp_path / "d.onnx"), "onnx")


@pytest.mark.parametrize("name,fmt,ok", [("d.onnx", "onnx", True), ("d.model", "onnx", True), ("d.ts", "torchscript", True),
                                         ("d.pt", "torchscript", True), ("d.pt2", "torch-export", True),
                                         ("d.onnx", "torchscript", False), ("d.ts", "onnx", False),
                                         ("d.pt2", "onnx", False), ("D.ONNX", "torch-export", False),
                                         ("d.pt", "torch-export", False), ("d.onnx", "tflite", False)])
def test_export_path_must_not_name_another_format(name, fmt, ok):
    from ascood.deploy.export import check_export_path

    if ok:
        check_export_path(name, fmt)
    else:
        with pytest.raises(ValueError, match=r"\*\.|format must be one of"):
            check_export_path(name, fmt)
