"""From weights to torch modules: read a state dict, load it strictly into a timm or
torchxrayvision model, and wrap the model as a feature-map extractor (`FeatureMaps`).

`trainable.models.weights` decides *which* file; this module turns that file into a module.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainable.models.registry import BackboneSpec, get_spec
from trainable.models.weights import WeightsInfo, import_xrv, resolve_weights, timm_pretrained_cfg, xrv_cache_dir


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


def in_chans(spec: BackboneSpec) -> int:
    return 1 if spec.source == "torchxrayvision" else 3


def random_feature_maps(spec: BackboneSpec) -> nn.Module:
    if spec.source == "torchxrayvision":
        return XrvFeatureMaps(import_xrv().models.DenseNet(weights=None))
    import timm

    return FeatureMaps(timm.create_model(spec.timm_name, pretrained=False, num_classes=0))


def load_feature_maps(spec: BackboneSpec, info: WeightsInfo) -> nn.Module:
    if info.path is None:
        return random_feature_maps(spec)
    if info.kind == "file":
        state_dict = read_state_dict(info.path)
        if all(key.startswith("body.") for key in state_dict):  # a saved Backbone.model
            model = random_feature_maps(spec).eval()
            prune_unused(model, spec.min_input_size, in_chans(spec))
            load_strict(model, state_dict, where=info.path, what=f"backbone {spec.name!r}")
            return model
        if spec.source == "torchxrayvision":
            return XrvFeatureMaps(xrv_densenet_from_state_dict(state_dict, where=info.path))
        return FeatureMaps(_timm_body(spec, state_dict, info.path))
    if spec.source == "torchxrayvision":
        return XrvFeatureMaps(load_xrv_densenet(spec.arch, info))
    return FeatureMaps(_timm_body(spec, read_state_dict(info.path), info.path))


def _timm_body(spec: BackboneSpec, state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    body = timm_model_from_state_dict(spec.timm_name, state_dict, where=where)
    body.reset_classifier(0)
    return body


def prune_unused(model: nn.Module, size: int, in_chans: int) -> torch.Size:
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a torch pickle read with ``weights_only=True``).

    Unwraps a ``{"state_dict": ...}``/``{"model": ...}`` checkpoint and a DataParallel
    ``module.`` prefix. Full pickled models are refused (loading them runs code).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends
            raise ValueError(
                f"weights file {str(path)!r} is not a plain state dict readable with torch.load(weights_only=True) "
                f"({type(exc).__name__}); save model.state_dict() or a .safetensors file instead (torchxrayvision's "
                f"own release files belong in {xrv_cache_dir()}, where they load with weights='imagenet')"
            ) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a mapping of names to tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_timm_classifier(
    name: str, weights: str = "imagenet", *, allow_download: bool | None = None
) -> nn.Module:
    """The full timm classifier of a timm registry entry, weights loaded strictly, in eval mode.

    Example::

        >>> model = load_timm_classifier("efficientnet_lite0")   # ImageNet, 1000 classes
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    spec = get_spec(name)
    if spec.source != "timm":
        raise ValueError(f"load_timm_classifier needs a timm backbone; {name!r} comes from {spec.source}")
    info = resolve_weights(spec.name, weights, allow_download=allow_download)
    if info.path is None:
        import timm

        return timm.create_model(spec.timm_name, pretrained=False).eval()
    return timm_model_from_state_dict(spec.timm_name, read_state_dict(info.path), where=info.path).eval()


def timm_model_from_state_dict(arch: str, state_dict: dict[str, torch.Tensor], *, where: str) -> nn.Module:
    """Create timm model ``arch`` (an exact timm name, ``arch.tag`` or ``arch``) and load ``state_dict`` into it with strict=True.

    Accepts timm key names and lukemelas/EfficientNet-PyTorch names (converted). The
    number of classes follows the file's classifier; without one the model has none.
    """
    import timm

    if "_conv_stem.weight" in state_dict:
        num_classes = state_dict["_fc.weight"].shape[0] if "_fc.weight" in state_dict else 0
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        state_dict = _lukemelas_to_timm(state_dict, model)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=_num_classes_in(arch, state_dict))
    load_strict(model, state_dict, where=where, what=f"timm model {arch!r}")
    return model


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, where: str, what: str) -> None:
    """``model.load_state_dict(strict=True)`` with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc)
        if len(detail) > 1200:
            detail = detail[:1200] + " ..."
        raise ValueError(f"weights file {where!r} does not match {what} (strict load): {detail}") from exc


def load_xrv_densenet(key: str, info: WeightsInfo) -> nn.Module:
    """A torchxrayvision DenseNet for weights ``key`` (e.g. "densenet121-res224-all") per ``info``."""
    xrv = import_xrv()
    if info.path is None:
        return xrv.models.DenseNet(weights=None)
    if info.kind == "file":
        return xrv_densenet_from_state_dict(read_state_dict(info.path), where=info.path)
    # torchxrayvision's release files are pickled modules: xrv reads its own cache file
    # (it finds the file present and downloads nothing).
    return xrv.models.DenseNet(weights=key, cache_dir=str(Path(info.path).parent))


def xrv_densenet_from_state_dict(state_dict: dict[str, torch.Tensor], *, where: str) -> nn.Module:
    """A torchxrayvision DenseNet121 with ``state_dict`` loaded strictly (classes follow the file)."""
    state_dict = {k: v for k, v in state_dict.items() if k != "op_threshs"}
    weight = state_dict.get("classifier.weight")
    num_classes = int(weight.shape[0]) if weight is not None else 18
    model = import_xrv().models.DenseNet(weights=None, num_classes=num_classes)
    load_strict(model, state_dict, where=where, what="torchxrayvision DenseNet121")
    return model


def _num_classes_in(arch: str, state_dict: dict[str, torch.Tensor]) -> int:
    classifier = timm_pretrained_cfg(arch).get("classifier") or "classifier"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    weight = state_dict.get(f"{names[0]}.weight")
    return int(weight.shape[0]) if weight is not None else 0


_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LUKEMELAS_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LUKEMELAS_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def _lukemelas_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas/EfficientNet-PyTorch keys to timm EfficientNet keys.

    lukemelas numbers blocks flat (``_blocks.7``); timm by stage (``blocks.3.1``): the flat
    index walks timm's stages in order. Blocks without ``_expand_conv`` are timm's
    DepthwiseSeparableConv (different layer names).
    """
    layout = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    layers_of_block: dict[int, set[str]] = {}
    for key in state_dict:
        if match := _BLOCK_KEY.match(key):
            layers_of_block.setdefault(int(match.group(1)), set()).add(match.group(2))
    if len(layers_of_block) != len(layout):
        raise ValueError(f"lukemelas checkpoint has {len(layers_of_block)} blocks; the timm model has {len(layout)}")
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(layout):
                raise ValueError(f"lukemelas block {index} does not exist in a model with {len(layout)} blocks")
            has_expand = "_expand_conv" in layers_of_block[index]
            table = _LUKEMELAS_BLOCK if has_expand else _LUKEMELAS_BLOCK_NO_EXPAND
            converted[f"{layout[index]}.{table.get(layer, layer)}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            converted[f"{_LUKEMELAS_TOP.get(head, head)}.{rest}"] = value
    return converted
