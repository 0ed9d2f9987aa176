"""``ascood reproduce NAME --data-root DIR``: one row of the paper's tables, measured beside the published one.

For each seed, two networks are trained on the benchmark's ID train list
(OpenOOD v1.5 tree, :mod:`ascood.data.openood`) with the preset's settings
(:mod:`ascood.apps.presets`):

* ``ce``: the paper's baseline "MSP (CE network)": plain cross-entropy
  (``ood_type="none"``), linear head, fc_lr_factor 1, scored with MSP;
* ``ascood``: the preset's outliers, z-score head, w, alpha, ..., scored with
  the scorer the paper reports for this benchmark (and MSP).

Each epoch measures ID validation accuracy; the best epoch's checkpoint
(``best.pt``; the latest epoch on ties, as the authors' recorder) is
evaluated. Scorer hyperparameters are chosen by AUROC on the validation split
(ID val vs OOD val, OpenOOD's APS mode), never on the test sets; then FPR@95 /
AUROC / AUPR (x100, OOD positive) are measured on ID test vs every near and
far OOD set. The number set beside the paper's is the one the paper reports:
the near set for the spurious and fine-grained benchmarks, the mean over the
conventional sets of its Sec. 4 for CIFAR (MNIST, SVHN, iSUN, Textures,
Places365: no near set) and ImageNet-100 (iNaturalist, Textures, OpenImage-O).
ID accuracy is the clean forward's (OpenOOD's ACC) for every scorer.

Every flag, the scorers and the data tree are checked before anything is
written; then ``--out`` is claimed (one lock for the whole reproduction: a
second ``reproduce`` on it stops at once). Under ``torchrun --nproc_per_node
N -m ascood reproduce ...`` every run trains data-parallel over the N
processes (DistributedSampler, SyncBatchNorm on GPUs; the preset's batch is
the global batch, split evenly), rank 0 alone writes, and the evaluation is
shared too: each split's images go through the model once over all ranks
(shards in the feature store, ``<run>/features`` by default), ODIN / i-ODIN score their images
sharded, and rank 0 writes the same numbers one process would
(:mod:`ascood.scoring.distributed`).

Re-running the same command continues where it stopped: a finished training
run (``train_done.json``, or ``last.pt`` at the last epoch) is not redone, an
interrupted one resumes from its ``last.pt`` (also under torchrun), and a
finished evaluation is reused when its signature (scorers and their
arguments, checkpoint, sets, data root and the bytes of the image lists) is
unchanged; otherwise it is evaluated again and the command says why. A run
folder made with other settings or other training lists is never
overwritten: that is an error, raised before anything is written.

Outputs (``--out``, default ``runs/reproduce/NAME``); see :data:`OUTPUT_FILES`.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import datasets as D
from ..data.openood import CONVENTIONAL_SETS, OpenOODTreeError, ResolvedBenchmark, resolve_benchmark
from ..files import atomic_write_text, write_json
from ..scoring.benchmark import evaluate_on_benchmark
from ..scoring.summary import STD_TEXT, mean_std
from ..training.checkpoint import load_checkpoint, load_model
from ..training.distributed import DistContext, PeerFailed, from_rank0, init_from_env, object_group
from ..training.trainer import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, TrainConfig, Trainer
from .presets import (EVAL_KEYS, PUBLISHED, TRAIN_KEYS, Resolved, get_preset, pretrained_weights_error, resolve,
                      train_steps)

__all__ = ["reproduce", "METHODS", "OUTPUT_FILES", "resolve_config", "train_steps", "ReproduceError", "plan",
           "Plan", "OpenOODTreeError", "train_run", "eval_run", "check_run", "summarize", "format_table"]

METHODS = ("ce", "ascood")
METHOD_LABELS = {"ce": "MSP (CE network)", "ascood": "ASCOOD"}
DONE_MARKER = "train_done.json"
RUN_RECORD = "run.json"
#: The files reproduce writes at the top of --out (checked, with the lock, before any work).
TOP_OUTPUTS = ("table.md", "summary.json", "results_per_set.csv", "results_per_set.json", "config.json")

OUTPUT_FILES = {
    "table.md": "the paper's table layout: FPR@95 / AUROC / ID accuracy measured (mean ± population std over "
                "seeds, ddof 0) beside the published MSP (CE network) and ASCOOD numbers, on the quantity the paper "
                "reports (the near set; for CIFAR and ImageNet-100 the conventional mean, naming any conventional "
                "set the tree lacks), the near mean on its own line, near and far means, per-set published numbers "
                "where there are some, skipped OOD sets",
    "summary.json": "the numbers of table.md (per method: per seed and mean/std)",
    "results_per_set.csv": "every method x seed x scorer x OOD set (and near/far mean) row: FPR@95, AUROC, "
                           "AUPR-In, AUPR-Out, ID accuracy (clean forward), the scorer's own-prediction accuracy "
                           "(x100)",
    "results_per_set.json": "the same rows as JSON, with the APS choices",
    "config.json": "the resolved configuration (value and source of each: preset / flag / default / derived), "
                   "the seeds, the data root and the OpenOOD sets used and skipped, the number of processes",
    "<method>/seed<k>/": "one training run: last.pt (resumable), best.pt (best ID val accuracy, latest epoch on "
                         "ties; evaluated), config.json, log.jsonl (per-epoch loss, acc, val_acc), run.json (its "
                         "settings, data root and training-list fingerprint), train_done.json (written when "
                         "training finished)",
    "<method>/seed<k>/eval/": "its evaluation: results.csv / results.json (per OOD set), aps.json (the "
                              "hyperparameters APS chose on the validation split and their validation AUROC), "
                              "hist_<scorer>.png (ID vs OOD score histograms, the paper's Figure 4), signature.json "
                              "(the scorers, checkpoint, sets, data root and list fingerprint it was made from; a "
                              "re-run with other ones evaluates again and says why)",
    "<method>/seed<k>/features/": "the feature store of its evaluation (--features; 'none' to skip): per split a "
                                  "folder of shard-<i>.safetensors files (shard-00000.safetensors, ...: logits, raw features, labels) and a "
                                  "manifest.json keyed by the checkpoint's sha256, the files, the preprocessing "
                                  "and the layer; a re-evaluation with other scorers reads them instead of running "
                                  "the model",
}


class ReproduceError(RuntimeError):
    """A user-facing problem (bad settings, a run folder made with other settings); the message says what."""

    user_facing = True  # the CLI prints the whole message (exit status 2)


#: Another rank (rank 0) failed before training; it reports the error, this rank only exits with its status.
_PeerFailed = PeerFailed


# -- configuration ------------------------------------------------------------------------------------------
def resolve_config(name: str, overrides: dict[str, Any]) -> Resolved:
    """The preset ``name`` with ``overrides`` (flag values, None = not given) applied."""
    explicit = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(explicit) - set(TRAIN_KEYS) - set(EVAL_KEYS)
    if unknown:
        raise ReproduceError(f"cannot override {', '.join(sorted(unknown))}")
    return resolve(get_preset(name), explicit, {}, keys=tuple(dict.fromkeys(TRAIN_KEYS + EVAL_KEYS)))


def method_settings(values: dict, method: str) -> tuple[dict, str]:
    """(TrainConfig kwargs, head) of one method from the resolved values."""
    common = {"epochs": values["epochs"], "lr": values["lr"]}
    if method == "ce":
        return {**common, "ood_type": "none", "fc_lr_factor": 1.0}, "linear"
    return {**common, "ood_type": values["ood_type"], "p_inv": values["p_inv"], "alpha_max": values["alpha_max"],
            "alpha_min": values["alpha_min"], "w": values["w"], "fc_lr_factor": values["fc_lr_factor"],
            "shuffle_rank": values["shuffle_rank"]}, values["head"]


def method_scorers(values: dict, method: str) -> list[str]:
    if method == "ce":
        return ["msp"]
    names = [s.strip().lower() for s in str(values["scorers"]).split(",") if s.strip()]
    return list(dict.fromkeys(["msp", values["scorer"], *names]))


def scorer_params(preset_name: str, scorers: Sequence[str]) -> dict[str, dict]:
    """The preset's constructor arguments of the scorers that are run (e.g. NNGuide's whole-set bank)."""
    preset = get_preset(preset_name)
    return {s: preset.params_for(s) for s in scorers if preset.params_for(s)}


def _check_scorers(preset_name: str, values: dict) -> None:
    """Build every scorer of both methods with the preset's arguments: a bad name or argument stops here."""
    from ..scoring.scorers import scorer_for_model

    for method in METHODS:
        names = method_scorers(values, method)
        params = scorer_params(preset_name, names)
        for name in names:
            try:
                scorer_for_model(name, [float(s) for s in values["std"]], **params.get(name, {}))
            except ValueError as err:
                raise ReproduceError(f"--scorers: {err}") from None
            except TypeError as err:
                raise ReproduceError(f"scorer {name} does not accept the preset {preset_name}'s arguments "
                                     f"{params.get(name)} ({err})") from None


# -- one training run ---------------------------------------------------------------------------------------
def _loader(ds, batch_size: int, workers: int, train: bool = False, seed: int | None = None):
    return D.make_loader(ds, batch_size, train=train, workers=workers, seed=seed)


def run_record(tree: ResolvedBenchmark, values: dict, method: str, seed: int, weights: str | None,
               world_size: int = 1) -> dict:
    """What a training run is made from (run.json): settings, data root and the training lists' fingerprint."""
    cfg_kwargs, head = method_settings(values, method)
    return {"benchmark": tree.benchmark.name, "method": method, "seed": seed, "train_config": cfg_kwargs,
            "head": head, "model": values["model"], "image_size": values["image_size"],
            "mean": list(values["mean"]), "std": list(values["std"]), "batch_size": values["batch_size"],
            "weights": os.path.basename(weights) if weights else None,
            "data": {"root": tree.root, "lists": tree.fingerprint(("id_train", "id_val"))},
            "world_size": world_size}


#: Record keys that do not decide what a run trains (a finished run is reused across them).
_INFO_KEYS = {"world_size"}


@dataclass
class RunState:
    """What to do with one run folder: "done" (reuse ``checkpoint``), "resume" (from last.pt) or "fresh";
    ``notes`` are printed; ``mark_done``: last.pt is at the last epoch but train_done.json is missing."""

    status: str
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)
    mark_done: bool = False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run(run_dir: str, record: dict, epochs: int) -> RunState:
    """Compare ``run_dir`` with the run about to be made (nothing is written); ReproduceError on a conflict."""
    path = os.path.join(run_dir, RUN_RECORD)
    best, last = os.path.join(run_dir, BEST_CHECKPOINT_NAME), os.path.join(run_dir, CHECKPOINT_NAME)
    state = RunState("fresh")
    if not os.path.isfile(path):
        if os.path.exists(last):
            raise ReproduceError(f"{run_dir} holds a checkpoint but no {RUN_RECORD}: not made by `ascood reproduce`; "
                                 "choose another --out (nothing was changed)")
        return state
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ReproduceError(f"{path} cannot be read ({err}); nothing was changed: repair or remove it, or pass "
                             "another --out") from None
    old_data, new_data = old.get("data"), record.get("data") or {}
    settings_old = _flat({k: v for k, v in old.items() if k not in _INFO_KEYS | {"data"}})
    settings_new = _flat({k: v for k, v in record.items() if k not in _INFO_KEYS | {"data"}})
    diff = [f"{k}: {settings_old.get(k)!r} -> {settings_new.get(k)!r}"
            for k in sorted(set(settings_old) | set(settings_new)) if settings_old.get(k) != settings_new.get(k)]
    if diff:
        raise ReproduceError(f"{run_dir} was trained with other settings ({'; '.join(diff)}); nothing was changed: "
                             "pass another --out, or the same flags as before")
    if not isinstance(old_data, dict):
        state.notes.append(f"{run_dir}: its {RUN_RECORD} predates data fingerprints: taken as trained on "
                           f"{new_data.get('root')}")
    else:
        changed = sorted(k for k in set(old_data.get("lists", {})) | set(new_data.get("lists", {}))
                         if old_data.get("lists", {}).get(k) != new_data.get("lists", {}).get(k))
        if changed:
            raise ReproduceError(f"{run_dir} was trained on other image lists ({', '.join(changed)} differ from "
                                 f"those under --data-root {new_data.get('root')}; it was trained under "
                                 f"{old_data.get('root')}); nothing was changed: pass another --out, or the data "
                                 "root it was trained on")
        if old_data.get("root") != new_data.get("root"):
            state.notes.append(f"{run_dir} was trained under data root {old_data.get('root')}; the training lists "
                               f"under {new_data.get('root')} are byte-identical, so the run is kept (its "
                               "evaluation uses the new root)")
    if os.path.isfile(os.path.join(run_dir, DONE_MARKER)) and os.path.isfile(best):
        state.status, state.checkpoint = "done", best
    elif os.path.isfile(last):
        ckpt = load_checkpoint(last)
        if int(ckpt["epoch"]) >= epochs:
            # best.pt deleted by hand: the last epoch is evaluated.
            state.status, state.mark_done = "done", True
            state.checkpoint = best if os.path.isfile(best) else last
        else:
            state.status, state.checkpoint = "resume", last
    return state


def train_run(run_dir: str, tree: ResolvedBenchmark, values: dict, method: str, seed: int, *, weights: str | None,
              device: str | None, workers: int, progress: bool, state: RunState | None = None,
              ctx: DistContext | None = None) -> tuple[str, bool]:
    """Train (or resume, or skip) one run; returns (checkpoint to evaluate, whether training ran now).

    ``state``: rank 0's :func:`check_run` result (computed here when None). Under torchrun every rank calls
    this with the same state; only rank 0 writes (run.json, train_done.json, the trainer's files).
    """
    ctx = ctx or DistContext()
    record = run_record(tree, values, method, seed, weights, ctx.world_size)
    cfg_kwargs, head = method_settings(values, method)
    config = TrainConfig(seed=seed, **cfg_kwargs)
    if state is None:
        state = check_run(run_dir, record, config.epochs)
    best = os.path.join(run_dir, BEST_CHECKPOINT_NAME)
    if state.status == "done":
        if state.mark_done and ctx.is_main:
            write_json({"epochs": config.epochs}, os.path.join(run_dir, DONE_MARKER))
        return state.checkpoint, False
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
        write_json(record, os.path.join(run_dir, RUN_RECORD))
    size, mean, std = values["image_size"], values["mean"], values["std"]
    torch.manual_seed(seed)
    train_ds = tree.dataset("id_train", D.build_transforms(size, mean, std, train=True))
    val_ds = tree.dataset("id_val", D.build_transforms(size, mean, std, train=False))
    from ..nets.registry import build_model

    model = build_model(values["model"], tree.benchmark.num_classes, head=head, weights=weights)
    extra = {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "image_size": size, "channels": 3,
             "classes": [str(c) for c in range(tree.benchmark.num_classes)], "data": tree.root,
             "data_format": "openood", "benchmark": tree.benchmark.name, "method": method,
             "batch_size": values["batch_size"]}
    # The preset's batch is the global one: each of the world_size processes takes an equal share.
    per_rank = values["batch_size"] // ctx.world_size
    trainer = Trainer(model, _loader(train_ds, per_rank, workers, train=True, seed=seed), config,
                      val_loader=_loader(val_ds, values["batch_size"], workers), out_dir=run_dir,
                      resume=state.checkpoint if state.status == "resume" else None, device=device,
                      progress=progress and ctx.is_main, extra=extra)
    trainer.fit()
    if ctx.is_main:
        write_json({"epochs": trainer.epoch, "best_val_acc": trainer.best_val_acc},
                   os.path.join(run_dir, DONE_MARKER))
    return best, True


# -- evaluation ---------------------------------------------------------------------------------------------
def eval_signature(best: str, tree: ResolvedBenchmark, scorers: list[str], params: dict) -> dict:
    """What an evaluation is made from: the scorers and their arguments, the checkpoint, the sets, the data root
    and the bytes of every list it reads (and imagenet100's class list)."""
    ckpt = load_checkpoint(best)
    return {"scorers": list(scorers), "scorer_params": params, "checkpoint_epoch": int(ckpt["epoch"]),
            "best_val_acc": ckpt.get("best_val_acc"), "sets": [f"{s.role}:{s.name}" for s in tree.present],
            "data_root": tree.root, "lists": tree.fingerprint()}


def _signature_changes(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "lists" and isinstance(old.get(key), dict):
            changed = sorted(k for k in set(old[key]) | set(new[key]) if old[key].get(k) != new[key].get(k))
            out.append(f"lists changed: {', '.join(changed)}")
        elif key == "lists":
            out.append("no list fingerprint recorded")
        else:
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def eval_run(run_dir: str, best: str, tree: ResolvedBenchmark, scorers: list[str], *, batch_size: int, workers: int,
             device: str | None, progress: bool, params: dict | None = None,
             say: Callable[[str], None] = lambda msg: None, features: dict | None = None,
             ranks=None) -> tuple[list[dict], dict]:
    """Evaluate one run's checkpoint (or reuse the evaluation already written for it with the same signature).

    ``features``: the feature store's settings ({"root": folder or None for ``run_dir/features``,
    "shard_rows", "features_dtype"}), None for none. ``ranks``: under torchrun every rank calls this (rank 0
    decides whether to reuse and writes); each split is extracted once over the ranks into the feature store
    and the scoring is shared (:mod:`ascood.scoring.distributed`)."""
    eval_dir = os.path.join(run_dir, "eval")
    params = dict(params or {})
    main = ranks is None or ranks.is_main

    def reuse() -> tuple[dict, tuple | None]:
        signature = eval_signature(best, tree, scorers, params)
        sig_path = os.path.join(eval_dir, "signature.json")
        results = os.path.join(eval_dir, "results.json")
        if os.path.isfile(sig_path) and os.path.isfile(results):
            try:
                with open(sig_path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            if old == signature:
                with open(results, encoding="utf-8") as g, open(os.path.join(eval_dir, "aps.json"),
                                                                encoding="utf-8") as h:
                    return signature, (json.load(g)["rows"], json.load(h))
            changes = _signature_changes(old if isinstance(old, dict) else {}, signature)
            say(f"{run_dir}: evaluating again ({'; '.join(changes) or 'unreadable signature.json'})")
        return signature, None

    signature, done = reuse() if ranks is None else from_rank0(reuse, ranks.ctx, ranks.group)
    if done is not None:
        return done
    model, ckpt = load_model(best)
    store = None
    if features is not None:
        from ..scoring.store import FeatureStore

        store = FeatureStore(features.get("root") or os.path.join(run_dir, "features"),
                             shard_rows=features.get("shard_rows", 4096),
                             features_dtype=features.get("features_dtype", "float32"),
                             log=None if main else (lambda msg: None))
    cache = None
    if ranks is not None and ranks.enabled:
        from ..scoring.distributed import ShardedFeatureCache

        if store is None:
            raise ReproduceError("under torchrun the processes share each split's features through the feature "
                                 "store: drop --features none / --no-feature-store")
        model.to(ranks.device(device))
        cache = ShardedFeatureCache(model, store, ranks, checkpoint=best)
    else:
        model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    table, aps = evaluate_on_benchmark(model, ckpt.get("extra") or {}, tree, scorers, batch_size=batch_size,
                                       workers=workers, out_dir=eval_dir if main else None,
                                       progress=progress and main, scorer_params=params, feature_store=store,
                                       checkpoint=best, cache=cache)
    if cache is not None:
        say(cache.summary())
    if main:
        write_json(signature, os.path.join(eval_dir, "signature.json"))  # last: a crash before it = evaluate again
    return table.rows, aps


# -- aggregation and the table ------------------------------------------------------------------------------
def _set_rows(rows: list[dict], scorer: str) -> list[dict]:
    return [r for r in rows if r["scorer"] == scorer and not str(r["dataset"]).endswith("mean")]


def _mean_over(rows: list[dict], scorer: str, names: Sequence[str] | None, metric: str,
               group: str | None = None) -> float | None:
    """Mean of ``metric`` over the per-set rows of ``scorer`` whose dataset is in ``names`` (or in ``group``)."""
    sets = _set_rows(rows, scorer)
    sets = [r for r in sets if (names is None or r["dataset"] in names) and (group is None or r["group"] == group)]
    return sum(r[metric] for r in sets) / len(sets) if sets else None


def target_sets(preset_name: str, tree: ResolvedBenchmark) -> tuple[str, list[str], list[str]]:
    """(target kind, the sets present it averages, the sets of the paper's number missing from the tree).

    "near": the near set(s); "conventional": the paper's conventional sets present
    (:data:`~ascood.data.openood.CONVENTIONAL_SETS`); "all" (no published number): every near and far set.
    """
    pub = PUBLISHED.get(preset_name)
    present = [s.name for s in tree.present if s.role in ("near", "far")]
    if pub is None:
        return "all", present, []
    if pub.target == "near":
        return "near", [s.name for s in tree.present if s.role == "near"], \
            [s.name for s, _ in tree.skipped if s.role == "near"]
    wanted = CONVENTIONAL_SETS[tree.benchmark.name]
    return "conventional", [n for n in wanted if n in present], [n for n in wanted if n not in present]


def _fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    return f"{m:.2f} ± {s:.2f}"


def summarize(name: str, values: dict, runs: dict[tuple[str, int], list[dict]], seeds: Sequence[int],
              tree: ResolvedBenchmark) -> dict:
    """Per method: the reported scorer's target FPR@95 / AUROC, near / far means, per-set numbers and the clean
    ID accuracy per seed; the published numbers beside them."""
    pub = PUBLISHED.get(name)
    target, sets, missing = target_sets(name, tree)
    out = {"benchmark": name, "tree": tree.benchmark.name, "target": target, "target_sets": sets,
           "missing_target_sets": missing, "seeds": list(seeds), "std": STD_TEXT, "methods": {},
           "published_source": pub.source if pub else None}
    for method in METHODS:
        scorer = "msp" if method == "ce" else values["scorer"]
        per_seed = []
        for seed in seeds:
            rows = runs[(method, seed)]
            acc = next((r["id_acc"] for r in rows if r["scorer"] == scorer), None)
            per_set = {}
            for r in rows:
                if not str(r["dataset"]).endswith("mean"):
                    per_set.setdefault(r["scorer"], {})[r["dataset"]] = {"fpr95": r["fpr95"], "auroc": r["auroc"]}
            per_seed.append({"seed": seed, "fpr95": _mean_over(rows, scorer, sets, "fpr95"),
                             "auroc": _mean_over(rows, scorer, sets, "auroc"), "id_acc": acc,
                             **{f"{g}_{m}": _mean_over(rows, scorer, None, m, group=g) for g in ("near", "far")
                                for m in ("fpr95", "auroc")}, "per_set": per_set})
        published = None
        if pub:
            fpr, auroc = (pub.msp_fpr95, pub.msp_auroc) if method == "ce" else (pub.ascood_fpr95, pub.ascood_auroc)
            published = {"fpr95": list(fpr), "auroc": list(auroc),
                         "id_acc": pub.acc_ce if method == "ce" else pub.acc_ascood}
            if pub.per_set and method in pub.per_set.values:
                published["per_set"] = {"source": pub.per_set.source, "scorer": pub.per_set.scorer[method],
                                        "sets": {k: list(v) for k, v in pub.per_set.values[method].items()},
                                        "id_acc": pub.per_set.id_acc.get(method)}
        out["methods"][method] = {"label": METHOD_LABELS[method], "scorer": scorer, "per_seed": per_seed,
                                  "published": published}
    return out


def _pub_cell(value: Sequence[float | None]) -> str:
    mean, std = value[0], value[1] if len(value) > 1 else None
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_table(summary: dict, tree: ResolvedBenchmark, preset_note: str = "") -> str:
    """Markdown: measured beside published on the paper's quantity, the near mean on its own line, group means,
    per-set published numbers, notes on missing and skipped sets."""
    name, target = summary["benchmark"], summary["target"]
    sets, missing = summary["target_sets"], summary["missing_target_sets"]
    near = [s.name for s in tree.present if s.role == "near"]
    source = summary.get("published_source") or "Table 1"
    if target == "near":
        what = f"the near OOD set ({', '.join(near) or 'missing'}), as the paper's {source}"
    elif target == "conventional":
        what = (f"the conventional mean, the mean over {', '.join(sets) or 'no set'} (the paper's {source} "
                f"averages the conventional sets of its Sec. 4: {', '.join(CONVENTIONAL_SETS[tree.benchmark.name])}"
                "; no near set)")
    else:
        what = "the mean over every near and far OOD set (no published number to compare)"
    seeds = summary["seeds"]
    title = f"# {name}: measured vs the paper's {source}" if name in PUBLISHED else f"# {name}: measured"
    lines = [title, "",
             f"FPR@95 / AUROC x100, OpenOOD convention (OOD is the positive class), on {what}; "
             f"mean ± {STD_TEXT}; seeds {', '.join(map(str, seeds))}. Best-validation-accuracy checkpoints; "
             "scorer hyperparameters chosen by APS on ID val vs OOD val; ID accuracy of the clean forward.", ""]
    if missing:
        lines += [f"**Approximate comparison:** {', '.join(missing)} "
                  f"{'is' if len(missing) == 1 else 'are'} missing from the data tree, so the measured number is "
                  f"over {len(sets)} of the paper's {len(sets) + len(missing)} sets ({', '.join(sets) or 'none'}) "
                  "while the published one is over all of them.", ""]
    head = ["method", "scorer", "FPR@95", "FPR@95 (paper)", "AUROC", "AUROC (paper)", "ID acc", "ID acc (paper)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in summary["methods"].values():
        ps, pub = m["per_seed"], m["published"]
        cell = lambda k: _fmt([r[k] for r in ps])  # noqa: E731
        p = (lambda k: _pub_cell(pub[k])) if pub else (lambda k: "n/a")
        acc_pub = f"{pub['id_acc']:.2f}" if pub else "n/a"
        lines.append(f"| {m['label']} | {m['scorer']} | {cell('fpr95')} | {p('fpr95')} | {cell('auroc')} | "
                     f"{p('auroc')} | {cell('id_acc')} | {acc_pub} |")
    if target != "near":
        where = f"{', '.join(near)}" if near else "none present"
        lines += ["", f"Near-OOD mean ({where}; not part of the paper's number): " + "; ".join(
            f"{m['label']} ({m['scorer']}) {_fmt([r['near_fpr95'] for r in m['per_seed']])} / "
            f"{_fmt([r['near_auroc'] for r in m['per_seed']])}" for m in summary["methods"].values())]
    lines += ["", "Group means (measured, FPR@95 / AUROC):", "",
              "| method | scorer | near mean | far mean |", "|---|---|---|---|"]
    for m in summary["methods"].values():
        ps = m["per_seed"]
        g = {k: _fmt([r[k] for r in ps]) for k in ("near_fpr95", "near_auroc", "far_fpr95", "far_auroc")}
        lines.append(f"| {m['label']} | {m['scorer']} | {g['near_fpr95']} / {g['near_auroc']} | "
                     f"{g['far_fpr95']} / {g['far_auroc']} |")
    lines += _per_set_lines(summary)
    if tree.skipped:
        lines += ["", "Skipped (missing from the data tree): "
                  + ", ".join(f"{s.role} {s.name}" for s, _ in tree.skipped)]
    if name not in PUBLISHED:
        lines += ["", f"{name} is not in the paper's tables: no published numbers."]
    if preset_note:
        lines += ["", f"Preset note: {preset_note}"]
    return "\n".join(lines) + "\n"


def _per_set_lines(summary: dict) -> list[str]:
    """Per-set comparison with published per-set numbers (the fork's result file, Table 3)."""
    lines: list[str] = []
    for m in summary["methods"].values():
        per = (m["published"] or {}).get("per_set")
        if not per:
            continue
        scorer = per["scorer"]
        lines += ["", f"{m['label']} per OOD set with {scorer}, beside {per['source']} (FPR@95 / AUROC):", "",
                  "| OOD set | measured FPR@95 | published | measured AUROC | published |", "|---|---|---|---|---|"]
        for set_name, (fpr, auroc) in per["sets"].items():
            got = [r["per_set"].get(scorer, {}).get(set_name) for r in m["per_seed"]]
            f = _fmt([g["fpr95"] if g else None for g in got])
            a = _fmt([g["auroc"] if g else None for g in got])
            if all(g is None for g in got):
                f = a = "missing" if scorer in m["per_seed"][0]["per_set"] else f"({scorer} not run)"
            lines.append(f"| {set_name} | {f} | {fpr:.2f} | {a} | {auroc:.2f} |")
        if per.get("id_acc") is not None:
            lines += ["", f"ID accuracy there: {per['id_acc']:.2f} (measured: "
                          f"{_fmt([r['id_acc'] for r in m['per_seed']])})"]
    return lines


def _write_rows(out: str, runs: dict, aps: dict) -> None:
    rows = [{"method": method, "seed": seed, **r} for (method, seed), rs in sorted(runs.items()) for r in rs]
    keys = ["method", "seed", "scorer", "group", "dataset", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc",
            "scorer_id_acc"]
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join(_csv_cell(r.get(k)) for k in keys))
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "results_per_set.csv"))
    write_json({"convention": "openood (OOD positive), x100; id_acc = clean forward", "rows": rows,
                "aps": {f"{m}/seed{s}": a for (m, s), a in sorted(aps.items())}},
               os.path.join(out, "results_per_set.json"))


def _csv_cell(v) -> str:
    if v is None:
        return ""
    text = f"{v:.4f}" if isinstance(v, float) else str(v)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


# -- planning: every check before anything is written --------------------------------------------------------
@dataclass
class Plan:
    resolved: Resolved
    tree: ResolvedBenchmark
    steps_per_run: int
    n_train: int
    world_size: int = 1


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ReproduceError(f"--device {device!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReproduceError(f"--device {device}: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ReproduceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def plan(name: str, data_root: str, overrides: dict, *, allow_missing: bool, weights: str | None,
         class_list: str | None = None, progress: bool = False, need_weights: bool = True, world_size: int = 1,
         device: str | None = None, workers: int = 0, link_roots: Sequence[str] = ()) -> Plan:
    """Resolve and check the configuration, the scorers and the data tree (nothing is written or trained)."""
    from . import checks

    resolved = resolve_config(name, overrides)
    v = resolved.values
    _check_scorers(name, v)
    err = pretrained_weights_error(resolved, weights)
    if err and need_weights:
        raise ReproduceError(err)
    if weights and not os.path.isfile(weights):
        raise ReproduceError(f"--weights file not found: {weights}")
    if class_list is not None and not os.path.isfile(class_list):
        raise ReproduceError(f"--class-list file not found: {class_list}")
    if workers < 0:
        raise ReproduceError(f"--workers must be >= 0, got {workers}")
    _check_device(device)
    if v["batch_size"] % world_size:
        raise ReproduceError(f"--batch-size {v['batch_size']} is the global batch and must split evenly over the "
                             f"{world_size} torchrun processes; choose a multiple of {world_size}")
    from ..nets.registry import build_model

    num_classes = get_preset(name).num_classes
    try:
        checks.check_image_size(lambda: build_model(v["model"], num_classes, head=v["head"]), v["image_size"], 3,
                                v["model"])
    except checks.InputError as e:
        raise ReproduceError(str(e)) from None
    tree = resolve_benchmark(v["benchmark"], data_root, allow_missing=allow_missing, progress=progress,
                             class_list=class_list, link_roots=link_roots)
    n_train = tree.size("id_train")
    # DistributedSampler gives each process ceil(n / world) samples, in batches of batch / world.
    steps = train_steps(-(-n_train // world_size), v["batch_size"] // world_size, v["epochs"])
    return Plan(resolved, tree, steps, n_train, world_size)


# -- torchrun -----------------------------------------------------------------------------------------------
def _on_every_rank(fn: Callable[[], Any], ctx: DistContext) -> Any:
    """Run ``fn`` on every rank; if it fails on any, rank 0 raises (its own error, or the failing rank's
    message) and the others raise :class:`_PeerFailed` quietly, so the error is printed once and never lost."""
    if not ctx.enabled:
        return fn()
    import torch.distributed as dist

    result, own = None, None
    try:
        result = fn()
        outcome = None
    except Exception as err:  # noqa: BLE001 -- reported below, once, by rank 0
        own = err
        outcome = (str(err), 2 if getattr(err, "user_facing", False) or type(err).__name__ == "InputError" else 1)
    outcomes: list = [None] * ctx.world_size
    dist.all_gather_object(outcomes, outcome)
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    if ctx.is_main:
        if own is not None:
            raise own
        rank, (message, status) = failed[0]
        raise (ReproduceError if status == 2 else RuntimeError)(f"process {rank} of torchrun: {message}")
    raise _PeerFailed(failed[0][1][0], failed[0][1][1])


@contextmanager
def _claimed(out: str, ctx: DistContext) -> Iterator[None]:
    """The lock of the whole reproduction on ``out`` (rank 0 holds it; the other ranks learn the outcome)."""
    from ..training.rundir import claim_output_dir

    with ExitStack() as stack:
        def claim() -> None:
            stack.enter_context(claim_output_dir(out, flag="--out", outputs=TOP_OUTPUTS))

        from_rank0(claim, ctx)
        yield


def _check_out_benchmark(out: str, name: str) -> None:
    """An --out made by reproduce for another preset is refused (before anything in it changes)."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as err:
        raise ReproduceError(f"--out {out}: {path} cannot be read ({err}); nothing was changed: choose another "
                             "--out") from None
    old_name = (old.get("resolved") or {}).get("preset") if isinstance(old, dict) else None
    if old_name is None and isinstance(old, dict):
        old_name = old.get("benchmark")
    if old_name is not None and old_name != name:
        raise ReproduceError(f"--out {out} holds a reproduction of {old_name}, not {name}; nothing was changed: "
                             "choose another --out")


# -- driver -------------------------------------------------------------------------------------------------
def _dist_begin(device: str | None) -> tuple[DistContext, bool]:
    """(this process's place, whether this call started the process group): torchrun's environment."""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    ctx = init_from_env(device)
    return ctx, ctx.enabled and not before


def reproduce(name: str, data_root: str, *, seeds: Sequence[int] = (0, 1, 2), out: str | None = None,
              overrides: dict | None = None, allow_missing: bool = False, weights: str | None = None,
              class_list: str | None = None, device: str | None = None, workers: int = 0, progress: bool = True,
              argv: Sequence[str] = (), link_roots: Sequence[str] = (), features: dict | None = None) -> dict | None:
    """Train CE and ASCOOD for every seed (resumable), evaluate, write the outputs; returns the summary dict
    (None on the ranks other than 0 under torchrun). ``features``: the feature store of the evaluations (see
    :func:`eval_run`; None: none)."""
    ctx, started = _dist_begin(device)
    try:
        group = object_group(ctx)  # collective: every rank, once
        return _reproduce(name, data_root, seeds, out, overrides or {}, allow_missing, weights, class_list, device,
                          workers, progress, argv, ctx, link_roots, features, group)
    finally:
        if started:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _reproduce(name, data_root, seeds, out, overrides, allow_missing, weights, class_list, device, workers, progress,
               argv, ctx: DistContext, link_roots: Sequence[str] = (), features: dict | None = None,
               group=None) -> dict | None:
    from tqdm.auto import tqdm

    from ..scoring.distributed import Ranks

    main_rank = ctx.is_main
    # What reproduce decides about existing runs (kept, re-evaluated, ...) is said also with --no-progress.
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if main_rank else (lambda msg: None)
    p = _on_every_rank(lambda: plan(name, data_root, overrides, allow_missing=allow_missing, weights=weights,
                                    class_list=class_list, progress=progress and main_rank,
                                    world_size=ctx.world_size, device=device, workers=workers,
                                    link_roots=link_roots), ctx)
    v = p.resolved.values
    out = out or os.path.join("runs", "reproduce", name)
    jobs = [(m, s) for s in seeds for m in METHODS]
    with _claimed(out, ctx):
        def prepare() -> dict:
            # Every check of what is already in --out comes before the first write.
            _check_out_benchmark(out, name)
            states = {}
            for method, seed in jobs:
                record = run_record(p.tree, v, method, seed, weights, ctx.world_size)
                states[(method, seed)] = check_run(os.path.join(out, method, f"seed{seed}"), record, v["epochs"])
            write_json({"benchmark": p.tree.benchmark.name, "preset": name, "seeds": list(seeds),
                        "resolved": p.resolved.to_json(), "data": p.tree.summary(), "steps_per_run": p.steps_per_run,
                        "processes": ctx.world_size, "argv": list(argv), "weights": weights,
                        "class_list": class_list}, os.path.join(out, "config.json"))
            return states

        states = from_rank0(prepare, ctx)
        if main_rank and progress:
            print(f"{name}: {p.n_train} train images, batch {v['batch_size']}"
                  + (f" ({v['batch_size'] // ctx.world_size} per process x {ctx.world_size})" if ctx.enabled else "")
                  + f", {v['epochs']} epochs = {p.steps_per_run} steps per run; {len(jobs)} runs", flush=True)
            if p.tree.skipped:
                print("skipped (missing): " + ", ".join(p.tree.skipped_names()), flush=True)
        checkpoints: dict[tuple[str, int], str] = {}
        bar = tqdm(jobs, desc="training", disable=not (progress and main_rank))
        for method, seed in bar:
            bar.set_postfix_str(f"{method} seed {seed}")
            run_dir = os.path.join(out, method, f"seed{seed}")
            state = states[(method, seed)]
            for note in state.notes:
                say(note)
            checkpoints[(method, seed)], trained = train_run(
                run_dir, p.tree, v, method, seed, weights=weights, device=device, workers=workers,
                progress=progress, state=state, ctx=ctx)
            if not trained:
                say(f"{method} seed {seed}: training already finished ({run_dir}), not redone")
        bar.close()
        # Every rank evaluates together (each split extracted once over the ranks); rank 0 writes.
        ranks = Ranks(ctx, group) if ctx.enabled else None
        runs: dict[tuple[str, int], list[dict]] = {}
        aps: dict[tuple[str, int], dict] = {}
        for method, seed in tqdm(jobs, desc="evaluating", disable=not (progress and main_rank)):
            run_dir = os.path.join(out, method, f"seed{seed}")
            scorers = method_scorers(v, method)
            runs[(method, seed)], aps[(method, seed)] = eval_run(
                run_dir, checkpoints[(method, seed)], p.tree, scorers, batch_size=v["batch_size"], workers=workers,
                device=device, progress=progress, params=scorer_params(name, scorers), say=say, features=features,
                ranks=ranks)
        if not main_rank:
            return None  # rank 0 writes the table; this process is done
        summary = summarize(name, v, runs, seeds, p.tree)
        summary["skipped"] = p.tree.skipped_names()
        write_json(summary, os.path.join(out, "summary.json"))
        _write_rows(out, runs, aps)
        table = format_table(summary, p.tree, get_preset(name).notes)
        atomic_write_text(table, os.path.join(out, "table.md"))
    summary["table"] = table
    summary["out"] = out
    return summary


# -- CLI (main.py only registers these) ---------------------------------------------------------------------
def _seeds(text: str) -> list[int]:
    import argparse

    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {text!r}")
    return seeds


def _epilog() -> str:
    import textwrap

    files = "\n".join(textwrap.fill(f"{k}: {v}", 100, initial_indent="  ", subsequent_indent="      ")
                      for k, v in OUTPUT_FILES.items())
    return ("Outputs in --out:\n" + files + "\n\nRe-running the same command continues where it stopped: finished "
            "runs are not retrained, interrupted ones resume from last.pt, finished evaluations are reused while "
            "their signature is unchanged.\n\nSeveral GPUs: torchrun --nproc_per_node N -m ascood reproduce NAME "
            "--data-root DIR (each run data-parallel; each split's features extracted once over the processes; rank 0 "
            "writes).")


def add_parser(sub) -> None:
    """Register ``ascood reproduce`` on the top-level parser's subcommands."""
    import argparse

    from .argtypes import device_name, fraction, non_negative as nonneg, non_negative_int, positive as positive_float
    from .argtypes import existing_dir, positive_int
    from .common_args import LINK_FLAG, add_feature_store_args
    from ..nets.registry import MODEL_NAMES
    from ..training.outliers import OOD_TYPES, SHUFFLE_RANKS
    from .presets import PRESETS

    r = sub.add_parser("reproduce", help="train and evaluate one benchmark of the paper (CE baseline and ASCOOD, "
                       "several seeds) and print the published numbers beside the measured ones",
                       description="Reproduce one row of the paper's tables on an OpenOOD v1.5 data tree: for each "
                                   "seed train the CE baseline and ASCOOD with the preset's settings, evaluate the "
                                   "best-validation checkpoint (scorer hyperparameters by APS on ID val vs OOD val) "
                                   "on ID test vs the near and far OOD sets. Runs under torchrun on several GPUs.",
                       epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("name", nargs="?", choices=tuple(PRESETS), help="benchmark / preset (--list describes them)")
    r.add_argument("--list", action="store_true", help="print every preset's settings and provenance, and exit")
    r.add_argument("--data-root", metavar="DIR",
                   help="OpenOOD v1.5 data root (benchmark_imglist/, images_classic/, images_largescale/); required")
    r.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    r.add_argument("--out", help="output directory (default runs/reproduce/NAME); locked while the command runs")
    r.add_argument("--weights", help="local ImageNet-pretrained backbone weights for the fine-tuned presets "
                   "(waterbirds, celeba: ResNet-18; imagenet100: ResNet-34; cars, aircraft: ResNet-50); never "
                   "downloaded")
    r.add_argument("--class-list", metavar="FILE",
                   help="imagenet100: its 100 ImageNet classes, one per line (WordNet id such as n01440764, or "
                        "ImageNet-1K label); not part of OpenOOD's tree")
    r.add_argument("--allow-missing", action="store_true",
                   help="run with the OOD sets that are present when some are missing; the table says which were "
                        "skipped (iSUN, not in OpenOOD's download, is skipped without this flag)")
    r.add_argument(LINK_FLAG, dest="link_roots", action="append", type=existing_dir, default=[], metavar="DIR",
                   help="a folder the tree's symlinks may lead into besides --data-root (repeatable; e.g. the disk "
                        "that images_classic/cifar10 links to); list entries leading anywhere else are refused")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration, its sources and the training steps per run, and exit")
    g = r.add_argument_group("overrides of the preset (for quick or partial runs)")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--model", choices=MODEL_NAMES)
    g.add_argument("--image-size", type=positive_int)
    g.add_argument("--batch-size", type=positive_int, help="the global batch (split over torchrun's processes)")
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--ood-type", choices=[t for t in OOD_TYPES if t != "none"])
    g.add_argument("--p-inv", type=fraction)
    g.add_argument("--shuffle-rank", choices=SHUFFLE_RANKS)
    g.add_argument("--alpha-max", type=nonneg)
    g.add_argument("--alpha-min", type=nonneg)
    g.add_argument("--w", type=nonneg)
    g.add_argument("--fc-lr-factor", type=positive_float)
    g.add_argument("--scorers", help="comma-separated scorers for the ASCOOD runs (MSP and the preset's "
                   "reported scorer are always run)")
    r.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default 0)")
    r.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available; under "
                   "torchrun each process its local GPU)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_feature_store_args(r, default="each run's folder, OUT/METHOD/seedS/features")


OVERRIDE_KEYS = ("epochs", "model", "image_size", "batch_size", "lr", "ood_type", "p_inv", "shuffle_rank",
                 "alpha_max", "alpha_min", "w", "fc_lr_factor", "scorers")


def _feature_settings(args) -> dict | None:
    """The evaluations' feature store from --features / --no-feature-store / --features-dtype / --shard-rows
    (an explicit folder is checked here, before any work)."""
    from .common_args import feature_store_from_args

    if getattr(args, "no_feature_store", False) or (getattr(args, "features", None) or "").lower() == "none":
        return None
    shared = feature_store_from_args(args, None) if getattr(args, "features", None) else None
    return {"root": shared.root if shared is not None else None, "shard_rows": getattr(args, "shard_rows", 4096),
            "features_dtype": getattr(args, "features_dtype", "float32")}


def cmd(args, argv: Sequence[str] = ()) -> int:
    """``ascood reproduce``: returns the exit status."""
    from .presets import preset_list_text

    if args.list:
        print(preset_list_text())
        return 0
    if not args.name:
        raise ReproduceError("give a preset NAME (ascood reproduce --list describes them)")
    if not args.data_root:
        raise ReproduceError("--data-root DIR is required (the OpenOOD v1.5 data root)")
    overrides = {k: getattr(args, k) for k in OVERRIDE_KEYS}
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.print_config:
        p = plan(args.name, args.data_root, overrides, allow_missing=args.allow_missing, weights=args.weights,
                 class_list=args.class_list, need_weights=False, device=args.device, workers=args.workers,
                 link_roots=args.link_roots)
        if main_rank:
            print(p.resolved.format())
            note = pretrained_weights_error(p.resolved, args.weights)
            if note:
                print(f"note: {note}")
            print(f"data: {p.tree.benchmark.name} under {p.tree.root}: {p.n_train} train images -> "
                  f"{p.steps_per_run} training steps per run; {len(METHODS) * len(args.seeds)} runs "
                  f"(seeds {args.seeds})")
            if p.tree.skipped:
                print("skipped (missing): " + ", ".join(p.tree.skipped_names()))
        return 0
    features = _feature_settings(args)
    try:
        summary = reproduce(args.name, args.data_root, seeds=args.seeds, out=args.out, overrides=overrides,
                            allow_missing=args.allow_missing, weights=args.weights, class_list=args.class_list,
                            device=args.device, workers=args.workers, progress=args.progress, argv=argv,
                            link_roots=args.link_roots, features=features)
    except _PeerFailed as err:  # rank 0 printed the message; this rank only ends with the same status
        return err.status
    if summary is None:
        return 0
    print(summary["table"])
    print(f"outputs: {summary['out']} (table.md, summary.json, results_per_set.csv/json, config.json, runs)")
    return 0
