"""What every trial of a sweep shares: the trial config's keys, the sweep-wide settings and the
prepared arrays.

`trainable.prepare` builds a `Prepared`; trials receive it through the object store. It lives in
this small module so that unpickling it in a trial process imports numpy and ray only (not the
decoders, pandas, scikit-learn or the backbones that preparing needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainable.models.featureset import FeatureKey, FeatureSet

# search-space keys a trial understands, with their defaults
TRIAL_DEFAULTS: dict[str, object] = {
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "hidden": 256,
    "dropout": 0.2,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 32,
    "augment": "none",
    "crop_margin": 0.0,
    "class_weighted": True,
    # loss weights: none | class | group (trainable.train.balance); auto = class_weighted's (true: class)
    "balance": "auto",
    # Grad-CAM loss of the head stage (trainable.cam.loss): lambda x share of |signed evidence| outside the region
    "cam_loss": 0.0,
    "cam_loss_region": "outside_lungs",   # outside_lungs | edge (the border band outside the lungs)
    # how the head pools the backbone's maps: gap (global average) | lungs (weighted by the lung mask's
    # share of each map cell: trainable.models.lung_pool); lungs: head stage only (no ft_epochs)
    "pool": "gap",
    "oversample": False,      # minority class twice per epoch, the copy augmented (trainable.train.oversample)
    # fine-tuning stage after the head epochs (trainable.train.finetune); ft_epochs 0 = none
    "ft_epochs": 0,
    "ft_lr": 1e-5,
    "ft_blocks": "all",       # "all" or N: the last N blocks of the backbone train (finetune.backbone_blocks)
    "ft_bn": "frozen",        # "frozen": BatchNorm in eval mode, affine frozen; "train": updated
    "patience": 0,            # ft early stopping on per-fold validation loss; 0 = off (best epoch still restored)
}


def with_defaults(config: dict) -> dict:
    """`config` completed with TRIAL_DEFAULTS; an unknown key is an error."""
    unknown = set(config) - set(TRIAL_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown trial config key(s): {sorted(unknown)}")
    return {**TRIAL_DEFAULTS, **config}


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
    group_column: str = "source"  # manifest column for group-aware metrics (source, view, site, …)
    min_cell: int = 5            # (group × class) cells smaller than this are not scored
    cam_layer: str = "final"     # Grad-CAM layer for lung/edge mass: "final" (fast path) or a stage
    #                              output (trainable.cam.camlayer: the full model, every epoch)
    lung_masks: str = "auto"     # lung-mask source: auto (data's, else atlas) | data | atlas | pspnet
    cache_dir: str | None = None  # on-disk cache (trainable.cache): None = $CXRTUNE_CACHE_DIR or
    #                               ~/.cache/cxrtune; "off" = none


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
    mask_source: np.ndarray                    # per image: "data", "atlas" or "pspnet"
    groups: np.ndarray                         # per image: its value of settings.group_column
    features: dict[str, object]                # str(FeatureKey) -> ObjectRef[FeatureSet] (or FeatureSet)
    data_hash: str
    timings: dict[str, float] = field(default_factory=dict)
    images: object = None                      # ObjectRef[uint8 (N, S, S)] (or the array): for the full path
    patients: np.ndarray | None = None         # per image: its patient id (fine-tuning's inner split)
    # the lung masks at base size before any crop, bit-packed along the last axis (np.packbits):
    # the fine-tuning stage's Grad-CAM loss warps them like each augmented view it trains on
    base_masks: np.ndarray | None = None       # uint8 (N, S, ceil(S / 8))

    def feature_set(self, key: FeatureKey) -> FeatureSet:
        value = self.features[str(key)]
        import ray  # a trial has it loaded; validating a space file needs none

        return ray.get(value) if isinstance(value, ray.ObjectRef) else value

    def features_for(self, config: dict) -> FeatureSet:
        """The feature set a trial config trains on."""
        return self.feature_set(FeatureKey.of(config, self.settings.input_size))

    def image_array(self) -> np.ndarray:
        """The decoded images, read-only and zero-copy from the object store (trials that run a backbone)."""
        import ray

        return ray.get(self.images) if isinstance(self.images, ray.ObjectRef) else self.images
