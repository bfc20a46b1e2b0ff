"""A Grad-CAM training loss: the share of the head's signed evidence that lies outside a region.

For a head on global-average-pooled maps (g = mean_ij A_ij, Z = h·w cells), the Grad-CAM evidence
of an output y is E = Σ_k alpha_k A^k with alpha = (1/Z)·∂y/∂g (`trainable.cam.explain`). With the
maps held constant E is a differentiable function of the head's parameters: alpha comes from
`torch.autograd.grad(..., create_graph=True)` through the head only, so the optimiser can lower

    share = Σ_cells w_out·|E| / Σ_cells |E|          (mean over images)

where w_out is, per image and map cell, the fraction of the cell outside the region (the lungs, or
the border band outside the lungs: `region_weights`).

Why the *signed* evidence, not Grad-CAM's ReLU map of the true class: a loss on the ReLU map is
gamed (measured) — the head moves its outside-lung evidence into negative evidence for the other
class, which ReLU hides, and no decision changes. So the explained output is what decides:

* two classes: the logit difference y_1 − y_0 (one map per image);
* more classes: every class logit (C maps per image; the share is their mean).

`|E|` counts evidence of either sign, so outside-lung evidence cannot hide in the other class.

The maps are a tensor argument (`maps`, N×K×h×w): the head stage passes the cached view-0 maps;
a fine-tuning stage could pass a live backbone's maps (then gradients also reach the backbone).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CAM_LOSS_REGIONS = ("outside_lungs", "edge")


def region_weights(lung_masks: np.ndarray, edge: np.ndarray, region: str, h: int, w: int,
                   batch_size: int = 256) -> torch.Tensor:
    """float32 (N, h, w): per image and map cell, the fraction of the cell the loss counts against
    the head. `outside_lungs`: the cell outside the lung mask; `edge`: the cell in the border band
    outside the lungs (`trainable.cam.explain.edge_band`). Masks are bool (N, S, S) at the input."""
    if region not in CAM_LOSS_REGIONS:
        raise ValueError(f"cam_loss_region must be one of {list(CAM_LOSS_REGIONS)} (got {region!r})")
    edge_t = torch.from_numpy(np.asarray(edge, bool))
    out = []
    for s in range(0, len(lung_masks), batch_size):
        lung = torch.from_numpy(np.asarray(lung_masks[s:s + batch_size], bool))
        bad = ~lung if region == "outside_lungs" else edge_t & ~lung
        out.append(F.adaptive_avg_pool2d(bad.float().unsqueeze(1), (h, w))[:, 0])
    return torch.cat(out) if out else torch.zeros(0, h, w)


def signed_evidence(head: torch.nn.Module, maps: torch.Tensor, pooled: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N, M, h, w) signed Grad-CAM evidence E = Σ_k alpha_k A^k of the head's deciding outputs:
    M = 1 (y_1 − y_0) for two classes, M = C (every logit) otherwise. Differentiable w.r.t. the
    head's parameters (and w.r.t. `maps` when they require grad).

    `pooled`: the maps' spatial means when the caller has them (the feature cache does). The head
    is explained as it predicts: in eval mode (dropout off), restored afterwards."""
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()   # the cache's float16, when the float32 copy did not fit
    if pooled is None:
        pooled = maps.mean(dim=(2, 3))
    pooled = pooled.to(maps.dtype)
    if not pooled.requires_grad:
        pooled = pooled.detach().requires_grad_(True)
    was_training = head.training
    head.eval()
    try:
        with torch.enable_grad():
            logits = head(pooled)
            n_classes = logits.shape[1]
            outputs = [logits[:, 1] - logits[:, 0]] if n_classes == 2 else [logits[:, c] for c in range(n_classes)]
            grads = [torch.autograd.grad(o.sum(), pooled, create_graph=True, retain_graph=True)[0]
                     for o in outputs]   # rows are independent in eval mode: the sum's gradient is per image
    finally:
        head.train(was_training)
    alpha = torch.stack(grads, dim=1) / (maps.shape[2] * maps.shape[3])   # (N, M, K)
    return torch.einsum("nmk,nkhw->nmhw", alpha, maps)


def outside_share(evidence: torch.Tensor, outside: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per image (N,): Σ w_out·|E| / Σ |E| over the cells, averaged over the M maps of the image.
    `evidence` (N, M, h, w), `outside` (N, h, w). A map with no evidence at all (a dead head) counts
    as uniform, mean(w_out), as in `region_masses`: no evidence is no better than chance."""
    a = evidence.abs()
    inside = (a * outside.unsqueeze(1)).flatten(2).sum(2)
    total = a.flatten(2).sum(2)
    uniform = outside.flatten(1).mean(1, keepdim=True).expand_as(total)
    return torch.where(total > eps, inside / total.clamp_min(eps), uniform).mean(1)


def cam_loss(head: torch.nn.Module, maps: torch.Tensor, outside: torch.Tensor,
             pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar: the mean over images of the share of |signed evidence| outside the region
    (`outside_share` of `signed_evidence`); 0 ≤ value ≤ 1."""
    return outside_share(signed_evidence(head, maps, pooled), outside).mean()
