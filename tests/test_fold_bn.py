"""BatchNorm folding for the feature pass (trainable.models.fold_bn): the same maps, the original untouched,
and no folding where the convolution's output is used by something besides its BatchNorm."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainable.models.backbones import build_backbone
from trainable.models.features import feature_maps, inference_model
from trainable.models.fold_bn import fold_batchnorm


def _trained_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), _trained_bn(nn.BatchNorm2d(8), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class ConvOutputReused(nn.Module):
    """The convolution's output feeds its BatchNorm *and* a skip connection: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), _trained_bn(nn.BatchNorm2d(3), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_plain_conv_bn_folds_to_the_same_output() -> None:
    model = Plain().eval()
    x = torch.randn(2, 3, 16, 16)
    folded, n = fold_batchnorm(model, x)
    assert n == 1
    assert isinstance(folded.bn, nn.Identity) and isinstance(model.bn, nn.BatchNorm2d)  # original kept
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_conv_output_used_twice_is_not_folded() -> None:
    model = ConvOutputReused().eval()
    folded, n = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    assert n == 0 and folded is model


def test_efficientnet_feature_maps_match_the_unfolded_backbone() -> None:
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.model.modules())
    model = inference_model(backbone, 96, torch.device("cpu"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) < n_bn // 4  # most are folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.model.modules()) == n_bn  # untouched
    images = (np.random.default_rng(0).random((6, 112, 112)) * 255).astype(np.uint8)
    fast = feature_maps(backbone, images, 0.08, 96, model=model)
    with torch.inference_mode():  # the unfolded model: eval, the same inputs
        from trainable.data.images import geometry, to_model_input
        pre = backbone.preprocessing
        ref = backbone.model.eval()(to_model_input(geometry(images, 0.08, 96), pre.in_chans, pre.mean, pre.std))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
