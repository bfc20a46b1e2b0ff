"""The explanation score the objective uses (`focus`, trainable.cam.explain) measures focus, not the
crop or the map grid: a uniform map scores 0 at every crop, the lung mask averaged down to the map
grid scores 1 at every grid, and the border band never counts lung pixels twice.

The lung masks are the real atlas (517 annotations shipped by torchxrayvision) through the same
crop/resize a sweep applies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainable.cam.explain import (edge_band, explanation_scores, focus, focus_reference, region_masses)
from trainable.data.images import mask_geometry
from trainable.data.lungs import lung_atlas
from trainable.models.head import Head

SIZE = 224


def atlas_at(crop: float) -> np.ndarray:
    return mask_geometry(lung_atlas(256)[None], crop, SIZE)


def test_a_uniform_map_scores_zero_at_every_crop() -> None:
    edge = edge_band(SIZE, 0.08)
    uniform = np.ones((1, SIZE, SIZE), np.float32)
    raw, scores = [], []
    for crop in (0.0, 0.08):
        lung = atlas_at(crop)
        lm, em = region_masses(uniform, lung, edge)
        raw.append(lm[0])
        scores.append(focus(lm, em, focus_reference(lung, edge, 7, 7)))
    assert raw[1] - raw[0] > 0.1           # what the raw lung mass gains from cropping alone
    assert scores == pytest.approx([0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("crop", [0.0, 0.08])
def test_the_lung_shaped_map_scores_one_at_every_grid(crop: float) -> None:
    """The mask averaged down to 5×5, 7×7 and 14×14, explained through the per-epoch fast path
    (`explanation_scores` on the grid, as a trial does): raw masses move with the grid, focus does not."""
    lung = atlas_at(crop)
    edge = edge_band(SIZE, 0.08)
    head = Head(1, 1, 2, dropout=0.0)
    with torch.no_grad():  # class 1's logit grows with the single channel: its CAM is that channel
        for p in head.parameters():
            p.zero_()
        head.net[0].weight.fill_(1.0)
        head.net[3].weight[1, 0] = 1.0
    raw, scores = [], []
    for g in (5, 7, 14):
        maps = F.adaptive_avg_pool2d(torch.from_numpy(lung.astype(np.float32)).unsqueeze(1), (g, g))
        lm, em = explanation_scores(head, maps, torch.tensor([1]), lung, edge)
        raw.append(lm[0] - em[0])
        scores.append(focus(lm, em, focus_reference(lung, edge, g, g)))
    assert max(raw) - min(raw) > 0.1       # the grid alone moves lung − edge by this much
    assert scores == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # the fast path vs the full-resolution reference


def test_the_edge_band_excludes_the_lungs() -> None:
    """Evidence on lung pixels inside the band counts as lung only (a crop pushes lungs into the band)."""
    size = 40
    edge = edge_band(size, 0.1)  # 4 px
    lung = np.zeros((1, size, size), bool)
    lung[0, 0:20, 10:30] = True             # reaches the top border
    cam = np.zeros((1, size, size), np.float32)
    cam[0, 0:4, 10:30] = 1.0                # on the lung, inside the band
    lm, em = region_masses(cam, lung, edge)
    assert lm[0] == pytest.approx(1.0) and em[0] == pytest.approx(0.0)
    cam[0, 0:4, 30:40] = 1.0                # and as much again on the band beside the lung
    lm, em = region_masses(cam, lung, edge)
    assert lm[0] == pytest.approx(80 / 120) and em[0] == pytest.approx(40 / 120)


def test_focus_orders_maps_by_where_they_look() -> None:
    lung = atlas_at(0.0)
    edge = edge_band(SIZE, 0.08)
    ref = focus_reference(lung, edge, 7, 7)
    on_edge = edge[None].astype(np.float32)
    on_lung = lung.astype(np.float32)
    s_edge = focus(*region_masses(on_edge, lung, edge), ref)
    s_lung = focus(*region_masses(on_lung, lung, edge), ref)
    assert s_edge < 0 < 1 <= s_lung + 1e-6  # the full-resolution mask beats what a 7×7 grid can draw
