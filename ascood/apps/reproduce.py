"""``ascood reproduce NAME --data-root DIR``: one row of the paper's Table 1, measured beside the published one.

For each seed, two networks are trained on the benchmark's ID train list
(OpenOOD v1.5 tree, :mod:`ascood.data.openood`) with the preset's settings
(:mod:`ascood.apps.presets`):

* ``ce``: the paper's baseline "MSP (CE network)": plain cross-entropy
  (``ood_type="none"``), linear head, fc_lr_factor 1, scored with MSP;
* ``ascood``: the preset's outliers, z-score head, w, alpha, ..., scored with
  the scorer the paper reports for this benchmark (and MSP).

Each epoch measures ID validation accuracy; the best epoch's checkpoint
(``best.pt``) is evaluated. Scorer hyperparameters are chosen by AUROC on the
validation split (ID val vs OOD val, OpenOOD's APS mode), never on the test
sets; then FPR@95 / AUROC / AUPR (x100, OOD positive) are measured on ID test
vs every near and far OOD set.

Re-running the same command continues where it stopped: a finished training
run (``train_done.json``, or ``last.pt`` at the last epoch) is not redone, an
interrupted one resumes from its ``last.pt``, and a finished evaluation
(``eval/results.json`` with the same scorers and checkpoint) is reused. A run
folder made with other settings is never overwritten: that is an error.

Outputs (``--out``, default ``runs/reproduce/NAME``); see :data:`OUTPUT_FILES`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data import datasets as D
from ..data.openood import OpenOODTreeError, ResolvedBenchmark, resolve_benchmark
from ..files import atomic_write_text, write_json
from ..scoring.benchmark import evaluate_on_benchmark
from ..scoring.summary import mean_std
from ..training.checkpoint import load_checkpoint, load_model
from ..training.trainer import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, TrainConfig, Trainer
from .presets import (EVAL_KEYS, PUBLISHED, TRAIN_KEYS, Resolved, get_preset, pretrained_weights_error, resolve,
                      train_steps)

__all__ = ["reproduce", "METHODS", "OUTPUT_FILES", "resolve_config", "train_steps", "ReproduceError"]

METHODS = ("ce", "ascood")
METHOD_LABELS = {"ce": "MSP (CE network)", "ascood": "ASCOOD"}
DONE_MARKER = "train_done.json"
RUN_RECORD = "run.json"

OUTPUT_FILES = {
    "table.md": "the paper's Table 1 layout: FPR@95 / AUROC / ID accuracy measured (mean ± std over seeds) beside "
                "the published MSP (CE network) and ASCOOD numbers, near and far means, skipped OOD sets",
    "summary.json": "the numbers of table.md (per method: per seed and mean/std)",
    "results_per_set.csv": "every method x seed x scorer x OOD set (and near/far mean) row: FPR@95, AUROC, "
                           "AUPR-In, AUPR-Out, ID accuracy (x100)",
    "results_per_set.json": "the same rows as JSON, with the APS choices",
    "config.json": "the resolved configuration (value and source of each: preset / flag / default / derived), "
                   "the seeds, the OpenOOD sets used and skipped",
    "<method>/seed<k>/": "one training run: last.pt (resumable), best.pt (best ID val accuracy, evaluated), "
                         "config.json, log.jsonl (per-epoch loss, acc, val_acc), run.json (its settings), "
                         "train_done.json (written when training finished)",
    "<method>/seed<k>/eval/": "its evaluation: results.csv / results.json (per OOD set), aps.json (the "
                              "hyperparameters APS chose on the validation split and their validation AUROC), "
                              "hist_<scorer>.png (ID vs OOD score histograms, the paper's Figure 4), signature.json (the scorers, "
                              "checkpoint and sets it was made from; a re-run with other ones evaluates again)",
}


class ReproduceError(RuntimeError):
    """A user-facing problem (bad settings, a run folder made with other settings); the message says what."""

    user_facing = True  # the CLI prints the whole message (exit status 2)


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
            "alpha_min": values["alpha_min"], "w": values["w"], "fc_lr_factor": values["fc_lr_factor"]}, \
        values["head"]


def method_scorers(values: dict, method: str) -> list[str]:
    if method == "ce":
        return ["msp"]
    names = [s.strip().lower() for s in str(values["scorers"]).split(",") if s.strip()]
    return list(dict.fromkeys(["msp", values["scorer"], *names]))


# -- one training run ---------------------------------------------------------------------------------------
def _loader(ds, batch_size: int, workers: int, train: bool = False, seed: int | None = None):
    return D.make_loader(ds, batch_size, train=train, workers=workers, seed=seed)


def _compare_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, RUN_RECORD)
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
            raise ReproduceError(f"{run_dir} holds a checkpoint but no {RUN_RECORD}: not made by `ascood reproduce`; "
                                 "choose another --out (nothing was changed)")
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    old, new = _flat(old), _flat(record)
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ReproduceError(f"{run_dir} was trained with other settings ({'; '.join(diff)}); nothing was changed: "
                             "pass another --out, or the same flags as before")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_run(run_dir: str, tree: ResolvedBenchmark, values: dict, method: str, seed: int, *, weights: str | None,
              device: str | None, workers: int, progress: bool) -> tuple[str, bool]:
    """Train (or resume, or skip) one run; returns (best checkpoint path, whether training ran now)."""
    cfg_kwargs, head = method_settings(values, method)
    config = TrainConfig(seed=seed, **cfg_kwargs)
    record = {"benchmark": tree.benchmark.name, "method": method, "seed": seed, "train_config": cfg_kwargs,
              "head": head, "model": values["model"], "image_size": values["image_size"],
              "mean": list(values["mean"]), "std": list(values["std"]), "batch_size": values["batch_size"],
              "weights": os.path.basename(weights) if weights else None}
    _compare_record(run_dir, record)
    best = os.path.join(run_dir, BEST_CHECKPOINT_NAME)
    last = os.path.join(run_dir, CHECKPOINT_NAME)
    if os.path.isfile(os.path.join(run_dir, DONE_MARKER)) and os.path.isfile(best):
        return best, False
    resume = None
    if os.path.isfile(last):
        ckpt = load_checkpoint(last)
        if int(ckpt["epoch"]) >= config.epochs:
            write_json({"epochs": int(ckpt["epoch"])}, os.path.join(run_dir, DONE_MARKER))
            return (best if os.path.isfile(best) else last), False  # best.pt deleted by hand: the last epoch
        resume = last
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
             "data_format": "openood", "benchmark": tree.benchmark.name, "method": method}
    trainer = Trainer(model, _loader(train_ds, values["batch_size"], workers, train=True, seed=seed), config,
                      val_loader=_loader(val_ds, values["batch_size"], workers), out_dir=run_dir, resume=resume,
                      device=device, progress=progress, extra=extra)
    trainer.fit()
    write_json({"epochs": trainer.epoch, "best_val_acc": trainer.best_val_acc}, os.path.join(run_dir, DONE_MARKER))
    return best, True


# -- evaluation ---------------------------------------------------------------------------------------------
def eval_run(run_dir: str, best: str, tree: ResolvedBenchmark, scorers: list[str], *, batch_size: int, workers: int,
             device: str | None, progress: bool) -> tuple[list[dict], dict]:
    """Evaluate one run's best checkpoint (or reuse the evaluation already written for it)."""
    eval_dir = os.path.join(run_dir, "eval")
    ckpt = load_checkpoint(best)
    signature = {"scorers": scorers, "checkpoint_epoch": int(ckpt["epoch"]),
                 "best_val_acc": ckpt.get("best_val_acc"), "sets": [f"{s.role}:{s.name}" for s in tree.present]}
    sig_path = os.path.join(eval_dir, "signature.json")
    results = os.path.join(eval_dir, "results.json")
    if os.path.isfile(sig_path) and os.path.isfile(results):
        with open(sig_path, encoding="utf-8") as f:
            if json.load(f) == signature:
                with open(results, encoding="utf-8") as g, open(os.path.join(eval_dir, "aps.json")) as h:
                    return json.load(g)["rows"], json.load(h)
    model, ckpt = load_model(best)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    table, aps = evaluate_on_benchmark(model, ckpt.get("extra") or {}, tree, scorers, batch_size=batch_size,
                                       workers=workers, out_dir=eval_dir, progress=progress)
    write_json(signature, sig_path)  # last: a crash before it means "evaluate again"
    return table.rows, aps


# -- aggregation and the table ------------------------------------------------------------------------------
def _target_metric(rows: list[dict], scorer: str, target: str, metric: str) -> float | None:
    """The number the paper's Table 1 reports: the single near set ("near") or the mean over all OOD sets."""
    sets = [r for r in rows if r["scorer"] == scorer and not str(r["dataset"]).endswith("mean")]
    if target == "near":
        sets = [r for r in sets if r["group"] == "near"]
    if not sets:
        return None
    return sum(r[metric] for r in sets) / len(sets)


def _group_mean(rows: list[dict], scorer: str, group: str, metric: str) -> float | None:
    vals = [r[metric] for r in rows if r["scorer"] == scorer and r["group"] == group
            and not str(r["dataset"]).endswith("mean")]
    return sum(vals) / len(vals) if vals else None


def _fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    return f"{m:.2f} ± {s:.2f}"


def summarize(name: str, values: dict, runs: dict[tuple[str, int], list[dict]], seeds: Sequence[int]) -> dict:
    """Per method: the reported scorer's target FPR@95 / AUROC, near / far means and ID accuracy per seed."""
    pub = PUBLISHED.get(name)
    target = pub.target if pub else "all"
    out = {"benchmark": name, "target": target, "seeds": list(seeds), "methods": {}}
    for method in METHODS:
        scorer = "msp" if method == "ce" else values["scorer"]
        per_seed = []
        for seed in seeds:
            rows = runs[(method, seed)]
            acc = next((r["id_acc"] for r in rows if r["scorer"] == "msp"), None)
            per_seed.append({"seed": seed, "fpr95": _target_metric(rows, scorer, target, "fpr95"),
                             "auroc": _target_metric(rows, scorer, target, "auroc"), "id_acc": acc,
                             **{f"{g}_{m}": _group_mean(rows, scorer, g, m) for g in ("near", "far")
                                for m in ("fpr95", "auroc")}})
        published = None
        if pub:
            fpr, auroc = (pub.msp_fpr95, pub.msp_auroc) if method == "ce" else (pub.ascood_fpr95, pub.ascood_auroc)
            published = {"fpr95": list(fpr), "auroc": list(auroc),
                         "id_acc": pub.acc_ce if method == "ce" else pub.acc_ascood}
        out["methods"][method] = {"label": METHOD_LABELS[method], "scorer": scorer, "per_seed": per_seed,
                                  "published": published}
    return out


def format_table(summary: dict, tree: ResolvedBenchmark, preset_note: str = "") -> str:
    """Markdown: measured beside published, then near / far means; notes on the target and skipped sets."""
    name, target = summary["benchmark"], summary["target"]
    near = [s.name for s in tree.present if s.role == "near"]
    what = (f"the near OOD set ({', '.join(near) or 'missing'})" if target == "near"
            else "the mean over every near and far OOD set (the paper's near+far mean)")
    seeds = summary["seeds"]
    lines = [f"# {name}: measured vs the paper's Table 1", "",
             f"FPR@95 / AUROC x100, OpenOOD convention (OOD is the positive class), on {what}; "
             f"mean ± sample std over seeds {', '.join(map(str, seeds))}. Best-validation-accuracy checkpoints; "
             "scorer hyperparameters chosen by APS on ID val vs OOD val.", ""]
    head = ["method", "scorer", "FPR@95", "FPR@95 (paper)", "AUROC", "AUROC (paper)", "ID acc", "ID acc (paper)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in summary["methods"].values():
        ps, pub = m["per_seed"], m["published"]
        cell = lambda k: _fmt([r[k] for r in ps])  # noqa: E731
        p = (lambda k: f"{pub[k][0]:.2f} ± {pub[k][1]:.2f}") if pub else (lambda k: "n/a")
        acc_pub = f"{pub['id_acc']:.2f}" if pub else "n/a"
        lines.append(f"| {m['label']} | {m['scorer']} | {cell('fpr95')} | {p('fpr95')} | {cell('auroc')} | "
                     f"{p('auroc')} | {cell('id_acc')} | {acc_pub} |")
    lines += ["", "Group means (measured, FPR@95 / AUROC):", "",
              "| method | scorer | near mean | far mean |", "|---|---|---|---|"]
    for m in summary["methods"].values():
        ps = m["per_seed"]
        g = {k: _fmt([r[k] for r in ps]) for k in ("near_fpr95", "near_auroc", "far_fpr95", "far_auroc")}
        lines.append(f"| {m['label']} | {m['scorer']} | {g['near_fpr95']} / {g['near_auroc']} | "
                     f"{g['far_fpr95']} / {g['far_auroc']} |")
    if tree.skipped:
        lines += ["", "Skipped (missing from the data tree, --allow-missing): "
                  + ", ".join(f"{s.role} {s.name}" for s, _ in tree.skipped)]
    if name not in PUBLISHED:
        lines += ["", f"{name} is not in the paper's Table 1: no published numbers."]
    if preset_note:
        lines += ["", f"Preset note: {preset_note}"]
    return "\n".join(lines) + "\n"


def _write_rows(out: str, runs: dict, aps: dict) -> None:
    rows = [{"method": method, "seed": seed, **r} for (method, seed), rs in sorted(runs.items()) for r in rs]
    keys = ["method", "seed", "scorer", "group", "dataset", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"]
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join(_csv_cell(r.get(k)) for k in keys))
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "results_per_set.csv"))
    write_json({"convention": "openood (OOD positive), x100", "rows": rows,
                "aps": {f"{m}/seed{s}": a for (m, s), a in sorted(aps.items())}},
               os.path.join(out, "results_per_set.json"))


def _csv_cell(v) -> str:
    if v is None:
        return ""
    text = f"{v:.4f}" if isinstance(v, float) else str(v)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


# -- driver -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    resolved: Resolved
    tree: ResolvedBenchmark
    steps_per_run: int
    n_train: int


def plan(name: str, data_root: str, overrides: dict, *, allow_missing: bool, weights: str | None,
         progress: bool = False, need_weights: bool = True) -> Plan:
    """Resolve the configuration and the data tree (all checks, nothing trained)."""
    resolved = resolve_config(name, overrides)
    err = pretrained_weights_error(resolved, weights)
    if err and need_weights:
        raise ReproduceError(err)
    if weights and not os.path.isfile(weights):
        raise ReproduceError(f"--weights file not found: {weights}")
    tree = resolve_benchmark(resolved.values.get("benchmark", name), data_root, allow_missing=allow_missing,
                             progress=progress)
    n_train = tree.size("id_train")
    v = resolved.values
    return Plan(resolved, tree, train_steps(n_train, v["batch_size"], v["epochs"]), n_train)


def reproduce(name: str, data_root: str, *, seeds: Sequence[int] = (0, 1, 2), out: str | None = None,
              overrides: dict | None = None, allow_missing: bool = False, weights: str | None = None,
              device: str | None = None, workers: int = 0, progress: bool = True, argv: Sequence[str] = ()) -> dict:
    """Train CE and ASCOOD for every seed (resumable), evaluate, write the outputs; returns the summary dict."""
    from tqdm.auto import tqdm

    p = plan(name, data_root, overrides or {}, allow_missing=allow_missing, weights=weights, progress=progress)
    v = p.resolved.values
    out = out or os.path.join("runs", "reproduce", p.tree.benchmark.name)
    os.makedirs(out, exist_ok=True)
    write_json({"benchmark": p.tree.benchmark.name, "seeds": list(seeds), "resolved": p.resolved.to_json(),
                "data": p.tree.summary(), "steps_per_run": p.steps_per_run, "argv": list(argv),
                "weights": weights}, os.path.join(out, "config.json"))
    if progress:
        print(f"{p.tree.benchmark.name}: {p.n_train} train images, batch {v['batch_size']}, {v['epochs']} epochs = "
              f"{p.steps_per_run} steps per run; {len(METHODS) * len(seeds)} runs", flush=True)
        if p.tree.skipped:
            print("skipped (missing): " + ", ".join(p.tree.skipped_names()), flush=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    aps: dict[tuple[str, int], dict] = {}
    jobs = [(m, s) for s in seeds for m in METHODS]
    bar = tqdm(jobs, desc="runs", disable=not progress)
    for method, seed in bar:
        bar.set_postfix_str(f"{method} seed {seed}")
        run_dir = os.path.join(out, method, f"seed{seed}")
        best, trained = train_run(run_dir, p.tree, v, method, seed, weights=weights,
                                  device=device, workers=workers, progress=progress)
        if progress and not trained:
            tqdm.write(f"{method} seed {seed}: training already finished ({run_dir}), not redone")
        runs[(method, seed)], aps[(method, seed)] = eval_run(
            run_dir, best, p.tree, method_scorers(v, method), batch_size=v["batch_size"], workers=workers,
            device=device, progress=progress)
    summary = summarize(p.tree.benchmark.name, v, runs, seeds)
    summary["skipped"] = p.tree.skipped_names()
    write_json(summary, os.path.join(out, "summary.json"))
    _write_rows(out, runs, aps)
    table = format_table(summary, p.tree, get_preset(name).notes)
    atomic_write_text(table, os.path.join(out, "table.md"))
    summary["table"] = table
    summary["out"] = out
    return summary


__all__ += ["OpenOODTreeError", "plan", "Plan"]


# -- CLI (cli.py only registers these) ----------------------------------------------------------------------
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
            "runs are not retrained, interrupted ones resume from last.pt, finished evaluations are reused.")


def add_parser(sub) -> None:
    """Register ``ascood reproduce`` on the top-level parser's subcommands."""
    import argparse

    from .argtypes import device_name, fraction, non_negative as nonneg, non_negative_int, positive as positive_float
    from .argtypes import positive_int
    from ..nets.registry import MODEL_NAMES
    from ..training.outliers import OOD_TYPES
    from .presets import PRESETS

    r = sub.add_parser("reproduce", help="train and evaluate one benchmark of the paper's Table 1 (CE baseline and "
                       "ASCOOD, several seeds) and print the published numbers beside the measured ones",
                       description="Reproduce one row of the paper's Table 1 on an OpenOOD v1.5 data tree: for each "
                                   "seed train the CE baseline and ASCOOD with the preset's settings, evaluate the "
                                   "best-validation checkpoint (scorer hyperparameters by APS on ID val vs OOD val) "
                                   "on ID test vs the near and far OOD sets.",
                       epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("name", choices=tuple(PRESETS), help="benchmark / preset")
    r.add_argument("--data-root", required=True, metavar="DIR",
                   help="OpenOOD v1.5 data root (benchmark_imglist/, images_classic/, images_largescale/)")
    r.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    r.add_argument("--out", help="output directory (default runs/reproduce/NAME)")
    r.add_argument("--weights", help="local ImageNet-pretrained backbone weights for the fine-tuned presets "
                   "(waterbirds, celeba: ResNet-18; cars, aircraft: ResNet-50); never downloaded")
    r.add_argument("--allow-missing", action="store_true",
                   help="run with the OOD sets present when some are missing; the table says which were skipped")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration, its sources and the training steps per run, and exit")
    g = r.add_argument_group("overrides of the preset (for quick or partial runs)")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--model", choices=MODEL_NAMES)
    g.add_argument("--image-size", type=positive_int)
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--ood-type", choices=[t for t in OOD_TYPES if t != "none"])
    g.add_argument("--p-inv", type=fraction)
    g.add_argument("--alpha-max", type=nonneg)
    g.add_argument("--alpha-min", type=nonneg)
    g.add_argument("--w", type=nonneg)
    g.add_argument("--fc-lr-factor", type=positive_float)
    g.add_argument("--scorers", help="comma-separated scorers for the ASCOOD runs (MSP and the preset's "
                   "reported scorer are always run)")
    r.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default 0)")
    r.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


OVERRIDE_KEYS = ("epochs", "model", "image_size", "batch_size", "lr", "ood_type", "p_inv", "alpha_max", "alpha_min",
                 "w", "fc_lr_factor", "scorers")


def cmd(args, argv: Sequence[str] = ()) -> int:
    """``ascood reproduce``: returns the exit status."""
    overrides = {k: getattr(args, k) for k in OVERRIDE_KEYS}
    if args.print_config:
        p = plan(args.name, args.data_root, overrides, allow_missing=args.allow_missing, weights=args.weights,
                 need_weights=False)
        print(p.resolved.format())
        note = pretrained_weights_error(p.resolved, args.weights)
        if note:
            print(f"note: {note}")
        print(f"data: {p.tree.benchmark.name} under {p.tree.root}: {p.n_train} train images -> {p.steps_per_run} "
              f"training steps per run; {len(METHODS) * len(args.seeds)} runs (seeds {args.seeds})")
        if p.tree.skipped:
            print("skipped (missing): " + ", ".join(p.tree.skipped_names()))
        return 0
    summary = reproduce(args.name, args.data_root, seeds=args.seeds, out=args.out, overrides=overrides,
                        allow_missing=args.allow_missing, weights=args.weights, device=args.device,
                        workers=args.workers, progress=args.progress, argv=argv)
    print(summary["table"])
    print(f"outputs: {summary['out']} (table.md, summary.json, results_per_set.csv/json, config.json, runs)")
    return 0
