"""BatchNorm folded into the convolution before it, for the frozen backbone's feature pass.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can live in the
convolution's weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`). On a CPU that removes
a quarter of an EfficientNet-Lite forward pass (benchmarks/README.md). Which BatchNorm follows
which convolution is read from one traced forward pass (the BatchNorm's input *is* the
convolution's output), and the folded copy must reproduce the original's output on that input, or
the original is used: a convolution whose output also feeds something else is caught there.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

try:  # timm's BatchNorm + activation in one module (EfficientNet, RegNet, …)
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency; kept for a backbone without it
    BatchNormAct2d = None


def _after_bn(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or timm's dropout + activation."""
    if BatchNormAct2d is not None and isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _foldable(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d or (BatchNormAct2d is not None and type(bn) is BatchNormAct2d)


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm's input is the convolution's output."""
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # outputs stay alive so no id is reused during the pass
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def record(_m, _i, out, name=name):
                produced[id(out)] = name
                keep.append(out)
            hooks.append(module.register_forward_hook(record))
        elif _foldable(module) and module.track_running_stats:
            def match(_m, inputs, name=name):
                if id(inputs[0]) in produced:
                    pairs.append((produced[id(inputs[0])], name))
            hooks.append(module.register_forward_pre_hook(match))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    # a convolution feeding two BatchNorms (or a BatchNorm run twice) cannot be folded
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and bns.count(b) == 1]


def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> tuple[nn.Module, int]:
    """(a folded copy of `model` in eval mode, the number of BatchNorms folded), or (`model`, 0)
    when nothing folds or the copy's output on `example` differs by more than `rtol` of its scale."""
    model = model.eval()
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        folded.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        folded.set_submodule(bn_name, _after_bn(bn))
    with torch.no_grad():
        want, got = model(example), folded(example)
    if want.shape != got.shape or (want - got).abs().max() > rtol * max(float(want.abs().max()), 1e-6):
        return model, 0
    return folded.eval(), len(pairs)
