"""GradNorm with feature_space="raw" on a z-score model: the exported graph computes the scorer's quantity
(the last layer applied to the raw h, OpenOOD's), in both export formats that need no extra package."""
import copy

import pytest

import ascood
import deployhelpers as H
from ascood.deploy.export import export, run_exported
from ascood.scoring.scorers import get_scorer
from test_export import check_parity, inputs


@pytest.mark.parametrize("fmt,ext", [("torchscript", "ts"), ("torch-export", "pt2")])
def test_gradnorm_raw_export_parity(fmt, ext, tmp_path):
    model = copy.deepcopy(H.trained_model())
    assert model.head_type == "zscore"
    _, val, _ = H.splits()
    det = ascood.Detector.fit(model, id_val=val, scorer=get_scorer("gradnorm", feature_space="raw"), tpr=0.9,
                              preprocessing=H.PREP, classes=H.CLASSES, device="cpu")
    x = inputs(det)
    ref = det.predict(x)
    check_parity(det, run_exported(export(det, str(tmp_path / f"det.{ext}"), fmt, check=False), fmt, x), ref)
