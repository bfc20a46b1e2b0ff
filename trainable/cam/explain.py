"""Where the evidence falls: exact Grad-CAM from cached feature maps, lung / edge mass, and focus.

For a head on global-average-pooled features g = mean_ij A_ij, the Grad-CAM channel weight is
alpha_k = mean_ij ∂y/∂A_kij = (1/Z)·∂y/∂g_k, so CAM = ReLU(Σ_k alpha_k·A^k) needs only the cached
maps A and one backward pass through the head. The same holds for lung-masked pooling
g = Σ w A / Σ w (`pool: lungs`, `trainable.models.lung_pool`): mean_ij ∂y/∂A_kij = (1/Z)·∂y/∂g_k,
with ∂y/∂g taken at the lung-pooled g (pass it as `pooled`). The map is then post-processed exactly as
pytorch-grad-cam does (min-max per image, bilinear resize to the input), so both paths agree
(`tests/test_explain.py` checks it against the library on the full model).

Masses: `lung_mass` is the map's share on the image's lung mask, `edge_mass` its share on the
border band *outside the lungs* (the band and the lungs are disjoint, so no pixel counts twice).

`focus` is the explanation score the objective uses. Raw masses reward things other than focus:
a crop makes the lungs a larger share of the input (a uniform map gains lung mass), and a coarse
map grid cannot put its mass on the lungs however well it looks (the lung mask itself, averaged
down to 5×5, scores lung 0.65 / edge 0.11; at 14×14, 0.87 / 0.01). So each fold's
lung − edge is placed between two references computed for the same images, crop and grid:
the uniform map (what chance puts on the lungs and the edge: 0) and the lung mask averaged down
to the map grid (the most lung-shaped map the grid can draw: 1):

    focus = (Δ − Δ_uniform) / (Δ_mask − Δ_uniform),   Δ = mean(lung_mass − edge_mass)

0 means no more lung-vs-edge evidence than a uniform map, 1 as much as the grid allows; negative
values mean more evidence on the edge band than chance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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
    """Share of each non-negative map on its lung mask and on the border band outside the lungs.

    cams: (N, S, S) at input resolution; lung_masks: bool (N, S, S); edge: bool (S, S).
    A map with no positive evidence counts as uniform (no preference for any region).
    """
    cams = torch.as_tensor(np.asarray(cams, np.float32)).clamp_min(0)
    total = cams.flatten(1).sum(1)
    flat_zero = total <= 0
    if flat_zero.any():
        cams[flat_zero] = 1.0
        total = cams.flatten(1).sum(1)
    lung_t = torch.from_numpy(np.asarray(lung_masks, bool))
    lung = (cams * lung_t).flatten(1).sum(1) / total
    edge_mass = (cams * (torch.from_numpy(np.asarray(edge, bool)) & ~lung_t)).flatten(1).sum(1) / total
    return lung.numpy(), edge_mass.numpy()


@dataclass
class FocusReference:
    """Per image, lung − edge mass of the two reference maps of `focus`: the uniform map
    (`uniform`) and the lung mask averaged down to the map grid (`mask`); and the share of the
    input the lung mask covers (`lung_share`: lung_enrichment is lung_mass over it)."""

    uniform: np.ndarray
    mask: np.ndarray
    lung_share: np.ndarray


def focus_reference(lung_masks: np.ndarray, edge: np.ndarray, h: int, w: int, batch_size: int = 64
                    ) -> FocusReference:
    """The references of `focus` for these images' masks at an h×w map grid (once per trial)."""
    uniform, mask, share = [], [], []
    edge_t = np.asarray(edge, bool)
    for s in range(0, len(lung_masks), batch_size):
        m = np.asarray(lung_masks[s:s + batch_size], bool)
        share.append(m.mean(axis=(1, 2)))
        uniform.append(share[-1] - (edge_t & ~m).mean(axis=(1, 2)))
        shaped = F.adaptive_avg_pool2d(torch.from_numpy(m.astype(np.float32)).unsqueeze(1), (h, w))[:, 0]
        lm, em = region_masses(normalise_and_resize(shaped, m.shape[-1]), m, edge_t)
        mask.append(lm - em)
    return FocusReference(*(np.concatenate(a) if a else np.zeros(0) for a in (uniform, mask, share)))


def focus(lung_mass: np.ndarray, edge_mass: np.ndarray, ref: FocusReference, rows: np.ndarray | None = None) -> float:
    """Chance-corrected, grid-normalised lung-vs-edge focus of a set of images (see the module doc)."""
    uniform = ref.uniform if rows is None else ref.uniform[rows]
    mask = ref.mask if rows is None else ref.mask[rows]
    base = float(uniform.mean())
    return float((np.mean(lung_mass - edge_mass) - base) / max(float(mask.mean()) - base, 1e-6))


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
        self.ones_w = torch.outer(self.bh.sum(0), self.bw.sum(0))  # Bᵀ·1·B: weights of the whole resized map
        lung_w, area, edge_w, edge_area = [], [], [], []
        for s in range(0, len(lung_masks), batch_size):
            m = torch.from_numpy(np.asarray(lung_masks[s:s + batch_size], np.float32))
            band = edge_t * (1 - m)  # the border band outside each image's lungs
            lung_w.append(self.bh.T @ m @ self.bw)  # (n, h, w)
            edge_w.append(self.bh.T @ band @ self.bw)
            area.append(m.flatten(1).sum(1))
            edge_area.append(band.flatten(1).sum(1))
        self.lung_w = torch.cat(lung_w) if lung_w else torch.zeros(0, h, w)
        self.edge_w = torch.cat(edge_w) if edge_w else torch.zeros(0, h, w)
        self.lung_area = torch.cat(area) if area else torch.zeros(0)
        self.edge_area = torch.cat(edge_area) if edge_area else torch.zeros(0)
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
            r = rows_t[sl]
            lung_w, area, edge_w, edge_area = self.lung_w[r], self.lung_area[r], self.edge_w[r], self.edge_area[r]
            # Σ over a region of the twice-normalised map = (Σ region·up − lo·area) / span
            total = ((cam * self.ones_w).flatten(1).sum(1) - lo * self.size * self.size) / span
            in_lung = ((cam * lung_w).flatten(1).sum(1) - lo * area) / span
            in_edge = ((cam * edge_w).flatten(1).sum(1) - lo * edge_area) / span
            flat = total <= 0  # no positive evidence: counts as uniform, as in region_masses
            pixels = self.size * self.size
            lm = torch.where(flat, area / pixels, in_lung / total.clamp_min(1e-30))
            em = torch.where(flat, edge_area / pixels, in_edge / total.clamp_min(1e-30))
            lung.append(lm.numpy())
            edge_m.append(em.numpy())
        return np.concatenate(lung), np.concatenate(edge_m)


def explanation_scores(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor,
                       lung_masks: np.ndarray, edge: np.ndarray, batch_size: int = 256,
                       pooled: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (lung_mass, edge_mass) of the Grad-CAM for `targets` (`GridScorer`, built for
    these images' masks). `pooled`: the head's input when it is not the maps' mean (`pool: lungs`)."""
    return GridScorer(lung_masks, edge, maps.shape[2], maps.shape[3], batch_size).scores(
        head, maps, targets, pooled=pooled)
