"""Score an exported model's Grad-CAM the way its sweep's CV did (metadata.json `scoring`).

`cxrtune evaluate` and the held-out scoring (`search.outputs.evaluate`, `search.outputs.heldout`)
take from here the two things CV's lung / edge mass depended on besides the model:

* the lung masks: `lung_masks` (auto | data | atlas | pspnet) applied with CV's own rule
  (`trainable.cam.lung_segment.choose_lung_masks`): auto, the data's mask where an image has one,
  else the atlas at the sweep's `atlas_threshold`; data, the data's (every image must have one);
  atlas, the atlas everywhere; pspnet, torchxrayvision's PSPNet for every image. PSPNet's weights
  missing offline is a one-line LungSegmentationError before any image is decoded.
* the layer: `cam_layer` other than `final` is full-model Grad-CAM at that layer of the exported
  model (`trainable.cam.camlayer.layer_cam_on`), as each fold's LayerCam was; `final` is the exact
  fast formula from the backbone's last maps (`trainable.cam.explain`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from trainable.cache import array_digest, cache_root
from trainable.cam.camlayer import FINAL, LayerCam, layer_cam_on
from trainable.cam.lung_segment import choose_lung_masks, pspnet_weights
from trainable.data.dataset import Dataset
from trainable.data.lungs import lung_atlas
from trainable.errors import DataError, ModelError


def scoring_settings(meta: dict) -> dict:
    """How the sweep scored Grad-CAM (metadata.json["scoring"]); models exported before it was
    recorded get the defaults they were scored with (final layer, auto masks)."""
    recorded = meta.get("scoring") or {}
    out = {"lung_masks": "auto", "atlas_threshold": float(meta.get("atlas_threshold", 0.5)), "cam_target": "true",
           "cam_layer": FINAL, "min_cell": 5, "group_column": "source", "edge_band": float(meta["edge_band"])}
    return out | {k: v for k, v in recorded.items() if k in out}


def check_scoring_inputs(scoring: dict, model_dir: str | Path) -> None:
    """Fail before any work when a recorded mask source cannot run here (PSPNet's weights offline)."""
    if scoring["lung_masks"] == "pspnet":
        pspnet_weights(instead=f": the model {model_dir} was scored with PSPNet lung masks "
                               f"(metadata.json scoring.lung_masks: pspnet) and is scored with them here too")


def lung_masks_as_scored(scoring: dict, dataset: Dataset, images: np.ndarray, data_masks: np.ndarray,
                         data: str, log: Callable[[str], None] = lambda m: None) -> tuple[np.ndarray, np.ndarray]:
    """(bool masks (N, S, S) at the decoded size, per image "data" | "atlas" | "pspnet"), by CV's rule."""
    mode = str(scoring["lung_masks"])
    has_mask = np.asarray(dataset.has_masks, bool)
    ids = dataset.table["id"].astype(str).tolist()
    if mode == "data" and not has_mask.all():
        first = ids[int(np.flatnonzero(~has_mask)[0])]
        raise DataError(f"{data}: the model was scored with lung_masks: data, and image {first!r} has no mask "
                        f"({int((~has_mask).sum())} of {len(dataset)} have none)")
    size, threshold = int(images.shape[-1]), float(scoring["atlas_threshold"])
    # PSPNet's masks are cached by the decoded images' content, as the sweep's are
    return choose_lung_masks(mode, images, data_masks, has_mask, ids, array_digest(images), cache_root(),
                             lambda: lung_atlas(size, threshold), log)


def layer_cam_as_scored(backbone: nn.Module, meta: dict, scoring: dict, model_dir: str | Path,
                        batch_size: int | None = None) -> LayerCam | None:
    """The exported model's LayerCam at the sweep's `cam_layer` (None for `final`: the fast formula)."""
    layer = str(scoring["cam_layer"])
    if layer == FINAL:
        return None
    pre = meta["preprocessing"]
    try:
        return layer_cam_on(backbone, pre, layer, float(pre["crop_margin"]), int(pre["input_size"]), batch_size)
    except AttributeError:
        raise ModelError(f"{Path(model_dir) / 'metadata.json'}: scoring.cam_layer {layer!r} is not a module of "
                         f"the exported backbone {meta['backbone']!r}") from None
