"""The selection rule: most lung-focused trial within Δ of the best metric."""
from __future__ import annotations

import pandas as pd
import pytest

from search.outputs.select import metric_best, select_trial


def _trials() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "status": ["TERMINATED", "TERMINATED", "TERMINATED", "TERMINATED", "ERROR"],
        "best_auc": [0.98, 0.972, 0.95, 0.975, 0.99],
        "best_lung_mass": [0.30, 0.55, 0.70, 0.55, 0.9],
        "best_edge_mass": [0.30, 0.10, 0.05, 0.05, 0.0],
    })


def test_within_delta_takes_highest_lung_mass_then_lowest_edge_mass() -> None:
    # like Balvinsson et al.: 98.0% (a) reads artifacts, 97.2%/97.5% (b, d) look at the lungs
    assert select_trial(_trials(), "auc", 0.01)["trial_id"] == "d"
    assert select_trial(_trials(), "auc", 0.0)["trial_id"] == "a"
    assert select_trial(_trials(), "auc", 0.05)["trial_id"] == "c"
    assert metric_best(_trials(), "auc")["trial_id"] == "a"  # the errored trial never counts


def test_bad_delta_is_rejected() -> None:
    with pytest.raises(ValueError, match="within must be in"):
        select_trial(_trials(), "auc", -0.1)


def test_asha_stopped_trials_are_not_compared_and_metric_best_is_the_metrics_own_best() -> None:
    """A trial ASHA stopped had fewer epochs to reach its best: select and metric-best compare only the
    trials that ran every epoch; metric-best takes each trial's highest metric at any epoch (peak_)."""
    trials = _trials().assign(stopped_early=[False, False, True, False, False],
                              best_focus=[0.1, 0.5, 0.9, 0.6, 0.9],
                              peak_auc=[0.98, 0.985, 0.99, 0.975, 0.99])
    assert select_trial(trials, "auc", 0.05)["trial_id"] == "d"   # c (stopped) would win on focus
    assert select_trial(trials, "auc", 0.01)["trial_id"] == "d"   # ranked on best_focus once it exists
    assert metric_best(trials, "auc")["trial_id"] == "b"          # its own best epoch, not the objective's
    # a sweep where no trial ran every epoch still selects among the finished ones
    cut = trials.assign(stopped_early=True)
    assert select_trial(cut, "auc", 0.05)["trial_id"] == "c"


def test_metric_best_is_reported_at_its_metrics_own_best_epoch() -> None:
    """selection.json and the benchmark give metric-best's figures at the epoch where its metric
    peaked (what chose it), not where its objective peaked."""
    from search.outputs.select import metric_best_record, metric_peak

    history = pd.DataFrame({"trial_id": ["b"] * 3 + ["a"], "epoch": [1, 2, 3, 1],
                            "auc": [0.96, 0.985, 0.97, 0.98], "lung_mass": [0.6, 0.4, 0.5, 0.3],
                            "edge_mass": [0.1, 0.3, 0.2, 0.3], "focus": [0.5, 0.2, 0.3, 0.1]})
    row = pd.Series({"trial_id": "b", "best_epoch": 1, "best_auc": 0.96, "best_lung_mass": 0.6,
                     "best_edge_mass": 0.1, "best_focus": 0.5})
    assert metric_peak(history, "b", "auc")["epoch"] == 2
    assert metric_best_record(row, history, "auc") == {
        "metric_best_metric": 0.985, "metric_best_epoch": 2, "metric_best_lung_mass": 0.4,
        "metric_best_edge_mass": 0.3, "metric_best_focus": 0.2}
    # a sweep without history.csv falls back to trials.csv's best-epoch values
    empty = pd.DataFrame(columns=["trial_id", "epoch", "objective"])
    assert metric_best_record(row, empty, "auc")["metric_best_epoch"] == 1
