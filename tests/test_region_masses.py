"""The per-epoch lung/edge mass (trainable.cam.explain.explanation_scores) works on the h×w Grad-CAM grid
without building S×S maps; it must give the numbers of the full-resolution path that `cxrtune
explain` and the montages use (normalise_and_resize + region_masses), which itself matches
pytorch-grad-cam (tests/test_explain.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainable.cam.explain import edge_band, explanation_scores, gradcam_from_maps, normalise_and_resize, region_masses
from trainable.models.head import Head


def _full_resolution(head, maps, targets, lung, edge):
    cams = normalise_and_resize(gradcam_from_maps(head, maps, targets), lung.shape[-1]).detach()
    return region_masses(cams, lung, edge)


@pytest.mark.parametrize(("grid", "size"), [(7, 224), (7, 64), (3, 64), (8, 64), (2, 96), (10, 80)])
def test_grid_path_equals_full_resolution_path(grid: int, size: int) -> None:
    torch.manual_seed(grid * 1000 + size)
    rng = np.random.default_rng(grid)
    n, k = 12, 16
    head = Head(k, 8, 3, 0.0)
    maps = torch.rand(n, k, grid, grid) * torch.rand(n, k, 1, 1) * 3
    targets = torch.as_tensor(rng.integers(0, 3, n))
    yy, xx = np.mgrid[:size, :size]
    # a different blob-shaped "lung" per image, off-centre, so the masses vary between images
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size
    lung = ((yy - cy) ** 2 + (xx - cx) ** 2) < (rng.uniform(0.15, 0.35, (n, 1, 1)) * size) ** 2
    edge = edge_band(size, 0.08)
    fast_lung, fast_edge = explanation_scores(head, maps, targets, lung, edge, batch_size=5)
    ref_lung, ref_edge = _full_resolution(head, maps, targets, lung, edge)
    assert np.ptp(ref_lung) > 0.05  # a test that can tell images apart
    np.testing.assert_allclose(fast_lung, ref_lung, atol=2e-5)
    np.testing.assert_allclose(fast_edge, ref_edge, atol=2e-5)


def test_flat_map_counts_as_uniform_in_both_paths() -> None:
    size, head = 64, Head(4, 4, 2, 0.0)
    maps = torch.ones(2, 4, 7, 7)  # the same at every position: the CAM has no spatial preference
    lung = np.zeros((2, size, size), bool)
    lung[:, 16:48, 8:40] = True
    edge = edge_band(size, 0.08)
    fast = explanation_scores(head, maps, torch.tensor([0, 1]), lung, edge)
    ref = _full_resolution(head, maps, torch.tensor([0, 1]), lung, edge)
    np.testing.assert_allclose(fast, ref, atol=1e-6)
    np.testing.assert_allclose(fast[0], lung.mean(axis=(1, 2)), atol=1e-6)
