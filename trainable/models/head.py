"""The new classification head and its training loop on pooled backbone features."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from trainable.models.head_adam import HeadAdam


class Head(nn.Module):
    """Linear(C, hidden) → ReLU → Dropout → Linear(hidden, classes), applied to pooled features."""

    def __init__(self, in_features: int, hidden: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class Classifier(nn.Module):
    """Backbone feature maps → global average pool → Head: the model a user loads and explains."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def pool(self, maps: torch.Tensor, lung: object = None) -> torch.Tensor:
        """Global average pooling (`pool: gap`); `lung` is ignored (`LungPoolClassifier` uses it)."""
        return maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone(x)))


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) so a minority class counts as much as the majority."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                           sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a batch with class weights `weight`, or per-sample weights `sample_weight`
    (the batch loss is their weighted mean; `trainable.train.balance`)."""
    if sample_weight is None:
        return nn.functional.cross_entropy(logits, y, weight=weight)
    sw = sample_weight.to(logits.dtype)
    return (nn.functional.cross_entropy(logits, y, reduction="none") * sw).sum() / sw.sum()


def train_one_epoch(head: Head, optimizer: torch.optim.Optimizer | HeadAdam, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int, generator: torch.Generator, weight: torch.Tensor | None,
                    sample_weight: torch.Tensor | None = None,
                    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss.

    `weight`: class weights of the cross-entropy; `sample_weight` (len(x),): per-sample weights
    instead (the batch loss is their weighted mean); `penalty(idx)`: a scalar added to the loss of
    the batch of rows `idx` of x (the head stage's Grad-CAM loss, `trainable.cam.loss`)."""
    head.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for s in range(0, len(x), batch_size):
        idx = order[s:s + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = weighted_cross_entropy(head(x[idx]), y[idx], weight,
                                      None if sample_weight is None else sample_weight[idx])
        if penalty is not None:
            loss = loss + penalty(idx)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


@torch.no_grad()
def predict_proba(head: Head, x: torch.Tensor) -> np.ndarray:
    head.eval()
    return torch.softmax(head(x), dim=1).numpy()
