"""`cam_layer`: Grad-CAM lung / edge mass at a higher-resolution layer than the backbone's last.

The layer's CAM grid is finer than the final layer's, its masses equal pytorch-grad-cam on the
full model (backbone → pool → head) at that layer, a bad layer is a one-line SpaceError naming the
field and the valid layers, and a sweep records the grid it used in trials.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from search.space import SpaceError, load_space
from tests.conftest import cxrtune
from trainable.cam.camlayer import LayerCam, valid_cam_layers
from trainable.cam.explain import edge_band, region_masses
from trainable.data.images import geometry, mask_geometry, to_model_input
from trainable.data.phantom import render_example
from trainable.models.backbones import build_backbone
from trainable.models.head import Classifier, Head

SIZE = 64   # network input: the final EfficientNet layer is 2×2 here, body.blocks.4 is 4×4


def _phantoms() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    renders = [render_example(label, size=96, seed=s) for s, label in enumerate(("covid", "normal", "pneumonia"))]
    images = np.stack([r.image for r in renders])
    lungs = mask_geometry(np.stack([r.lung.astype(np.uint8) * 255 for r in renders]), 0.0, SIZE)
    return images, lungs, torch.tensor([1, 0, 1])


def test_layer_gives_a_finer_grid_and_matches_pytorch_grad_cam() -> None:
    torch.manual_seed(0)
    bb = build_backbone("efficientnet_lite0", "imagenet")
    head = Head(bb.num_features, 16, 2, dropout=0.3).train()   # dropout on: the path must switch it off
    final = LayerCam(bb, bb.target_layer, 0.0, SIZE)
    fine = LayerCam(bb, "body.blocks.4", 0.0, SIZE)
    assert final.grid == (2, 2)
    assert fine.grid == (4, 4) and fine.grid[0] > final.grid[0]

    images, lungs, targets = _phantoms()
    edge = edge_band(SIZE, 0.08)
    lung_mass, edge_mass = fine.masses(head, images, targets, lungs, edge)
    assert head.training, "the head's mode is restored"

    pre = bb.preprocessing
    x = to_model_input(geometry(images, 0.0, SIZE), pre.in_chans, pre.mean, pre.std)
    model = Classifier(bb.model, head)
    with GradCAM(model=model, target_layers=[model.get_submodule("backbone.body.blocks.4")]) as cam:
        reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    ref_lung, ref_edge = region_masses(reference, lungs, edge)
    np.testing.assert_allclose(lung_mass, ref_lung, atol=1e-4)
    np.testing.assert_allclose(edge_mass, ref_edge, atol=1e-4)
    # the finer layer is a different map, not the final one resized
    coarse_lung, _ = final.masses(head, images, targets, lungs, edge)
    assert np.abs(coarse_lung - lung_mass).max() > 1e-3


def test_valid_layers_come_from_the_registry() -> None:
    layers = valid_cam_layers("efficientnet_lite0")
    assert layers[0] == "final" and "body.blocks.4" in layers
    assert "body.layer3" in valid_cam_layers("resnet18")


def test_bad_cam_layer_is_a_space_error_naming_the_valid_layers(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("cam_layer: body.blocks.99\nspace: {backbone: {choice: [efficientnet_lite0, resnet18]}}\n")
    with pytest.raises(SpaceError) as e:
        load_space(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    assert "cam_layer 'body.blocks.99'" in msg and "body.blocks.4 (stride 16)" in msg
    proc = cxrtune("run", "--space", str(f), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "cam_layer" in proc.stderr and "Traceback" not in proc.stderr


SPACE = """
name: camlayer
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 96, seed: 0}}
folds: 2
epochs: 2
num_samples: 1
base_size: 96
input_size: 64
views: 1
cam_layer: body.blocks.4
asha: {grace_period: 2}
space: {backbone: efficientnet_lite0, hidden: 16, lr: 0.003}   # nothing searched: runs without a searcher
"""


@pytest.mark.timeout(300)
def test_sweep_records_the_cam_grid_it_used(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(SPACE)
    proc = cxrtune("run", "--space", str(tmp_path / "s.yaml"), "--out", str(tmp_path), "--name", "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "r" / "trials.csv")
    assert trials["cam_grid"].tolist() == ["4x4"]
    assert trials["best_lung_mass"].between(0, 1).all()
