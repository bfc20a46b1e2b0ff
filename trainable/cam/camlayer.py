"""Grad-CAM at a higher-resolution layer than the backbone's last one (the space's `cam_layer`).

At 224 px the last EfficientNet layer is a 7×7 grid (32-px cells): too coarse to tell lung from
mediastinum. `cam_layer: body.blocks.4` (stride 16: 14×14) or another stage output sharpens the
lung / edge mass. The fast path cannot do this (its exact Grad-CAM needs the maps the pooled head
reads), so this is the reference path: the full model (backbone → global average pool → head) on
the validation images, with pytorch-grad-cam's GradCAM computed by hooks at the layer — activation
A and gradient ∂y/∂A captured on the layer's output tensor, alpha_k = mean_ij ∂y/∂A_kij,
CAM = ReLU(Σ_k alpha_k·A^k), then the library's post-processing (`trainable.cam.explain`).
`tests/test_cam_layer.py` checks it against the library itself.

Cost: one forward and one backward through the backbone per validation image and epoch
(README.md "Grad-CAM at a higher-resolution layer" gives the measured rate).

After the sweep the same layer explains what it exported: `cxrtune evaluate`, the held-out scoring
and the montages build a LayerCam over the exported (or a fold's fine-tuned) backbone module with
`layer_cam_on`, so their lung / edge mass is scored the way CV scored it.

>>> valid_cam_layers("efficientnet_lite0")[:3]        # doctest: +SKIP
['final', 'body.blocks.0', 'body.blocks.1']
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from trainable.cam.explain import normalise_and_resize, region_masses
from trainable.data.images import geometry, to_model_input
from trainable.models.backbones import Backbone, Preprocessing, process_backbone
from trainable.models.features import inference_batch_size
from trainable.models.head import Classifier
from trainable.models.loaders import random_feature_maps
from trainable.models.registry import get_spec
from trainable.progress import track

FINAL = "final"   # the backbone's registry target layer: the fast path from cached maps


@functools.lru_cache(maxsize=None)
def _stage_layers(name: str) -> tuple[tuple[str, int], ...]:
    """(dotted module name inside `Backbone.model`, stride) of each stage output of a backbone."""
    spec = get_spec(name)
    with torch.device("meta"):   # no memory, no weights: only the module tree
        model = random_feature_maps(spec)
    if spec.source == "torchxrayvision":
        return tuple((f"body.features.denseblock{i}", 2 ** (i + 1)) for i in range(1, 5))
    return tuple((f"body.{f['module']}", int(f["reduction"])) for f in model.body.feature_info)


def valid_cam_layers(name: str) -> list[str]:
    """`final` and the stage outputs of backbone `name` (each a module of `Backbone.model`)."""
    return [FINAL, *(layer for layer, _ in _stage_layers(name))]


def describe_cam_layers(name: str) -> str:
    """One line for error messages: every valid layer with its stride."""
    return ", ".join([f"{FINAL} ({get_spec(name).target_layer})",
                      *(f"{layer} (stride {stride})" for layer, stride in _stage_layers(name))])


def gradcam_at_layer(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor
                     ) -> torch.Tensor:
    """Raw Grad-CAM (N, h, w) of `model` at `layer` for class `targets[n]`, as pytorch-grad-cam
    computes it (hooks on the layer's output tensor; no parameter gradients are accumulated)."""
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        saved["a"] = out.detach()
        out.register_hook(lambda g: saved.__setitem__("g", g.detach()))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)   # a frozen backbone still passes gradients back
            logits = model(x)
            picked = logits.gather(1, targets.view(-1, 1).long()).sum()
            torch.autograd.grad(picked, x)
    finally:
        handle.remove()
    alpha = saved["g"].mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * saved["a"]).sum(dim=1))


class BuiltModule(NamedTuple):
    """What LayerCam explains besides a head: a backbone module and the preprocessing its input needs
    (a `Backbone` has both; an exported or fine-tuned model's `.backbone` gets them here)."""

    model: nn.Module
    preprocessing: Preprocessing


class LayerCam:
    """Grad-CAM lung / edge mass of a trial's heads at `layer` of its (frozen) backbone."""

    def __init__(self, backbone: Backbone | BuiltModule, layer: str, margin: float, input_size: int,
                 batch_size: int | None = None) -> None:
        self.backbone, self.layer_name = backbone, layer
        self.layer = backbone.model.get_submodule(layer)
        self.margin, self.input_size = margin, input_size
        self.batch_size = batch_size or inference_batch_size(next(backbone.model.parameters()).device)
        with torch.no_grad():
            grid = self._grid()
        self.grid = grid

    def _grid(self) -> tuple[int, int]:
        shape: list[int] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, o: shape.extend(o.shape[2:]))
        pre = self.backbone.preprocessing
        try:
            self.backbone.model(torch.zeros(1, pre.in_chans, self.input_size, self.input_size))
        finally:
            handle.remove()
        return int(shape[0]), int(shape[1])

    def masses(self, head: nn.Module, images: np.ndarray, targets: torch.Tensor, lung_masks: np.ndarray,
               edge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (lung_mass, edge_mass); `images` uint8 (N, S, S) before crop and resize."""
        lung, edge_m = [], []
        for sl, cams in self._batches(head, images, targets):
            lm, em = region_masses(cams, lung_masks[sl], edge)
            lung.append(lm)
            edge_m.append(em)
        return np.concatenate(lung), np.concatenate(edge_m)

    def cams(self, head: nn.Module, images: np.ndarray, targets: torch.Tensor) -> torch.Tensor:
        """The maps `masses` scores: (N, input, input), post-processed as pytorch-grad-cam does."""
        return torch.cat([cams for _, cams in self._batches(head, images, targets)])

    def _batches(self, head: nn.Module, images: np.ndarray, targets: torch.Tensor
                 ) -> Iterator[tuple[slice, torch.Tensor]]:
        pre = self.backbone.preprocessing
        model = Classifier(self.backbone.model, head)
        was_training = head.training
        model.eval()   # as pytorch-grad-cam does: no dropout in the explained head
        try:
            for s in track(range(0, len(images), self.batch_size), f"Grad-CAM at {self.layer_name}",
                           total=len(images), unit="images", step=lambda s: len(images[s:s + self.batch_size])):
                sl = slice(s, s + self.batch_size)
                x = to_model_input(geometry(images[sl], self.margin, self.input_size), pre.in_chans,
                                   pre.mean, pre.std)
                dev = next(model.parameters()).device  # a fine-tuned fold model may sit on the GPU
                raw = gradcam_at_layer(model, self.layer, x.to(dev), targets[sl].to(dev)).cpu()
                yield sl, normalise_and_resize(raw, self.input_size)
        finally:
            head.train(was_training)


def layer_cam_for(backbone: str, weights: str, layer: str, margin: float, input_size: int) -> LayerCam | None:
    """The trial's LayerCam, or None for `final` (the fast path from cached maps)."""
    if layer == FINAL:
        return None
    return LayerCam(process_backbone(backbone, weights), layer, margin, input_size)


def layer_cam_on(module: nn.Module, preprocessing: dict, layer: str, margin: float, input_size: int,
                 batch_size: int | None = None) -> LayerCam:
    """A LayerCam over an already built backbone module — an export's `model.backbone` (metadata.json's
    `preprocessing`) or a fold's fine-tuned one (its FeatureSet's) — at `layer`, a dotted name inside it."""
    pre = Preprocessing(input_size=int(preprocessing["input_size"]), mean=tuple(preprocessing["mean"]),
                        std=tuple(preprocessing["std"]), in_chans=int(preprocessing["in_chans"]))
    return LayerCam(BuiltModule(module, pre), layer, margin, input_size, batch_size)
