"""The objective ranks a lung-focused trial above an edge-focused one with the same metric."""
from __future__ import annotations

import pytest

from search.objective import objective_score


def test_weighted_prefers_lung_focus_at_equal_metric() -> None:
    lung_focused = {"balanced_accuracy": 0.9, "lung_mass": 0.6, "edge_mass": 0.05}
    edge_focused = {"balanced_accuracy": 0.9, "lung_mass": 0.2, "edge_mass": 0.5}
    kw = dict(mode="weighted", metric="balanced_accuracy", w=0.5)
    assert objective_score(lung_focused, **kw) > objective_score(edge_focused, **kw)
    assert objective_score(lung_focused, **kw) == pytest.approx(0.9 + 0.5 * 0.55)
    # w = 0 is the metric alone: the two tie
    kw0 = dict(mode="weighted", metric="balanced_accuracy", w=0.0)
    assert objective_score(lung_focused, **kw0) == objective_score(edge_focused, **kw0)


def test_constraint_ranks_every_infeasible_trial_below_every_feasible_one() -> None:
    kw = dict(mode="constraint", metric="auc", w=0.0, lung_floor=0.4)
    feasible_bad = {"auc": 0.0, "lung_mass": 0.41, "edge_mass": 0.3}
    infeasible_good = {"auc": 1.0, "lung_mass": 0.39, "edge_mass": 0.0}
    assert objective_score(feasible_bad, **kw) > objective_score(infeasible_good, **kw)
    closer = {"auc": 1.0, "lung_mass": 0.35, "edge_mass": 0.0}
    farther = {"auc": 1.0, "lung_mass": 0.10, "edge_mass": 0.0}
    assert objective_score(closer, **kw) > objective_score(farther, **kw)
