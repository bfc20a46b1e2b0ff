"""Shared fixtures: small real files on disk, and one local Ray cluster per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
# a disk cache of their own (decoded images, features): tests neither read a user's ~/.cache/cxrtune
# nor leave entries in it; shared by the session's tests, Ray workers and `cxrtune` subprocesses
_CACHE = tempfile.mkdtemp(prefix="cxrtune-test-cache-")
os.environ.setdefault("CXRTUNE_CACHE_DIR", _CACHE)
atexit.register(shutil.rmtree, _CACHE, True)
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


ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = """
name: tiny
task: covid_vs_rest
data: {synthetic: {n_patients: 18, size: 96, shortcut: 0.9, seed: 3}}
folds: 2
holdout: 0.2        # 4 patients the search never sees; best/ and selected/ are scored on them
epochs: 2
num_samples: 4
base_size: 96
input_size: 64
views: 2
objective: {mode: weighted, metric: balanced_accuracy, w: 0.5}
asha: {grace_period: 1, reduction_factor: 2}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  augment: {choice: [none, light]}
  crop_margin: {choice: [0.0, 0.08]}
"""


def cxrtune(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, offline."""
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `cxrtune run` (4 trials, local Ray, MLflow file store + TensorBoard on), shared by
    every test that reads a finished sweep's files (~1 min on 2 cores)."""
    work = tmp_path_factory.mktemp("sweep")
    (work / "tiny.yaml").write_text(TINY_SPACE)
    proc = cxrtune("run", "--space", str(work / "tiny.yaml"), "--out", str(work / "results"), "--name", "t1",
                   "--mlflow", str(work / "mlruns"), "--tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report: " in proc.stderr
    return work / "results" / "t1"
