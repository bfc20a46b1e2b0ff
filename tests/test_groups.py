"""Group-aware metrics expose a shortcut that pooled metrics hide (the cxr-real situation)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from trainable.train.groups import group_metrics


def test_a_source_shortcut_scores_zero_on_the_cell_that_breaks_it() -> None:
    # adults: 40 covid + 10 other pneumonia; children: 100 rest. The model calls every adult covid.
    groups = np.array(["adult"] * 50 + ["child"] * 100)
    y = np.array([1] * 40 + [0] * 10 + [0] * 100)
    p_covid = np.where(groups == "adult", 0.9, 0.1)
    probs = np.stack([1 - p_covid, p_covid], 1)
    m = group_metrics(y, probs, groups, ("rest", "covid"), min_cell=5)
    assert balanced_accuracy_score(y, probs.argmax(1)) > 0.9          # looks excellent pooled
    assert m["recall_adult_rest"] == 0.0 and m["recall_adult_covid"] == 1.0
    assert m["recall_child_rest"] == 1.0 and "recall_child_covid" not in m  # empty cell not scored
    assert m["worst_group_accuracy"] == 0.0
    assert m["within_group_auc"] == pytest.approx(0.5)                # no signal among adults


def test_small_cells_are_skipped_and_single_group_falls_back_to_class_recall() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.eye(2)[[0, 0, 1, 1, 1, 1, 0]]
    m = group_metrics(y, probs, np.array(["a"] * 7), ("n", "p"), min_cell=3)
    assert m["worst_group_accuracy"] == pytest.approx(min(2 / 3, 3 / 4))
    m = group_metrics(y, probs, np.array(["a"] * 7), ("n", "p"), min_cell=5)
    assert np.isnan(m["worst_group_accuracy"])
