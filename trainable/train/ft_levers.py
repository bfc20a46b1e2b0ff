"""The training levers in the fine-tuning stage: `balance` loss weights and the live Grad-CAM loss.

`balance` (`trainable.train.balance.epoch_loss_weights`, exactly as the head stage): class weights,
or per-sample weights for `group`, computed on each ft epoch's training rows.

`cam_loss` λ > 0 (`LiveCam`): total loss = weighted CE + λ · the share of the signed Grad-CAM
evidence outside the region (`trainable.cam.loss.cam_loss`), where the maps A are the backbone's
*live* maps of the batch being trained — the augmented view the optimiser sees — so A is
differentiable: α = (1/Z)·∂y/∂g is taken through the head with `create_graph=True`, the one
`backward()` of the step carries the loss's gradient into the head and the backbone's trainable
parameters, and the backbone runs forward and backward once per step (no second pass).

The region weights per map cell come from the lung mask of *that* augmented view: each image's
base-size mask (`Prepared.base_masks`) goes through the same affine and crop as its image
(`trainable.data.images.mask_geometry` with the view's parameters), then `region_weights` averages
it down to the map grid. With λ = 0 nothing of this runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainable.cam.explain import edge_band
from trainable.cam.loss import cam_loss, region_weights
from trainable.data.images import mask_geometry
from trainable.models.head import Classifier, weighted_cross_entropy
from trainable.shared import Prepared


@dataclass
class LiveCam:
    """The ft stage's Grad-CAM loss: λ, the region, and what warps each view's lung mask."""

    lam: float
    region: str
    base_masks: np.ndarray   # `Prepared.base_masks`: bit-packed bool (N, S, ceil(S/8))
    side: int                # S, the base size
    margin: float            # the trial's crop_margin
    input_size: int
    edge: np.ndarray         # edge_band at the input size
    grid: tuple[int, int]    # the target layer's map grid at the input size

    def outside(self, images: np.ndarray, params: np.ndarray) -> torch.Tensor:
        """float32 (n, h, w): per map cell the fraction outside the region, for images `images`
        seen through the augmentations `params` (their rows of `view_params`)."""
        masks = np.unpackbits(self.base_masks[images], axis=-1, count=self.side).astype(bool)
        view = mask_geometry(masks, self.margin, self.input_size, params)
        return region_weights(view, self.edge, self.region, *self.grid)


def live_cam(config: dict, prepared: Prepared, grid: tuple[int, int]) -> LiveCam | None:
    """The Grad-CAM loss of a trial's fine-tuning, or None when its λ is 0 (nothing extra is paid).
    `grid`: the backbone's final map grid at the input size (the feature set's)."""
    lam = float(config["cam_loss"])
    if lam <= 0:
        return None
    if prepared.base_masks is None:
        raise ValueError("cam_loss > 0 with fine-tuning needs Prepared.base_masks (built by trainable.prepare)")
    s = prepared.settings
    return LiveCam(lam, str(config["cam_loss_region"]), prepared.base_masks, int(s.base_size),
                   float(config["crop_margin"]), int(s.input_size), edge_band(s.input_size, s.edge_band),
                   (int(grid[0]), int(grid[1])))


def ft_batch_loss(model: Classifier, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                  sample_weight: torch.Tensor | None, cam: tuple[float, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(total loss, λ·cam term or None) of one ft batch: one backbone forward serves the
    cross-entropy and, with `cam` = (λ, outside weights (n, h, w)), the Grad-CAM loss on the same
    live maps (the head explained in eval mode, as `trainable.cam.loss.signed_evidence` does)."""
    maps = model.backbone(x)
    pooled = maps.mean(dim=(2, 3))   # what Classifier.forward pools
    ce = weighted_cross_entropy(model.head(pooled), target, weight, sample_weight)
    if cam is None:
        return ce, None
    lam, outside = cam
    term = lam * cam_loss(model.head, maps, outside.to(device=maps.device, dtype=maps.dtype), pooled)
    return ce + term, term
