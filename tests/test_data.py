"""Data loading: a valid manifest loads; every broken rule is a DataError naming file and rule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import write_manifest_dataset
from trainable.data.dataset import load_dataset
from trainable.data.images import decode_images
from trainable.errors import DataError


def test_manifest_loads_with_absolute_paths_and_task_labels(tiny_dataset: Path) -> None:
    ds = load_dataset(tiny_dataset, "covid_vs_rest")
    assert ds.classes == ("rest", "covid")
    assert len(ds) == 16 and set(ds.labels.tolist()) == {0, 1}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in ds.table["path"])
    assert ds.has_masks.all()
    images, masks = decode_images(ds, 24)
    assert images.shape == (16, 24, 24) and images.dtype == np.uint8
    assert masks[0, 12, 12] and not masks[0, 0, 0]


def test_class_folders_load(tmp_path: Path) -> None:
    for cls in ("normal", "covid"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(tmp_path, "labels")
    assert ds.classes == ("covid", "normal") and len(ds) == 6


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nonexistent.*does not exist"):
        load_dataset(tmp_path / "nonexistent")


def _edit_manifest(root: Path, **changes) -> None:
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    for (col, row), value in changes.get("cells", {}).items():
        df.loc[row, col] = value
    for col in changes.get("drop", []):
        df = df.drop(columns=col)
    df.to_csv(root / "manifest.csv", index=False)


def test_unknown_label_names_row_and_allowed_labels(tiny_dataset: Path) -> None:
    _edit_manifest(tiny_dataset, cells={("label", 3): "covdi"})
    with pytest.raises(DataError, match=r"manifest.csv: row 5: label 'covdi' is not one of"):
        load_dataset(tiny_dataset, "covid_vs_rest")


def test_missing_image_file_is_named(tiny_dataset: Path) -> None:
    (tiny_dataset / "images" / "2.png").unlink()
    with pytest.raises(DataError, match=r"row 4: path .*images/2.png does not exist"):
        load_dataset(tiny_dataset)


def test_missing_column_is_named(tiny_dataset: Path) -> None:
    _edit_manifest(tiny_dataset, drop=["patient_id"])
    with pytest.raises(DataError, match="missing required column.*patient_id"):
        load_dataset(tiny_dataset)


def test_corrupt_and_fake_images_are_named(tiny_dataset: Path) -> None:
    (tiny_dataset / "images" / "1.png").write_text("this is text, not a PNG")
    ds = load_dataset(tiny_dataset)
    with pytest.raises(DataError, match=r"cannot read image .*images/1.png"):
        decode_images(ds, 16)
    good = (tiny_dataset / "images" / "0.png").read_bytes()
    (tiny_dataset / "images" / "1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(DataError, match=r"cannot read image .*images/1.png"):
        decode_images(ds, 16)


def test_mask_of_wrong_size_is_named(tiny_dataset: Path) -> None:
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tiny_dataset / "masks" / "5.png")
    with pytest.raises(DataError, match=r"mask .*masks/5.png is 12x10 but its image .* is 32x32"):
        decode_images(load_dataset(tiny_dataset), 16)


def test_single_class_is_rejected(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d", labels=("normal",))
    with pytest.raises(DataError, match="only class"):
        load_dataset(root, "three_class")
