"""Entry point 1 of 3 for the driver: turn a data set and the sweep's fixed settings into what
every trial shares — decoded labels, the folds, lung masks per crop, and feature sets (one per
(backbone, weights, crop, input size)) computed once, as Ray tasks, and kept in the object store.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import ray

from trainable.data import Dataset
from trainable.features import FeatureKey, FeatureSet, compute_features
from trainable.folds import patient_folds
from trainable.images import decode_images, mask_geometry
from trainable.lungs import lung_atlas


@dataclass(frozen=True)
class Settings:
    """Sweep-wide constants (not searched): every trial of a sweep uses the same ones."""

    folds: int = 3
    epochs: int = 6
    seed: int = 0
    base_size: int = 256
    input_size: int = 224
    views: int = 4               # cached augmentation views per image (view 0 = unaugmented)
    edge_band: float = 0.08      # border band width, fraction of each side of the model input
    atlas_threshold: float = 0.5
    cam_target: str = "true"     # the class Grad-CAM explains: "true", "predicted" or a class name


@dataclass
class Prepared:
    """Everything a trial needs besides its config; shipped to trials through the object store."""

    settings: Settings
    classes: tuple[str, ...]
    labels: np.ndarray
    ids: list[str]
    paths: list[str]
    folds: list[tuple[np.ndarray, np.ndarray]]
    lung_masks: dict[float, np.ndarray]        # crop margin -> bool (N, input, input)
    mask_source: np.ndarray                    # per image: "data" or "atlas"
    features: dict[str, object]                # str(FeatureKey) -> ObjectRef[FeatureSet] (or FeatureSet)
    data_hash: str
    timings: dict[str, float] = field(default_factory=dict)

    def feature_set(self, key: FeatureKey) -> FeatureSet:
        value = self.features[str(key)]
        return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _feature_task(images: np.ndarray, key: FeatureKey, views: dict[str, int], seed: int
                  ) -> tuple[dict, FeatureSet]:
    fs = compute_features(images, key, views, seed)
    summary = {"key": str(key), "images": fs.images_through_backbone, "seconds": fs.seconds,
               "maps": tuple(fs.maps.shape[1:]), "weights": fs.weights_info.get("source")}
    return summary, fs


def _shared_arrays(dataset: Dataset, settings: Settings, keys: list[FeatureKey],
                   progress: Callable[[str], None]) -> tuple[np.ndarray, dict]:
    """Decode once, split once, lung masks per crop: everything but the features."""
    folds = patient_folds(dataset.labels, dataset.patients, dataset.classes, settings.folds, settings.seed)
    t0 = time.perf_counter()
    images, masks = decode_images(dataset, settings.base_size)
    has_mask = dataset.has_masks
    if not has_mask.all():
        masks[~has_mask] = lung_atlas(settings.base_size, settings.atlas_threshold)
    t_decode = time.perf_counter() - t0
    progress(f"decoded {len(images)} images at {settings.base_size}px in {t_decode:.1f}s "
             f"({int(has_mask.sum())} with their own lung mask, the rest use the atlas)")
    lung = {m: mask_geometry(masks, m, settings.input_size) for m in sorted({k.crop_margin for k in keys})}
    fields = dict(settings=settings, classes=dataset.classes, labels=dataset.labels,
                  ids=dataset.table["id"].tolist(), paths=dataset.table["path"].tolist(), folds=folds,
                  lung_masks=lung, mask_source=np.where(has_mask, "data", "atlas"),
                  data_hash=dataset.content_hash())
    return images, fields | {"timings": {"decode_s": t_decode}}


def prepare_local(dataset: Dataset, settings: Settings, keys: Iterable[FeatureKey],
                  augment_policies: Iterable[str], progress: Callable[[str], None] = print) -> Prepared:
    """The same as `prepare_sweep`, computed in this process (no Ray): for select/export after a sweep."""
    keys = sorted(set(keys), key=str)
    images, fields = _shared_arrays(dataset, settings, keys, progress)
    views = {p: settings.views for p in sorted(set(augment_policies))}
    features = {}
    for k in keys:
        features[str(k)] = fs = compute_features(images, k, views, settings.seed)
        progress(f"  features {k}: {fs.images_through_backbone} images in {fs.seconds:.1f}s")
    return Prepared(features=features, **fields)


def prepare_sweep(dataset: Dataset, settings: Settings, keys: Iterable[FeatureKey],
                  augment_policies: Iterable[str], *, cpus: float = 1, gpus: float = 0,
                  progress: Callable[[str], None] = print) -> Prepared:
    """Decode once, split once, launch one feature task per key and wait for all of them."""
    keys = sorted(set(keys), key=str)
    images, fields = _shared_arrays(dataset, settings, keys, progress)
    views = {p: settings.views for p in sorted(set(augment_policies))}
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, num_returns=2)(_feature_task)
    images_ref = ray.put(images)
    refs: dict[str, object] = {}
    summaries = []
    for k in keys:
        summary, features = task.remote(images_ref, k, views, settings.seed)
        refs[str(k)] = features
        summaries.append(summary)
    t1 = time.perf_counter()
    progress(f"computing frozen-backbone features for {len(keys)} key(s) "
             f"({len(views)} augmentation policies, {settings.views} views each)")
    while summaries:
        done, summaries = ray.wait(summaries, num_returns=1)
        s = ray.get(done[0])  # the small summary only: the arrays stay in the object store
        progress(f"  features {s['key']}: {s['images']} images in {s['seconds']:.1f}s "
                 f"({s['images'] / max(s['seconds'], 1e-9):.0f} img/s), maps {s['maps']}, "
                 f"weights {s['weights']}")
    fields["timings"]["features_s"] = time.perf_counter() - t1
    return Prepared(features=refs, **fields)
