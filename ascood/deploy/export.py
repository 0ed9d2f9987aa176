"""Export a :class:`~ascood.deploy.Detector` as ONE graph: ONNX, torch.export (.pt2) or TorchScript.

    det.export("det.onnx", "onnx")            # onnxruntime: images -> logits, score, is_ood, p_value
    det.export("det.pt2", "torch-export")     # torch.export.load(path).module()(images)
    det.export("det.ts", "torchscript")       # torch.jit.load(path)(images)

The graph is :func:`ascood.deploy.graph.build_graph`: input ``images``
float32 (B, C, S, S) in [0, 1] after resize + centre crop, any batch size B;
outputs ``logits`` (B, K) float32, ``score`` (B,) float32, ``is_ood`` (B,) bool,
``p_value`` (B,) float64. The fused ops are lowered to standard ops, so the
files run without ascood: torch alone for .pt2 / TorchScript, onnxruntime
alone for ONNX (opset 17, CPU tested).

Metadata (preprocessing, class names, threshold, tpr, scorer, the output
names and meanings) is a JSON string stored as the ONNX model's
``metadata_props["ascood"]``, as the extra file ``ascood.json`` of a .pt2
archive (``torch.export.load(path, extra_files={"ascood.json": ""})``) and of a
TorchScript archive (``torch.jit.load(path, _extra_files={"ascood.json": ""})``);
:func:`read_metadata` reads it back.

Input-gradient scorers (ODIN, i-ODIN, MDS with eps > 0) export to
torch.export (the backward is traced into the graph as aten ops) and
TorchScript (``torch.autograd.grad`` in the scripted graph: call it with grad
mode on, not under ``torch.no_grad()``), not to ONNX.

Exported files are programs: load only your own (torch.jit.load and
torch.export.load are not for untrusted files).
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import torch

from ..files import atomic_write
from ..training.rundir import claim_output_file
from .artifact import require_deploy_extra
from .graph import GRADIENT_SCORERS, build_graph

__all__ = ["FORMATS", "check_export_path", "check_export_target", "is_ascood_export", "score_tolerance", "export",
           "metadata", "read_metadata", "run_exported", "load_exported", "OUTPUTS", "DEFAULT_NAMES", "needs_gradient"]

FORMATS = ("onnx", "torch-export", "torchscript")
DEFAULT_NAMES = {"onnx": "detector.onnx", "torch-export": "detector.pt2", "torchscript": "detector.ts"}
#: File name endings that say a format: a name ending in another format's is refused (a .onnx file holding
#: TorchScript fails only when someone serves it).
FORMAT_SUFFIXES = {"onnx": (".onnx",), "torch-export": (".pt2",), "torchscript": (".ts", ".pt", ".pth", ".jit")}


def check_export_path(path: str, fmt: str) -> None:
    """ValueError when ``path``'s ending names another format than ``fmt`` (torch.export also needs .pt2)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "torch-export" and not path.endswith(".pt2"):
        raise ValueError(f"a torch.export archive must be named *.pt2 (torch.export.load reads only those), got {path}")
    low = path.lower()
    for other, endings in FORMAT_SUFFIXES.items():
        if other != fmt and low.endswith(endings):
            raise ValueError(f"{path} ends in {os.path.splitext(path)[1]}, the ending of {other} files, but the "
                             f"format is {fmt}: name it *{FORMAT_SUFFIXES[fmt][0]} (or choose --format {other})")


#: The metadata member of a .pt2 / TorchScript zip archive: ``<archive>/extra/ascood.json``.
_ZIP_METADATA = ("extra", "ascood.json")
_METADATA_LIMIT = 64 * 2 ** 20  # far above any class list; a larger member is not ours


def _onnx_producer(head: bytes) -> bytes | None:
    """The ``producer_name`` of an ONNX ModelProto from its first bytes (protobuf writes fields in number order:
    ir_version (1), then producer_name (2)); None when the bytes do not start that way."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while pos < len(head) and shift < 64:
            byte = head[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise ValueError("truncated varint")

    try:
        while pos < len(head):
            key = varint()
            if key == (1 << 3 | 0):  # ir_version, a varint
                varint()
            elif key == (2 << 3 | 2):  # producer_name, length-delimited
                size = varint()
                return head[pos:pos + size] if pos + size <= len(head) else None
            else:
                return None
    except ValueError:
        return None
    return None


def _zip_has_ascood_metadata(path: str) -> bool:
    """Whether the zip archive ``path`` holds ``<archive>/extra/ascood.json`` with this graph format (read with
    zipfile: nothing in the archive is loaded or run)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if len(parts) == 3 and tuple(parts[1:]) == _ZIP_METADATA and info.file_size <= _METADATA_LIMIT:
                    with archive.open(info) as f:
                        meta = json.loads(f.read(_METADATA_LIMIT + 1).decode("utf-8"))
                    return isinstance(meta, dict) and meta.get("format") == GRAPH_FORMAT
    except (OSError, ValueError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return False
    return False


def is_ascood_export(path: str) -> bool:
    """Whether the existing file ``path`` was written by :func:`export`, by a cheap marker (nothing is loaded):
    an ONNX file whose ``producer_name`` is ``ascood``, or a .pt2 / TorchScript zip archive whose
    ``extra/ascood.json`` member holds this package's graph format. An empty file counts as ours (nothing to
    lose, e.g. a name from ``mktemp``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if not head:
        return True
    if head.startswith(b"PK"):
        return _zip_has_ascood_metadata(path)
    return _onnx_producer(head) == b"ascood"


def check_export_target(path: str, fmt: str, flag: str = "path") -> None:
    """ValueError naming ``flag`` when ``path`` is a folder, or an existing file an ascood export did not write
    (:func:`is_ascood_export`): an export replaces only its own files."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name the file to write, e.g. "
                         f"{os.path.join(path, DEFAULT_NAMES[fmt])}")
    if os.path.lexists(path) and not is_ascood_export(path):
        raise ValueError(f"{flag} {path} is an existing file that ascood did not write (no ascood export metadata in "
                         "it), so nothing was written: remove it or choose another file name")


def _load_torchscript(path: str, **kw):
    """torch.jit.load without its deprecation note (the user chose TorchScript; the docs say torch-export is
    the format torch keeps)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        return torch.jit.load(path, map_location="cpu", **kw)
OUTPUTS = ("logits", "score", "is_ood", "p_value")
GRAPH_FORMAT = "ascood-detector-graph-v1"
ONNX_OPSET = 17
_ONNX_LIMIT = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB, with room for the graph itself


def score_tolerance(det, score: torch.Tensor) -> np.ndarray:
    """The parity tolerance per score: 1e-4 + 1e-3 * max(|score|, range of the calibration scores).

    0.1% of the detector's score scale: float32 kernels of another runtime and the lowered z-score head
    differ from the scorers' own code by far less on every scorer except MDS / RMDS, whose squared
    distances through a near-singular precision matrix amplify feature rounding the most.
    """
    spread = float(det.calibration.max() - det.calibration.min())
    return 1e-4 + 1e-3 * np.maximum(np.abs(score.detach().double().cpu().numpy()), spread)


def needs_gradient(det) -> bool:
    """Whether the detector's scorer differentiates the input (ODIN, i-ODIN, MDS with eps > 0)."""
    return det.scorer.name in GRADIENT_SCORERS or bool(getattr(det.scorer, "needs_input", False))


def metadata(det, fmt: str) -> dict:
    """What a serving stack needs besides the graph (JSON): preprocessing, classes, decision, outputs."""
    return {
        "format": GRAPH_FORMAT, "graph_format": fmt,
        # "preprocessing" as detector.json calls it; "input" only says what the graph's input tensor is.
        "preprocessing": det.preprocessing.to_json(),
        "input": {"name": "images", "dtype": "float32",
                  "shape": ["B", det.preprocessing.channels, det.preprocessing.image_size,
                            det.preprocessing.image_size],
                  "values": "pixel values in [0, 1] after resize + centre crop, before mean/std (see preprocessing)"},
        "outputs": {"logits": "(B, K) float32 model logits", "score": "(B,) float32, higher = more ID",
                    "is_ood": "(B,) bool, p_value <= k / (n + 1), i.e. score < threshold",
                    "p_value": "(B,) float64 conformal p-value (1 + #{calibration <= score}) / (n + 1)"},
        "classes": det.classes,
        "scorer": {"name": det.scorer.name, "params": {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                                           else str(v)) for k, v in det.scorer.get_params().items()}},
        "decision": {"tpr": det.tpr, "alpha": det.alpha, "threshold": det.threshold, "k": det.k,
                     "n_calibration": int(det.calibration.numel())},
        "fused_ops": "lowered to standard torch ops (z-score head: (h - mean) / (unbiased std + 1e-6) * sigma; "
                     "iodin_perturb: top-k |grad| signed step); the graph needs neither ascood nor ascood_kernels",
        "validation": det.validation,
    }


def _example(det, batch: int = 2) -> torch.Tensor:
    p = det.preprocessing
    # Not 0 or 1: torch.export would specialise the batch dimension to a size-0/1 example.
    return torch.rand(batch, p.channels, p.image_size, p.image_size, generator=torch.Generator().manual_seed(0))


def export(det, path: str, fmt: str = "onnx", *, check: bool = True) -> str:
    """Write the detector's graph to ``path`` in ``fmt`` (one of :data:`FORMATS`); returns the path.

    ``check``: run the written file once on a small batch and compare it with
    the in-memory graph (a broken export fails here, not in production).
    """
    check_export_path(path, fmt)
    check_export_target(path, fmt)
    if fmt == "onnx" and needs_gradient(det):
        raise ValueError(f"scorer {det.scorer.name} perturbs the input along its gradient, which an ONNX inference "
                         "graph cannot compute: export it with --format torch-export or torchscript, or build the "
                         "detector with a forward-only scorer (e.g. ebo, msp, mls, gen, react, scale, knn, vim)")
    with claim_output_file(path, flag="path"):  # a lock beside the file (nested claims of one process are fine)
        check_export_target(path, fmt)  # again under the lock: the file may have appeared meanwhile
        _write(det, path, fmt, check)
    return path


def _write(det, path: str, fmt: str, check: bool) -> None:
    """Trace, write and (``check``) run the file once against the in-memory graph."""
    det.model.cpu().eval()
    meta = json.dumps(metadata(det, fmt), sort_keys=True, default=str)
    x = _example(det)
    if fmt == "onnx":
        _export_onnx(det, path, x, meta)
    elif fmt == "torch-export":
        _export_program(det, path, x, meta)
    else:
        _export_torchscript(det, path, x, meta)
    if check:
        ref = build_graph(det)(x)
        got = run_exported(path, fmt, x)
        tol = score_tolerance(det, ref[1].detach())
        diff = np.abs(got["score"].astype(np.float64) - ref[1].detach().double().numpy())
        logit_ok = np.allclose(got["logits"], ref[0].detach().numpy(), rtol=1e-4, atol=1e-5)
        # p-values and decisions follow from the score; a score on a calibration value may move by one rank.
        if got["score"].shape != tuple(ref[1].shape) or not (diff <= tol).all() or not logit_ok:
            raise RuntimeError(f"the exported {fmt} graph disagrees with the detector (score difference "
                               f"{diff.max():.3g}, tolerance {tol.min():.3g}; logits close: {logit_ok}); "
                               f"the file {path} is not usable")


def _export_onnx(det, path: str, x: torch.Tensor, meta: str) -> None:
    onnx = require_deploy_extra("onnx")
    graph = build_graph(det)
    nbytes = sum(b.numel() * b.element_size() for b in list(graph.buffers()) + list(graph.parameters()))
    if nbytes > _ONNX_LIMIT:
        raise ValueError(f"the graph's constants take {nbytes / 2 ** 30:.2f} GiB, over ONNX's 2 GiB protobuf limit "
                         "(a large KNN/NNGuide bank): use --format torch-export, or a smaller bank")
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(graph, (x,), buf, dynamo=False, input_names=["images"], output_names=list(OUTPUTS),
                          dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUTS}},
                          opset_version=ONNX_OPSET, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = "ascood", meta
    model.producer_name = "ascood"
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


def _export_program(det, path: str, x: torch.Tensor, meta: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    if needs_gradient(det):
        # torch.export cannot trace autograd.grad; make_fx traces torch.func.grad into aten forward + backward
        # ops first, and that plain graph exports like any other.
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = build_graph(det, grad="func")
        traced = make_fx(graph, tracing_mode="symbolic", _allow_non_fake_inputs=True)(x)
        ep = torch.export.export(traced, (x,), dynamic_shapes=({0: batch},), strict=False)
    else:
        ep = torch.export.export(build_graph(det), (x,), dynamic_shapes=({0: batch},), strict=False)
    atomic_write(path, lambda f: torch.export.save(ep, f, extra_files={"ascood.json": meta}))


def _export_torchscript(det, path: str, x: torch.Tensor, meta: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notes and tracer warnings about constants
        if needs_gradient(det):
            graph = build_graph(det, grad="autograd")
            # The backbone is traced (any architecture), the graph around it scripted (autograd.grad must run
            # when the graph runs, which tracing cannot record).
            graph.net.backbone = torch.jit.trace(graph.net.backbone, (x - graph.mean) / graph.std, check_trace=False)
            module = torch.jit.script(graph)
        else:
            module = torch.jit.trace(build_graph(det), (x,), check_trace=False)
        atomic_write(path, lambda f: torch.jit.save(module, f, _extra_files={"ascood.json": meta}))


def load_exported(path: str, fmt: str):
    """A callable: images (B, C, S, S) float32 numpy or tensor -> {output name: numpy array}."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        ort = require_deploy_extra("onnxruntime")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

        def run(images):
            arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, dtype=np.float32)
            return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"images": arr.astype(np.float32, copy=False)})))
        return run
    if fmt == "torch-export":
        module = torch.export.load(path).module()
    else:
        module = _load_torchscript(path)

    def run_torch(images):
        t = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images, dtype=np.float32))
        out = module(t.float())
        return {n: o.detach().cpu().numpy() for n, o in zip(OUTPUTS, out)}
    return run_torch


def run_exported(path: str, fmt: str, images) -> dict:
    """One call of an exported file: {output name: numpy array}."""
    return load_exported(path, fmt)(images)


def read_metadata(path: str, fmt: str) -> dict:
    """The JSON metadata stored in an exported file."""
    if fmt == "onnx":
        onnx = require_deploy_extra("onnx")
        model = onnx.load(path, load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return _upgrade_metadata(json.loads(props["ascood"]))
    extra = {"ascood.json": ""}
    if fmt == "torch-export":
        torch.export.load(path, extra_files=extra)
    else:
        _load_torchscript(path, _extra_files=extra)
    data = extra["ascood.json"]
    return _upgrade_metadata(json.loads(data.decode() if isinstance(data, bytes) else data))


def _upgrade_metadata(meta: dict) -> dict:
    """Files written before "preprocessing" had its own key kept it under "input": read them the same way."""
    if isinstance(meta, dict) and "preprocessing" not in meta and isinstance(meta.get("input"), dict) \
            and "image_size" in meta["input"]:
        meta["preprocessing"] = {k: v for k, v in meta["input"].items() if k != "name"}
    return meta


def default_path(det_dir: str, fmt: str) -> str:
    """Where ``ascood export DET --format F`` writes without --out: DET/detector.{onnx,pt2,ts}."""
    return os.path.join(det_dir, DEFAULT_NAMES[fmt])
