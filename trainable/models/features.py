"""Frozen-backbone features: the fast path every head-stage trial reads.

With the backbone frozen, its last feature maps depend only on (backbone, weights, input size,
crop, augmentation view, image). One pass computes them; every trial of the sweep trains its
head on the pooled vectors and scores Grad-CAM exactly from the view-0 maps (`trainable.cam.explain`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from trainable.data.augment import AUGMENT_POLICIES
from trainable.data.images import geometry, to_model_input, view_params
from trainable.models.backbones import Backbone, process_backbone
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.models.fold_bn import fold_batchnorm
from trainable.progress import progress

_BUILD_LOCK = threading.Lock()  # compute_features: one thread builds a backbone, the others wait for it


def inference_batch_size(device: torch.device | str | None = None) -> int:
    """Images per backbone pass when the batch size is not a hyperparameter (features, Grad-CAM
    through the full model, predictions). On a CPU a few images at a time keep a layer's
    activations in the core's caches: EfficientNet-Lite0/1 at 224 px on one thread run ~1.8× faster
    at 4 than at 32, forward (features) and forward + backward (Grad-CAM) alike
    (benchmarks/README.md). A GPU wants large batches."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 64 if torch.device(device).type == "cuda" else 4


def inference_model(backbone: Backbone, input_size: int, device: torch.device | None = None) -> torch.nn.Module:
    """The backbone's model for the feature pass: eval mode, channels_last, on `device` (default:
    CUDA when there is one), and on a CPU a copy with BatchNorm folded into the convolutions
    (`trainable.models.fold_bn`: the same maps to ~1e-5, 1.3–1.5× faster). `backbone.model` itself is
    left as it is: it may be fine-tuned or explained afterwards."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        # converted outside inference mode: parameters made there could never take part in
        # autograd again
        model = backbone.model.eval().to(device=device, memory_format=torch.channels_last)
    if device.type != "cpu":
        return model
    example = torch.randn(2, backbone.preprocessing.in_chans, input_size, input_size,
                          generator=torch.Generator().manual_seed(0))
    return fold_batchnorm(model, example.contiguous(memory_format=torch.channels_last))[0]


def feature_maps(backbone: Backbone, images: np.ndarray, margin: float, input_size: int,
                 params: np.ndarray | None = None, batch_size: int | None = None,
                 model: torch.nn.Module | None = None) -> torch.Tensor:
    """Last feature maps (N, F, h, w) float32 (on the CPU) of uint8 images (N, S, S) through the
    frozen backbone. On a GPU (a task given `gpus_per_trial` > 0 sees one) the forward pass runs
    on CUDA under float16 autocast; otherwise on the CPU in float32. `batch_size`: default
    `inference_batch_size()`; `model`: `inference_model(backbone, input_size)`, built here when the
    caller does not keep one across calls."""
    model = model or inference_model(backbone, input_size)
    device = next(model.parameters()).device
    batch_size = batch_size or inference_batch_size(device)
    with torch.inference_mode():
        return _forward(model, backbone, images, margin, input_size, params, batch_size, device)


def _forward(model: torch.nn.Module, backbone: Backbone, images: np.ndarray, margin: float, input_size: int,
             params: np.ndarray | None, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    with progress(f"features {backbone.name}", len(images)) as advance:
        for start in range(0, len(images), batch_size):
            sl = slice(start, start + batch_size)
            x = geometry(images[sl], margin, input_size, None if params is None else params[sl])
            pre = backbone.preprocessing
            x = to_model_input(x, pre.in_chans, pre.mean, pre.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                out.append(model(x.to(device, non_blocking=True)).float().cpu())
            advance(len(x))
    return torch.cat(out)


def global_average(maps: torch.Tensor, params: np.ndarray | None) -> torch.Tensor:
    """A gap key's pooling of one view's maps (N, K, h, w) -> (N, K); `params`: the view's geometry."""
    return maps.mean(dim=(2, 3))


def compute_features(images: np.ndarray, key: FeatureKey, views: dict[str, int], seed: int,
                     batch_size: int | None = None,
                     pool_view: Callable[[torch.Tensor, np.ndarray | None], torch.Tensor] = global_average
                     ) -> FeatureSet:
    """View-0 maps plus pooled vectors of `views[policy]` views for each augmentation policy;
    `pool_view(maps, view params)` pools each view (params None for view 0)."""
    start = time.perf_counter()
    # one build per process: a warm feature worker computes every crop of a backbone with it. The
    # driver's feature threads (trainable.prepare) share that build: one of them makes it
    with _BUILD_LOCK:
        backbone = process_backbone(key.backbone, key.weights)
        model = inference_model(backbone, key.input_size)
    maps = feature_maps(backbone, images, key.crop_margin, key.input_size, batch_size=batch_size, model=model)
    pooled0 = pool_view(maps, None).numpy()
    n_images = len(images)
    pooled: dict[str, np.ndarray] = {}
    for policy, n_views in views.items():
        stack = [pooled0]
        for v in range(1, n_views if policy != "none" else 1):
            params = view_params(AUGMENT_POLICIES[policy], len(images), seed, v)
            stack.append(pool_view(feature_maps(backbone, images, key.crop_margin, key.input_size, params,
                                                batch_size, model), params).numpy())
            n_images += len(images)
        pooled[policy] = np.stack(stack)
    pre = backbone.preprocessing
    return FeatureSet(key=key, maps=maps.numpy().astype(np.float16), pooled=pooled,
                      preprocessing={**asdict(pre), "input_size": key.input_size,
                                     "crop_margin": key.crop_margin},
                      target_layer=backbone.target_layer, weights_info=dict(backbone.weights),
                      seconds=time.perf_counter() - start, images_through_backbone=n_images)
