"""One score per trial-epoch from the classification metric and where the Grad-CAM evidence falls.

`weighted`:   metric + w · focus   (`focus`: chance-corrected, grid-normalised lung-vs-edge focus,
              trainable.cam.explain: 0 = a uniform map, 1 = the lung mask at the map's grid)
`constraint`: metric when lung_mass ≥ lung_floor; otherwise metric − 2 − (lung_floor − lung_mass),
              which ranks every trial under the floor below every feasible one (metrics are in [0, 1]).
`pareto`:     the searcher maximises [metric, focus] together (multi-objective OptunaSearch);
              the reported `objective`, which ASHA stops trials on, is the `weighted` score.

One ranking value: every epoch a trial also reports `running_objective`, the best objective so far
(and `running_<metric>`, `running_focus`: their values at that epoch). ASHA, the searcher and
trials.csv's `best_objective` all rank on it, so the three agree on every trial.

Trials are compared at one budget (`full_budget`): those that ran every epoch. ASHA-stopped
trials stay in trials.csv but are not on the Pareto front, not metric-best and not selectable.

The Pareto front (`pareto_front`, `pareto_column`) is the set of such trials that no other beats
on both the metric and focus; trials.csv marks it in every mode.
"""
from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # pandas only for the tables: a trial process unpickles this module for objective_score
    import pandas as pd


def objective_score(metrics: dict[str, float], *, mode: str, metric: str, w: float,
                    lung_floor: float = 0.0) -> float:
    value = metrics[metric]
    if value is None or math.isnan(value):
        raise ValueError(f"objective metric {metric!r} is NaN in every validation fold: it cannot rank trials "
                         f"(e.g. within_group_auc needs a group with images of every class in a fold); "
                         f"choose another objective.metric")
    lung = metrics["lung_mass"]
    if mode in ("weighted", "pareto"):
        return value + w * metrics["focus"]
    if mode == "constraint":
        return value if lung >= lung_floor else value - 2.0 - (lung_floor - lung)
    raise ValueError(f"objective mode must be 'weighted', 'constraint' or 'pareto' (got {mode!r})")


def check_metric_defined(metric: str, labels: np.ndarray, groups: np.ndarray, classes: tuple[str, ...],
                         min_cell: int, group_column: str) -> None:
    """Refuse, before any work, a group metric that no trial could compute on this data (it would be
    NaN in every fold, and an objective cannot rank on NaN). The pooled out-of-fold value exists
    exactly when some cell (worst_group_accuracy) or some group holding every class
    (within_group_auc) has at least `min_cell` images, whatever the predictions."""
    if metric not in ("worst_group_accuracy", "within_group_auc"):
        return
    from search.space import SpaceError
    from trainable.train.groups import group_metrics

    labels = np.asarray(labels)
    if math.isnan(group_metrics(labels, np.eye(len(classes))[labels], groups, classes, min_cell)[metric]):
        why = (f"no ({group_column} × class) cell has {min_cell} or more images" if metric == "worst_group_accuracy"
               else f"no {group_column} group holds at least {min_cell} images with every class {list(classes)}")
        raise SpaceError(f"objective.metric {metric!r} is undefined on this data: {why}; "
                         f"choose another metric, group_column or min_cell")


def make_score(objective) -> Callable[[dict[str, float]], float]:
    """A picklable score function for the trials (they never import `search` themselves)."""
    return partial(objective_score, mode=objective.mode, metric=objective.metric, w=objective.w,
                   lung_floor=objective.lung_floor)


def pareto_front(x, y) -> np.ndarray:
    """Boolean mask of the points that no other point dominates when both x and y are maximised.

    A point is dominated when another is at least as good on both and better on one; equal points
    are all on the front. NaN coordinates are never on it.

    >>> pareto_front([0.1, 0.5, 0.3, 0.5], [0.9, 0.5, 0.4, 0.5]).tolist()
    [True, True, False, True]
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length (got shapes {x.shape} and {y.shape})")
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated_by = ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        front[i] = not dominated_by.any()
    return front


def full_budget(trials: pd.DataFrame) -> pd.Series:
    """The trials that compare at one budget: finished and not stopped early (every epoch run).

    When no trial ran every epoch (a sweep cut short), every finished trial counts instead."""
    import pandas as pd

    done = trials["status"] == "TERMINATED" if "status" in trials else pd.Series(False, index=trials.index)
    if "stopped_early" not in trials:
        return done
    full = done & ~trials["stopped_early"].astype(str).str.lower().eq("true")
    return full if full.any() else done


def pareto_column(trials: pd.DataFrame, metric: str) -> pd.Series:
    """trials.csv's `pareto`: True for the full-budget trials on the front of (best_<metric>, best_focus).

    Both values are taken at each trial's best epoch (the row's `best_*` columns), so the front is
    the one a reader can check on trials.csv itself; failed and ASHA-stopped trials are never on it.
    """
    import pandas as pd

    out = pd.Series(False, index=trials.index, name="pareto")
    col = f"best_{metric}"
    if trials.empty or col not in trials or "best_focus" not in trials:
        return out
    ok = full_budget(trials)
    out[ok] = pareto_front(trials.loc[ok, col], trials.loc[ok, "best_focus"])
    return out
