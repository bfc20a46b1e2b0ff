"""One ranking value: the Optuna study, ASHA and trials.csv rank every trial on the same number
(its best objective so far, `running_objective`), and the Pareto front holds only trials that ran
every epoch. Read from one real tiny sweep (tests/conftest.py's `tiny_sweep`)."""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from search.searcher import load_study


def test_optuna_was_told_exactly_the_values_trials_csv_ranks_on(tiny_sweep: Path) -> None:
    trials = pd.read_csv(tiny_sweep / "trials.csv", dtype={"trial_id": str})
    study = load_study(tiny_sweep)  # RESULTS/optuna.db, now kept in every objective mode
    told = sorted(round(t.value, 6) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    done = trials[trials["status"] == "TERMINATED"]
    assert len(told) == len(done) >= 2
    assert told == sorted(round(v, 6) for v in done["best_objective"])
    # best_objective is the maximum over the trial's epochs (history.csv), whether or not ASHA stopped it
    history = pd.read_csv(tiny_sweep / "history.csv", dtype={"trial_id": str})
    peak = history.groupby("trial_id")["objective"].max()
    for _, r in done.iterrows():
        assert abs(r["best_objective"] - peak[r["trial_id"]]) < 1e-9


def test_the_front_and_the_selection_compare_trials_at_one_budget(tiny_sweep: Path) -> None:
    trials = pd.read_csv(tiny_sweep / "trials.csv", dtype={"trial_id": str})
    front = trials[trials["pareto"].astype(bool)]
    assert len(front) >= 1 and not front["stopped_early"].astype(bool).any()
    import json

    selection = json.loads((tiny_sweep / "selection.json").read_text())
    chosen = trials.set_index("trial_id").loc[selection["selected"]]
    assert not bool(chosen["stopped_early"])
    assert "focus" in (tiny_sweep / "leaderboard.md").read_text()
