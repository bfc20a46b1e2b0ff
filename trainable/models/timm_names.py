"""Any ``timm.list_models()`` name as a backbone, verbatim, with an optional pretrained tag.

``resnet50.a1_in1k``, ``convnext_tiny`` or ``mobilenetv3_small_050`` resolve to a
`BackboneSpec` whose ``arch``/``tag`` are exactly timm's (no tag: timm's default tag for the
architecture). The Grad-CAM layer is the last stage of timm's ``feature_info`` when that
module's output *is* the feature maps ``forward_features`` returns; otherwise (EfficientNet's
``conv_head``/``bn2`` after the last stage) the outermost module whose output is. An
architecture the registry already has keeps the registry's vetted layer.

Models whose ``forward_features`` are not N×C×h×w maps (ViTs' tokens, Swin's NHWC) are
refused: the pooled head and Grad-CAM need convolutional maps. Everything is checked on
the meta device (no memory, no weights, no network).

Example::

    >>> from trainable.models.registry import get_spec
    >>> s = get_spec("resnet34")
    >>> s.timm_name, s.target_layer
    ('resnet34.a1_in1k', 'body.layer4')
"""
from __future__ import annotations

import dataclasses
import difflib
import functools

import torch
from torch import nn

from trainable.models.spec import BackboneSpec, UnknownBackboneError

_TRY_SIZES = (64, 75, 96, 128, 224)  # the smallest that runs becomes min_input_size


@functools.cache
def timm_spec(name: str, vetted: tuple[BackboneSpec, ...] = (), aliases: tuple[str, ...] = ()) -> BackboneSpec:
    """The spec of timm model ``name`` (``arch`` or ``arch.tag``); UnknownBackboneError if timm lacks it.

    vetted: registry entries whose architecture keeps their Grad-CAM layer; aliases: the registry's
    names, suggested with timm's in the error. Call it through `registry.get_spec`."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UnknownBackboneError(unknown_backbone_message(name, [*aliases, *timm.list_models()]))
    tags = [full.partition(".")[2] for full in timm.models.get_arch_pretrained_cfgs(arch)]
    if tag and tag not in tags:
        known = ", ".join(tags) or "none"
        raise UnknownBackboneError(f"backbone {name!r}: timm has no pretrained tag {tag!r} for {arch!r} "
                                   f"(its tags: {known})")
    tag = tag or _default_tag(arch)
    same = next((spec for spec in vetted if spec.arch == arch), None)
    if same is not None:  # same module tree: keep the registry's layer and input size
        return dataclasses.replace(same, name=name, tag=tag, aliases=(),
                                   note=f"timm {arch}.{tag} verbatim (layer as registry entry {same.name!r})")
    target, min_size = _target_layer(arch, name)
    return BackboneSpec(name=name, source="timm", arch=arch, tag=tag, target_layer=target, paper="timm",
                        note=f"timm {arch}.{tag} verbatim; Grad-CAM layer from feature_info",
                        min_input_size=min_size)


def unknown_backbone_message(name: str, known: list[str]) -> str:
    """One line: the name is neither a registry name nor a timm model, with the closest known names."""
    close = difflib.get_close_matches(str(name), known, n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, dict.fromkeys(close)))}?" if close else ""
    return (f"unknown backbone {name!r}: neither a cxrtune alias nor a timm.list_models() name.{hint} "
            f"(`cxrtune backbones` lists the aliases)")


def _default_tag(arch: str) -> str:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    return (cfg.tag or "") if cfg is not None else ""


def _target_layer(arch: str, name: str) -> tuple[str, int]:
    """(dotted target layer inside `FeatureMaps`, smallest input that runs) for a timm architecture."""
    import timm

    with torch.device("meta"):
        body = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    outputs: dict[str, list[torch.Tensor]] = {}  # every output of every module, in call order
    hooks = [module.register_forward_hook(lambda _m, _i, out, n=module_name: outputs.setdefault(n, []).append(out))
             for module_name, module in body.named_modules() if module_name]
    try:
        final, size = _first_forward(body, name, outputs)
    finally:
        for hook in hooks:
            hook.remove()
    if not (isinstance(final, torch.Tensor) and final.ndim == 4 and final.shape[1] == body.num_features):
        shape = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise UnknownBackboneError(
            f"backbone {name!r}: timm's forward_features gives {shape}, not N×{body.num_features}×h×w feature "
            f"maps; cxrtune needs a convolutional backbone (CNN, ConvNeXt, EfficientNet, ...)")
    last_stage = body.feature_info[-1]["module"] if getattr(body, "feature_info", None) else None
    producers = [n for n, outs in outputs.items() if len(outs) == 1 and outs[0] is final]  # runs once, gives maps
    if last_stage in producers:
        return f"body.{last_stage}", size
    if not producers:
        raise UnknownBackboneError(f"backbone {name!r}: no module of timm's {arch!r} outputs its feature maps, "
                                   f"so Grad-CAM has no layer to hook; pick another backbone")
    return f"body.{min(producers, key=lambda n: (n.count('.'), n))}", size


def _first_forward(body: nn.Module, name: str, outputs: dict) -> tuple[torch.Tensor, int]:
    errors = []
    for size in _TRY_SIZES:
        outputs.clear()
        try:
            with torch.no_grad():
                return body.forward_features(torch.zeros(1, 3, size, size, device="meta")), size
        except Exception as e:  # noqa: BLE001 - too small an input raises many types
            errors.append(f"{size}px: {type(e).__name__}")
    raise UnknownBackboneError(f"backbone {name!r}: timm's forward_features failed at every size tried "
                               f"({'; '.join(errors)})")
