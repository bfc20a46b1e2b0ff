"""The held-out test split: disjoint by patient, stratified, seeded and stable; a sweep scores best/
and selected/ on it (the shared tiny sweep runs with `holdout: 0.2`), and nothing else sees it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from search.outputs.heldout import check_split, search_split
from search.rundir import SweepError
from search.space import SpaceError, load_space
from tests.conftest import cxrtune, write_manifest_dataset
from trainable.data.dataset import load_dataset
from trainable.data.holdout import split_holdout
from trainable.errors import DataError


@pytest.fixture
def dataset(tmp_path: Path):
    """40 patients, 2–3 images each, three labels, two sources."""
    root = write_manifest_dataset(tmp_path / "d", n_patients=40, per_patient=2, size=16,
                                  labels=("normal", "covid", "pneumonia"), masks=False)
    table = pd.read_csv(root / "manifest.csv")
    table["source"] = np.where(table["patient_id"].str[1:].astype(int) % 4 == 0, "adult", "child")
    table.to_csv(root / "manifest.csv", index=False)
    return load_dataset(root, "covid_vs_rest")


def test_split_is_disjoint_by_patient_stratified_and_complete(dataset) -> None:
    split = split_holdout(dataset, 0.25, seed=0, group_column="source", min_search_patients=3)
    search, held = split.search, split.heldout
    assert not set(search.patients) & set(held.patients)
    assert len(search) + len(held) == len(dataset)
    assert set(search.table["id"]) | set(held.table["id"]) == set(dataset.table["id"])
    # every image of a held-out patient is held out
    assert set(dataset.table["id"][np.isin(dataset.patients, held.patients)]) == set(held.table["id"])
    # about a quarter of the patients of every label, and of both sources
    for lab in ("normal", "covid", "pneumonia"):
        n = dataset.table.loc[dataset.table["label"] == lab, "patient_id"].nunique()
        h = held.table.loc[held.table["label"] == lab, "patient_id"].nunique()
        assert abs(h - 0.25 * n) <= 1, (lab, h, n)
    assert set(held.table["source"]) == {"adult", "child"}
    assert split.record()["patient_ids"] == sorted(set(held.patients))


def test_split_is_stable_for_a_seed_and_changes_with_it(dataset) -> None:
    a = split_holdout(dataset, 0.2, seed=7).heldout_patients
    assert split_holdout(dataset, 0.2, seed=7).heldout_patients == a
    # row order does not matter: the same patients when the manifest is shuffled
    order = np.random.default_rng(0).permutation(len(dataset))
    shuffled = dataclasses.replace(dataset, table=dataset.table.iloc[order].reset_index(drop=True),
                                   labels=dataset.labels[order])
    assert split_holdout(shuffled, 0.2, seed=7).heldout_patients == a
    assert split_holdout(dataset, 0.2, seed=8).heldout_patients != a
    # the data's labels stratify, not the task's classes: every task holds out the same patients
    three = dataclasses.replace(dataset, task="three_class")
    assert split_holdout(three, 0.2, seed=7).heldout_patients == a
    assert split_holdout(dataset, 0.0, seed=7).heldout is None


def test_too_few_patients_is_a_clear_error_naming_the_field(dataset) -> None:
    with pytest.raises(DataError, match=r"holdout: 0.6 leaves class 'covid' \d+ patient\(s\).*folds=8"):
        split_holdout(dataset, 0.6, seed=0, min_search_patients=8)
    with pytest.raises(DataError, match=r"holdout: 1.5 must be in \[0, 1\)"):
        split_holdout(dataset, 1.5, seed=0)


def test_space_field_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("holdout: 1.0\nspace: {}\n")
    with pytest.raises(SpaceError, match="holdout"):
        load_space(str(bad))
    proc = cxrtune("run", "--space", str(bad), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "holdout" in proc.stderr and "Traceback" not in proc.stderr


def test_a_changed_split_is_refused(dataset, tmp_path: Path) -> None:
    spec = load_space("default").model_copy(update={"holdout": 0.2, "folds": 3})
    split = search_split(spec, dataset)
    (tmp_path / "heldout.json").write_text(json.dumps(split.record()))
    check_split(tmp_path, split)  # the same split passes
    other = search_split(spec.model_copy(update={"seed": 5}), dataset)
    with pytest.raises(SweepError, match="held-out patients rebuilt from the data differ"):
        check_split(tmp_path, other)


def test_tiny_sweep_scores_best_and_selected_on_the_held_out_patients(tiny_sweep: Path) -> None:
    record = json.loads((tiny_sweep / "heldout.json").read_text())
    manifest = pd.read_csv(tiny_sweep / "data" / "manifest.csv")
    held = manifest[manifest["patient_id"].isin(record["patient_ids"])]
    assert record["patient_ids"] and sorted(held["id"]) == record["image_ids"]
    # the search saw only the other patients: the sweep's data and best/'s refit exclude them
    summary = json.loads((tiny_sweep / "summary.json").read_text())
    assert summary["data"]["images"] == len(manifest) - len(held) == record["search"]["images"]
    tested = json.loads((tiny_sweep / "test_metrics.json").read_text())
    for role in ("best", "selected"):
        metrics = tested[role]["metrics"]
        assert 0 <= metrics["balanced_accuracy"] <= 1 and 0 <= metrics["lung_mass"] <= 1
        assert sum(map(sum, tested[role]["confusion_matrix"]["rows_true_columns_predicted"])) == len(held)
        assert summary["heldout"][role]["balanced_accuracy"] == metrics["balanced_accuracy"]
    meta = json.loads((tiny_sweep / "best" / "metadata.json").read_text())
    assert tested["best"]["trial_id"] == meta["cv_metrics"]["trial_id"]
    assert "## Held-out test" in (tiny_sweep / "leaderboard.md").read_text()
    assert 'id="heldout"' in (tiny_sweep / "report.html").read_text()
    # the same numbers as `cxrtune evaluate` on a manifest of exactly the held-out rows
    sub = tiny_sweep.parent / "heldout-data"
    sub.mkdir(exist_ok=True)
    rows = held.assign(path=[str(tiny_sweep / "data" / p) for p in held["path"]],
                       mask_path=[str(tiny_sweep / "data" / p) for p in held["mask_path"]])
    rows.to_csv(sub / "manifest.csv", index=False)
    proc = cxrtune("evaluate", "--model", str(tiny_sweep / "best"), "--data", str(sub),
                   "--out", str(sub / "eval.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((sub / "eval.json").read_text())
    assert ev["metrics"]["balanced_accuracy"] == pytest.approx(tested["best"]["metrics"]["balanced_accuracy"])
    assert ev["metrics"]["lung_mass"] == pytest.approx(tested["best"]["metrics"]["lung_mass"], abs=1e-6)
