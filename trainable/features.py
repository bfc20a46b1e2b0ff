"""Frozen-backbone features: the fast path every head-stage trial reads.

With the backbone frozen, its last feature maps depend only on (backbone, weights, input size,
crop, augmentation view, image). One pass computes them; every trial of the sweep trains its
head on the pooled vectors and scores Grad-CAM exactly from the view-0 maps (`trainable.explain`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from trainable.backbones import Backbone, build_backbone
from trainable.images import AUGMENT_POLICIES, geometry, to_model_input, view_params


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    weights: str
    crop_margin: float
    input_size: int

    def __str__(self) -> str:
        return f"{self.backbone}|{self.weights}|crop={self.crop_margin:g}|{self.input_size}px"


@dataclass
class FeatureSet:
    """Features of every image for one FeatureKey."""

    key: FeatureKey
    maps: np.ndarray                          # float16 (N, F, h, w): view 0, unaugmented
    pooled: dict[str, np.ndarray]             # policy -> float32 (V, N, F); [0] is view 0 for every policy
    preprocessing: dict
    target_layer: str
    weights_info: dict
    seconds: float = 0.0
    images_through_backbone: int = 0
    extra: dict = field(default_factory=dict)


def feature_maps(backbone: Backbone, images: np.ndarray, margin: float, input_size: int,
                 params: np.ndarray | None = None, batch_size: int = 32) -> torch.Tensor:
    """Last feature maps (N, F, h, w) float32 (on the CPU) of uint8 images (N, S, S) through the
    frozen backbone. On a GPU (a task given `gpus_per_trial` > 0 sees one) the forward pass runs
    on CUDA under float16 autocast; otherwise on the CPU in float32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        # converted outside inference mode: parameters made there could never take part in
        # autograd again, and the same backbone may be fine-tuned or explained afterwards
        model = backbone.model.eval().to(device=device, memory_format=torch.channels_last)
    with torch.inference_mode():
        return _forward(model, backbone, images, margin, input_size, params, batch_size, device)


def _forward(model: torch.nn.Module, backbone: Backbone, images: np.ndarray, margin: float, input_size: int,
             params: np.ndarray | None, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x = geometry(images[sl], margin, input_size, None if params is None else params[sl])
        pre = backbone.preprocessing
        x = to_model_input(x, pre.in_chans, pre.mean, pre.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out.append(model(x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def compute_features(images: np.ndarray, key: FeatureKey, views: dict[str, int], seed: int,
                     batch_size: int = 32) -> FeatureSet:
    """View-0 maps plus pooled vectors of `views[policy]` views for each augmentation policy."""
    start = time.perf_counter()
    backbone = build_backbone(key.backbone, key.weights)
    maps = feature_maps(backbone, images, key.crop_margin, key.input_size, batch_size=batch_size)
    pooled0 = maps.mean(dim=(2, 3)).numpy()
    n_images = len(images)
    pooled: dict[str, np.ndarray] = {}
    for policy, n_views in views.items():
        stack = [pooled0]
        for v in range(1, n_views if policy != "none" else 1):
            params = view_params(AUGMENT_POLICIES[policy], len(images), seed, v)
            stack.append(feature_maps(backbone, images, key.crop_margin, key.input_size, params,
                                      batch_size).mean(dim=(2, 3)).numpy())
            n_images += len(images)
        pooled[policy] = np.stack(stack)
    pre = backbone.preprocessing
    return FeatureSet(key=key, maps=maps.numpy().astype(np.float16), pooled=pooled,
                      preprocessing={**asdict(pre), "input_size": key.input_size,
                                     "crop_margin": key.crop_margin},
                      target_layer=backbone.target_layer, weights_info=dict(backbone.weights),
                      seconds=time.perf_counter() - start, images_through_backbone=n_images)
