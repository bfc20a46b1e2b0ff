"""The searcher and scheduler for each objective mode, and the Pareto ordering of the results.

In `weighted` and `constraint` mode one number, `running_objective` (each trial's best objective
so far, reported every epoch), drives both OptunaSearch and ASHA, set once in TuneConfig; it is
also what trials.csv ranks on (`best_objective`). In `pareto` mode they differ, so each gets its own:

* OptunaSearch(metric=[running_<metric>, "running_focus"], mode=["max", "max"]): a multi-objective
  Optuna study (TPE, which handles several objectives: MOTPE), told each trial's values at its best
  epoch (trials.csv's best_<metric> and best_focus).
* ASHAScheduler(metric="running_objective", mode="max"): stops trials on the weighted score
  metric + w·focus (best so far), a scalar, as successive halving needs.

In every mode the study lives in RESULTS/optuna.db (SQLite), so it can be opened after the sweep
(`optuna.load_study(study_name="cxrtune", storage="sqlite:///RESULTS/optuna.db")`, or
optuna-dashboard) and its values checked against trials.csv.
* TuneConfig(metric=None, mode=None): Tune passes TuneConfig's metric to the searcher and the
  scheduler, which would overwrite the searcher's list and clash with the scheduler's own metric.

`best/` in `pareto` mode is the front member with the highest weighted objective: trials.csv puts
the front first (`order_trials`), so its first row is that trial in every mode.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.objective import pareto_column
from search.space import SweepSpec

STUDY_NAME = "cxrtune"
RANK_METRIC = "running_objective"  # the one ranking value: each trial's best objective so far
STUDY_FILE = "optuna.db"


def study_storage_url(results: Path) -> str:
    return f"sqlite:///{(Path(results) / STUDY_FILE).resolve()}"


def search_algorithms(spec: SweepSpec, results: Path
                      ) -> tuple[OptunaSearch | None, ASHAScheduler, str | None, str | None]:
    """(searcher, scheduler, TuneConfig metric, TuneConfig mode) for the space's objective mode.

    A space with nothing to search (every parameter fixed, one trial) runs without a searcher:
    OptunaSearch refuses an empty search space."""
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    asha = dict(time_attr="training_iteration", max_t=spec.total_epochs(), grace_period=spec.asha.grace_period,
                reduction_factor=spec.asha.reduction_factor)
    if not spec.searched():
        return None, ASHAScheduler(**asha), RANK_METRIC, "max"
    study = dict(sampler=sampler, study_name=STUDY_NAME, storage=optuna.storages.RDBStorage(study_storage_url(results)))
    objectives = spec.objective.searcher_objectives()
    if objectives is None:
        return OptunaSearch(**study), ASHAScheduler(**asha), RANK_METRIC, "max"
    metrics, modes = objectives
    searcher = OptunaSearch(metric=metrics, mode=modes, **study)
    return searcher, ASHAScheduler(metric=RANK_METRIC, mode="max", **asha), None, None


def load_study(results: Path) -> optuna.Study:
    """The Optuna study a sweep left in RESULTS/optuna.db."""
    return optuna.load_study(study_name=STUDY_NAME, storage=study_storage_url(results))


def order_trials(trials: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """trials.csv with its `pareto` column; in `pareto` mode the front first, each part by objective.

    Other modes keep the plain objective order (the column is informative there)."""
    df = trials.copy()
    df["pareto"] = pareto_column(df, spec.objective.metric)
    if spec.objective.mode == "pareto" and "best_objective" in df:
        df = df.sort_values(["pareto", "best_objective"], ascending=[False, False], na_position="last",
                            kind="stable")
    return df.reset_index(drop=True)


def front_note(trials: pd.DataFrame, metric: str, mode: str) -> str:
    """leaderboard.md's words on the front: its members, and in `pareto` mode what best/ is."""
    if "pareto" not in trials:
        return ""
    front = trials[trials["pareto"].astype(bool)]
    if front.empty:
        return ""
    members = ", ".join(f"{r.trial_id} ({metric} {r[f'best_{metric}']:.3f}, focus {r.best_focus:.3f})"
                        for _, r in front.sort_values("best_focus").iterrows())
    text = (f"**Pareto front** on ({metric}, focus) at each trial's best epoch, among the trials that ran "
            f"every epoch — none of them is better on both: {members}.")
    if mode == "pareto":
        text += (" Objective mode `pareto`: the searcher maximised both together; ASHA stopped trials on the "
                 "weighted objective; the front is listed first and `best/` is the front member with the "
                 "highest weighted objective (rank 1).")
    return text
