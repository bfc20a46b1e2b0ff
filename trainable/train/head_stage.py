"""The head stage: each fold's head trains on the frozen backbone's cached features.

The fast path: with the backbone frozen its last maps depend only on (backbone, weights, input
size, crop, view, image), so they are computed once per sweep (`trainable.prepare`); an epoch is
a pass over pooled vectors, and Grad-CAM is exact from the cached maps (`trainable.cam.explain`).
With `settings.cam_layer` other than `final`, the masses come from the full model at that layer
(`trainable.cam.camlayer.LayerCam`) instead.

Training levers (README "Training levers"): `balance` (loss weights: `trainable.train.balance`) and
`cam_loss` λ > 0 (`CamTerm`: λ × the share of the head's signed Grad-CAM evidence outside the
lungs, `trainable.cam.loss`). The pooled vectors a head trains on come from augmented views, but
only view 0's maps are cached, so the Grad-CAM loss of a batch row is computed on its image's
view-0 maps (the float32 copy `cached_scoring` builds once per trial for scoring: no second copy).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainable.cam.explain import GridScorer, edge_band, focus_reference
from trainable.cam.loss import cam_loss, region_weights
from trainable.models.featureset import FeatureSet
from trainable.models.head import Head, predict_proba, train_one_epoch
from trainable.models.head_adam import HeadAdam
from trainable.shared import Prepared
from trainable.train.balance import epoch_loss_weights
from trainable.train.lockstep import FoldResult, cam_targets, fold_result, lockstep_epoch
from trainable.train.oversample import oversampled_rows

if TYPE_CHECKING:
    from trainable.cam.camlayer import LayerCam


@dataclass
class FoldState:
    head: Head
    optimizer: HeadAdam
    generator: torch.Generator


def new_fold_state(config: dict, n_features: int, n_classes: int, seed: int) -> FoldState:
    torch.manual_seed(seed)
    head = Head(n_features, int(config["hidden"]), n_classes, float(config["dropout"]))
    # fused Adam: one kernel per step instead of a dozen passes over the weights (a quarter of a
    # head-stage epoch on CPU); HeadAdam, not torch.optim.Adam, spares each trial actor the import
    # of torch._dynamo (trainable.models.head_adam)
    opt = HeadAdam(head.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    return FoldState(head, opt, torch.Generator().manual_seed(seed))


# view-0 maps are converted to float32 once per trial up to this size; larger sets (many images,
# big grids) convert each validation batch every epoch instead, to bound a trial's memory
FLOAT32_MAPS_MAX_BYTES = 512 * 2**20


@dataclass
class CachedScoring:
    """What the fast path's Grad-CAM scoring reads every epoch, built once per trial: the view-0
    maps (float32 when they fit FLOAT32_MAPS_MAX_BYTES: the cache holds float16, and converting
    them every epoch cost a tenth of an epoch), their pooled vectors, and the lung/edge weights
    of every image on the map grid."""

    maps: torch.Tensor
    pooled: torch.Tensor
    scorer: GridScorer


def cached_scoring(config: dict, prepared: Prepared, fs: FeatureSet) -> CachedScoring:
    maps = torch.from_numpy(fs.maps)
    if fs.maps.size * 4 <= FLOAT32_MAPS_MAX_BYTES:
        maps = maps.float()
    s = prepared.settings
    lung = prepared.lung_masks[float(config["crop_margin"])]
    return CachedScoring(maps, torch.from_numpy(fs.pooled[config["augment"]][0]),
                         GridScorer(lung, edge_band(s.input_size, s.edge_band), *fs.maps.shape[2:]))


@dataclass
class CamTerm:
    """The head stage's Grad-CAM loss (`cam_loss` λ > 0): λ × `trainable.cam.loss.cam_loss` on the
    view-0 maps of each batch row's image. `maps`, `pooled`: `CachedScoring`'s (every image, in
    order); `outside`: per image the fraction of each map cell outside the region (N, h, w)."""

    lam: float
    maps: torch.Tensor
    pooled: torch.Tensor
    outside: torch.Tensor

    def penalty(self, head: Head, rows: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
        """`train_one_epoch`'s penalty for a pass over the images `rows` (row i of x is image rows[i])."""
        rows_t = torch.as_tensor(rows)

        def term(idx: torch.Tensor) -> torch.Tensor:
            r = rows_t[idx]
            return self.lam * cam_loss(head, self.maps[r], self.outside[r], self.pooled[r])

        return term


def cam_term(config: dict, prepared: Prepared, scoring: CachedScoring) -> CamTerm | None:
    """The Grad-CAM loss of a trial, or None when its λ is 0 (the fast path does no extra work)."""
    lam = float(config["cam_loss"])
    if lam <= 0:
        return None
    s = prepared.settings
    outside = region_weights(prepared.lung_masks[float(config["crop_margin"])], edge_band(s.input_size, s.edge_band),
                             str(config["cam_loss_region"]), *scoring.maps.shape[2:])
    return CamTerm(lam, scoring.maps, scoring.pooled, outside)


def train_head_epoch(st: FoldState, config: dict, prepared: Prepared, pooled: np.ndarray, rows: np.ndarray,
                     views: np.ndarray, cam: CamTerm | None) -> float:
    """One epoch of a head on the cached pooled vectors `pooled[views, rows]` with the trial's loss
    weights (`balance`) and Grad-CAM loss (`cam`); returns the mean training loss."""
    y = np.asarray(prepared.labels)
    weight, sample_weight = epoch_loss_weights(config, prepared, rows)
    return train_one_epoch(st.head, st.optimizer, torch.from_numpy(pooled[views, rows]), torch.as_tensor(y[rows]),
                           int(config["batch_size"]), st.generator, weight, sample_weight,
                           None if cam is None else cam.penalty(st.head, rows))


def train_view(epoch: int, n_views: int, seed: int, fold: int) -> int:
    """Which cached augmentation view a fold trains on in an epoch (0 when there is no augmentation)."""
    if n_views <= 1:
        return 0
    return int(np.random.default_rng([seed, fold, epoch]).integers(n_views))


class HeadStage:
    """The lockstep `Stage` of the head epochs: train on a cached view, validate on view 0, score
    Grad-CAM with `cam` (a LayerCam) or from the cached maps (`scoring`, built once when not given)."""

    def __init__(self, states: list[FoldState], config: dict, prepared: Prepared, fs: FeatureSet,
                 cam: LayerCam | None = None, scoring: CachedScoring | None = None) -> None:
        self.states, self.config, self.prepared, self.fs, self.cam = states, config, prepared, fs, cam
        s = prepared.settings
        self.pooled = fs.pooled[config["augment"]]
        self.y = np.array(prepared.labels)
        self.labels = torch.as_tensor(self.y)
        self.lung = prepared.lung_masks[float(config["crop_margin"])]
        self.edge = edge_band(s.input_size, s.edge_band)
        self.scoring = scoring if cam is not None or scoring is not None else cached_scoring(config, prepared, fs)
        if float(config["cam_loss"]) > 0 and self.scoring is None:  # cam_layer scoring: the loss still needs the maps
            self.scoring = cached_scoring(config, prepared, fs)
        self.cam_term = None if self.scoring is None else cam_term(config, prepared, self.scoring)
        # focus is relative to the map grid the masses are scored on: the cached maps', or cam_layer's
        self.reference = focus_reference(self.lung, self.edge, *(cam.grid if cam is not None else fs.maps.shape[2:]))

    def run_fold(self, k: int, epoch: int) -> FoldResult:
        config, prepared, s, y = self.config, self.prepared, self.prepared.settings, self.y
        (tr, va), st = prepared.folds[k], self.states[k]
        v = train_view(epoch, len(self.pooled), s.seed, k)
        # oversample: the minority's rows again, from another cached view (trainable.train.oversample)
        rows, views = oversampled_rows(tr, y, v, len(self.pooled), epoch, s.seed, k) if config["oversample"] \
            else (tr, np.full(len(tr), v))
        train_loss = train_head_epoch(st, config, prepared, self.pooled, rows, views, self.cam_term)
        probs = predict_proba(st.head, torch.from_numpy(self.pooled[0][va]))
        targets = cam_targets(s.cam_target, y[va], probs, prepared.classes)
        if self.cam is None:   # exact Grad-CAM from the cached last maps (fast path)
            sc = self.scoring
            lung_mass, edge_mass = sc.scorer.scores(st.head, sc.maps[va], targets, va, sc.pooled[va])
        else:   # settings.cam_layer: the full model at a higher-resolution layer (trainable.cam.camlayer)
            lung_mass, edge_mass = self.cam.masses(st.head, prepared.image_array()[va], targets,
                                                   self.lung[va], self.edge)
        return fold_result(prepared, va, probs, lung_mass, edge_mass, self.reference, train_loss)

    def finish_epoch(self, epoch: int, results: list[FoldResult | None], final: bool
                     ) -> tuple[list[FoldResult], dict[str, float], bool]:
        return [r for r in results if r is not None], {}, final


def run_epoch(states: list[FoldState], config: dict, prepared: Prepared, fs: FeatureSet,
              epoch: int, cam: LayerCam | None = None, scoring: CachedScoring | None = None) -> dict:
    """One head epoch of every fold (`HeadStage`); returns its CV metrics (`summarise_results`)."""
    return lockstep_epoch(HeadStage(states, config, prepared, fs, cam, scoring), prepared, epoch)[0]
