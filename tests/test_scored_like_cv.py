"""Held-out scoring, `evaluate` and the montages score like CV (the sweep's mask source, atlas
threshold, CAM target, min_cell, recorded in metadata.json), and the folds are saved and checked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from search.outputs.evaluate import scoring_settings
from search.rundir import SweepError, check_folds, load_record, write_folds


def test_metadata_records_how_cv_scored_and_evaluate_uses_it(tiny_sweep: Path) -> None:
    meta = json.loads((tiny_sweep / "best" / "metadata.json").read_text())
    settings = load_record(tiny_sweep)["settings"]
    for k in ("lung_masks", "atlas_threshold", "cam_target", "cam_layer", "min_cell", "group_column", "edge_band"):
        assert meta["scoring"][k] == settings[k], k
    assert scoring_settings(meta)["cam_target"] == settings["cam_target"]
    # a model exported before `scoring` existed is scored with the defaults it was trained with
    old = {k: v for k, v in meta.items() if k not in ("scoring", "atlas_threshold")}
    assert scoring_settings(old) | {"edge_band": 0} == {"lung_masks": "auto", "atlas_threshold": 0.5,
                                                         "cam_target": "true", "cam_layer": "final", "min_cell": 5,
                                                         "group_column": "source", "edge_band": 0}


def test_heldout_cells_carry_their_n_and_focus_is_scored(tiny_sweep: Path) -> None:
    test = json.loads((tiny_sweep / "test_metrics.json").read_text())
    best = test["best"]
    assert best["min_cell"] == load_record(tiny_sweep)["settings"]["min_cell"]
    assert set(best["group_recall"]) <= set(best["group_cells"]) and best["group_cells"]
    assert all(n >= 1 for n in best["group_cells"].values())
    assert np.isfinite(best["metrics"]["focus"])
    assert "(n=" in (tiny_sweep / "report.html").read_text()


def test_folds_are_saved_and_a_different_rebuild_is_refused(tiny_sweep: Path, tmp_path: Path) -> None:
    folds = pd.read_csv(tiny_sweep / "folds.csv", dtype={"id": str})
    held = set(json.loads((tiny_sweep / "heldout.json").read_text())["image_ids"])
    assert set(folds["fold"]) == {0, 1} and not held & set(folds["id"])  # 2 folds, never a held-out image
    ids = folds["id"].tolist()
    va0 = np.flatnonzero(folds["fold"].to_numpy() == 0)
    va1 = np.flatnonzero(folds["fold"].to_numpy() == 1)
    write_folds(tmp_path, ids, [(va1, va0), (va0, va1)])
    check_folds(tmp_path, ids, [(va1, va0), (va0, va1)])          # the same folds: fine
    swapped = [(va0[1:], np.r_[va1, va0[:1]]), (np.r_[va1, va0[:1]], va0[1:])]
    with pytest.raises(SweepError, match="folds rebuilt from the data differ"):
        check_folds(tmp_path, ids, [swapped[1], swapped[0]])
