"""The naive way, next to the fast path it is measured against (benchmarks/sweep_throughput.py).

`run_naive_trial` is what a plain Ray Tune function trainable does with a frozen backbone: it
builds the backbone, and in every epoch, for every fold, runs it over that fold's training images
(at the epoch's augmentation view) and validation images (unaugmented) — K × N images per
trial-epoch — then trains the K heads and scores Grad-CAM with the project's own
`trainable.trial.run_epoch`. Nothing is cached, nothing is shared between trials. The only
difference from `trainable.trial.run_trial` is where the feature maps come from, so for the same
config and seeds both give the same per-epoch metrics (up to the fast path's fp16 maps and
batch-composition rounding): `tests/test_fast_vs_naive.py`.

Both ways are also here as plain generators of (metrics, fold states) per epoch (`naive_epochs`,
`cached_epochs`) for the test and for the benchmark's in-process lower bound.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import ray
import torch
from ray import tune

from trainable.backbones import Backbone, build_backbone
from trainable.features import FeatureKey, FeatureSet, feature_maps
from trainable.images import AUGMENT_POLICIES, view_params
from trainable.prepare import Prepared
from trainable.trial import (FoldState, _save, feature_key, new_fold_state, run_epoch, train_view,
                             with_defaults)

Epochs = Iterator[tuple[dict, list[FoldState]]]


def epoch_features(backbone: Backbone, images: np.ndarray, key: FeatureKey, policy: str, n_views: int,
                   prepared: Prepared, epoch: int) -> tuple[FeatureSet, int, float]:
    """What one naive trial-epoch computes: per fold, the backbone over its training images at the
    fold's view for this epoch and over its validation images at view 0.

    Returns a FeatureSet holding exactly the entries `run_epoch` reads (float32 maps, not fp16),
    the number of images through the backbone and the seconds spent in it.
    """
    s = prepared.settings
    n = len(images)
    pooled = np.zeros((n_views, n, backbone.num_features), np.float32)
    maps: np.ndarray | None = None
    count, t0 = 0, time.perf_counter()
    for k, (tr, va) in enumerate(prepared.folds):
        v = train_view(epoch, n_views, s.seed, k)
        params = view_params(AUGMENT_POLICIES[policy], n, s.seed, v)[tr] if v else None
        train_maps = feature_maps(backbone, images[tr], key.crop_margin, key.input_size, params)
        pooled[v, tr] = train_maps.mean(dim=(2, 3)).numpy()
        val_maps = feature_maps(backbone, images[va], key.crop_margin, key.input_size)
        if maps is None:
            maps = np.zeros((n, *val_maps.shape[1:]), np.float32)
        maps[va] = val_maps.numpy()
        pooled[0, va] = val_maps.mean(dim=(2, 3)).numpy()
        count += len(tr) + len(va)
    seconds = time.perf_counter() - t0
    fs = FeatureSet(key=key, maps=maps, pooled={policy: pooled}, preprocessing={},
                    target_layer=backbone.target_layer, weights_info=dict(backbone.weights))
    return fs, count, seconds


def naive_epochs(config: dict, prepared: Prepared, images: np.ndarray | None = None) -> Epochs:
    """Per-epoch metrics of one trial computed the naive way (backbone inside every fold and epoch)."""
    config = with_defaults(config)
    images = prepared.image_array() if images is None else images
    key = feature_key(config, prepared)
    # the backbone first: building it draws from torch's global RNG, which the heads' dropout uses
    backbone = build_backbone(key.backbone, key.weights)
    n_views = 1 if config["augment"] == "none" else prepared.settings.views
    states = [new_fold_state(config, backbone.num_features, len(prepared.classes), prepared.settings.seed + k)
              for k in range(len(prepared.folds))]
    for epoch in range(prepared.settings.epochs):
        fs, count, seconds = epoch_features(backbone, images, key, config["augment"], n_views, prepared, epoch)
        metrics = run_epoch(states, config, prepared, fs, epoch)
        yield metrics | {"epoch": epoch + 1, "backbone_images": count, "backbone_s": seconds}, states


def cached_epochs(config: dict, prepared: Prepared) -> Epochs:
    """Per-epoch metrics of one trial on the cached features: `run_trial`'s loop without Ray."""
    config = with_defaults(config)
    fs = prepared.feature_set(feature_key(config, prepared))
    states = [new_fold_state(config, fs.maps.shape[1], len(prepared.classes), prepared.settings.seed + k)
              for k in range(len(prepared.folds))]
    for epoch in range(prepared.settings.epochs):
        yield run_epoch(states, config, prepared, fs, epoch) | {"epoch": epoch + 1}, states


def run_naive_trial(config: dict, prepared: Prepared, score: Callable[[dict], float],
                    epochs: int | None = None) -> None:
    """Ray Tune function trainable, the naive way: reports the same metrics (and a checkpoint of the
    heads) as `run_trial` every epoch, plus `backbone_images` / `backbone_s` of that epoch.
    `epochs` stops it early (the benchmark times a few trial-epochs and extrapolates)."""
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    history: list[dict] = []
    node = ray.get_runtime_context().get_node_id()
    for metrics, states in naive_epochs(config, prepared):
        metrics["objective"] = float(score(metrics))
        history.append({k: v for k, v in metrics.items() if not k.startswith("fold_") and k != "confusion"})
        with tempfile.TemporaryDirectory(prefix="cxrtune-naive-ckpt-") as d:
            tune.report(metrics | {"node_id": node}, checkpoint=_save(d, states, metrics["epoch"], history))
        if epochs is not None and metrics["epoch"] >= epochs:
            return
