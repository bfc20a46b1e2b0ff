"""The feature pass of a `pool: lungs` key: the same view-0 maps as the gap key, and per augmented
view the lung-masked pooled vectors, each view's lung mask warped with that view's geometry (the
image's affine and crop: `trainable.models.lung_pool.view_cell_weights`), so a head trains on the
lungs of the view it sees.

Apart from `trainable.models.features` so that adding it changed neither that module's source nor
the gap keys' cache entries (the cache addresses an entry by the source of the modules that build it).
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from trainable.data.augment import AUGMENT_POLICIES
from trainable.data.images import view_params
from trainable.models.backbones import process_backbone
from trainable.models.features import feature_maps, inference_model
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.models.lung_pool import lung_pool, view_cell_weights


def compute_lung_features(images: np.ndarray, masks: np.ndarray, key: FeatureKey, views: dict[str, int],
                          seed: int, batch_size: int | None = None) -> FeatureSet:
    """`compute_features` for a lungs key; `masks`: bool (N, S, S) lung masks at the images' base size
    (the sweep's chosen source: the data's, the atlas or PSPNet)."""
    if masks is None or len(masks) != len(images):
        raise ValueError(f"pool: lungs needs one lung mask per image (got {None if masks is None else len(masks)} "
                         f"for {len(images)} images)")
    start = time.perf_counter()
    backbone = process_backbone(key.backbone, key.weights)
    model = inference_model(backbone, key.input_size)
    maps = feature_maps(backbone, images, key.crop_margin, key.input_size, batch_size=batch_size, model=model)
    h, w = maps.shape[2:]
    pooled0 = lung_pool(maps, view_cell_weights(masks, key.crop_margin, key.input_size, None, h, w)).numpy()
    n_images = len(images)
    pooled: dict[str, np.ndarray] = {}
    for policy, n_views in views.items():
        stack = [pooled0]
        for v in range(1, n_views if policy != "none" else 1):
            params = view_params(AUGMENT_POLICIES[policy], len(images), seed, v)
            m = feature_maps(backbone, images, key.crop_margin, key.input_size, params, batch_size, model)
            stack.append(lung_pool(m, view_cell_weights(masks, key.crop_margin, key.input_size, params, h, w)).numpy())
            n_images += len(images)
        pooled[policy] = np.stack(stack)
    pre = backbone.preprocessing
    return FeatureSet(key=key, maps=maps.numpy().astype(np.float16), pooled=pooled,
                      preprocessing={**asdict(pre), "input_size": key.input_size,
                                     "crop_margin": key.crop_margin},
                      target_layer=backbone.target_layer, weights_info=dict(backbone.weights),
                      seconds=time.perf_counter() - start, images_through_backbone=n_images)
