"""Classification metrics: pure functions of labels and predicted probabilities."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, log_loss,
                             roc_auc_score)

METRIC_NAMES = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "loss")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """balanced accuracy, macro F1, AUC (binary, or one-vs-rest macro), accuracy and log loss."""
    pred = probs.argmax(1)
    labels = list(range(n_classes))
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "loss": float(log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=labels)),
    }
    present = np.unique(y_true)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif n_classes == 2:
        out["auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    else:
        out["auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    return out
