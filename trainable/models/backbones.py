"""Backbones: one factory over a registry of named feature extractors.

``build_backbone(name, weights)`` returns a :class:`Backbone`: a module mapping a
normalised image batch to its last feature maps (N×F×h×w, not pooled), the feature
width F, the dotted name of the module whose output *is* those maps (the Grad-CAM
target layer), the preprocessing the weights expect, and the weights' provenance.
The classifier built on top is ``GAP(model(x)) -> head``, so Grad-CAM computed from
``model(x)`` equals pytorch-grad-cam on the full model at ``target_layer``.

The registry covers the backbones of the two source papers (Balvinsson et al.; Santos
et al.), CPU-friendly ones, and torchxrayvision's chest-X-ray DenseNet121s.

Example::

    >>> import torch
    >>> from trainable.models.backbones import build_backbone
    >>> b = build_backbone("efficientnet_lite0", weights="random")
    >>> b.num_features, b.target_layer, b.preprocessing.input_size
    (1280, 'body.bn2', 224)
    >>> b.model(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 1280, 2, 2])
    >>> b.weights["kind"]
    'random'
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from trainable.models import weights as _weights
from trainable.models.loaders import (
    FeatureMaps,
    XrvFeatureMaps,
    in_chans,
    load_feature_maps,
    prune_unused,
    random_feature_maps,
)
from trainable.models.registry import BackboneSpec, UnknownBackboneError, available_backbones, get_spec  # noqa: F401 - re-exported: the factory's names

__all__ = [
    "Backbone",
    "BackboneSpec",
    "FeatureMaps",
    "Preprocessing",
    "UnknownBackboneError",
    "XrvFeatureMaps",
    "available_backbones",
    "build_backbone",
    "describe_backbones",
    "get_spec",
]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the weights expect. Images arrive as floats in ``value_range``, resized to
    ``input_size`` (``interpolation``), then normalised per channel: ``(x - mean) / std``.
    ``in_chans`` 3: the grayscale X-ray replicated to RGB; 1: fed as is."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    value_range: tuple[float, float] = (0.0, 1.0)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Backbone:
    """A built backbone; see the module doc. ``model`` is in eval mode."""

    name: str
    model: nn.Module
    num_features: int
    target_layer: str
    preprocessing: Preprocessing
    weights: dict[str, Any]


def build_backbone(name: str, weights: str = "imagenet", *, allow_download: bool | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights``, in eval mode.

    Args:
        name: a name from :func:`available_backbones` (aliases resolve to the registry name).
        weights: "imagenet" (pretrained; torchxrayvision entries get their chest-X-ray
            weights), "random" (random init; reads no file, no network), or the path to a
            local ``.pth``/``.safetensors`` file, loaded with strict=True. A file may hold
            a timm (or lukemelas EfficientNet) checkpoint, a torchxrayvision DenseNet
            state dict, or a saved ``Backbone.model.state_dict()``.
        allow_download: may pretrained weights missing offline be downloaded? None: only
            when $CXRTUNE_ALLOW_DOWNLOAD=1; never under HF_HUB_OFFLINE.

    Raises:
        UnknownBackboneError: ``name`` is not registered (the message lists the names).
        FileNotFoundError: ``weights`` names a file that does not exist.
        trainable.models.weights.WeightsNotFoundError: no pretrained weights offline (the message
            lists the places looked at) and no download allowed.

    Example::

        >>> b = build_backbone("resnet18", weights="random")
        >>> b.num_features, b.target_layer
        (512, 'body.layer4')
    """
    spec = get_spec(name)
    info = _weights.resolve_weights(spec.name, weights, allow_download=allow_download)
    model = load_feature_maps(spec, info)
    model.eval()
    num_features = prune_unused(model, spec.min_input_size, in_chans(spec))[1]
    return Backbone(
        name=spec.name,
        model=model,
        num_features=num_features,
        target_layer=spec.target_layer,
        preprocessing=_preprocessing(spec),
        weights=info.as_dict(),
    )


@functools.lru_cache(maxsize=2)
def process_backbone(name: str, weights: str) -> Backbone:
    """One build per worker process: a reused Tune actor runs many trials, and each fold or LayerCam
    of a trial needs the same weights. Shared: use it read-only, or `copy.deepcopy` it to train."""
    return build_backbone(name, weights)


def describe_backbones(check_offline: bool = True) -> list[dict[str, Any]]:
    """One row per accepted name: source, timm name, parameter count and feature shape
    (built on the meta device: no memory, no weights), target layer, input size, whether
    pretrained weights are on this machine (and where), and the paper that used it."""
    rows = []
    for name in available_backbones():
        spec = get_spec(name)
        params, num_features, feature_hw = _meta_stats(spec.name)
        row: dict[str, Any] = {
            "name": name,
            "alias_of": spec.name if name != spec.name else None,
            "source": spec.source,
            "timm_name": spec.timm_name,
            "timm_arch": spec.arch if spec.source == "timm" else None,
            "timm_tag": spec.tag if spec.source == "timm" else None,
            "arch": spec.arch if spec.source == "timm" else f"densenet121 (xrv weights={spec.arch!r})",
            "params": params,
            "num_features": num_features,
            "feature_map": f"{feature_hw[0]}x{feature_hw[1]}",
            "target_layer": spec.target_layer,
            "input_size": _preprocessing(spec).input_size,
            "in_chans": in_chans(spec),
            "paper": spec.paper,
            "note": spec.note,
        }
        if check_offline:
            row["offline_weights"], row["offline_where"] = _weights.offline_available(spec.name)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- helpers


def _meta_stats(name: str) -> tuple[int, int, tuple[int, int]]:
    spec = get_spec(name)
    if spec.source == "torchxrayvision":  # one architecture for every xrv weights key
        spec = get_spec("xrv-densenet121-res224-all")
    return _meta_stats_of(spec)


@functools.lru_cache(maxsize=None)
def _meta_stats_of(spec: BackboneSpec) -> tuple[int, int, tuple[int, int]]:
    """(parameters, F, (h, w) at the input size) of an entry, built on the meta device."""
    with torch.device("meta"):
        model = random_feature_maps(spec).eval()
        shape = prune_unused(model, _preprocessing(spec).input_size, in_chans(spec))
    params = sum(p.numel() for p in model.parameters())
    return params, int(shape[1]), (int(shape[2]), int(shape[3]))


@functools.lru_cache(maxsize=None)
def _preprocessing(spec: BackboneSpec) -> Preprocessing:
    if spec.source == "torchxrayvision":
        return Preprocessing(
            input_size=224, mean=(0.5,), std=(0.5 / 1024,), in_chans=1,
            note="(x - 0.5) / (0.5/1024) maps [0, 1] to [-1024, 1024], the scale of xrv.utils.normalize",
        )
    cfg = _weights.timm_pretrained_cfg(spec.timm_name)
    return Preprocessing(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        in_chans=3,
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        note=f"grayscale replicated to 3 channels; mean/std of timm's {spec.timm_name}",
    )
