"""Minority oversampling by augmentation, as Balvinsson et al. did: the minority class twice per epoch.

Space key `oversample: true`. In the head stage each training image of the minority class (the
class with the fewest training images in the fold) appears a second time per epoch, its copy taken
from another cached augmentation view than the one the epoch trains on; in the fine-tuning stage
the copy is a second, independently drawn augmentation. The space check (search.space) requires
`augment` != none and `views` >= 2, so the copy always differs from the original.

Combinable with `class_weighted`: the class weights are then computed on the oversampled epoch
(the minority counts twice), so the loss stays balanced.
"""
from __future__ import annotations

import numpy as np


def minority_class(labels: np.ndarray, n_classes: int | None = None) -> int:
    """The class with the fewest images among those present (ties: the lowest index)."""
    counts = np.bincount(labels, minlength=n_classes or 0).astype(float)
    counts[counts == 0] = np.inf  # an absent class is not "the minority"
    return int(np.argmin(counts))


def oversampled_rows(tr: np.ndarray, y: np.ndarray, view: int, n_views: int, epoch: int, seed: int,
                     fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, cached view per row) of one head-stage epoch: `tr` at `view`, then the minority's
    rows again, each at a seeded view other than `view`."""
    if n_views < 2:
        raise ValueError(f"oversampling needs at least 2 cached augmentation views (got {n_views})")
    extra = tr[y[tr] == minority_class(y[tr])]
    rng = np.random.default_rng([seed, fold, epoch, 1])
    others = np.array([v for v in range(n_views) if v != view])
    rows = np.concatenate([tr, extra])
    views = np.concatenate([np.full(len(tr), view), rng.choice(others, len(extra))])
    return rows, views


def oversampled_indices(tr: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, copy number) of one fine-tuning epoch: copy 1 is the minority's second augmentation."""
    extra = tr[y[tr] == minority_class(y[tr])]
    return np.concatenate([tr, extra]), np.concatenate([np.zeros(len(tr), int), np.ones(len(extra), int)])
