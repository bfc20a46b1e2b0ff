"""Minority oversampling (trainable.train.oversample), its space check, and the covid_vs_viral task."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from search.space import SpaceError, load_space
from trainable.data.dataset import load_dataset
from trainable.errors import DataError
from trainable.train.oversample import minority_class, oversampled_indices, oversampled_rows


def test_minority_is_doubled_in_a_head_epoch_from_another_view() -> None:
    y = np.array([0] * 10 + [1] * 4)
    tr = np.arange(len(y))
    rows, views = oversampled_rows(tr, y, view=2, n_views=4, epoch=0, seed=0, fold=0)
    assert minority_class(y) == 1
    assert np.bincount(y[rows]).tolist() == [10, 8]          # minority twice, majority once
    extra = views[len(tr):]
    assert len(extra) == 4 and (extra != 2).all() and set(extra) <= {0, 1, 3}
    assert (views[:len(tr)] == 2).all()
    rows_ft, copy = oversampled_indices(tr, y)
    assert np.bincount(y[rows_ft]).tolist() == [10, 8] and copy.sum() == 4


def test_oversampling_needs_augmentation_views(tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("space: {augment: none, oversample: true}\n")
    with pytest.raises(SpaceError, match="oversample.*augment"):
        load_space(space)
    space.write_text("views: 1\nspace: {augment: light, oversample: true}\n")
    with pytest.raises(SpaceError, match="views >= 2"):
        load_space(space)
    space.write_text("num_samples: 1\nspace: {augment: light, oversample: true, class_weighted: true}\n")
    assert load_space(space).space["oversample"] is True


def _manifest(root: Path, rows: list[tuple[str, str]]) -> Path:
    (root / "images").mkdir(parents=True)
    out = []
    for i, (label, finding) in enumerate(rows):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(root / f"images/{i}.png")
        out.append({"id": f"i{i}", "path": f"images/{i}.png", "label": label, "finding": finding,
                    "patient_id": f"p{i}", "source": "t", "view": "PA", "mask_path": ""})
    pd.DataFrame(out).to_csv(root / "manifest.csv", index=False)
    return root


def test_covid_vs_viral_maps_findings_and_drops_the_rest(tmp_path: Path) -> None:
    root = _manifest(tmp_path / "d", [("covid", "covid"), ("covid", "covid"), ("pneumonia", "viral"),
                                      ("pneumonia", "sars"), ("pneumonia", "bacterial"), ("normal", "normal"),
                                      ("pneumonia", "streptococcus")])
    ds = load_dataset(root, "covid_vs_viral")
    assert ds.classes == ("viral", "covid")
    assert dict(zip(ds.table["id"], ds.labels.tolist())) == {"i0": 1, "i1": 1, "i2": 0, "i3": 0}
    assert "dropped 3" in ds.notes[0]


def test_covid_vs_viral_errors_name_the_problem(tmp_path: Path) -> None:
    root = _manifest(tmp_path / "a", [("covid", "covid"), ("pneumonia", "bacterial"), ("normal", "normal")])
    with pytest.raises(DataError, match="no viral finding.*bacterial"):
        load_dataset(root, "covid_vs_viral")
    root = _manifest(tmp_path / "b", [("covid", ""), ("pneumonia", "")])
    with pytest.raises(DataError, match="needs a `finding` column"):
        load_dataset(root, "covid_vs_viral")
