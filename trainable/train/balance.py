"""Loss weights of a training epoch: space key `balance: none | class | group`.

* `none`: plain cross-entropy.
* `class`: inverse-frequency class weights (`trainable.models.head.class_weights`), exactly what
  `class_weighted: true` always did.
* `group`: every (group × class) cell of the epoch's training rows weighs the same in total, as
  per-sample weights (mean 1); a cell with fewer than `settings.min_cell` images is folded into its
  class: all small cells of a class form one cell together. The group is the image's value of
  `settings.group_column` (`Prepared.groups`), so a head cannot win by fitting the big cells of a
  source (adult vs paediatric, one hospital) while missing the small ones.

Not set (`auto`, the default) follows `class_weighted`: true → `class`, false → `none`, so spaces
written before the key behave as they did. Weights are computed on the epoch's rows (with
`oversample`, the minority counts twice).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from trainable.models.head import class_weights

if TYPE_CHECKING:
    from trainable.shared import Prepared

BALANCE_MODES = ("none", "class", "group")


def balance_mode(config: dict) -> str:
    """The effective mode of a trial config: its `balance`, or `class_weighted`'s when it is `auto`."""
    mode = config.get("balance", "auto")
    if mode == "auto":
        return "class" if config.get("class_weighted", True) else "none"
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {list(BALANCE_MODES)} (got {mode!r})")
    return str(mode)


def group_weights(y: np.ndarray, groups: np.ndarray, min_cell: int) -> np.ndarray:
    """float64 per-sample weights (mean 1) under which every (group × class) cell has the same total;
    cells under `min_cell` images are merged per class into one cell."""
    y = np.asarray(y)
    groups = np.asarray(groups).astype(str)
    cell = np.array([f"{c}\x00{g}" for c, g in zip(y, groups)], dtype=object)
    names, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
    small = counts[inverse] < min_cell
    cell[small] = np.array([f"{c}\x00<small>" for c in y[small]], dtype=object)
    names, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
    w = len(y) / (len(names) * counts[inverse].astype(np.float64))
    return w


def loss_weights(config: dict, y: np.ndarray, groups: np.ndarray | None, n_classes: int, min_cell: int
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class weights for `cross_entropy(weight=…)`, per-sample weights) of an epoch's rows: at most
    one is not None (`balance_mode`)."""
    mode = balance_mode(config)
    if mode == "class":
        return class_weights(y, n_classes), None
    if mode == "group":
        if groups is None:
            raise ValueError("balance: group needs a group per image (Prepared.groups is None)")
        return None, torch.tensor(group_weights(y, groups, min_cell), dtype=torch.float32)
    return None, None


def epoch_loss_weights(config: dict, prepared: Prepared, rows: np.ndarray
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`loss_weights` of the images `rows` of an epoch (repeats counted: oversampling), with their
    labels and groups from `prepared`: what the head stage, fine-tuning and both export refits use.
    The per-sample weights, when there are, are aligned with `rows`."""
    y = np.asarray(prepared.labels)
    groups = None if prepared.groups is None else np.asarray(prepared.groups)[rows]
    return loss_weights(config, y[rows], groups, len(prepared.classes), prepared.settings.min_cell)
