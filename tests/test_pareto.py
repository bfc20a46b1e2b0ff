"""`objective: {mode: pareto}`: a multi-objective Optuna study over [metric, focus] (each trial's
values at its best epoch), ASHA on the weighted objective, and the Pareto front (among the trials
that ran every epoch) in trials.csv, leaderboard.md, best/ and `cxrtune select`.

One tiny real sweep (local Ray, phantom data at 96 px, 4 trials × 2 epochs) read by several tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from search.objective import objective_score, pareto_column
from search.outputs.select import select_trial
from search.searcher import load_study, order_trials
from search.space import SpaceError, load_space
from tests.conftest import TINY_SPACE, cxrtune

WEIGHTED = "objective: {mode: weighted, metric: balanced_accuracy, w: 0.5}"
PARETO = "objective: {mode: pareto, metric: balanced_accuracy, w: 0.5}"


def _space(text: str) -> str:
    assert WEIGHTED in TINY_SPACE
    return TINY_SPACE.replace(WEIGHTED, text)


@pytest.fixture(scope="module")
def pareto_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pareto")
    (work / "p.yaml").write_text(_space(PARETO).replace("name: tiny", "name: pareto"))
    proc = cxrtune("run", "--space", str(work / "p.yaml"), "--out", str(work / "results"), "--name", "p1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "results" / "p1"


def _brute_force_front(points: list[tuple[float, float]]) -> list[bool]:
    """On the front unless some other point is >= on both and > on one (the definition, O(n²))."""
    return [not any(a >= x and b >= y and (a > x or b > y) for j, (a, b) in enumerate(points) if j != i)
            for i, (x, y) in enumerate(points)]


def test_trials_csv_marks_exactly_the_non_dominated_trials(pareto_sweep: Path) -> None:
    trials = pd.read_csv(pareto_sweep / "trials.csv", dtype={"trial_id": str})
    assert "pareto" in trials and len(trials) == 4
    done = trials[(trials["status"] == "TERMINATED") & ~trials["stopped_early"].astype(bool)]
    assert len(done) >= 1
    points = list(zip(done["best_balanced_accuracy"], done["best_focus"]))
    assert done["pareto"].astype(bool).tolist() == _brute_force_front(points)
    # failed and ASHA-stopped trials (fewer epochs to reach their best) are never on it
    assert not trials.loc[~trials.index.isin(done.index), "pareto"].astype(bool).any()
    # the front comes first; best/ is its member with the highest weighted objective
    flags = trials["pareto"].astype(bool).tolist()
    assert flags == sorted(flags, reverse=True)
    front = trials[trials["pareto"].astype(bool)]
    expected_best = front.loc[front["best_objective"].idxmax(), "trial_id"]
    meta = json.loads((pareto_sweep / "best" / "metadata.json").read_text())
    assert meta["cv_metrics"]["trial_id"] == expected_best
    # the reported objective (ASHA's metric) is the weighted score, not the metric alone
    r = front.iloc[0]
    assert r["best_objective"] == pytest.approx(objective_score(
        {"balanced_accuracy": r["best_balanced_accuracy"], "lung_mass": r["best_lung_mass"],
         "edge_mass": r["best_edge_mass"], "focus": r["best_focus"]}, mode="weighted", metric="balanced_accuracy",
        w=0.5), abs=1e-6)


def test_the_searcher_is_a_two_objective_optuna_study(pareto_sweep: Path) -> None:
    study = load_study(pareto_sweep)  # RESULTS/optuna.db, written by Ray Tune's OptunaSearch
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 4 and len(told) >= 2
    assert all(len(t.values) == 2 for t in told)
    # the values Optuna was told are each trial's [balanced_accuracy, focus] at its best epoch: trials.csv's
    trials = pd.read_csv(pareto_sweep / "trials.csv", dtype={"trial_id": str})
    done = trials[trials["status"] == "TERMINATED"]
    pairs = {(round(a, 6), round(b, 6)) for a, b in zip(done["best_balanced_accuracy"], done["best_focus"])}
    assert {(round(a, 6), round(b, 6)) for a, b in (t.values for t in told)} == pairs


def test_leaderboard_lists_the_front_and_selection_works_unchanged(pareto_sweep: Path) -> None:
    board = (pareto_sweep / "leaderboard.md").read_text()
    trials = pd.read_csv(pareto_sweep / "trials.csv", dtype={"trial_id": str})
    assert "**Pareto front**" in board and "`best/` is the front member with the highest weighted" in board
    for tid in trials.loc[trials["pareto"].astype(bool), "trial_id"]:
        assert tid in board.split("**Pareto front**")[1].split("\n")[0]
    assert "Pareto front" in (pareto_sweep / "report.html").read_text()
    # the sweep ran `select` as always (select_within 0.02): the same rule, unchanged, in pareto mode
    chosen = json.loads((pareto_sweep / "selection.json").read_text())
    assert chosen["selected"] == select_trial(trials, "balanced_accuracy", 0.02)["trial_id"]
    assert chosen["objective_best"] == trials.iloc[0]["trial_id"]  # front member, top objective
    assert (pareto_sweep / "selected" / "model.pt").is_file()


def test_pareto_column_and_order_on_a_hand_made_table(tmp_path: Path) -> None:
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "status": ["TERMINATED", "TERMINATED", "TERMINATED", "ERROR", "TERMINATED"],
        "best_balanced_accuracy": [0.90, 0.80, 0.70, 0.99, np.nan],
        "best_focus": [0.30, 0.50, 0.40, 0.90, 0.90],
        "best_objective": [1.00, 0.95, 0.80, np.nan, np.nan]})
    # c is dominated by b; the failed d and the NaN e are never on the front
    assert pareto_column(trials, "balanced_accuracy").tolist() == [True, True, False, False, False]
    (tmp_path / "s.yaml").write_text(_space(PARETO))
    ordered = order_trials(trials, load_space(tmp_path / "s.yaml"))
    assert ordered["trial_id"].tolist()[:3] == ["a", "b", "c"] and ordered["pareto"].tolist()[:2] == [True, True]
    # a dominated trial with the top objective still ranks after the front in pareto mode
    trials.loc[2, "best_objective"] = 2.0
    assert order_trials(trials, load_space(tmp_path / "s.yaml"))["trial_id"].iloc[0] == "a"
    (tmp_path / "w.yaml").write_text(TINY_SPACE)
    assert order_trials(trials.sort_values("best_objective", ascending=False),
                        load_space(tmp_path / "w.yaml"))["trial_id"].iloc[0] == "c"


@pytest.mark.parametrize("objective, message", [
    ("{mode: pareto, metric: balanced_accuracy, lung_floor: 0.3}",
     "objective: lung_floor (0.3) applies to mode 'constraint' only (mode is 'pareto'"),
    ("{mode: pareto, metric: lung_mass}", "objective.metric: Input should be 'balanced_accuracy'"),
    ("{mode: paretto}", "objective.mode: Input should be 'weighted', 'constraint' or 'pareto' (got 'paretto')"),
])
def test_bad_pareto_objectives_are_one_line_space_errors(tmp_path: Path, objective: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_space(f"objective: {objective}"))
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_bad_pareto_objective_exits_2_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_space("objective: {mode: pareto, lung_floor: 0.2}"))
    proc = cxrtune("run", "--space", str(path), "--out", str(tmp_path / "results"))
    assert proc.returncode == 2 and "lung_floor (0.2) applies to mode 'constraint' only" in proc.stderr
    assert not (tmp_path / "results").exists()
