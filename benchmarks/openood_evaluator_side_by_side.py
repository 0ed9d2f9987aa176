"""ascood's evaluation beside OpenOOD's own Evaluator: same model, same images, same scorers and APS grids.

    # OpenOOD's evaluator needs faiss-cpu, pandas and pyyaml: a separate venv that sees this one's torch
    python -m venv /tmp/oo && echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > /tmp/oo/lib/python3.11/site-packages/main.pth && /tmp/oo/bin/pip install faiss-cpu pandas pyyaml
    python benchmarks/openood_evaluator_side_by_side.py --openood /path/to/OpenOOD --openood-python /tmp/oo/bin/python
    # a smoke-sized run (numbers not meaningful)
    python benchmarks/openood_evaluator_side_by_side.py --openood ... --openood-python ... --small

What runs (each side in its own Python process, one after the other, ``torch.set_num_threads(--threads)``):

* a fake OpenOOD v1.5 ``cifar10`` data tree (the real list and folder names of OpenOOD's ``DATA_INFO``:
  ID train / val / test, OOD val (tin), near: cifar100, tin; far: mnist, svhn, texture, places365) of
  seeded 32x32 PNGs (ID: a colour per class plus noise; each OOD set its own colours / texture);
* one model: ascood's CIFAR ResNet-18 (``resnet18_32x32``, ``--width``, linear head so that
  logits = fc(h), the form OpenOOD's postprocessors assume) with seeded weights, its batch-norm
  statistics and linear head fitted on the ID train set (:func:`make_model`) so that scores are not
  degenerate; saved once, loaded by both sides (``weights_only=True``);
* OpenOOD side: for every postprocessor, OpenOOD's ``openood.evaluation_api.Evaluator`` built exactly
  as its docs and ``scripts/eval_ood.py`` do (``Evaluator(net, 'cifar10', data_root, config_root,
  postprocessor_name=...)``: its data loaders, its ``ReactNet`` / ``ASHNet`` / ``ScaleNet`` wrappers,
  ``postprocessor.setup``, its ``hyperparam_search`` (APS) when the postprocessor's config says
  ``APS_mode: True``), then ``eval_ood()``. The fetched tree is imported from ``--openood``, unmodified;
  what this script does to make it run on a CPU without a download is said in :func:`_openood_child`;
* ascood side: the library calls ``ascood eval --data-root`` makes (``ascood.scoring.benchmark``):
  one :class:`~ascood.scoring.scorers.FeatureCache`, :func:`~ascood.scoring.scorers.sweep` with the grid of
  OpenOOD's config (``postprocessor_sweep``) for every scorer whose config has ``APS_mode: True``, then
  :func:`ascood.evaluate`, scorer by scorer so each one's time is measured.

Reported: wall time per side (process start to exit, and the evaluation alone) and per scorer, the
number of images that went through the network (a forward pre-hook on the backbone counts batch
rows: deterministic, and the main structural difference, as OpenOOD runs the model again per
postprocessor and per APS grid point), the hyperparameters each side's APS chose, and the AUROCs of
both sides per OOD set with their largest difference (``--tol``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: ascood scorer name -> OpenOOD postprocessor name (the scorers both libraries have). Not here:
#: ascood's ``entropy`` (OpenOOD has no entropy postprocessor); OpenOOD's many others (ascood has none).
SCORERS = {
    "msp": "msp", "mls": "mls", "ebo": "ebo", "tempscale": "temp_scaling", "odin": "odin", "iodin": "iodin",
    "react": "react", "ash": "ash", "scale": "scale", "dice": "dice", "knn": "knn", "mds": "mds",
    "rmds": "rmds", "vim": "vim", "she": "she", "klm": "klm", "gen": "gen", "gradnorm": "gradnorm",
    "nnguide": "nnguide", "relation": "relation",
}

#: OpenOOD's APS grids at the fetched commit (``configs/postprocessors/<name>.yml``, ``postprocessor_sweep``,
#: for the configs with ``APS_mode: True``), in ascood's parameter names. The OpenOOD side checks these
#: against the configs it loads and stops if they differ. Keys are in the REVERSE of OpenOOD's order:
#: OpenOOD's grid varies its first parameter fastest, ascood's (itertools.product) its last, and both keep
#: the first best point, so this order makes ties resolve to the same point.
APS_GRIDS = {
    "ebo": {"temperature": [1]},
    "odin": {"eps": [0.0014, 0.0028], "temperature": [1, 10, 100, 1000]},
    "iodin": {"eps": [0.0014, 0.0028], "temperature": [1, 10, 100, 1000]},
    "react": {"percentile": [85, 90, 95, 99]},
    "ash": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "scale": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "knn": {"K": [50, 100, 200, 500, 1000]},
    "vim": {"dim": [256, 1000]},
    "gen": {"M": [10, 50, 100, 200, 500, 1000], "gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10]},
    "relation": {"pow": [1, 2, 4, 6, 8]},
}
#: ascood constructor arguments that make a scorer the one OpenOOD defines: NNGuide's bank = the first
#: loader batches past alpha * N rows (OpenOOD's setup loop), not ascood's default random subset.
ASCOOD_PARAMS = {"nnguide": {"bank": "first"}}

CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # OpenOOD's cifar10 preprocessing
BENCHMARK = "cifar10"
NEAR, FAR = ("cifar100", "tin"), ("mnist", "svhn", "texture", "places365")


def vim_grid(feature_dim: int) -> list[int]:
    """OpenOOD's ViM dims below the feature size m (a dim >= m leaves no residual space: OpenOOD's score is
    then NaN, ascood refuses the point); m // 2 when none is."""
    dims = [d for d in APS_GRIDS["vim"]["dim"] if d < feature_dim]
    return dims or [feature_dim // 2]


def grids_for(feature_dim: int) -> dict[str, dict[str, list]]:
    grids = {k: dict(v) for k, v in APS_GRIDS.items()}
    grids["vim"] = {"dim": vim_grid(feature_dim)}
    return grids


# ------------------------------------------------------------------------------------------------ the data
def _palette(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).uniform(30, 225, (n, 3))


def _set_images(kind: str, n: int, rng, id_colours, size: int = 32):
    """``n`` uint8 HxWx3 images of one set: ID = its class colour + noise; near = colours between ID
    classes; far = grey levels / stripes / dark noise / bright noise (one look per far set)."""
    import numpy as np

    xx = np.mgrid[0:size, 0:size][1]
    out = []
    for i in range(n):
        if kind == "id":
            base = id_colours[i % len(id_colours)]
            img = base + rng.normal(0, 30, (size, size, 3))
        elif kind == "near":
            a, b = id_colours[i % len(id_colours)], id_colours[(i + 3) % len(id_colours)]
            img = (a + b) / 2 + rng.normal(0, 30, (size, size, 3))
        elif kind == "mnist":
            img = np.repeat(np.where(rng.random((size, size, 1)) < 0.15, 230.0, 10.0), 3, axis=2)
        elif kind == "svhn":
            img = rng.uniform(40, 200, 3) + rng.normal(0, 50, (size, size, 3))
        elif kind == "texture":
            f = rng.uniform(0.2, 1.2)
            wave = 128 + 100 * np.sin(f * xx + rng.uniform(0, 6))
            img = wave[..., None] * np.ones(3) + rng.normal(0, 10, (size, size, 3))
        else:  # places365 / tin-like: smooth random colour fields
            colour = rng.uniform(0, 255, 3)
            img = colour + np.linspace(-60, 60, size)[:, None, None] + rng.normal(0, 20, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def make_tree(root: str, n_train: int, n_val: int, n_test: int, n_ood: int, seed: int = 0) -> dict[str, int]:
    """Write the fake OpenOOD ``cifar10`` tree under ``root``: lists under ``benchmark_imglist/cifar10/``, PNGs
    under ``images_classic/<set>/<split>/``. Returns {list name: images}."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = _palette(10, seed)
    sets = [("train_cifar10", "cifar10/train", "id", n_train), ("val_cifar10", "cifar10/val", "id", n_val),
            ("test_cifar10", "cifar10/test", "id", n_test), ("val_tin", "tin/val", "places", n_val),
            ("test_cifar100", "cifar100/test", "near", n_ood), ("test_tin", "tin/test", "places", n_ood)]
    sets += [(f"test_{n}", f"{n}/test", n, n_ood) for n in FAR]
    # The full-spectrum list OpenOOD's loader builder opens (never scored here): a few ID-like images.
    sets.append(("test_cifar10c", "cifar10c/test", "id", 10))
    counts = {}
    for list_name, folder, kind, n in sets:
        lines = []
        for i, img in enumerate(_set_images(kind, n, rng, colours)):
            rel = f"{folder}/{i:05d}.png"
            path = os.path.join(root, "images_classic", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(img).save(path)
            lines.append(f"{rel} {i % 10 if kind == 'id' else -1}")
        list_path = os.path.join(root, "benchmark_imglist", BENCHMARK, list_name + ".txt")
        os.makedirs(os.path.dirname(list_path), exist_ok=True)
        with open(list_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        counts[list_name] = n
    return counts


# ----------------------------------------------------------------------------------------------- the model
def build_net(width: int):
    """The benchmark's model: ascood's CIFAR ResNet-18 with a linear head (logits = fc(h))."""
    sys.path.insert(0, ROOT)
    from ascood.nets.registry import build_model

    return build_model("resnet18_32x32", 10, head="linear", width=width, input_mean=CIFAR10_MEAN,
                       input_std=CIFAR10_STD)


def make_model(path: str, data_root: str, width: int, threads: int, seed: int = 0) -> None:
    """Seeded weights, made a usable classifier cheaply (no backprop through the backbone, which costs minutes
    on 2 shared cores): batch-norm statistics from one pass over the ID train list, then the linear head
    fitted by L-BFGS on the ID-train features (cross-entropy). Saved to ``path``."""
    import torch

    sys.path.insert(0, ROOT)
    from ascood.data import datasets as D

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = build_net(width)
    tf = D.build_transforms(32, CIFAR10_MEAN, CIFAR10_STD, train=False)
    ds = D.ImageListDataset(os.path.join(data_root, "benchmark_imglist", BENCHMARK, f"train_{BENCHMARK}.txt"),
                            os.path.join(data_root, "images_classic"), tf)
    loader = D.make_loader(ds, 200, train=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    net.train()
    with torch.no_grad():
        for x, _ in loader:
            net(x)
    for m in bns:
        m.momentum = 0.1
    net.eval()
    with torch.no_grad():
        hs, ys = zip(*[(net.features(x), y) for x, y in loader])
    h, y = torch.cat(hs), torch.cat(ys)
    h_scale = h.std() + 1e-6  # fit on unit-scale features, fold the scale back into the weights
    w = torch.zeros(10, h.shape[1], requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(h / h_scale @ w.T + b, y) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        net.fc.weight.copy_(w / h_scale)
        net.fc.bias.copy_(b)
    torch.save(net.state_dict(), path)


def load_net(path: str, width: int):
    import torch

    net = build_net(width)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


class ForwardCounter:
    """Images through the network: a forward pre-hook on the backbone adds each call's batch rows."""

    def __init__(self, module) -> None:
        self.images = 0
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.images += int(args[0].shape[0])
        self.calls += 1


# ---------------------------------------------------------------------------------------- the OpenOOD side
#: Modules OpenOOD's package ``__init__``s import for features this benchmark does not use (AdaScale,
#: OpenMax, DRAEM / CutPaste preprocessors, CLIP / timm networks, adversarial datasets, the dataset
#: download). They are replaced by stubs that raise when used; the OpenOOD side checks that no module of
#: a postprocessor it runs holds one.
OPENOOD_STUBS = ("gdown", "statsmodels", "libmr", "cv2", "imgaug", "diffdist", "timm", "clip", "foolbox")


def _install_stubs(names) -> list[str]:
    import importlib.abc
    import importlib.machinery
    import types

    made: list[str] = []

    class Unavailable:
        def __init__(self, name):
            self._name = name

        def __call__(self, *a, **k):
            raise RuntimeError(f"{self._name}: a stub of this benchmark (the module is not installed)")

        def __getattr__(self, k):
            return Unavailable(f"{self._name}.{k}")

        def __mro_entries__(self, bases):
            return (object,)

    class StubModule(types.ModuleType):
        def __getattr__(self, k):
            if k.startswith("__"):
                raise AttributeError(k)
            return Unavailable(f"{self.__name__}.{k}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in names:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            made.append(spec.name)
            m = StubModule(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    _install_stubs.types = (StubModule, Unavailable)
    return made


def _cpu_shims() -> None:
    """OpenOOD's evaluator and postprocessors move every batch with ``.cuda()`` and TempScale makes its T with
    ``device='cuda'``: on a machine without a GPU these become the CPU (the code paths are otherwise
    unchanged). On a GPU machine nothing is patched."""
    import torch
    from torch import nn

    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    for fname in ("ones", "zeros", "empty", "tensor", "full", "randn", "rand", "arange"):
        orig = getattr(torch, fname)

        def on_cpu(*a, _orig=orig, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return _orig(*a, **k)

        setattr(torch, fname, on_cpu)


def _openood_net(model):
    """The OpenOOD network interface (``net(x, return_feature=True)`` -> (logits, h), ``forward_threshold``,
    ``get_fc``, ``get_fc_layer``, ``fc``) over the benchmark's model: the same weights and features."""
    from torch import nn

    class OpenOODInterface(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.fc = m.fc

        def forward(self, x, return_feature=False, return_feature_list=False):
            h = self.m.features(x)
            logits = self.fc(h)
            return (logits, h) if return_feature else logits

        def forward_threshold(self, x, threshold):
            return self.fc(self.m.features(x).clip(max=threshold))

        def get_fc(self):
            return self.fc.weight.cpu().detach().numpy(), self.fc.bias.cpu().detach().numpy()

        def get_fc_layer(self):
            return self.fc

    return OpenOODInterface(model)


def _openood_grid(pp) -> dict[str, list] | None:
    """The postprocessor's APS grid as loaded from its config, in ascood's names (None: no APS)."""
    if not pp.APS_mode:
        return None
    names = {"temperature_list": "temperature", "temperature": "temperature", "noise": "eps",
             "percentile_list": "percentile", "K_list": "K", "dim_list": "dim", "gamma_list": "gamma",
             "M_list": "M", "pow_list": "pow"}
    return {names[k]: list(v) for k, v in dict(pp.args_dict).items()}


def _openood_child(spec: dict) -> dict:
    """Every postprocessor through OpenOOD's Evaluator. Made to run here, and nothing else changed:

    * the imports in :data:`OPENOOD_STUBS` are stubs (none is used by the postprocessors run here: checked);
    * no GPU: ``.cuda()`` is the identity and ``device='cuda'`` tensors are made on the CPU (:func:`_cpu_shims`);
    * ``data_setup`` finds the fake tree complete, so it downloads nothing (``gdown`` is a stub that raises);
    * ViM's grid is cut to dims below the feature size (:func:`vim_grid`), the only config value overridden.
    """
    import numpy as np
    import torch

    made = _install_stubs(set(OPENOOD_STUBS))
    sys.path.insert(0, spec["openood"])
    t_import = time.perf_counter()
    from openood.evaluation_api.evaluator import Evaluator
    from openood.evaluation_api.postprocessor import get_postprocessor

    import_s = time.perf_counter() - t_import
    _cpu_shims()
    torch.set_num_threads(spec["threads"])
    model = load_net(spec["model"], spec["width"])
    counter = ForwardCounter(model.backbone)
    net = _openood_net(model)
    config_root = os.path.join(spec["openood"], "configs")
    grids = spec["grids"]
    stub_types = _install_stubs.types
    out = {"side": "openood", "import_s": import_s, "stubbed_modules": sorted(made), "scorers": {},
           "torch_threads": torch.get_num_threads()}
    for name in spec["scorers"]:
        oo_name = SCORERS[name]
        images0 = counter.images
        t0 = time.perf_counter()
        pp = get_postprocessor(config_root, oo_name, BENCHMARK)
        mod = sys.modules[type(pp).__module__]
        stubs_used = [k for k, v in vars(mod).items() if isinstance(v, stub_types)]
        if stubs_used:
            raise RuntimeError(f"{oo_name}: its module uses stubbed imports {stubs_used}")
        loaded = _openood_grid(pp)
        if loaded is not None:
            expect = {k: APS_GRIDS[name][k] for k in sorted(APS_GRIDS[name])} if name in APS_GRIDS else None
            if expect is None or {k: loaded[k] for k in sorted(loaded)} != expect:
                raise RuntimeError(f"{oo_name}: OpenOOD's config grid {loaded} differs from this script's "
                                   f"APS_GRIDS[{name!r}] = {APS_GRIDS.get(name)}: update APS_GRIDS")
            if name == "vim":
                pp.args_dict["dim_list"] = grids["vim"]["dim"]
        elif name in APS_GRIDS:
            raise RuntimeError(f"{oo_name}: OpenOOD's config has no APS but APS_GRIDS lists {name!r}")
        ev = Evaluator(net, BENCHMARK, data_root=spec["data"], config_root=config_root,
                       postprocessor_name=oo_name, postprocessor=pp, batch_size=spec["batch_size"], shuffle=False,
                       num_workers=0)
        images_setup = counter.images - images0
        t1 = time.perf_counter()
        metrics = ev.eval_ood(fsood=False, progress=False)
        t2 = time.perf_counter()
        auroc = {str(k): float(v) for k, v in metrics["AUROC"].items()}
        auroc["near mean"], auroc["far mean"] = auroc.pop("nearood"), auroc.pop("farood")
        hp = pp.get_hyperparam() if hasattr(pp, "get_hyperparam") and pp.APS_mode else None
        out["scorers"][name] = {
            "openood_name": oo_name, "setup_aps_s": t1 - t0, "eval_s": t2 - t1, "total_s": t2 - t0,
            "images_setup_aps": images_setup, "images": counter.images - images0,
            "aps": bool(pp.APS_mode), "chosen": None if hp is None else np.asarray(hp).tolist(),
            "auroc": auroc, "id_acc": float(metrics["ACC"].iloc[0])}
        print(f"[openood] {name}: {t2 - t0:.1f} s, {counter.images - images0} images", flush=True)
    out["images"] = counter.images
    return out


# ----------------------------------------------------------------------------------------- the ascood side
def _ascood_child(spec: dict) -> dict:
    """``ascood eval --data-root``'s calls (:func:`ascood.scoring.benchmark.evaluate_on_benchmark`), with
    OpenOOD's APS grids and one :func:`ascood.evaluate` per scorer (sharing the feature and score caches) so
    that each scorer's time is measured."""
    import torch

    t_import = time.perf_counter()
    sys.path.insert(0, ROOT)
    from ascood.data import datasets as D
    from ascood.data.openood import resolve_benchmark
    from ascood.scoring.evaluator import ScoreCache, evaluate
    from ascood.scoring.scorers import FeatureCache, scorer_for_model, sweep

    import_s = time.perf_counter() - t_import
    torch.set_num_threads(spec["threads"])
    model = load_net(spec["model"], spec["width"])
    counter = ForwardCounter(model.backbone)
    grids = spec["grids"]
    bs = spec["batch_size"]
    t0 = time.perf_counter()
    tree = resolve_benchmark(BENCHMARK, spec["data"])
    tf = D.build_transforms(32, CIFAR10_MEAN, CIFAR10_STD, train=False)

    def loader(ds):
        return D.make_loader(ds, bs, train=False, workers=0)

    val_id, val_ood = loader(tree.dataset("id_val", tf)), loader(tree.dataset("ood_val", tf))
    train, test = loader(tree.dataset("id_train", tf)), loader(tree.dataset("id_test", tf))
    groups = {g: {n: loader(ds) for n, ds in sets.items()} for g, sets in tree.ood_groups(tf).items()}
    cache = FeatureCache(model)
    scores = ScoreCache(cache)
    # Every split a scorer reads runs through the model once, here, so that the per-scorer times below are
    # the scorers' own (ascood.evaluate / sweep would extract the same splits lazily, at the first use).
    probes = [scorer_for_model(n, CIFAR10_STD, **ASCOOD_PARAMS.get(n, {})) for n in spec["scorers"]]
    splits = [test]
    if any(p.supports_features for p in probes):
        splits += [ld for g in groups.values() for ld in g.values()]
        if any(n in grids for n in spec["scorers"]) or any(p.needs_fit and p.fit_split == "val" for p in probes):
            splits.append(val_id)
        if any(n in grids for n in spec["scorers"]):
            splits.append(val_ood)
        if any(p.needs_fit and p.fit_split == "train" for p in probes):
            splits.append(train)
    for ld in splits:
        cache.get(ld)
    t_setup = time.perf_counter() - t0
    out = {"side": "ascood", "import_s": import_s, "setup_s": t_setup, "images_extraction": counter.images,
           "scorers": {}, "torch_threads": torch.get_num_threads(), "skipped_sets": tree.skipped_names()}
    for name in spec["scorers"]:
        images0 = counter.images
        t1 = time.perf_counter()
        scorer = scorer_for_model(name, CIFAR10_STD, **ASCOOD_PARAMS.get(name, {}))
        chosen = None
        if name in grids:
            res = sweep(scorer, model, val_id, val_ood, grid=grids[name], id_train_loader=train,
                        id_val_loader=val_id, cache=cache)
            chosen = res.best_params
        images_aps = counter.images - images0
        table = evaluate(model, test, groups, scorers={name: scorer}, id_train_loader=train, id_val_loader=val_id,
                         features=cache, cache=scores)
        t2 = time.perf_counter()
        auroc = {r["dataset"]: r["auroc"] for r in table.rows}
        out["scorers"][name] = {"total_s": t2 - t1, "images_setup_aps": images_aps, "images": counter.images - images0,
                                "aps": name in grids, "chosen": chosen, "auroc": auroc,
                                "id_acc": table.rows[0]["id_acc"]}
        print(f"[ascood] {name}: {t2 - t1:.1f} s, {counter.images - images0} images", flush=True)
    out["images"] = counter.images
    out["extractions"] = cache.extractions
    return out


# ------------------------------------------------------------------------------------------------- report
def _fmt_params(p) -> str:
    if p is None:
        return "-"
    if isinstance(p, dict):
        return ", ".join(f"{k}={v}" for k, v in p.items())
    return ", ".join(str(v) for v in p) if isinstance(p, (list, tuple)) else str(p)


def _oo_params_named(name: str, chosen) -> str:
    """OpenOOD's chosen hyperparameter list in ascood's names (its args order is the config's)."""
    if chosen is None:
        return "-"
    keys = list(reversed(list(APS_GRIDS.get(name, {}))))  # APS_GRIDS holds OpenOOD's order reversed
    vals = chosen if isinstance(chosen, list) else [chosen]
    if len(keys) != len(vals):
        return _fmt_params(chosen)
    return ", ".join(f"{k}={v}" for k, v in zip(keys, vals))


def report(oo: dict | None, asc: dict | None, walls: dict, tol: float, meta: dict) -> str:
    lines = [f"model: resnet18_32x32 width {meta['width']} (feature dim {meta['feature_dim']}), "
             f"BN statistics + L-BFGS linear head on ID train; images: {meta['counts']}; batch {meta['batch_size']}; "
             f"torch threads {meta['threads']}; ViM grid {meta['grids']['vim']['dim']}", ""]
    lines.append("| side | process wall s | evaluation s | images through the network |")
    lines.append("|---|---:|---:|---:|")
    for side, res in (("OpenOOD Evaluator", oo), ("ascood", asc)):
        if res is None:
            continue
        ev = sum(s["total_s"] for s in res["scorers"].values()) + res.get("setup_s", 0.0)
        lines.append(f"| {side} | {walls[res['side']]:.1f} | {ev:.1f} | {res['images']:,} |")
    if oo and asc:
        ev_oo = sum(s["total_s"] for s in oo["scorers"].values())
        ev_as = sum(s["total_s"] for s in asc["scorers"].values()) + asc.get("setup_s", 0.0)
        lines.append("")
        lines.append(f"ascood / OpenOOD: evaluation {ev_oo / ev_as:.1f}x faster, "
                     f"{oo['images'] / max(asc['images'], 1):.1f}x fewer images through the network "
                     f"(ascood: {asc['extractions']} split extractions + ODIN / i-ODIN's per-grid-point passes)")
        # ODIN / i-ODIN perturb the input: both libraries run the model per image and grid point for them.
        perturb = [n for n in ("odin", "iodin") if n in oo["scorers"] and n in asc["scorers"]]
        if perturb and len(perturb) < len(oo["scorers"]):
            rest_oo = ev_oo - sum(oo["scorers"][n]["total_s"] for n in perturb)
            rest_as = ev_as - sum(asc["scorers"][n]["total_s"] for n in perturb)
            img_oo = oo["images"] - sum(oo["scorers"][n]["images"] for n in perturb)
            img_as = asc["images"] - sum(asc["scorers"][n]["images"] for n in perturb)
            lines.append(f"without {' and '.join(perturb)}: OpenOOD {rest_oo:.1f} s and {img_oo:,} images, ascood "
                         f"{rest_as:.1f} s and {img_as:,} images ({rest_oo / max(rest_as, 1e-9):.1f}x faster, "
                         f"{img_oo / max(img_as, 1):.1f}x fewer images)")
        acc_oo = next(iter(oo["scorers"].values()))["id_acc"]
        acc_as = next(iter(asc["scorers"].values()))["id_acc"]
        lines.append(f"ID test accuracy of the model: OpenOOD {acc_oo:.2f}, ascood {acc_as:.2f}")
    names = list((oo or asc)["scorers"])
    extraction = ([f"| (ascood: data lists + one pass over every split) | - | | | {asc['setup_s']:.1f} | "
                   f"{asc['images_extraction']:,} | | | | |"] if asc else [])
    lines += ["", "| scorer | APS points | OpenOOD s | OpenOOD images | ascood s | ascood images | "
                  "OpenOOD APS choice | ascood APS choice | max abs dAUROC | agree |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|---|"] + extraction
    disagree = []
    for n in names:
        o = (oo or {}).get("scorers", {}).get(n)
        a = (asc or {}).get("scorers", {}).get(n)
        points = 1
        for v in meta["grids"].get(n, {}).values():
            points *= len(v)
        cells = [n, str(points) if n in meta["grids"] else "-"]
        cells += [f"{o['total_s']:.1f}", f"{o['images']:,}"] if o else ["", ""]
        cells += [f"{a['total_s']:.1f}", f"{a['images']:,}"] if a else ["", ""]
        cells += [_oo_params_named(n, o["chosen"]) if o else "", _fmt_params(a["chosen"]) if a else ""]
        if o and a:
            keys = [k for k in o["auroc"] if k in a["auroc"]]
            d = max(abs(o["auroc"][k] - a["auroc"][k]) for k in keys)
            ok = d <= tol
            if not ok:
                disagree.append(n)
            cells += [f"{d:.3f}", "yes" if ok else "NO"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if oo and asc:
        lines += ["", f"AUROC x100 on {', '.join(NEAR + FAR)} and the two group means; tolerance {tol}. "
                      + (f"Outside it: {', '.join(disagree)}." if disagree else "All within it.")]
        lines += ["", "| scorer | set | OpenOOD AUROC | ascood AUROC |", "|---|---|---:|---:|"]
        for n in names:
            o, a = oo["scorers"].get(n), asc["scorers"].get(n)
            if not (o and a):
                continue
            for k in o["auroc"]:
                if k in a["auroc"]:
                    lines.append(f"| {n} | {k} | {o['auroc'][k]:.3f} | {a['auroc'][k]:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Both sides run one after the other, each in its own process.")
    p.add_argument("--openood", help="path to a fetched OpenOOD source tree (the folder holding openood/ and "
                                     "configs/); imported from there, never modified")
    p.add_argument("--openood-python", default=sys.executable,
                   help="Python that runs the OpenOOD side (needs torch, torchvision, scikit-learn, scipy, "
                        "faiss-cpu, pandas, pyyaml; default: this one)")
    p.add_argument("--work", help="folder for the data tree, model, logs and results (default: a new temp folder, "
                                  "removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temp work folder")
    p.add_argument("--scorers", default=",".join(SCORERS),
                   help=f"comma-separated ascood scorer names among {', '.join(SCORERS)} (default all)")
    p.add_argument("--sides", choices=("both", "openood", "ascood"), default="both")
    p.add_argument("--width", type=int, default=32, help="ResNet-18 width (feature dim 8 x width; default 32)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=500, help="ID val and OOD val (tin) images each")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-ood", type=int, default=500, help="images per near / far OOD test set (6 sets)")
    p.add_argument("--small", action="store_true",
                   help="smoke size: width 16, 400 / 100 / 200 / 100 images (numbers not meaningful)")
    p.add_argument("--batch-size", type=int, default=200, help="both sides (OpenOOD's Evaluator default: 200)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides (default 2)")
    p.add_argument("--tol", type=float, default=0.05, help="AUROC x100 tolerance of the agreement table")
    p.add_argument("--json", help="write both sides' raw results here")
    p.add_argument("--md", help="write the markdown report here")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if not args.openood:
        p.error("--openood PATH is required: a fetched OpenOOD source tree (e.g. a checkout of "
                "github.com/Jingkang50/OpenOOD), which this benchmark imports and runs")
    evaluator = os.path.join(args.openood, "openood", "evaluation_api", "evaluator.py")
    if not os.path.isfile(evaluator) or not os.path.isdir(os.path.join(args.openood, "configs", "postprocessors")):
        p.error(f"--openood {args.openood}: not an OpenOOD source tree (expected openood/evaluation_api/evaluator.py "
                "and configs/postprocessors/ inside it)")
    names = [s.strip().lower() for s in args.scorers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCORERS]
    if unknown or not names:
        p.error(f"--scorers: unknown {unknown or 'empty list'}; choose from {', '.join(SCORERS)}")
    args.scorer_list = names
    if args.small:
        args.width, args.n_train, args.n_val, args.n_test, args.n_ood = 16, 400, 100, 200, 100
    for flag in ("width", "n_train", "n_val", "n_test", "n_ood", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


#: What OpenOOD's evaluator imports that a plain ascood environment may lack (pip names).
OPENOOD_NEEDS = {"faiss": "faiss-cpu", "pandas": "pandas", "yaml": "pyyaml", "torch": "torch",
                 "torchvision": "torchvision", "sklearn": "scikit-learn", "scipy": "scipy", "tqdm": "tqdm"}


def openood_python_problem(python: str) -> str | None:
    """None when ``python`` can import what OpenOOD's evaluator needs, else a message naming what is missing."""
    code = ("import importlib.util, sys; sys.stdout.write(' '.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    try:
        res = subprocess.run([python, "-c", code, *OPENOOD_NEEDS], capture_output=True, text=True, timeout=120)
    except OSError as err:
        return f"--openood-python {python}: cannot run it ({err})"
    if res.returncode != 0:
        return f"--openood-python {python}: exited {res.returncode}: {res.stderr.strip()[-300:]}"
    missing = res.stdout.split()
    if missing:
        return (f"--openood-python {python} cannot import {', '.join(missing)}: OpenOOD's evaluator needs them "
                f"(pip install {' '.join(OPENOOD_NEEDS[m] for m in missing)} into a venv of its own, see this "
                "script's docstring, and pass its python)")
    return None


def _run_child(python: str, side: str, spec_path: str, log_path: str) -> tuple[float, int]:
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call([python, os.path.abspath(__file__), "--child", side, spec_path], stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - t, rc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        side, spec_path = args.child
        with open(spec_path) as f:
            spec = json.load(f)
        res = _openood_child(spec) if side == "openood" else _ascood_child(spec)
        with open(spec[f"{side}_out"], "w") as f:
            json.dump(res, f, indent=1)
        return 0

    if args.sides in ("both", "openood"):
        problem = openood_python_problem(args.openood_python)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    work = args.work or tempfile.mkdtemp(prefix="oodbench-")
    os.makedirs(work, exist_ok=True)
    try:
        data, model_path = os.path.join(work, "data"), os.path.join(work, "model.pt")
        t = time.perf_counter()
        counts = make_tree(data, args.n_train, args.n_val, args.n_test, args.n_ood)
        make_model(model_path, data, args.width, args.threads)
        print(f"data tree and model: {time.perf_counter() - t:.1f} s ({work})", flush=True)
        feature_dim = 8 * args.width
        grids = grids_for(feature_dim)
        spec = {"openood": os.path.abspath(args.openood), "data": data, "model": model_path, "width": args.width,
                "threads": args.threads, "batch_size": args.batch_size, "scorers": args.scorer_list,
                "grids": grids, "openood_out": os.path.join(work, "openood.json"),
                "ascood_out": os.path.join(work, "ascood.json")}
        spec_path = os.path.join(work, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        results, walls = {}, {}
        for side in ("openood", "ascood"):
            if args.sides not in ("both", side):
                continue
            python = args.openood_python if side == "openood" else sys.executable
            log = os.path.join(work, f"{side}.log")
            print(f"running the {side} side ({log}) ...", flush=True)
            walls[side], rc = _run_child(python, side, spec_path, log)
            if rc != 0:
                with open(log) as f:
                    tail = f.read()[-3000:]
                print(f"the {side} side failed (exit {rc}); the end of {log}:\n{tail}", file=sys.stderr)
                return 1
            with open(spec[f"{side}_out"]) as f:
                results[side] = json.load(f)
            print(f"{side}: {walls[side]:.1f} s", flush=True)
        meta = {"width": args.width, "feature_dim": feature_dim, "counts": counts,
                "batch_size": args.batch_size, "threads": args.threads, "grids": grids}
        text = report(results.get("openood"), results.get("ascood"), walls, args.tol, meta)
        print(text)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "walls": walls, **results}, f, indent=1)
        return 0
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
