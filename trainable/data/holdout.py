"""The held-out test split: a fixed share of patients the search never sees.

Patients (not images) are held out, stratified by label and by a grouping column (`source` by
default, so e.g. cxr-real's small adult non-COVID cell is represented on both sides), with a
seeded systematic sample: within each label the patients are ordered by (group, seeded random
key) and every ~1/fraction-th is taken, so each group keeps its share. The same data, fraction,
seed and column always give the same split (`cxrtune resume` and `cxrtune select` rely on it).

>>> search, heldout = split_holdout(dataset, 0.2, seed=0)      # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from trainable.data.dataset import Dataset
from trainable.data.duplicates import fold_groups
from trainable.errors import DataError


@dataclass(frozen=True)
class Holdout:
    """The result of a split: the search part, the held-out part, and what was held out."""

    search: Dataset
    heldout: Dataset | None          # None when fraction == 0
    fraction: float
    seed: int
    group_column: str | None         # the column the split was also stratified by (None: label only)
    merged: tuple[tuple[str, ...], ...] = ()  # patient groups linked by duplicate images (kept on one side)

    @property
    def heldout_patients(self) -> list[str]:
        return [] if self.heldout is None else sorted(set(self.heldout.patients.tolist()))

    def record(self) -> dict:
        """What results/heldout.json holds, so a user (and `resume`) can verify the split."""
        h = self.heldout
        per_class = ({} if h is None else
                     {c: {"images": int((h.labels == k).sum()),
                          "patients": int(len(set(h.patients[h.labels == k].tolist())))}
                      for k, c in enumerate(h.classes)})
        return {"fraction": self.fraction, "seed": self.seed, "stratified_by": ["label"]
                + ([self.group_column] if self.group_column else []),
                "search": {"images": len(self.search), "patients": len(set(self.search.patients.tolist()))},
                "heldout": {"images": 0 if h is None else len(h), "patients": len(self.heldout_patients),
                            "per_class": per_class},
                "duplicate_groups_merged": len(self.merged), "merged_patients": [list(m) for m in self.merged],
                "patient_ids": self.heldout_patients,
                "image_ids": [] if h is None else sorted(h.table["id"].astype(str).tolist())}


def _patient_labels(dataset: Dataset) -> dict[str, str]:
    """Each unit's (patient's, or merged duplicate group's: `fold_groups`) stratum: its most frequent
    label as the data writes it (ties: the first in sorted order). The data's labels, not the task's
    classes, so every task over the same data and seed holds out the same patients (and shares the
    search part's feature cache)."""
    out: dict[str, str] = {}
    labels = dataset.table["label"].astype(str).to_numpy()
    units = fold_groups(dataset)
    for p in dict.fromkeys(units.tolist()):
        values, counts = np.unique(labels[units == p], return_counts=True)
        out[p] = str(values[counts.argmax()])
    return out


def _key(seed: int, patient: str) -> int:
    # a per-patient random key that does not depend on row order (stable if rows are reordered)
    return zlib.crc32(f"{seed}:{patient}".encode())


def heldout_patients(dataset: Dataset, fraction: float, seed: int, group_column: str | None = "source",
                     field: str = "holdout") -> set[str]:
    """The patient ids to hold out. Raises DataError naming `field` when a label has too few
    patients to appear on both sides."""
    if not 0 <= fraction < 1:
        raise DataError(f"{field}: {fraction} must be in [0, 1) (a fraction of the patients; 0 = none)")
    if fraction == 0:
        return set()
    units = fold_groups(dataset)  # a merged duplicate group is held out (or searched) as one
    group_of: dict[str, str] = {}
    if group_column and group_column in dataset.table:
        for p, g in zip(units.tolist(), dataset.table[group_column].astype(str).tolist()):
            group_of.setdefault(p, g)
    by_label: dict[str, list[str]] = {}
    for p, lab in _patient_labels(dataset).items():
        by_label.setdefault(lab, []).append(p)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for lab in sorted(by_label):
        patients = sorted(by_label[lab], key=lambda p: (group_of.get(p, ""), _key(seed, p)))
        n = len(patients)
        if n < 2:
            raise DataError(f"{field}: {fraction}: label {lab!r} has {n} patient, who cannot be both held "
                            f"out and searched; set {field}: 0 or add patients")
        # systematic sample with a seeded offset: position i is taken when floor((i+u)·f) steps up
        u = rng.random()
        take = [p for i, p in enumerate(patients) if np.floor((i + 1 + u) * fraction) > np.floor((i + u) * fraction)]
        if not take:  # a small label still gets one held-out patient
            take = [patients[int(u * n)]]
        chosen.update(take)
    return set(np.asarray(dataset.patients).astype(str)[np.isin(units, list(chosen))].tolist())


def split_holdout(dataset: Dataset, fraction: float, seed: int, group_column: str | None = "source",
                  min_search_patients: int = 2, field: str = "holdout",
                  merged: tuple[tuple[str, ...], ...] = ()) -> Holdout:
    """Split `dataset` by patient into the search part and the held-out part.

    `min_search_patients`: every class must keep at least this many patients for the search
    (the number of folds); otherwise a DataError names `field`, the value and the rule."""
    held = heldout_patients(dataset, fraction, seed, group_column, field)
    if not held:
        return Holdout(dataset, None, fraction, seed, group_column, merged)
    is_held = np.isin(dataset.patients, list(held))
    search, heldout = _subset(dataset, ~is_held), _subset(dataset, is_held)
    overlap = set(search.patients.tolist()) & set(heldout.patients.tolist())
    if overlap:  # cannot happen by construction; checked because everything downstream trusts it
        raise AssertionError(f"held-out split shares patients with the search: {sorted(overlap)[:5]}")
    for k, name in enumerate(dataset.classes):
        left = len(set(search.patients[search.labels == k].tolist()))
        if left < min_search_patients:
            raise DataError(f"{field}: {fraction} leaves class {name!r} {left} patient(s) for the search, "
                            f"but folds={min_search_patients} needs at least {min_search_patients}; "
                            f"lower {field} or folds")
    return Holdout(search, heldout, fraction, seed, group_column if group_column in dataset.table else None, merged)


def _subset(dataset: Dataset, keep: np.ndarray) -> Dataset:
    table = dataset.table[keep].reset_index(drop=True)
    table.attrs = dict(dataset.table.attrs)
    return dataclasses.replace(dataset, table=table, labels=dataset.labels[keep])
