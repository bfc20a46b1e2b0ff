"""Where a sweep's feature pass runs: on a one-node cluster with the driver on it (the local
cluster `cxrtune run` starts) the driver computes the keys itself, one thread per CPU, instead of
starting feature workers. Both ways give the features `prepare_local` computes; a failure in a
driver thread reaches the caller; torch's thread count is what it was before."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_manifest_dataset
from trainable.data.dataset import load_dataset
from trainable.models.featureset import FeatureKey
from trainable.prepare import prepare_local, prepare_sweep
from trainable.shared import Settings

KEYS = [FeatureKey("efficientnet_lite0", "imagenet", 0.0, 64), FeatureKey("efficientnet_lite1", "imagenet", 0.08, 64)]
SETTINGS = Settings(folds=2, epochs=1, base_size=64, input_size=64, views=2, cache_dir="off")


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same features up to float16 rounding (the maps are stored as float16; the summation
    order of another thread count moves a value by one unit in its last place)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    print(f"max |difference| {np.abs(a - b).max():.2e}, max |value| {np.abs(b).max():.2f}")
    return a.shape == b.shape and np.allclose(a, b, rtol=2e-3, atol=1e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return load_dataset(write_manifest_dataset(tmp_path_factory.mktemp("fp") / "data", size=64), "covid_vs_rest")


def test_a_one_node_cluster_computes_the_features_in_the_driver(dataset, ray_local) -> None:
    threads = torch.get_num_threads()
    lines: list[str] = []
    swept = prepare_sweep(dataset, SETTINGS, KEYS, ["light"], progress=lines.append)  # where: decided here
    assert any("2 key(s) in the driver (2 thread(s))" in m for m in lines), lines
    assert torch.get_num_threads() == threads
    local = prepare_local(dataset, SETTINGS, KEYS, ["light"], progress=lambda m: None)
    for k in KEYS:
        a, b = swept.feature_set(k), local.feature_set(k)
        assert a.maps.shape == b.maps.shape and _close(a.maps, b.maps)
        assert _close(a.pooled["light"], b.pooled["light"])
        assert a.images_through_backbone == 2 * len(dataset)   # view 0 + one augmented view


def test_a_failure_in_a_driver_thread_reaches_the_caller(dataset, ray_local) -> None:
    threads = torch.get_num_threads()
    with pytest.raises(KeyError, match="no-such-policy"):
        prepare_sweep(dataset, SETTINGS, KEYS, ["no-such-policy"], progress=lambda m: None, in_driver=True)
    assert torch.get_num_threads() == threads


def test_feature_workers_compute_the_same_features(dataset, ray_local, tmp_path: Path) -> None:
    lines: list[str] = []
    remote = prepare_sweep(dataset, SETTINGS, KEYS[:1], ["none"], progress=lines.append, in_driver=False)
    assert any("on 1 worker(s)" in m for m in lines), lines
    local = prepare_local(dataset, SETTINGS, KEYS[:1], ["none"], progress=lambda m: None)
    assert _close(remote.feature_set(KEYS[0]).maps, local.feature_set(KEYS[0]).maps)
