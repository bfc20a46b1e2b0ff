"""The feature pass of a `pool: lungs` key: the same view-0 maps as the gap key, and per augmented
view the lung-masked pooled vectors, each view's lung mask warped with that view's geometry (the
image's affine and crop: `trainable.models.lung_pool.view_cell_weights`), so a head trains on the
lungs of the view it sees. The pass itself is `compute_features` with this pooling.
"""
from __future__ import annotations

import numpy as np
import torch

from trainable.models.features import compute_features
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.models.lung_pool import lung_pool, view_cell_weights


def compute_lung_features(images: np.ndarray, masks: np.ndarray, key: FeatureKey, views: dict[str, int],
                          seed: int, batch_size: int | None = None) -> FeatureSet:
    """`compute_features` for a lungs key; `masks`: bool (N, S, S) lung masks at the images' base size
    (the sweep's chosen source: the data's, the atlas or PSPNet)."""
    if masks is None or len(masks) != len(images):
        raise ValueError(f"pool: lungs needs one lung mask per image (got {None if masks is None else len(masks)} "
                         f"for {len(images)} images)")

    def pool_view(maps: torch.Tensor, params: np.ndarray | None) -> torch.Tensor:
        h, w = maps.shape[2:]
        return lung_pool(maps, view_cell_weights(masks, key.crop_margin, key.input_size, params, h, w))

    return compute_features(images, key, views, seed, batch_size, pool_view)
