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
