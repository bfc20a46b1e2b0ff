"""Duplicates across patients (`cxrtune data check`'s hashes) join one group: a copy of an image
filed under another patient id lands in the same fold and on the same side of the held-out split."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from search.outputs.heldout import search_split
from search.space import load_space
from trainable.data.dataset import load_dataset
from trainable.data.duplicates import fold_groups, merge_duplicates
from trainable.data.folds import patient_folds
from trainable.data.holdout import split_holdout
from trainable.data.phantom import synthesize

FOLDS, SEED, HOLDOUT = 3, 0, 0.3


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("phantom") / "data", n_patients=24, size=48).parent


def _with_copy(root: Path, out: Path, source_row: int, patient: str) -> Path:
    """The phantom set with image `source_row` copied (same pixels) under patient `patient`."""
    shutil.copytree(root, out)
    table = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    row = table.iloc[source_row].copy()
    shutil.copy(out / row["path"], out / "images" / "copy.png")
    row["id"], row["path"], row["patient_id"], row["mask_path"] = "copy", "images/copy.png", patient, ""
    pd.concat([table, row.to_frame().T]).to_csv(out / "manifest.csv", index=False)
    return out


def _sides(dataset, groups: np.ndarray, patients: tuple[str, str]) -> tuple[bool, bool]:
    """(same fold, same held-out side) for the two patients, with folds/holdout grouped by `groups`."""
    held = split_holdout(dataset, HOLDOUT, SEED, min_search_patients=FOLDS).heldout_patients
    folds = patient_folds(dataset.labels, groups, dataset.classes, FOLDS, SEED)
    fold_of = {dataset.patients[i]: k for k, (_, va) in enumerate(folds) for i in va}
    return fold_of[patients[0]] == fold_of[patients[1]], (patients[0] in held) == (patients[1] in held)


def test_a_duplicate_under_another_patient_is_kept_on_one_side(phantom: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRTUNE_CACHE_DIR", str(tmp_path / "cache"))
    base = load_dataset(phantom, "labels")
    source = base.table["patient_id"].iloc[0]
    label = base.table["label"].iloc[0]
    # a patient of the same label whom the unmerged folds and split put apart from `source`
    for k, other in enumerate(sorted(set(base.table.loc[base.table["label"] == label, "patient_id"]) - {source})):
        data = load_dataset(_with_copy(phantom, tmp_path / f"d{k}", 0, other), "labels")
        if _sides(data, np.asarray(data.patients).astype(str), (source, other)) == (False, False):
            break
    else:
        pytest.skip("no patient pair straddles both splits in this phantom")
    merged, groups = merge_duplicates(data, cache=tmp_path / "cache")
    assert groups == [sorted([source, other])]
    assert _sides(merged, fold_groups(merged), (source, other)) == (True, True)
    # the sweep's path: the count is printed and recorded in heldout.json's record, folds follow the groups
    lines: list[str] = []
    spec = load_space("default").model_copy(update={"holdout": HOLDOUT, "folds": FOLDS, "seed": SEED,
                                                    "task": "labels"})
    split = search_split(spec, data, lines.append)
    assert any("1 group(s) of patients merged" in line for line in lines), lines
    rec = split.record()
    assert rec["duplicate_groups_merged"] == 1 and rec["merged_patients"] == [sorted([source, other])]
    assert (source in rec["patient_ids"]) == (other in rec["patient_ids"])
    # a second call reads the groups from the cache (no decode) and gives the same split
    assert list((tmp_path / "cache" / "duplicates").iterdir())
    assert search_split(spec, data).heldout_patients == split.heldout_patients
