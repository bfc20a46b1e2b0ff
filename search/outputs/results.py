"""Turn a finished Tuner run into files people open: trials.csv, leaderboard.md, best/, summary.json.

Every file is written to a temporary name and renamed into place, so a killed run never leaves
a half-written one.
"""
from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel
from ray import tune

from search.objective import full_budget
from search.rundir import SCHEMA_VERSION, SweepError
from search.searcher import front_note, order_trials
from trainable.atomic import atomic_write_bytes, atomic_write_text
from trainable.data.dataset import Dataset
from trainable.export import exact_arch, export_model
from trainable.shared import Prepared

REPORTED = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "loss", "lung_mass", "edge_mass", "focus",
            "lung_enrichment", "worst_group_accuracy", "within_group_auc", "fold_mean_worst_group_accuracy",
            "objective", "ft_epochs_kept")  # ft_epochs_kept: mean of the folds' best ft epochs (trainable.train.finetune)
# each metric's own best over a trial's epochs (`peak_<m>`): what metric-best compares
PEAKED = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "worst_group_accuracy", "within_group_auc")


def trial_rows(result_grid: tune.ResultGrid, epochs: int) -> pd.DataFrame:
    """One row per trial: every config value, best-epoch and final metrics, epochs run, early stop."""
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe
        row: dict = {"trial_id": (result.metrics or {}).get("trial_id", Path(result.path or "").name)}
        row.update({k: v for k, v in sorted((result.config or {}).items())})
        row.update(_exact_arch((result.config or {}).get("backbone")))
        if history is None or history.empty or "objective" not in history:
            row.update(status="ERROR", epochs_run=0, stopped_early=False,
                       error=str(result.error).splitlines()[0] if result.error else "no metrics reported")
            rows.append(row)
            continue
        best = history.loc[history["objective"].idxmax()]
        last = history.iloc[-1]
        n = int(last["training_iteration"])
        planned = epochs + int((result.config or {}).get("ft_epochs", 0) or 0)  # ft epochs follow the head's
        patience = bool(last.get("ft_patience_stop", 0) or 0)
        cut = bool(result.error is None and n < planned)
        row.update(status="ERROR" if result.error else "TERMINATED", epochs_run=n,
                   stopped_early=cut, stopped_by=("patience" if patience else "asha") if cut else "",
                   best_epoch=int(best["epoch"]))
        per_class = [c for c in history.columns if c.startswith(("lung_mass_", "edge_mass_", "recall_"))]
        row.update({f"best_{k}": float(best[k]) for k in (*REPORTED, *per_class) if k in best})
        row.update({f"final_{k}": float(last[k]) for k in REPORTED if k in last})
        row.update({f"peak_{k}": float(history[k].max()) for k in PEAKED if k in history})
        row["best_confusion"] = best.get("confusion", "")
        for k in ("node_id", "weights_source", "weights_sha256", "cam_grid"):
            row[k] = last.get(k, "")
        row["error"] = str(result.error).splitlines()[0] if result.error else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    if "best_objective" in df:
        df = df.sort_values("best_objective", ascending=False, na_position="last")
    return df.reset_index(drop=True)


def _exact_arch(backbone: object) -> dict:
    """timm_arch / timm_tag of a trial's backbone (what it resolved to); empty when it does not resolve."""
    try:
        arch = exact_arch(str(backbone)) if backbone is not None else {}
    except ValueError:  # an unknown name: the trial failed on it and its error says so
        return {"timm_arch": "", "timm_tag": ""}
    return {"timm_arch": arch.get("timm_arch") or "", "timm_tag": arch.get("timm_tag") or ""}


def epoch_history(result_grid: tune.ResultGrid) -> pd.DataFrame:
    """One row per (trial, epoch) with every reported metric: the curves behind trials.csv."""
    frames = []
    for result in result_grid:
        h = result.metrics_dataframe
        if h is None or h.empty:
            continue
        keep = [c for c in ("trial_id", "epoch", "stage", *REPORTED, "train_loss", "time_total_s") if c in h]
        frames.append(h[keep])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", "epoch"])


def leaderboard_markdown(df: pd.DataFrame, metric: str, searched: list[str], title: str, note: str = "") -> str:
    ok = df[df["status"] == "TERMINATED"]
    cols = ["trial_id", *searched, "epochs_run", "stopped_early", f"best_{metric}", f"final_{metric}",
            "best_focus", "best_lung_mass", "best_edge_mass", "best_worst_group_accuracy", "best_within_group_auc",
            "best_objective", "pareto"]
    # dict.fromkeys: a group metric as the objective's metric would otherwise be a duplicate column
    table = ok[[c for c in dict.fromkeys(cols) if c in ok]].copy()
    for c in table.columns:
        if table[c].dtype.kind == "f":
            table[c] = table[c].map(lambda v: f"{v:.4g}")
    lines = [f"# {title}", "", _why(ok, metric), "", *([note, ""] if note else []),
             f"`best_*`: each trial's values at its best epoch (by the objective: a maximum over epochs, so "
             f"optimistic); `final_{metric}`: at its last epoch.", "",
             "| rank | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    for i, (_, r) in enumerate(table.iterrows(), 1):
        lines.append(f"| {i} | " + " | ".join(str(v) for v in r.to_list()) + " |")
    failed = df[df["status"] != "TERMINATED"]
    if len(failed):
        lines += ["", f"{len(failed)} trial(s) failed:"] + [f"- {r.trial_id}: {r.error}" for r in failed.itertuples()]
    return "\n".join(lines) + "\n"


def _why(ok: pd.DataFrame, metric: str) -> str:
    """Plain words: which trial won, and how it compares with the one a metric-only search picks."""
    if ok.empty:
        return "No trial finished."
    best = ok.iloc[0]
    full = ok[full_budget(ok)]
    peak = f"peak_{metric}" if f"peak_{metric}" in full else f"best_{metric}"
    by_metric = full.loc[full[peak].idxmax()]
    text = (f"**Winner: trial {best.trial_id}** — {metric} {best[f'best_{metric}']:.3f}, "
            f"focus {best.get('best_focus', float('nan')):.3f}, "
            f"lung mass {best.best_lung_mass:.3f}, edge mass {best.best_edge_mass:.3f}, "
            f"objective {best.best_objective:.3f} (epoch {best.best_epoch}).")
    if by_metric.trial_id != best.trial_id:
        text += (f" A search on {metric} alone (among the trials that ran every epoch) would pick trial "
                 f"{by_metric.trial_id} ({metric} {by_metric[peak]:.3f}), whose Grad-CAM puts "
                 f"{by_metric.best_lung_mass:.1%} of its evidence on the lungs and "
                 f"{by_metric.best_edge_mass:.1%} on the image edges, against "
                 f"{best.best_lung_mass:.1%} and {best.best_edge_mass:.1%} for the winner.")
    else:
        text += f" It is also the best trial on {metric} alone."
    return text


def write_results(results: Path, spec, space_file: Path, dataset: Dataset, prepared: Prepared,
                  result_grid: tune.ResultGrid, wall_s: float, log: Callable[[str], None] = print) -> None:
    df = order_trials(trial_rows(result_grid, spec.epochs), spec)  # + `pareto`; pareto mode: front first
    confusion = {r.trial_id: {"classes": list(dataset.classes), "matrix": json.loads(r.best_confusion)}
                 for r in df.itertuples() if isinstance(getattr(r, "best_confusion", None), str)
                 and r.best_confusion}
    df = df.drop(columns="best_confusion", errors="ignore")
    atomic_write_text(results / "confusion.json", json.dumps(confusion, indent=1))
    atomic_write_text(results / "trials.csv", df.to_csv(index=False))
    atomic_write_text(results / "history.csv", epoch_history(result_grid).to_csv(index=False))
    # which lung mask each image's lung_mass used (space `lung_masks`: data, atlas or pspnet)
    atomic_write_text(results / "lung_masks.csv", pd.DataFrame(
        {"id": prepared.ids, "path": prepared.paths, "mask_source": prepared.mask_source}).to_csv(index=False))
    searched = [k for k, v in spec.space.items() if isinstance(v, BaseModel)]
    metric = spec.objective.metric
    atomic_write_text(results / "leaderboard.md",
                      leaderboard_markdown(df, metric, searched, f"Leaderboard: {results.name}",
                                           note=front_note(df, metric, spec.objective.mode)))
    ok = df[df["status"] == "TERMINATED"]
    if ok.empty:
        raise SweepError(f"every trial failed; first error: {df['error'].iloc[0]} (see {results / 'tune'})")
    best = ok.iloc[0]
    _write_curves(results, epoch_history(result_grid), best, metric)
    config = {k: _plain(best[k]) for k in spec.space}
    metrics = {k: float(best[f"best_{k}"]) for k in REPORTED if f"best_{k}" in best}
    export_model(results / "best", config, prepared, int(best["best_epoch"]),
                 metrics | {"trial_id": best.trial_id})
    summary = {
        "schema_version": SCHEMA_VERSION,  # of trials.csv / history.csv: docs/columns.md
        "name": results.name, "space_file": str(space_file) if space_file else None, "wall_s": round(wall_s, 1),
        "trials": len(df), "finished": int(len(ok)), "stopped_early": int(ok["stopped_early"].sum()),
        "failed": int((df["status"] != "TERMINATED").sum()), "best_trial": best.trial_id,
        "objective": spec.objective.model_dump(), "data": {"root": str(dataset.root), "images": len(dataset),
                                                           "hash": prepared.data_hash,
                                                           "classes": list(dataset.classes)},
        "timings": prepared.timings,
        "versions": {p: version(p) for p in ("torch", "timm", "ray", "optuna", "grad-cam")},
        "python": platform.python_version(), "machine": platform.machine(),
    }
    atomic_write_text(results / "summary.json", json.dumps(summary, indent=2))
    log(f"\n{len(df)} trials ({summary['stopped_early']} stopped early by ASHA, {summary['failed']} failed) "
        f"in {wall_s:.0f}s")
    log(_why(ok, metric))
    log(f"results: {results}/trials.csv, leaderboard.md, best/")


def _write_curves(results: Path, history: pd.DataFrame, best: pd.Series, metric: str) -> None:
    """curves.png: the best trial's per-epoch training/validation curves (head and ft stages);
    every trial's are in history.csv (one row per trial and epoch, `stage` head/ft)."""
    from search.report.plots import curves_plot  # matplotlib: only when writing results

    if history.empty or not (history["trial_id"].astype(str) == str(best.trial_id)).any():
        return
    data = curves_plot(history, str(best.trial_id), metric, float(best["best_epoch"]))
    atomic_write_bytes(results / "curves.png", data)


def _plain(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v
