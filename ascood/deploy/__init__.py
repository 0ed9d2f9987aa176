"""ascood.deploy: from a trained run to a deployed detector.

:class:`Detector` (:mod:`.detector`): a model, one fitted scorer, the
preprocessing, the class names and a calibrated decision rule (threshold at a
target TPR, conformal p-values, Benjamini-Hochberg for batches:
:mod:`.conformal`). Saved as one artifact directory of safetensors and JSON
with a sha256 per file (:mod:`.artifact`, :mod:`.saving`, :mod:`.state`);
exported as one graph to ONNX, torch.export or TorchScript (:mod:`.graph`,
:mod:`.export`). The optional ``[deploy]`` extra (safetensors, onnx,
onnxruntime) is imported only when a file is written, read or exported.

Layer rule: may import ``ascood.data``, ``ascood.nets``, ``ascood.training`` and
``ascood.scoring``; only ``ascood.apps`` imports this layer.
"""
from .conformal import benjamini_hochberg, conformal_p_values, threshold_at_tpr
from .detector import Detector, Predictions
from .inputs import Preprocessing
from .state import ArtifactError

__all__ = ["Detector", "Predictions", "Preprocessing", "ArtifactError", "benjamini_hochberg", "conformal_p_values",
           "threshold_at_tpr"]
