"""Lung-masked pooling (`pool: lungs`): the head sees only evidence inside the lungs.

    g_k = Σ_ij w_ij A_kij / Σ_ij w_ij

where w_ij is the fraction of map cell ij inside the image's lung mask (the mask at the model
input averaged down to the map grid, as `trainable.cam.loss.region_weights` does). A mask with no
lung at all (Σ w = 0) falls back to uniform weights: global average pooling for that image.

Grad-CAM stays exact with the fast formula: ∂y/∂A_kij = ∂y/∂g_k · w_ij / Σw, so
pytorch-grad-cam's α_k = mean_ij ∂y/∂A_kij = (1/(h·w))·∂y/∂g_k, the same formula as for GAP
(`trainable.cam.explain.gradcam_from_maps`), with g the lung-pooled vector.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainable.data.images import apply_affine, crop_resize
from trainable.models.head import Classifier, Head


def cell_weights(masks: np.ndarray | torch.Tensor, h: int, w: int) -> torch.Tensor:
    """float32 (N, h, w): per map cell the fraction inside each mask (bool/float (N, H, W) at the input)."""
    m = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks).float()
    if tuple(m.shape[-2:]) == (h, w):
        return m
    return F.adaptive_avg_pool2d(m.unsqueeze(1), (h, w))[:, 0]


def lung_pool(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K): the w-weighted spatial mean of maps (N, K, h, w); weights (N, h, w) or (h, w).
    An image whose weights sum to 0 (no lung in its mask) is pooled uniformly."""
    wt = weights.to(maps.dtype)
    if wt.dim() == 2:
        wt = wt.expand(maps.shape[0], -1, -1)
    total = wt.flatten(1).sum(1)
    wt = torch.where((total > 0).view(-1, 1, 1), wt, torch.ones_like(wt))
    return torch.einsum("nkhw,nhw->nk", maps, wt) / wt.flatten(1).sum(1, keepdim=True)


def view_cell_weights(masks: np.ndarray, margin: float, input_size: int, params: np.ndarray | None,
                      h: int, w: int, batch_size: int = 256) -> torch.Tensor:
    """(N, h, w) cell weights of base-size bool masks (N, S, S) through one view's geometry: the same
    affine as the image (`trainable.data.images.geometry`), the crop, threshold 0.5 at the input
    (as `mask_geometry`), then averaged down to the map grid."""
    out = []
    for s in range(0, len(masks), batch_size):  # batches: a float copy of every mask at once is N·S²·4 bytes
        x = torch.from_numpy(np.asarray(masks[s:s + batch_size], np.float32)).unsqueeze(1)
        if params is not None:
            x = apply_affine(x, params[s:s + batch_size])
        out.append(cell_weights(crop_resize(x, margin, input_size)[:, 0] >= 0.5, h, w))
    return torch.cat(out) if out else torch.zeros(0, h, w)


class LungPoolClassifier(Classifier):
    """Backbone maps → lung-masked pooling → Head. `lung` (h, w): the default weights (the atlas lung
    region aligned to the crop, a buffer saved in model.pt); forward(x, lung) takes a per-image mask
    instead: bool/float (N, H, W) at the model input, or cell weights (N, h, w)."""

    def __init__(self, backbone: nn.Module, head: Head, lung: torch.Tensor) -> None:
        super().__init__(backbone, head)
        self.register_buffer("lung", torch.as_tensor(lung, dtype=torch.float32).clone())

    def pool(self, maps: torch.Tensor, lung: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        h, w = maps.shape[2:]
        weights = self.lung if lung is None else cell_weights(lung, h, w).to(maps.device)
        if tuple(weights.shape[-2:]) != (h, w):
            raise ValueError(f"lung weights are {tuple(weights.shape[-2:])} but the maps are {h}x{w}")
        return lung_pool(maps, weights)

    def forward(self, x: torch.Tensor, lung: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pool(self.backbone(x), lung))


def atlas_cell_weights(base_size: int, atlas_threshold: float, margin: float, input_size: int,
                       h: int, w: int) -> torch.Tensor:
    """(h, w): the atlas lung region (`trainable.data.lungs.lung_atlas`) through a trial's crop, as
    cell weights: the default mask of an exported `pool: lungs` model."""
    from trainable.data.lungs import lung_atlas

    atlas = lung_atlas(base_size, atlas_threshold)[None]
    return view_cell_weights(atlas, margin, input_size, None, h, w)[0]


def pooled_classifier(pool: str, backbone: nn.Module, head: Head, lung: torch.Tensor | None = None) -> Classifier:
    """The exported model of a `pool` ("gap" | "lungs"); `lung` (h, w): a lungs model's default weights."""
    if pool == "gap":
        return Classifier(backbone, head)
    if pool != "lungs" or lung is None:
        raise ValueError(f"pool {pool!r}: expected 'gap', or 'lungs' with its (h, w) lung weights")
    return LungPoolClassifier(backbone, head, lung)
