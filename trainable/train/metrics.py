"""Classification metrics: pure functions of labels and predicted probabilities.

They run once per fold per epoch of every trial, so they are computed from one confusion matrix
and one ranking in numpy: scikit-learn's input validation cost ~30 ms per call, a fifth of a
head-stage epoch. `tests/test_metrics.py` checks every value equals scikit-learn's
(`balanced_accuracy_score`, `f1_score(average="macro")`, `accuracy_score`, `log_loss`,
`roc_auc_score`, one-vs-rest macro for more than two classes) on random and degenerate inputs.
"""
from __future__ import annotations

import numpy as np

# the metrics a trial reports that an objective or `cxrtune select --metric` can rank by
OBJECTIVE_METRICS = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "worst_group_accuracy", "within_group_auc")

METRIC_NAMES = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "loss")


def confusion(y_true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y_true) * n_classes + np.asarray(pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (`scipy.stats.rankdata`'s default)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    return (first + (counts + 1) / 2)[inverse]


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for the boolean `positive`: the Mann–Whitney U statistic with ties
    counted half, which is exactly the trapezoidal area scikit-learn computes. NaN when one
    class is absent."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int, over: str = "all") -> float:
    """Binary AUC of the positive class, or the one-vs-rest macro mean for more classes (as
    `roc_auc_score(multi_class="ovr", average="macro")`); NaN with fewer than two classes present.

    `over="present"`: the one-vs-rest mean over the classes present in `y_true` only (how
    `cxrtune evaluate` scores data that lacks a class of the model)."""
    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return binary_auc(y_true == 1, probs[:, 1])
    if over == "present":
        return float(np.mean([binary_auc(y_true == c, probs[:, c]) for c in present]))
    if len(present) < n_classes:  # scikit-learn's own rules (and errors) for a class missing from y
        from sklearn.metrics import roc_auc_score  # rare: not worth importing in every trial process

        return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro",
                                   labels=list(range(n_classes))))
    return float(np.mean([binary_auc(y_true == c, probs[:, c]) for c in range(n_classes)]))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """balanced accuracy, macro F1, AUC (binary, or one-vs-rest macro), accuracy and log loss."""
    y_true = np.asarray(y_true)
    pred = probs.argmax(1)
    cm = confusion(y_true, pred, n_classes)
    true_n, pred_n, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    # balanced accuracy: mean recall over the classes present in y_true (scikit-learn drops a
    # class that is only predicted, with a warning)
    seen = true_n > 0
    recall = hits[seen] / true_n[seen]
    # macro F1 over every label, 0 where precision + recall is undefined (zero_division=0)
    denom = true_n + pred_n
    f1 = np.divide(2 * hits, denom, out=np.zeros(n_classes), where=denom > 0)
    eps = np.finfo(probs.dtype).eps  # log_loss clips to [eps, 1 - eps] of the probabilities' dtype
    picked = np.clip(np.clip(probs, 1e-7, 1.0), eps, 1 - eps)[np.arange(len(y_true)), y_true]
    return {
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "accuracy": float(hits.sum() / max(len(y_true), 1)),
        "loss": float(-np.log(picked.astype(np.float64)).mean()),
        "auc": auc(y_true, probs, n_classes),
    }
