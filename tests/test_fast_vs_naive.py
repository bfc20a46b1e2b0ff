"""Same answers: the fast path (cached fp16 maps, shared by every trial) and the naive way (the
backbone inside every trial, fold and epoch: benchmarks/naive.py) give the same per-epoch metrics
and lung / edge mass for the same config and seeds."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainable.data.dataset import load_dataset
from trainable.data.phantom import synthesize
from trainable.models.featureset import FeatureKey
from trainable.prepare import prepare_local
from trainable.shared import Settings, with_defaults

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.naive import cached_epochs, naive_epochs  # noqa: E402

CONFIGS = [
    # augmented: each fold trains on a cached view that the naive way recomputes every epoch
    dict(backbone="efficientnet_lite0", hidden=32, dropout=0.3, lr=3e-3, batch_size=8, augment="light",
         crop_margin=0.08),
    dict(backbone="efficientnet_lite0", hidden=16, dropout=0.0, lr=1e-2, batch_size=16, augment="none",
         crop_margin=0.0),
]
# classification metrics see the same pooled float32 features (up to batch-composition rounding);
# Grad-CAM reads fp16 maps on the fast path and float32 maps on the naive one
EXACT = ("balanced_accuracy", "macro_f1", "accuracy", "auc")
CLOSE = {"loss": 1e-4, "train_loss": 1e-4, "objective": 5e-3}
MASS = 5e-3  # lung_mass*, edge_mass*, lung_enrichment (relative for enrichment)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("fast-vs-naive")
    manifest = synthesize(work / "data", n_patients=12, size=96, shortcut=0.9, seed=1)
    ds = load_dataset(manifest.parent, "covid_vs_rest")
    settings = Settings(folds=2, epochs=3, base_size=96, input_size=96, views=2, cache_dir="off")
    keys = {FeatureKey("efficientnet_lite0", "imagenet", c["crop_margin"], 96) for c in CONFIGS}
    return prepare_local(ds, settings, keys, ["none", "light"], progress=lambda m: None)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"augment={c['augment']}")
def test_fast_and_naive_give_the_same_per_epoch_metrics(prepared, config: dict) -> None:
    torch.set_num_threads(1)
    fast = list(cached_epochs(config, prepared))
    naive = list(naive_epochs(config, prepared))
    assert len(fast) == len(naive) == prepared.settings.epochs
    n, folds = len(prepared.labels), len(prepared.folds)
    for (f, f_states), (m, m_states) in zip(fast, naive):
        assert f["epoch"] == m["epoch"]
        # the naive way really ran the backbone over every image of every fold this epoch
        assert m["backbone_images"] == n * folds
        for key in EXACT:
            if not (math.isnan(f[key]) and math.isnan(m[key])):
                assert f[key] == pytest.approx(m[key], abs=1e-9), (m["epoch"], key)
        for key, tol in CLOSE.items():
            if key in f:
                assert f[key] == pytest.approx(m[key], abs=tol), (m["epoch"], key)
        masses = [k for k in f if k.startswith(("lung_mass", "edge_mass"))]
        assert {"lung_mass", "edge_mass", "lung_mass_covid", "edge_mass_rest"} <= set(masses)
        for key in masses:
            assert f[key] == pytest.approx(m[key], abs=MASS), (m["epoch"], key)
        assert f["lung_enrichment"] == pytest.approx(m["lung_enrichment"], rel=MASS)
        assert f["confusion"] == m["confusion"]
        assert np.allclose(f["fold_lung_mass"], m["fold_lung_mass"], atol=MASS)
    # and the heads they trained are the same heads
    for a, b in zip(fast[-1][1], naive[-1][1]):
        for (name, pa), pb in zip(a.head.state_dict().items(), b.head.state_dict().values()):
            assert torch.allclose(pa, pb, atol=5e-3), name


def test_naive_defaults_match_the_trial_defaults(prepared) -> None:
    """A config with only the searched keys means the same trial on both paths."""
    partial = {"backbone": "efficientnet_lite0", "crop_margin": 0.0, "hidden": 8}
    assert with_defaults(partial)["augment"] == "none"
    f, _ = next(cached_epochs(partial, prepared))
    m, _ = next(naive_epochs(partial, prepared))
    assert f["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    assert f["lung_mass"] == pytest.approx(m["lung_mass"], abs=MASS)
