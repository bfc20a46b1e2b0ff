"""The objective ranks a lung-focused trial above an edge-focused one with the same metric, and
refuses a metric it cannot rank on."""
from __future__ import annotations

import numpy as np
import pytest

from search.objective import check_metric_defined, objective_score
from search.space import SpaceError


def test_weighted_prefers_lung_focus_at_equal_metric() -> None:
    lung_focused = {"balanced_accuracy": 0.9, "lung_mass": 0.6, "edge_mass": 0.05, "focus": 0.55}
    edge_focused = {"balanced_accuracy": 0.9, "lung_mass": 0.2, "edge_mass": 0.5, "focus": -0.4}
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


def test_a_nan_metric_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'within_group_auc' is NaN in every validation fold"):
        objective_score({"within_group_auc": float("nan"), "lung_mass": 0.5, "edge_mass": 0.1, "focus": 0.3},
                        mode="weighted", metric="within_group_auc", w=0.5)


def test_an_undefined_group_metric_is_refused_before_any_work() -> None:
    """Every class from its own source (cxr-real's `normal`): no group holds every class."""
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    groups = np.array(["kermany"] * 6 + ["ieee8023"] * 6)
    with pytest.raises(SpaceError, match="within_group_auc.*no source group holds at least 5 images with every class"):
        check_metric_defined("within_group_auc", labels, groups, ("normal", "covid"), 5, "source")
    check_metric_defined("worst_group_accuracy", labels, groups, ("normal", "covid"), 5, "source")  # cells of 6: fine
    with pytest.raises(SpaceError, match="worst_group_accuracy.*no \\(source × class\\) cell has 7 or more"):
        check_metric_defined("worst_group_accuracy", labels, groups, ("normal", "covid"), 7, "source")
    mixed = np.array(["a", "b"] * 6)
    check_metric_defined("within_group_auc", labels, mixed, ("normal", "covid"), 5, "site")
