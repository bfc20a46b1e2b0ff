"""One score per trial-epoch from the classification metric and where the Grad-CAM evidence falls.

`weighted`:   metric + w · (lung_mass − edge_mass)
`constraint`: metric when lung_mass ≥ lung_floor; otherwise metric − 2 − (lung_floor − lung_mass),
              which ranks every trial under the floor below every feasible one (metrics are in [0, 1]).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable


def objective_score(metrics: dict[str, float], *, mode: str, metric: str, w: float,
                    lung_floor: float = 0.0) -> float:
    value = metrics[metric]
    if value is None or math.isnan(value):
        value = 0.0
    lung, edge = metrics["lung_mass"], metrics["edge_mass"]
    if mode == "weighted":
        return value + w * (lung - edge)
    if mode == "constraint":
        return value if lung >= lung_floor else value - 2.0 - (lung_floor - lung)
    raise ValueError(f"objective mode must be 'weighted' or 'constraint' (got {mode!r})")


def make_score(objective) -> Callable[[dict[str, float]], float]:
    """A picklable score function for the trials (they never import `search` themselves)."""
    return partial(objective_score, mode=objective.mode, metric=objective.metric, w=objective.w,
                   lung_floor=objective.lung_floor)
