"""Where the evidence falls: exact Grad-CAM from cached feature maps, and lung / edge mass.

For a head on global-average-pooled features g = mean_ij A_ij, the Grad-CAM channel weight is
alpha_k = mean_ij ∂y/∂A_kij = (1/Z)·∂y/∂g_k, so CAM = ReLU(Σ_k alpha_k·A^k) needs only the cached
maps A and one backward pass through the head. The map is then post-processed exactly as
pytorch-grad-cam does (min-max per image, bilinear resize to the input), so both paths agree
(`tests/test_explain.py` checks it against the library on the full model).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def edge_band(size: int, band: float) -> np.ndarray:
    """Bool (size, size): pixels within `band` × size of any border of the model's input."""
    width = max(1, int(math.ceil(size * band))) if band > 0 else 0
    m = np.zeros((size, size), bool)
    if width:
        m[:width, :] = m[-width:, :] = m[:, :width] = m[:, -width:] = True
    return m


def gradcam_from_maps(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor,
                      pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Raw Grad-CAM (N, h, w) = ReLU(Σ_k alpha_k A^k) for class `targets[n]` of each image.

    `pooled`: the maps' spatial means when the caller has them already (the feature cache does)."""
    maps = maps.float()
    pooled = (maps.mean(dim=(2, 3)) if pooled is None else pooled.float()).detach().requires_grad_(True)
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


@lru_cache(maxsize=16)
def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): `F.interpolate(mode="bilinear", align_corners=False)` along one axis, as a matrix."""
    eye = torch.eye(n_in).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


@lru_cache(maxsize=16)
def _extreme_rows(n_in: int, n_out: int) -> torch.Tensor:
    """Rows of the interpolation matrix that hold the extremes of every interpolated map.

    Between two grid lines the interpolant is linear in the row's weight, so over a run of rows that
    mix the same two grid rows its min and max lie on the run's first or last row."""
    support = [tuple(torch.nonzero(row).flatten().tolist()) for row in bilinear_matrix(n_in, n_out)]
    keep = [i for i in range(len(support))
            if i == 0 or i == len(support) - 1 or support[i] != support[i - 1] or support[i] != support[i + 1]]
    return torch.tensor(keep)


class GridScorer:
    """Lung / edge mass of Grad-CAMs on an h×w grid, for a fixed set of images' lung masks.

    The same numbers as `region_masses(normalise_and_resize(cam, S), …)`, without building the S×S
    maps: resizing is linear (up = B·c·Bᵀ), so a mask's sum over the resized map is the h×w map
    weighted by Bᵀ·mask·B, and the min and max that the second min-max needs lie on a few rows and
    columns of it (`_extreme_rows`). At 224 px and a 7×7 grid that is ~20× less work per image
    (tests/test_region_masses.py checks both ways agree). The per-image mask weights are computed
    once here, so a trial that scores the same images every epoch pays for them once.
    """

    def __init__(self, lung_masks: np.ndarray, edge: np.ndarray, h: int, w: int, batch_size: int = 256) -> None:
        size = lung_masks.shape[-1]
        self.size, self.batch_size = size, batch_size
        self.bh, self.bw = bilinear_matrix(h, size), bilinear_matrix(w, size)
        self.rh, self.rw = _extreme_rows(h, size), _extreme_rows(w, size)
        edge_t = torch.from_numpy(np.asarray(edge, np.float32))
        self.edge_w = self.bh.T @ edge_t @ self.bw  # (h, w)
        self.edge_area, self.edge_share = edge_t.sum(), edge_t.mean()
        self.ones_w = torch.outer(self.bh.sum(0), self.bw.sum(0))  # Bᵀ·1·B: weights of the whole resized map
        lung_w, area = [], []
        for s in range(0, len(lung_masks), batch_size):
            m = torch.from_numpy(np.asarray(lung_masks[s:s + batch_size], np.float32))
            lung_w.append(self.bh.T @ m @ self.bw)  # (n, h, w)
            area.append(m.flatten(1).sum(1))
        self.lung_w = torch.cat(lung_w) if lung_w else torch.zeros(0, h, w)
        self.lung_area = torch.cat(area) if area else torch.zeros(0)
        self.lung_share = self.lung_area.double().numpy() / (size * size)  # per image: the masks' cover

    def scores(self, head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor,
               rows: np.ndarray | None = None, pooled: torch.Tensor | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (lung_mass, edge_mass) of the Grad-CAM for `targets`; `maps[i]` is image
        `rows[i]` of the masks given to the constructor (all of them, in order, when None)."""
        rows_t = torch.arange(len(maps)) if rows is None else torch.as_tensor(rows)
        lung, edge_m = [], []
        for s in range(0, len(maps), self.batch_size):
            sl = slice(s, s + self.batch_size)
            cam = _min_max(gradcam_from_maps(head, maps[sl], targets[sl],
                                             None if pooled is None else pooled[sl])).detach()
            sub = self.bh[self.rh] @ cam @ self.bw[self.rw].T  # the resized maps' rows and columns that hold their extremes
            lo = sub.flatten(1).min(1).values
            span = 1e-7 + (sub.flatten(1).max(1).values - lo)
            lung_w, area = self.lung_w[rows_t[sl]], self.lung_area[rows_t[sl]]
            # Σ over a region of the twice-normalised map = (Σ region·up − lo·area) / span
            total = ((cam * self.ones_w).flatten(1).sum(1) - lo * self.size * self.size) / span
            in_lung = ((cam * lung_w).flatten(1).sum(1) - lo * area) / span
            in_edge = ((cam * self.edge_w).flatten(1).sum(1) - lo * self.edge_area) / span
            flat = total <= 0  # no positive evidence: counts as uniform, as in region_masses
            lm = torch.where(flat, area / (self.size * self.size), in_lung / total.clamp_min(1e-30))
            em = torch.where(flat, self.edge_share.expand_as(total), in_edge / total.clamp_min(1e-30))
            lung.append(lm.numpy())
            edge_m.append(em.numpy())
        return np.concatenate(lung), np.concatenate(edge_m)


def explanation_scores(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor,
                       lung_masks: np.ndarray, edge: np.ndarray, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (lung_mass, edge_mass) of the Grad-CAM for `targets` (`GridScorer`, built for
    these images' masks)."""
    return GridScorer(lung_masks, edge, maps.shape[2], maps.shape[3], batch_size).scores(head, maps, targets)
