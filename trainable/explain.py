"""Where the evidence falls: exact Grad-CAM from cached feature maps, and lung / edge mass.

For a head on global-average-pooled features g = mean_ij A_ij, the Grad-CAM channel weight is
alpha_k = mean_ij ∂y/∂A_kij = (1/Z)·∂y/∂g_k, so CAM = ReLU(Σ_k alpha_k·A^k) needs only the cached
maps A and one backward pass through the head. The map is then post-processed exactly as
pytorch-grad-cam does (min-max per image, bilinear resize to the input), so both paths agree
(`tests/test_explain.py` checks it against the library on the full model).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gradcam_from_maps(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raw Grad-CAM (N, h, w) = ReLU(Σ_k alpha_k A^k) for class `targets[n]` of each image."""
    maps = maps.float()
    pooled = maps.mean(dim=(2, 3)).detach().requires_grad_(True)
    was_training = head.training
    head.eval()
    with torch.enable_grad():
        logits = head(pooled)
        picked = logits.gather(1, targets.view(-1, 1).long()).sum()
        (grad,) = torch.autograd.grad(picked, pooled)
    head.train(was_training)
    alpha = grad / (maps.shape[2] * maps.shape[3])
    return torch.relu(torch.einsum("nk,nkhw->nhw", alpha, maps))


def _min_max(cams: torch.Tensor) -> torch.Tensor:
    cams = cams - cams.flatten(1).min(1).values.view(-1, 1, 1)
    return cams / (1e-7 + cams.flatten(1).max(1).values.view(-1, 1, 1))


def normalise_and_resize(cams: torch.Tensor, size: int) -> torch.Tensor:
    """pytorch-grad-cam's post-processing: per-image min-max, bilinear resize to size×size, and
    min-max again (the library rescales once per layer and once after aggregating the layers)."""
    up = F.interpolate(_min_max(cams).unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return _min_max(up[:, 0])


def region_masses(cams: np.ndarray | torch.Tensor, lung_masks: np.ndarray, edge: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Share of each non-negative map on its lung mask and on the border band.

    cams: (N, S, S) at input resolution; lung_masks: bool (N, S, S); edge: bool (S, S).
    A map with no positive evidence counts as uniform (no preference for any region).
    """
    cams = torch.as_tensor(np.asarray(cams, np.float32)).clamp_min(0)
    total = cams.flatten(1).sum(1)
    flat_zero = total <= 0
    if flat_zero.any():
        cams[flat_zero] = 1.0
        total = cams.flatten(1).sum(1)
    lung = (cams * torch.from_numpy(lung_masks)).flatten(1).sum(1) / total
    edge_mass = (cams * torch.from_numpy(edge)).flatten(1).sum(1) / total
    return lung.numpy(), edge_mass.numpy()


def explanation_scores(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor,
                       lung_masks: np.ndarray, edge: np.ndarray, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (lung_mass, edge_mass) of the Grad-CAM for `targets`, batched to bound memory."""
    size = lung_masks.shape[-1]
    lung, edge_m = [], []
    for s in range(0, len(maps), batch_size):
        cam = normalise_and_resize(gradcam_from_maps(head, maps[s:s + batch_size], targets[s:s + batch_size]), size)
        lm, em = region_masses(cam.detach(), lung_masks[s:s + batch_size], edge)
        lung.append(lm)
        edge_m.append(em)
    return np.concatenate(lung), np.concatenate(edge_m)
