"""Lung masks per image: the data's own, the atlas prior, or torchxrayvision's PSPNet segmentation.

`lung_masks` in the space file picks the source for a sweep:

* ``auto``   the data's mask where an image has one (manifest ``mask_path``), else the atlas,
* ``data``   the data's masks; every image must have one,
* ``atlas``  the atlas prior for every image (trainable.data.lungs), even where the data has masks,
* ``pspnet`` every image segmented once by torchxrayvision's ChestX-Det PSPNet
  (``xrv.baseline_models.chestx_det.PSPNet``; 14 anatomical channels at 512×512, of which
  "Left Lung" and "Right Lung" are used: sigmoid > 0.5 on either, i.e. a logit > 0).

PSPNet's weights (``pspnet_chestxray_best_model_4.pth``, a GitHub release of torchxrayvision) are
looked for in ``$CXRTUNE_PSPNET_WEIGHTS`` (a file), then torchxrayvision's cache
(``$CXRTUNE_XRV_CACHE_DIR`` or ``~/.torchxrayvision/models_data/``), and downloaded into that cache
only when downloads are allowed (``CXRTUNE_ALLOW_DOWNLOAD=1`` and no ``HF_HUB_OFFLINE``; the policy of
trainable.models.weights). xrv's own ``PSPNet()`` constructor downloads unconditionally when the file is
absent, so the network is built here from its module (``ptsemseg.pspnet``) and the file loaded the
way xrv loads it (``torch.load(weights_only=True)``, ``module.`` prefix stripped, strict).

The masks are computed once per (decoded images, weights) and kept in the disk cache
(trainable.cache, kind ``lungseg``), like the decoded images and the features.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainable.errors import CxrtuneError, DataError
from trainable.models.weights import ENV_ALLOW_DOWNLOAD, downloads_allowed, import_xrv, sha256_file, xrv_cache_dir

LUNG_MASK_SOURCES = ("auto", "data", "atlas", "pspnet")
PSPNET_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/pspnet_chestxray_best_model_4.pth"
PSPNET_FILE = os.path.basename(PSPNET_URL)
ENV_PSPNET_WEIGHTS = "CXRTUNE_PSPNET_WEIGHTS"
NATIVE_SIZE = 512                       # PSPNet's input and output resolution
LUNG_TARGETS = ("Left Lung", "Right Lung")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LungSegmentationError(CxrtuneError):
    """PSPNet lung segmentation cannot run (its weights are missing and may not be downloaded)."""


def pspnet_weights_places() -> list[Path]:
    """Where the weights file is looked for, in order."""
    places = []
    explicit = os.environ.get(ENV_PSPNET_WEIGHTS)
    if explicit:
        places.append(Path(explicit).expanduser())
    places.append(xrv_cache_dir() / PSPNET_FILE)
    default = Path("~/.torchxrayvision/models_data").expanduser() / PSPNET_FILE
    return places if default in places else [*places, default]


def pspnet_weights(allow_download: bool | None = None, instead: str = ", or use lung_masks: auto | data | atlas"
                   ) -> Path:
    """The PSPNet weights file: found offline, or downloaded when allowed; else a one-line error
    (ending with `instead`: what else the user can do)."""
    places = pspnet_weights_places()
    for place in places:
        if place.is_file():
            return place
    if downloads_allowed(allow_download):
        target = xrv_cache_dir() / PSPNET_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        import_xrv().utils.download(PSPNET_URL, str(target))
        return target
    why = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
           else f"downloads are off (set {ENV_ALLOW_DOWNLOAD}=1 on a machine with network)")
    raise LungSegmentationError(
        f"lung_masks: pspnet needs torchxrayvision's PSPNet weights {PSPNET_FILE}; not found at "
        f"{', '.join(map(str, places))}; {why}; put the file there (from {PSPNET_URL}) or set "
        f"{ENV_PSPNET_WEIGHTS}=FILE{instead}")


def lung_channels() -> tuple[int, int]:
    """Indices of the left and right lung in PSPNet's output (its class attribute `targets`)."""
    targets = list(import_xrv().baseline_models.chestx_det.PSPNet.targets)
    return tuple(targets.index(t) for t in LUNG_TARGETS)  # type: ignore[return-value]


def build_pspnet(weights: Path | None) -> nn.Module:
    """torchxrayvision's ChestX-Det PSPNet network in eval mode; `weights=None` leaves it random."""
    xrv = import_xrv()
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    net = pspnet(len(xrv.baseline_models.chestx_det.PSPNet.targets))
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
        net.load_state_dict(state)
    return net.eval()


def _preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S) → PSPNet's input, as xrv's PSPNet.forward builds it: [0, 1], 3 channels,
    512 px (bilinear, antialiased), ImageNet normalisation."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None].repeat(1, 3, 1, 1)
    if x.shape[-1] != NATIVE_SIZE:
        x = nn.functional.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def lung_mask_from_output(output: torch.Tensor, size: int, channels: tuple[int, int] | None = None) -> np.ndarray:
    """PSPNet logits (N, 14, H, W) → bool (N, size, size): left ∪ right lung at the frame size.

    A pixel is lung where either lung channel's sigmoid exceeds 0.5 (logit > 0); the larger of the
    two logits is resized (bilinear) to the frame before the threshold, so the mask is smooth."""
    if output.ndim != 4:
        raise ValueError(f"PSPNet output must be (N, classes, H, W) (got shape {tuple(output.shape)})")
    left, right = channels if channels is not None else lung_channels()
    logit = torch.maximum(output[:, left], output[:, right])[:, None].float()
    if logit.shape[-2:] != (size, size):
        logit = nn.functional.interpolate(logit, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=size < logit.shape[-1])
    return (logit[:, 0] > 0).cpu().numpy()


@torch.inference_mode()
def segment_lungs(images: np.ndarray, net: nn.Module, batch_size: int = 4,
                  log: Callable[[str], None] = print) -> np.ndarray:
    """bool (N, S, S) lung masks of uint8 images (N, S, S), on a GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    channels = lung_channels()
    out = np.zeros(images.shape, dtype=bool)
    from trainable.progress import progress

    with progress("PSPNet lung masks", len(images)) as advance:
        for start in range(0, len(images), batch_size):
            x = _preprocess(images[start:start + batch_size]).to(device)
            out[start:start + len(x)] = lung_mask_from_output(net(x), images.shape[-1], channels)
            advance(len(x))
    empty = int((~out.any(axis=(1, 2))).sum())
    if empty:
        log(f"warning: PSPNet found no lung in {empty} of {len(images)} image(s); their lung_mass is 0")
    return out


def pspnet_masks(images: np.ndarray, images_digest: str, root: Path | None,
                 log: Callable[[str], None] = print) -> np.ndarray:
    """PSPNet lung masks for the decoded images, read from / written to the disk cache."""
    from trainable.cache import DiskCache, code_fingerprint

    weights = pspnet_weights()
    description = {"images": images_digest, "weights_sha256": sha256_file(weights), "size": int(images.shape[-1]),
                   "code": code_fingerprint(("trainable.cam.lung_segment",), ("torch", "torchxrayvision"))}

    def build() -> tuple[dict[str, np.ndarray], dict]:
        masks = segment_lungs(images, build_pspnet(weights), log=log)
        return {"masks": np.packbits(masks, axis=-1)}, {"weights": str(weights), "images": len(images)}

    entry = DiskCache(root, "lungseg", log).get_or_create(description, build)
    log(f"PSPNet lung masks for {len(images)} images: {'read from the disk cache' if entry.hit else 'segmented'} "
        f"in {entry.seconds:.1f}s (weights {weights})")
    return np.unpackbits(entry.arrays["masks"], axis=-1, count=images.shape[-1]).astype(bool)


def check_lung_masks(mode: str, has_mask: np.ndarray, ids: list[str]) -> None:
    """Fail before any work when the chosen source cannot serve every image."""
    if mode not in LUNG_MASK_SOURCES:
        raise DataError(f"lung_masks must be one of {list(LUNG_MASK_SOURCES)} (got {mode!r})")
    if mode == "data" and not has_mask.all():
        missing = np.flatnonzero(~has_mask)
        raise DataError(f"lung_masks: data needs a lung mask (manifest mask_path) for every image; "
                        f"{len(missing)} of {len(has_mask)} have none (first: {ids[missing[0]]})")
    if mode == "pspnet":
        pspnet_weights()


def choose_lung_masks(mode: str, images: np.ndarray, data_masks: np.ndarray, has_mask: np.ndarray,
                      ids: list[str], images_digest: str, root: Path | None, atlas: Callable[[], np.ndarray],
                      log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """(bool masks (N, S, S) at the frame size, per-image source "data" | "atlas" | "pspnet")."""
    check_lung_masks(mode, has_mask, ids)
    if mode == "pspnet":
        return pspnet_masks(images, images_digest, root, log), np.full(len(images), "pspnet")
    use_data = has_mask if mode in ("auto", "data") else np.zeros(len(images), bool)
    masks = data_masks.copy()
    if not use_data.all():
        masks[~use_data] = atlas()
    return masks, np.where(use_data, "data", "atlas")
