"""leaderboard.md when the objective's metric is a group metric (also a fixed leaderboard column)."""
import pandas as pd
import pytest

from search.outputs.results import leaderboard_markdown


@pytest.mark.parametrize("metric", ["within_group_auc", "worst_group_accuracy"])
def test_group_metric_is_one_column(metric: str) -> None:
    df = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2, "lr": [1e-3, 2e-3],
                       "epochs_run": [3, 3], "best_epoch": [2, 3], "stopped_early": [False, False],
                       f"best_{metric}": [0.61, 0.42], f"final_{metric}": [0.5, 0.4],
                       "best_within_group_auc" if metric != "within_group_auc" else "best_worst_group_accuracy":
                           [0.1, 0.2], "best_focus": [0.4, 0.5], "best_lung_mass": [0.6, 0.7], "best_edge_mass": [0.1, 0.1],
                       "best_objective": [0.9, 0.8], "pareto": [True, True]})
    md = leaderboard_markdown(df, metric, ["lr"], "Leaderboard: t")
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert header.count(f"best_{metric}") == 1
    assert "0.61" in md and "0.42" in md
