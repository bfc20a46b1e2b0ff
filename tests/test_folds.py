"""Folds: patients never cross a split, class ratios are kept, too few patients is a clear error."""
from __future__ import annotations

import numpy as np
import pytest

from trainable.data.folds import patient_folds
from trainable.errors import DataError


def _toy(n_patients: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    patient_labels = rng.choice(3, n_patients, p=[0.5, 0.3, 0.2])
    per = rng.integers(1, 5, n_patients)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per)
    labels = np.repeat(patient_labels, per)
    return labels, patients


def test_no_patient_in_train_and_validation_and_every_image_validated_once() -> None:
    labels, patients = _toy()
    folds = patient_folds(labels, patients, ("a", "b", "c"), 4, seed=0)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(len(labels)))
    for tr, va in folds:
        assert not set(patients[tr]) & set(patients[va])


def test_class_ratios_are_kept_and_folds_are_reproducible() -> None:
    labels, patients = _toy(120)
    folds = patient_folds(labels, patients, ("a", "b", "c"), 3, seed=1)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for _, va in folds:
        assert np.abs(np.bincount(labels[va], minlength=3) / len(va) - overall).max() < 0.1
    again = patient_folds(labels, patients, ("a", "b", "c"), 3, seed=1)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))


def test_too_few_patients_for_the_folds_is_named() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    patients = np.array(["a", "b", "c", "d", "d"])
    with pytest.raises(DataError, match=r"class 'covid' has 1 patient\(s\) but folds=3"):
        patient_folds(labels, patients, ("normal", "covid"), 3, seed=0)
