"""Shared fixtures: small real files on disk, and one local Ray cluster per test session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real"


def write_manifest_dataset(root: Path, n_patients: int = 8, per_patient: int = 2, size: int = 32,
                           labels: tuple[str, ...] = ("normal", "covid"), masks: bool = True) -> Path:
    """A tiny data set in the manifest format: random images, a square 'lung' mask each."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for p in range(n_patients):
        label = labels[p % len(labels)]
        for j in range(per_patient):
            i = len(rows)
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / f"images/{i}.png")
            mask = np.zeros((size, size), np.uint8)
            mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
            Image.fromarray(mask).save(root / f"masks/{i}.png")
            rows.append({"id": f"img{i}", "path": f"images/{i}.png", "label": label, "finding": label,
                         "patient_id": f"p{p}", "source": "test", "view": "PA",
                         "mask_path": f"masks/{i}.png" if masks else "", "license": "", "original_name": ""})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_manifest_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
