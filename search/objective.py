"""One score per trial-epoch from the classification metric and where the Grad-CAM evidence falls.

`weighted`:   metric + w · (lung_mass − edge_mass)
`constraint`: metric when lung_mass ≥ lung_floor; otherwise metric − 2 − (lung_floor − lung_mass),
              which ranks every trial under the floor below every feasible one (metrics are in [0, 1]).
`pareto`:     the searcher maximises [metric, lung_mass] together (multi-objective OptunaSearch);
              the reported `objective`, which ASHA stops trials on, is the `weighted` score.

The Pareto front (`pareto_front`, `pareto_column`) is the set of finished trials that no other
trial beats on both the metric and lung_mass; trials.csv marks it in every mode.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import numpy as np
import pandas as pd


def objective_score(metrics: dict[str, float], *, mode: str, metric: str, w: float,
                    lung_floor: float = 0.0) -> float:
    value = metrics[metric]
    if value is None or math.isnan(value):
        value = 0.0
    lung, edge = metrics["lung_mass"], metrics["edge_mass"]
    if mode in ("weighted", "pareto"):
        return value + w * (lung - edge)
    if mode == "constraint":
        return value if lung >= lung_floor else value - 2.0 - (lung_floor - lung)
    raise ValueError(f"objective mode must be 'weighted', 'constraint' or 'pareto' (got {mode!r})")


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


def pareto_column(trials: pd.DataFrame, metric: str) -> pd.Series:
    """trials.csv's `pareto`: True for the finished trials on the front of (best_<metric>, best_lung_mass).

    Both values are taken at each trial's best epoch (the row's `best_*` columns), so the front is
    the one a reader can check on trials.csv itself; failed trials are never on it.
    """
    out = pd.Series(False, index=trials.index, name="pareto")
    col = f"best_{metric}"
    if trials.empty or col not in trials or "best_lung_mass" not in trials:
        return out
    done = trials["status"] == "TERMINATED"
    out[done] = pareto_front(trials.loc[done, col], trials.loc[done, "best_lung_mass"])
    return out
