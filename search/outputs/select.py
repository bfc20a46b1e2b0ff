"""`cxrtune select`: the most lung-focused trial whose metric is within Δ of the best.

This is the choice Balvinsson et al. made by hand (InceptionResNetV2 at 97.2% over VGG19 at 98.0%,
because its Grad-CAM evidence lay on lung tissue), made a rule: among the trials that ran every
epoch (`search.objective.full_budget`: ASHA-stopped trials had fewer epochs to reach their best)
with best_<metric> ≥ max − within, take the highest best_focus (chance-corrected, grid-normalised
lung-vs-edge focus; ties: lower edge mass). Sweeps written before `focus` existed rank on
best_lung_mass. Metric-best is the trial with the highest metric at any epoch (`peak_<metric>`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from search.objective import full_budget
from search.outputs.evidence import fold_heads, write_montage
from search.outputs.heldout import search_dataset
from search.rundir import (
    SweepError,
    check_folds,
    load_sweep,
    read_history,
    sweep_dataset,
)
from search.space import SweepSpec
from trainable.atomic import atomic_write_text
from trainable.errors import CxrtuneError
from trainable.export import copy_export, export_model, same_export
from trainable.models.featureset import FeatureKey
from trainable.prepare import prepare_local
from trainable.shared import Prepared


def focus_column(trials: pd.DataFrame) -> str:
    """The column that measures focus: best_focus, or best_lung_mass in sweeps from before it existed."""
    return "best_focus" if "best_focus" in trials else "best_lung_mass"
def metric_best_record(row: pd.Series, history: pd.DataFrame, metric: str) -> dict[str, float | int]:
    """Metric-best's figures at the epoch of its own best metric (what chose it), not at the epoch
    its objective peaked; trials.csv's best_* values where history.csv is missing."""
    peak = metric_peak(history, row["trial_id"], metric)
    if peak is None:
        return {"metric_best_metric": float(row[f"best_{metric}"]), "metric_best_epoch": int(row["best_epoch"]),
                "metric_best_lung_mass": float(row["best_lung_mass"]),
                "metric_best_edge_mass": float(row["best_edge_mass"]),
                "metric_best_focus": float(row.get("best_focus", float("nan")))}
    return {"metric_best_metric": float(peak[metric]), "metric_best_epoch": int(peak["epoch"]),
            "metric_best_lung_mass": float(peak["lung_mass"]), "metric_best_edge_mass": float(peak["edge_mass"]),
            "metric_best_focus": float(peak.get("focus", float("nan")))}


class SelectionError(CxrtuneError, ValueError):
    """`within` or `metric` cannot select from this sweep."""


def select_trial(trials: pd.DataFrame, metric: str, within: float) -> pd.Series:
    if not 0 <= within <= 1:
        raise SelectionError(f"within must be in [0, 1] (got {within})")
    col = f"best_{metric}"
    if col not in trials:  # e.g. worst_group_accuracy of a sweep whose data had no groups
        raise SelectionError(f"trials.csv has no column {col}: this sweep did not report {metric!r}")
    ok = trials[full_budget(trials) & trials[col].notna()]
    if ok.empty:
        raise SweepError("no finished trial to select from")
    near = ok[ok[col] >= ok[col].max() - within - 1e-12]
    return near.sort_values([focus_column(trials), "best_edge_mass"], ascending=[False, True]).iloc[0]


def metric_best(trials: pd.DataFrame, metric: str) -> pd.Series:
    """The full-budget trial with the highest `metric` at any epoch (its own best, not the objective's)."""
    ok = trials[full_budget(trials)]
    col = f"peak_{metric}" if f"peak_{metric}" in trials else f"best_{metric}"
    return ok.loc[ok[col].idxmax()]


def metric_peak(history: pd.DataFrame, trial_id: str, metric: str) -> pd.Series | None:
    """The history row (one epoch) where `trial_id` reached its highest `metric`: the epoch that
    metric-best's figures come from (first epoch on ties). None when history.csv lacks it."""
    rows = history[(history["trial_id"] == trial_id)]
    if metric not in rows or rows[metric].notna().sum() == 0:
        return None
    return rows.loc[rows[metric].idxmax()]


def local_prepared(results: Path, spec: SweepSpec, saved: dict, rows: list[pd.Series],
                   log: Callable[[str], None]) -> Prepared:
    """Recompute, in this process, only the features the given trials need."""
    dataset = sweep_dataset(saved, spec)
    dataset = search_dataset(results, spec, dataset)  # never the held-out patients (heldout.json)
    keys = [FeatureKey.of({k: r[k] if k in r else spec.choices(k)[0] for k in ("backbone", "weights", "crop_margin", "pool")},
                          spec.input_size) for r in rows]
    augments = {str(r["augment"]) if "augment" in r else str(spec.choices("augment")[0]) for r in rows}
    prepared = prepare_local(dataset, spec.settings(), keys, augments, progress=log)
    check_folds(results, prepared.ids, prepared.folds)  # the heads of each fold never saw its images
    return prepared


def trial_config(row: pd.Series, spec: SweepSpec) -> dict:
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in spec.space}


def export_selection(results: Path, within: float | None = None, metric: str | None = None,
                     prepared: Prepared | None = None, log: Callable[[str], None] = print) -> Path:
    """Write `selected/` (model + metadata, with a Grad-CAM montage) and `gradcam_comparison.png`."""
    spec, trials, saved = load_sweep(results)
    metric = metric or spec.objective.metric
    within = spec.select_within if within is None else within
    chosen = select_trial(trials, metric, within)
    by_metric = metric_best(trials, metric)
    best = trials[trials["status"] == "TERMINATED"].iloc[0]  # trials.csv is sorted by objective
    if prepared is None:
        prepared = local_prepared(results, spec, saved, [chosen, by_metric, best], log)
    metrics = {k.removeprefix("best_"): float(chosen[k]) for k in chosen.index
               if k.startswith("best_") and k != "best_epoch" and pd.notna(chosen[k])}
    metrics |= {"trial_id": chosen["trial_id"], "selected_by": f"highest {focus_column(trials).removeprefix('best_')} "
                f"with {metric} within {within} of the best, among trials that ran every epoch"}
    if same_export(results / "best", chosen["trial_id"], int(chosen["best_epoch"])):
        out = copy_export(results / "best", results / "selected", metrics)   # best/ is this refit already
    else:
        out = export_model(results / "selected", trial_config(chosen, spec), prepared, int(chosen["best_epoch"]),
                           metrics)
    atomic_write_text(results / "selection.json", json.dumps({
        "metric": metric, "within": within, "selected": chosen["trial_id"],
        "metric_best": by_metric["trial_id"], "objective_best": best["trial_id"],
        "selected_metric": float(chosen[f"best_{metric}"]), "selected_lung_mass": float(chosen["best_lung_mass"]),
        "selected_edge_mass": float(chosen["best_edge_mass"]),
        "selected_focus": float(chosen.get("best_focus", float("nan"))),
        "compared": "trials that ran every epoch (ASHA-stopped ones excluded)",
        **metric_best_record(by_metric, read_history(results), metric)}, indent=2))
    roles: dict[str, list[str]] = {}
    rows = {}
    for role, row in (("metric-best", by_metric), ("selected", chosen), ("objective-best", best)):
        roles.setdefault(row["trial_id"], []).append(role)
        rows[row["trial_id"]] = row
    column = {tid: (f"{' + '.join(r)} {tid}", trial_config(rows[tid], spec), fold_heads(results, tid))
              for tid, r in roles.items()}
    write_montage(results / "gradcam_comparison.png", prepared, list(column.values()))
    write_montage(out / "gradcam.png", prepared, [column[chosen["trial_id"]]])
    if (results / "best").is_dir():
        write_montage(results / "best" / "gradcam.png", prepared, [column[best["trial_id"]]])
    log(f"selected trial {chosen['trial_id']} ({metric} {chosen[f'best_{metric}']:.3f}, "
        f"focus {chosen.get('best_focus', float('nan')):.3f}, lung mass "
        f"{chosen['best_lung_mass']:.3f}, edge mass {chosen['best_edge_mass']:.3f}); metric-best "
        f"{by_metric['trial_id']} ({metric} {by_metric[f'best_{metric}']:.3f}, lung mass "
        f"{by_metric['best_lung_mass']:.3f}, edge mass {by_metric['best_edge_mass']:.3f}) → {out}")
    return out
