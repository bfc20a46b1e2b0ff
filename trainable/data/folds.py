"""Patient-grouped, class-stratified K-fold splits: the same folds for every trial of a sweep."""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from trainable.errors import DataError


def patient_folds(labels: np.ndarray, patients: np.ndarray, classes: tuple[str, ...],
                  n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, val_idx) per fold; no patient is ever on both sides of a split.

    Every class needs at least `n_folds` patients, so that each validation fold holds it.
    """
    if n_folds < 2:
        raise DataError(f"folds must be >= 2 (got {n_folds})")
    for k, name in enumerate(classes):
        n_patients = len(np.unique(patients[labels == k]))
        if n_patients < n_folds:
            raise DataError(f"class {name!r} has {n_patients} patient(s) but folds={n_folds}: "
                            f"every class needs at least one patient per fold")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [(np.sort(tr), np.sort(va)) for tr, va in
             splitter.split(np.zeros(len(labels)), labels, groups=patients)]
    for k, (_, va) in enumerate(folds):
        missing = set(range(len(classes))) - set(labels[va].tolist())
        if missing:
            names = ", ".join(classes[m] for m in sorted(missing))
            raise DataError(f"fold {k} has no validation image of class {names}: "
                            f"too few patients for {n_folds} folds; lower `folds`")
    return folds
