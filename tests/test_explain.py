"""Grad-CAM: the fast path from cached feature maps equals pytorch-grad-cam on the full model,
and lung / edge mass are the shares of the map on the mask and on the border band."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from trainable.cam.explain import edge_band, explanation_scores, gradcam_from_maps, normalise_and_resize, region_masses
from trainable.models.backbones import build_backbone
from trainable.models.head import Classifier, Head


def _module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 96), ("resnet18", 64)])
def test_fast_path_matches_pytorch_grad_cam(name: str, size: int) -> None:
    torch.manual_seed(0)
    bb = build_backbone(name, "random")
    head = Head(bb.num_features, 16, 3, dropout=0.3)
    model = Classifier(bb.model, head).eval()
    x = torch.randn(3, bb.preprocessing.in_chans, size, size)
    targets = [0, 2, 1]
    with GradCAM(model=model, target_layers=[_module(model, f"backbone.{bb.target_layer}")]) as cam:
        reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    with torch.no_grad():
        maps = bb.model(x)
    fast = normalise_and_resize(gradcam_from_maps(head, maps, torch.tensor(targets)), size).numpy()
    assert reference.shape == fast.shape == (3, size, size)
    assert np.abs(reference - fast).max() <= 1e-4


def test_region_masses_are_shares_of_the_map() -> None:
    size = 50
    edge = edge_band(size, 0.1)  # 5 px
    lung = np.zeros((2, size, size), bool)
    lung[:, 10:40, 10:25] = True
    cams = np.zeros((2, size, size), np.float32)
    cams[0, 12:20, 12:20] = 1.0          # all evidence on the lung
    cams[1, 0:5, :] = 1.0                # all on the top border band
    cams[1, 10:35, 15:25] = 1.0          # plus as much on the lung: 250 px of 500
    lung_mass, edge_mass = region_masses(cams, lung, edge)
    assert lung_mass == pytest.approx([1.0, 0.5])
    assert edge_mass == pytest.approx([0.0, 0.5])
    # a map with no positive evidence counts as uniform
    lm, em = region_masses(np.zeros((1, size, size), np.float32), lung[:1], edge)
    assert lm[0] == pytest.approx(lung[0].mean()) and em[0] == pytest.approx(edge.mean())


def test_explanation_scores_follow_the_evidence() -> None:
    """A head that reads one channel: its CAM sits where that channel fires."""
    head = Head(4, 4, 2, dropout=0.0)
    with torch.no_grad():
        head.net[0].weight.copy_(torch.eye(4))
        head.net[0].bias.zero_()
        head.net[3].weight.zero_()
        head.net[3].weight[1, 2] = 1.0
    maps = torch.zeros(1, 4, 8, 8)
    maps[0, 2, 3:5, 3:5] = 1.0      # channel 2 fires in the centre
    maps[0, 0, 0, :] = 1.0          # channel 0 fires on the top edge (ignored by class 1)
    lung = np.zeros((1, 64, 64), bool)
    lung[0, 16:48, 16:48] = True
    lm, em = explanation_scores(head, maps, torch.tensor([1]), lung, edge_band(64, 0.08))
    assert lm[0] > 0.9 and em[0] < 0.05
