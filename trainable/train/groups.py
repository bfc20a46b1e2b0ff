"""Group-aware metrics: shortcuts that live inside the chest (source, scanner, age) show up as a
(group × class) cell the model gets wrong, even when pooled metrics and saliency look fine.

Pure functions of labels, predicted probabilities and a group per image.
"""
from __future__ import annotations

import re

import numpy as np

from trainable.train.metrics import auc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "none"


def cell_key(group: object, class_name: str) -> str:
    """The metric name of a (group × class) cell's recall: `recall_<group>_<class>`."""
    return f"recall_{_slug(group)}_{_slug(class_name)}"


def group_cells(y: np.ndarray, groups: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    """Images per (group × class) cell that holds any, keyed as `group_metrics`' recalls (`cell_key`)."""
    return {cell_key(g, c): int(((groups == g) & (y == k)).sum())
            for g in sorted(set(groups.tolist())) for k, c in enumerate(classes) if ((groups == g) & (y == k)).any()}


def group_metrics(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, classes: tuple[str, ...],
                  min_cell: int = 5) -> dict[str, float]:
    """Recall per (group × class) cell with >= `min_cell` images, their minimum
    (`worst_group_accuracy`), and the mean AUC within groups that hold every class
    (`within_group_auc`; NaN when no group does)."""
    pred = probs.argmax(1)
    out: dict[str, float] = {}
    recalls = []
    for g in sorted(set(groups.tolist())):
        in_g = groups == g
        for c, name in enumerate(classes):
            cell = in_g & (y == c)
            if cell.sum() >= min_cell:
                r = float((pred[cell] == c).mean())
                out[cell_key(g, name)] = r
                recalls.append(r)
    out["worst_group_accuracy"] = min(recalls) if recalls else float("nan")
    aucs = []
    for g in sorted(set(groups.tolist())):
        in_g = groups == g
        if len(np.unique(y[in_g])) == len(classes) and in_g.sum() >= min_cell:
            aucs.append(auc(y[in_g], probs[in_g], len(classes)))
    out["within_group_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out
