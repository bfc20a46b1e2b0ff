"""The naive way, next to the fast path it is measured against (benchmarks/sweep_throughput.py).

`run_naive_trial` is what a plain Ray Tune function trainable does with a frozen backbone: it
builds the backbone, and in every epoch, for every fold, runs it over that fold's training images
(at the epoch's augmentation view) and validation images (unaugmented) — K × N images per
trial-epoch — then trains the K heads with the project's own `trainable.train.head_stage.run_epoch`. Its
Grad-CAM (`cam="reference"`, the default) is what such a trainable would call: pytorch-grad-cam's
`GradCAM` on the full model (backbone → pool → head) at the registry's target layer, one forward
and backward pass per validation image (`LibraryCam`); `cam="fast"` scores it from the maps this
epoch computed instead, with cxrtune's exact formula. Nothing is cached, nothing is shared between
trials. For the same config and seeds both ways give `trainable.trial.run_trial`'s per-epoch
metrics (up to the fast path's fp16 maps and batch-composition rounding; Grad-CAM agrees to
~1e-5): `tests/test_fast_vs_naive.py`.

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
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from ray import tune

from trainable.cam.explain import region_masses
from trainable.data.images import AUGMENT_POLICIES, geometry, to_model_input, view_params
from trainable.models.backbones import Backbone, build_backbone
from trainable.models.features import feature_maps, inference_batch_size, inference_model
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.models.head import Classifier
from trainable.shared import Prepared, with_defaults
from trainable.train.checkpoint import save_checkpoint
from trainable.train.head_stage import FoldState, cached_scoring, new_fold_state, run_epoch, train_view

Epochs = Iterator[tuple[dict, list[FoldState]]]


def epoch_features(backbone: Backbone, images: np.ndarray, key: FeatureKey, policy: str, n_views: int,
                   prepared: Prepared, epoch: int, model: torch.nn.Module | None = None
                   ) -> tuple[FeatureSet, int, float]:
    """What one naive trial-epoch computes: per fold, the backbone over its training images at the
    fold's view for this epoch and over its validation images at view 0.

    Returns a FeatureSet holding exactly the entries `run_epoch` reads (float32 maps, not fp16),
    the number of images through the backbone and the seconds spent in it. `model`: the
    `inference_model` the trial built once (cxrtune's feature pass, BatchNorm folded on a CPU).
    """
    model = model or inference_model(backbone, key.input_size)
    s = prepared.settings
    n = len(images)
    pooled = np.zeros((n_views, n, backbone.num_features), np.float32)
    maps: np.ndarray | None = None
    count, t0 = 0, time.perf_counter()
    for k, (tr, va) in enumerate(prepared.folds):
        v = train_view(epoch, n_views, s.seed, k)
        params = view_params(AUGMENT_POLICIES[policy], n, s.seed, v)[tr] if v else None
        train_maps = feature_maps(backbone, images[tr], key.crop_margin, key.input_size, params, model=model)
        pooled[v, tr] = train_maps.mean(dim=(2, 3)).numpy()
        val_maps = feature_maps(backbone, images[va], key.crop_margin, key.input_size, model=model)
        if maps is None:
            maps = np.zeros((n, *val_maps.shape[1:]), np.float32)
        maps[va] = val_maps.numpy()
        pooled[0, va] = val_maps.mean(dim=(2, 3)).numpy()
        count += len(tr) + len(va)
    seconds = time.perf_counter() - t0
    fs = FeatureSet(key=key, maps=maps, pooled={policy: pooled}, preprocessing={},
                    target_layer=backbone.target_layer, weights_info=dict(backbone.weights))
    return fs, count, seconds


class LibraryCam:
    """Lung / edge mass of pytorch-grad-cam's GradCAM on the full model, for `run_epoch(cam=…)`."""

    def __init__(self, backbone: Backbone, key: FeatureKey, batch_size: int | None = None) -> None:
        # the batch size cxrtune's own backbone passes use (a plain trainable would pass its own)
        self.backbone, self.key, self.batch_size = backbone, key, batch_size or inference_batch_size()
        self.layer = backbone.model.get_submodule(backbone.target_layer)
        self.images = 0  # validation images explained (each a forward and a backward pass)
        with torch.no_grad():  # the map grid the masses come from (focus is relative to it)
            probe = torch.zeros(1, backbone.preprocessing.in_chans, key.input_size, key.input_size)
            self.grid = tuple(backbone.model(probe).shape[2:])

    def masses(self, head: torch.nn.Module, images: np.ndarray, targets: torch.Tensor, lung_masks: np.ndarray,
               edge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pre = self.backbone.preprocessing
        model = Classifier(self.backbone.model, head)
        was_training = head.training
        model.eval()
        lung, edge_m = [], []
        try:
            with GradCAM(model=model, target_layers=[self.layer]) as cam:
                for s in range(0, len(images), self.batch_size):
                    x = to_model_input(geometry(images[s:s + self.batch_size], self.key.crop_margin,
                                                self.key.input_size), pre.in_chans, pre.mean, pre.std)
                    maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t))
                                                        for t in targets[s:s + self.batch_size]])
                    lm, em = region_masses(maps, lung_masks[s:s + self.batch_size], edge)
                    lung.append(lm)
                    edge_m.append(em)
        finally:
            head.train(was_training)
        self.images += len(images)
        return np.concatenate(lung), np.concatenate(edge_m)


def naive_epochs(config: dict, prepared: Prepared, images: np.ndarray | None = None,
                 cam: str = "reference") -> Epochs:
    """Per-epoch metrics of one trial computed the naive way (backbone inside every fold and epoch).

    `cam`: "reference" (pytorch-grad-cam on the full model, as a plain trainable would) or "fast"
    (cxrtune's exact formula on the maps this epoch computed)."""
    if cam not in ("reference", "fast"):
        raise ValueError(f"cam must be 'reference' or 'fast' (got {cam!r})")
    config = with_defaults(config)
    images = prepared.image_array() if images is None else images
    key = FeatureKey.of(config, prepared.settings.input_size)
    # the backbone first: building it draws from torch's global RNG, which the heads' dropout uses
    backbone = build_backbone(key.backbone, key.weights)
    library = LibraryCam(backbone, key) if cam == "reference" else None
    n_views = 1 if config["augment"] == "none" else prepared.settings.views
    states = [new_fold_state(config, backbone.num_features, len(prepared.classes), prepared.settings.seed + k)
              for k in range(len(prepared.folds))]
    model = inference_model(backbone, key.input_size)  # once per trial, as cxrtune's feature task does
    for epoch in range(prepared.settings.epochs):
        fs, count, seconds = epoch_features(backbone, images, key, config["augment"], n_views, prepared, epoch,
                                            model)
        t0 = time.perf_counter()
        metrics = run_epoch(states, config, prepared, fs, epoch, library)
        yield metrics | {"epoch": epoch + 1, "backbone_images": count, "backbone_s": seconds,
                         "heads_and_cam_s": time.perf_counter() - t0}, states


def cached_epochs(config: dict, prepared: Prepared) -> Epochs:
    """Per-epoch metrics of one trial on the cached features: `run_trial`'s loop without Ray."""
    config = with_defaults(config)
    fs = prepared.features_for(config)
    states = [new_fold_state(config, fs.maps.shape[1], len(prepared.classes), prepared.settings.seed + k)
              for k in range(len(prepared.folds))]
    scoring = cached_scoring(config, prepared, fs)
    for epoch in range(prepared.settings.epochs):
        yield run_epoch(states, config, prepared, fs, epoch, scoring=scoring) | {"epoch": epoch + 1}, states


def run_naive_trial(config: dict, prepared: Prepared, score: Callable[[dict], float],
                    epochs: int | None = None, cam: str = "reference") -> None:
    """Ray Tune function trainable, the naive way: reports the same metrics (and a checkpoint of the
    heads) as `run_trial` every epoch, plus `backbone_images` / `backbone_s` of that epoch.
    `epochs` stops it early (the benchmark times a few trial-epochs and extrapolates)."""
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    history: list[dict] = []
    node = ray.get_runtime_context().get_node_id()
    for metrics, states in naive_epochs(config, prepared, cam=cam):
        metrics["objective"] = float(score(metrics))
        history.append({k: v for k, v in metrics.items() if not k.startswith("fold_") and k != "confusion"})
        with tempfile.TemporaryDirectory(prefix="cxrtune-naive-ckpt-") as d:
            tune.report(metrics | {"node_id": node}, checkpoint=save_checkpoint(d, states, metrics["epoch"], history))
        if epochs is not None and metrics["epoch"] >= epochs:
            return
