"""One lockstep fold engine for both training stages.

Every epoch trains each of the K patient-grouped folds once and validates it (predictions and
Grad-CAM lung / edge mass of its validation images), then the K results are summarised into CV
means plus metrics of the pooled out-of-fold predictions. ASHA therefore stops a trial on
cross-validated evidence, never on one fold.

A stage plugs in two methods (`Stage`): the head stage on cached maps
(`trainable.train.head_stage.HeadStage`) and the fine-tuning stage on images
(`trainable.train.finetune.FtStage`). Reporting, history and checkpoints live once, in the
caller's `on_epoch` (`trainable.trial`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol, TypedDict

import numpy as np
import torch

from trainable.cam.explain import FocusReference, focus
from trainable.shared import Prepared
from trainable.train.groups import group_metrics
from trainable.train.metrics import classification_metrics, confusion


class FoldResult(TypedDict):
    """One fold's validation after one epoch (plain data: it goes into checkpoints)."""

    va: np.ndarray           # the validation rows
    probs: np.ndarray        # (len(va), classes)
    lung_mass: np.ndarray    # per validation image
    edge_mass: np.ndarray
    metrics: dict[str, float]


class Stage(Protocol):
    def run_fold(self, k: int, epoch: int) -> FoldResult | None:
        """Train fold `k` for one epoch and validate it; None when the fold has already stopped."""

    def finish_epoch(self, epoch: int, results: list[FoldResult | None], final: bool
                     ) -> tuple[list[FoldResult], dict[str, float], bool]:
        """After every fold ran: the K results the epoch reports, metrics the stage adds, and
        whether the stage ends here (`final`: the last epoch of its range)."""


OnEpoch = Callable[[int, dict, bool], None]


def run_lockstep(stage: Stage, prepared: Prepared, epochs: range, on_epoch: OnEpoch | None = None) -> None:
    """Run `stage` over `epochs`; `on_epoch(epoch, metrics, last)` after each (see `summarise_results`)."""
    for epoch in epochs:
        metrics, last = lockstep_epoch(stage, prepared, epoch, final=epoch == epochs[-1])
        if on_epoch is not None:
            on_epoch(epoch, metrics, last)
        if last:
            break


def lockstep_epoch(stage: Stage, prepared: Prepared, epoch: int, final: bool = False) -> tuple[dict, bool]:
    """One epoch of every fold: (CV metrics, whether the stage ends)."""
    results = [stage.run_fold(k, epoch) for k in range(len(prepared.folds))]
    reported, extra, last = stage.finish_epoch(epoch, results, final)
    return summarise_results(prepared, reported) | extra, last


def cam_targets(target: str, labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> torch.Tensor:
    """The class each image's Grad-CAM explains: its true class, the predicted one, or a named class."""
    if target == "true":
        return torch.tensor(labels)   # a copy: labels may be a read-only object-store array
    if target == "predicted":
        return torch.as_tensor(probs.argmax(1))
    return torch.full((len(labels),), classes.index(target), dtype=torch.long)


def fold_result(prepared: Prepared, va: np.ndarray, probs: np.ndarray, lung_mass: np.ndarray,
                edge_mass: np.ndarray, reference: FocusReference, train_loss: float) -> FoldResult:
    return FoldResult(va=va, probs=probs, lung_mass=lung_mass, edge_mass=edge_mass,
                      metrics=fold_metrics(prepared, va, probs, lung_mass, edge_mass, reference, train_loss))


def fold_metrics(prepared: Prepared, va: np.ndarray, probs: np.ndarray, lung_mass: np.ndarray,
                 edge_mass: np.ndarray, reference: FocusReference, train_loss: float) -> dict[str, float]:
    """One fold's validation metrics, group metrics, Grad-CAM masses and focus.

    `reference`: the focus references of every image at this crop and map grid
    (`trainable.cam.explain.focus_reference`); the fold reads its validation rows `va`."""
    s = prepared.settings
    y = np.asarray(prepared.labels)
    m = classification_metrics(y[va], probs, len(prepared.classes))
    fold_groups = group_metrics(y[va], probs, prepared.groups[va], prepared.classes, s.min_cell)
    m.update(worst_group_accuracy=fold_groups["worst_group_accuracy"],
             within_group_auc=fold_groups["within_group_auc"])
    m.update(train_loss=train_loss, lung_mass=float(lung_mass.mean()),
             edge_mass=float(edge_mass.mean()),
             lung_enrichment=float(lung_mass.mean() / max(float(reference.lung_share[va].mean()), 1e-9)),
             focus=focus(lung_mass, edge_mass, reference, va))
    return m


def summarise_results(prepared: Prepared, results: list[FoldResult]) -> dict:
    """CV means of the per-fold metrics, pooled out-of-fold group metrics, per-class masses, the
    out-of-fold confusion matrix, and per-fold lists (`fold_*`)."""
    n = len(prepared.labels)
    per_fold: dict[str, list[float]] = {}
    oof_probs = np.zeros((n, len(prepared.classes)))
    oof_lung, oof_edge = np.zeros(n), np.zeros(n)
    for r in results:
        oof_probs[r["va"]], oof_lung[r["va"]], oof_edge[r["va"]] = r["probs"], r["lung_mass"], r["edge_mass"]
        for name, value in r["metrics"].items():
            per_fold.setdefault(name, []).append(value)
    return summarise_folds(prepared, per_fold, oof_probs, oof_lung, oof_edge)


def summarise_folds(prepared: Prepared, per_fold: dict[str, list[float]], oof_probs: np.ndarray,
                    oof_lung: np.ndarray, oof_edge: np.ndarray) -> dict:
    s = prepared.settings
    y = np.asarray(prepared.labels)
    out: dict = {name: float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
                 for name, values in per_fold.items()}
    # per (group × class) recall on all out-of-fold predictions: cells are too small per fold
    pooled = group_metrics(y, oof_probs, prepared.groups, prepared.classes, s.min_cell)
    out |= {k: v for k, v in pooled.items() if k.startswith("recall_")}
    # trial-level group metrics come from the pooled out-of-fold predictions; the per-fold values
    # (cells of a few images) stay in fold_worst_group_accuracy
    out["fold_mean_worst_group_accuracy"] = out.pop("worst_group_accuracy")
    out.pop("within_group_auc")
    out["worst_group_accuracy"] = pooled["worst_group_accuracy"]
    out["within_group_auc"] = pooled["within_group_auc"]
    for c, name in enumerate(prepared.classes):
        out[f"lung_mass_{name}"] = float(oof_lung[y == c].mean())
        out[f"edge_mass_{name}"] = float(oof_edge[y == c].mean())
    out["confusion"] = json.dumps(confusion(y, oof_probs.argmax(1), len(prepared.classes)).tolist())
    return out | {f"fold_{name}": values for name, values in per_fold.items()
                  if name in ("balanced_accuracy", "lung_mass", "focus", "worst_group_accuracy")}
