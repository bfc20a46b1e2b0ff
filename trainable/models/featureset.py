"""What a feature cache entry is: its key and the arrays every head-stage trial reads.

Kept apart from `trainable.models.features` (which builds backbones, and so imports timm and
torchvision) so that a trial process, which only reads feature sets, starts without those.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# how the head pools the maps: global average, or weighted by the lung mask (trainable.models.lung_pool)
POOLS = ("gap", "lungs")


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    weights: str
    crop_margin: float
    input_size: int
    pool: str = "gap"   # "lungs": `pooled` holds lung-masked means (maps are the same as gap's)

    def __str__(self) -> str:
        s = f"{self.backbone}|{self.weights}|crop={self.crop_margin:g}|{self.input_size}px"
        return s if self.pool == "gap" else f"{s}|pool={self.pool}"   # gap keys read as before

    @classmethod
    def of(cls, config: Mapping[str, Any], input_size: int) -> FeatureKey:
        """The key of a trial config (its backbone, weights, crop and pool) at the sweep's input size."""
        return cls(backbone=str(config["backbone"]), weights=str(config["weights"]),
                   crop_margin=float(config["crop_margin"]), input_size=int(input_size),
                   pool=str(config.get("pool", "gap")))


@dataclass
class FeatureSet:
    """Features of every image for one FeatureKey."""

    key: FeatureKey
    maps: np.ndarray                          # float16 (N, F, h, w): view 0, unaugmented
    pooled: dict[str, np.ndarray]             # policy -> float32 (V, N, F); [0] is view 0 for every policy
    #                                           (pool: lungs: each view's lung-masked means)
    preprocessing: dict
    target_layer: str
    weights_info: dict
    seconds: float = 0.0
    images_through_backbone: int = 0
    extra: dict = field(default_factory=dict)
