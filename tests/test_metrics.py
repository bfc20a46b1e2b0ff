"""The per-fold metrics (trainable.train.metrics, numpy) equal scikit-learn's on random and degenerate folds."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from trainable.train.groups import group_metrics
from trainable.train.metrics import binary_auc, classification_metrics


def _sklearn(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    labels = list(range(n_classes))
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        out = {"balanced_accuracy": balanced_accuracy_score(y, pred),
               "macro_f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
               "accuracy": accuracy_score(y, pred),
               "loss": log_loss(y, np.clip(probs, 1e-7, 1.0), labels=labels)}
    if len(np.unique(y)) < 2:
        out["auc"] = float("nan")
    elif n_classes == 2:
        out["auc"] = roc_auc_score(y, probs[:, 1])
    else:
        out["auc"] = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
    return out


def _probs(rng: np.random.Generator, n: int, k: int, ties: bool) -> np.ndarray:
    logits = rng.normal(size=(n, k))
    if ties:  # few distinct scores: many tied ranks in the AUC
        logits = np.round(logits, 0)
    e = np.exp(logits)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_equal_sklearn_on_random_folds(n_classes: int, ties: bool) -> None:
    rng = np.random.default_rng(n_classes * 10 + ties)
    for trial in range(40):
        n = int(rng.integers(5, 200))
        y = rng.integers(0, n_classes, size=n)
        if trial % 5 == 0:
            y[:] = y[0]  # one class only: AUC is NaN
        probs = _probs(rng, n, n_classes, ties)
        if trial % 7 == 0:
            probs[:, 0] = 1.0  # extreme probabilities: log loss clipping
            probs[:, 1:] = 0.0
        ours, ref = classification_metrics(y, probs, n_classes), _sklearn(y, probs, n_classes)
        assert set(ours) == set(ref)
        for name, value in ref.items():
            if np.isnan(value):
                assert np.isnan(ours[name]), name
            else:
                assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, trial)


def test_three_class_auc_with_a_class_missing_follows_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=50)  # class 2 never occurs in this fold
    probs = _probs(rng, 50, 3, ties=False)
    try:
        expected = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=[0, 1, 2])
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)[:30]):
            classification_metrics(y, probs, 3)
    else:
        assert classification_metrics(y, probs, 3)["auc"] == pytest.approx(expected, nan_ok=True)


def test_binary_auc_counts_ties_half() -> None:
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5
    assert binary_auc(np.array([True, True, False]), np.array([0.9, 0.1, 0.5])) == 0.5
    assert np.isnan(binary_auc(np.array([True, True]), np.array([0.1, 0.2])))


def test_within_group_auc_equals_sklearn_per_group() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=120)
    probs = _probs(rng, 120, 2, ties=True)
    groups = np.array(["a", "b", "c"])[rng.integers(0, 3, size=120)]
    expected = np.mean([roc_auc_score(y[groups == g], probs[groups == g, 1]) for g in "abc"])
    assert group_metrics(y, probs, groups, ("no", "yes"))["within_group_auc"] == pytest.approx(expected)
