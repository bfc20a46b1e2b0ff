"""Entry point 2 of 3: one trial = K patient-grouped folds trained in lockstep, one epoch at a time.

After every epoch the trial reports the cross-validated means (so ASHA stops trials on CV
evidence, never on one fold), the Grad-CAM lung / edge mass on the validation images, the
objective, and a checkpoint of the K heads (small: the frozen backbone is not in it).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
from ray import tune

# a trial process imports only what the head stage needs (torch, numpy, ray): timm, torchvision,
# scikit-learn and scipy added ~3 s to the start of every trial actor
from trainable.cam.explain import GridScorer, edge_band
from trainable.models.featureset import FeatureKey, FeatureSet
from trainable.train.groups import group_metrics
from trainable.models.head import Head, class_weights, predict_proba, train_one_epoch
from trainable.train.metrics import classification_metrics, confusion
from trainable.train.oversample import oversampled_rows
from trainable.shared import Prepared

if TYPE_CHECKING:
    from trainable.cam.camlayer import LayerCam

# search-space keys a trial understands, with their defaults
TRIAL_DEFAULTS: dict[str, object] = {
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "hidden": 256,
    "dropout": 0.2,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 32,
    "augment": "none",
    "crop_margin": 0.0,
    "class_weighted": True,
    "oversample": False,      # minority class twice per epoch, the copy augmented (trainable.train.oversample)
    # fine-tuning stage after the head epochs (trainable.train.finetune); ft_epochs 0 = none
    "ft_epochs": 0,
    "ft_lr": 1e-5,
    "ft_blocks": "all",       # "all" or N: the last N blocks of the backbone train (finetune.backbone_blocks)
    "ft_bn": "frozen",        # "frozen": BatchNorm in eval mode, affine frozen; "train": updated
    "patience": 0,            # ft early stopping on per-fold validation loss; 0 = off (best epoch still restored)
}

ScoreFn = Callable[[dict[str, float]], float]


def feature_key(config: dict, prepared: Prepared) -> FeatureKey:
    return FeatureKey(backbone=config["backbone"], weights=config["weights"],
                      crop_margin=float(config["crop_margin"]), input_size=prepared.settings.input_size)


def with_defaults(config: dict) -> dict:
    unknown = set(config) - set(TRIAL_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown trial config key(s): {sorted(unknown)}")
    return {**TRIAL_DEFAULTS, **config}


@dataclass
class FoldState:
    head: Head
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def new_fold_state(config: dict, n_features: int, n_classes: int, seed: int) -> FoldState:
    torch.manual_seed(seed)
    head = Head(n_features, int(config["hidden"]), n_classes, float(config["dropout"]))
    # fused: one kernel per step instead of a dozen passes over the weights (a quarter of a
    # head-stage epoch on CPU); the same updates to float rounding
    opt = torch.optim.Adam(head.parameters(), lr=float(config["lr"]),
                           weight_decay=float(config["weight_decay"]), fused=True)
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


def train_view(epoch: int, n_views: int, seed: int, fold: int) -> int:
    """Which cached augmentation view a fold trains on in an epoch (0 when there is no augmentation)."""
    if n_views <= 1:
        return 0
    return int(np.random.default_rng([seed, fold, epoch]).integers(n_views))


def cam_targets(target: str, labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> torch.Tensor:
    """The class each image's Grad-CAM explains: its true class, the predicted one, or a named class."""
    if target == "true":
        return torch.as_tensor(labels)
    if target == "predicted":
        return torch.as_tensor(probs.argmax(1))
    return torch.full((len(labels),), classes.index(target), dtype=torch.long)


def run_epoch(states: list[FoldState], config: dict, prepared: Prepared, fs: FeatureSet,
              epoch: int, cam: LayerCam | None = None, scoring: CachedScoring | None = None) -> dict:
    """Train every fold once, validate, score Grad-CAM (with `cam`, or from the cached maps:
    `scoring`, built here when the caller does not keep one across epochs).

    Returns the CV means of the per-fold metrics, per-class lung/edge mass and the confusion
    matrix over all out-of-fold predictions, and per-fold lists (`fold_*`).
    """
    s = prepared.settings
    pooled = fs.pooled[config["augment"]]
    y = np.array(prepared.labels)
    labels = torch.as_tensor(y)
    lung = prepared.lung_masks[float(config["crop_margin"])]
    edge = edge_band(s.input_size, s.edge_band)
    if cam is None and scoring is None:
        scoring = cached_scoring(config, prepared, fs)
    lung_share = lung.mean(axis=(1, 2)) if scoring is None else scoring.scorer.lung_share  # per image
    per_fold: dict[str, list[float]] = {}
    oof_probs = np.zeros((len(y), len(prepared.classes)))
    oof_lung, oof_edge = np.zeros(len(y)), np.zeros(len(y))
    for k, ((tr, va), st) in enumerate(zip(prepared.folds, states)):
        v = train_view(epoch, len(pooled), s.seed, k)
        # oversample: the minority's rows again, from another cached view (trainable.train.oversample)
        rows, views = oversampled_rows(tr, y, v, len(pooled), epoch, s.seed, k) if config["oversample"] \
            else (tr, np.full(len(tr), v))
        weight = class_weights(y[rows], len(prepared.classes)) if config["class_weighted"] else None
        train_loss = train_one_epoch(st.head, st.optimizer, torch.from_numpy(pooled[views, rows]), labels[rows],
                                     int(config["batch_size"]), st.generator, weight)
        probs = predict_proba(st.head, torch.from_numpy(pooled[0][va]))
        targets = cam_targets(s.cam_target, y[va], probs, prepared.classes)
        if cam is None:   # exact Grad-CAM from the cached last maps (fast path)
            lung_mass, edge_mass = scoring.scorer.scores(st.head, scoring.maps[va], targets, va,
                                                         scoring.pooled[va])
        else:   # settings.cam_layer: the full model at a higher-resolution layer (trainable.cam.camlayer)
            lung_mass, edge_mass = cam.masses(st.head, prepared.image_array()[va], targets, lung[va], edge)
        oof_probs[va], oof_lung[va], oof_edge[va] = probs, lung_mass, edge_mass
        m = fold_metrics(prepared, va, probs, lung_mass, edge_mass, float(lung_share[va].mean()), train_loss)
        for name, value in m.items():
            per_fold.setdefault(name, []).append(value)
    return summarise_folds(prepared, per_fold, oof_probs, oof_lung, oof_edge)


def fold_metrics(prepared: Prepared, va: np.ndarray, probs: np.ndarray, lung_mass: np.ndarray,
                 edge_mass: np.ndarray, lung_share: float, train_loss: float) -> dict[str, float]:
    """One fold's validation metrics, group metrics and Grad-CAM masses (head and fine-tune stage).

    `lung_share`: the mean fraction of the validation images the lung masks cover (lung_enrichment
    is lung_mass over it)."""
    s = prepared.settings
    y = np.asarray(prepared.labels)
    m = classification_metrics(y[va], probs, len(prepared.classes))
    fold_groups = group_metrics(y[va], probs, prepared.groups[va], prepared.classes, s.min_cell)
    m.update(worst_group_accuracy=fold_groups["worst_group_accuracy"],
             within_group_auc=fold_groups["within_group_auc"])
    m.update(train_loss=train_loss, lung_mass=float(lung_mass.mean()),
             edge_mass=float(edge_mass.mean()),
             lung_enrichment=float(lung_mass.mean() / max(lung_share, 1e-9)))
    return m


def summarise_folds(prepared: Prepared, per_fold: dict[str, list[float]], oof_probs: np.ndarray,
                    oof_lung: np.ndarray, oof_edge: np.ndarray) -> dict:
    """CV means of the per-fold metrics plus the pooled out-of-fold ones (see `run_epoch`)."""
    s = prepared.settings
    y = np.asarray(prepared.labels)
    out: dict = {name: float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")
                 for name, values in per_fold.items()}
    # per (group × class) recall on all out-of-fold predictions: cells are too small per fold
    pooled = group_metrics(y, oof_probs, prepared.groups, prepared.classes, s.min_cell)
    out |= {k: v for k, v in pooled.items() if k.startswith("recall_")}
    # trial-level group metrics come from the pooled out-of-fold predictions; the per-fold values
    # (cells of a few images) stay in fold_worst_group_accuracy
    out["fold_mean_worst_group_accuracy"] = out.pop("worst_group_accuracy")
    out.pop("within_group_auc")
    out["worst_group_accuracy"] = pooled["worst_group_accuracy"]
    out["within_group_auc"] = pooled["within_group_auc"]
    for c, name in enumerate(prepared.classes):
        out[f"lung_mass_{name}"] = float(oof_lung[y == c].mean())
        out[f"edge_mass_{name}"] = float(oof_edge[y == c].mean())
    out["confusion"] = json.dumps(confusion(y, oof_probs.argmax(1), len(prepared.classes)).tolist())
    return out | {f"fold_{name}": values for name, values in per_fold.items()
                  if name in ("balanced_accuracy", "lung_mass", "worst_group_accuracy")}


def _save(d: str, states: list[FoldState], epoch: int, history: list[dict]) -> tune.Checkpoint:
    torch.save({"epoch": epoch, "history": history,
                "heads": [st.head.state_dict() for st in states],
                "optimizers": [st.optimizer.state_dict() for st in states],
                "generators": [st.generator.get_state() for st in states]},
               os.path.join(d, "state.pt"))
    return tune.Checkpoint.from_directory(d)


def _restore(states: list[FoldState], checkpoint: tune.Checkpoint) -> tuple[int, list[dict]]:
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    for st, h, o, g in zip(states, state["heads"], state["optimizers"], state["generators"]):
        st.head.load_state_dict(h)
        st.optimizer.load_state_dict(o)
        st.generator.set_state(g)
    return state["epoch"], state["history"]


def run_trial(config: dict, prepared: Prepared, score: ScoreFn) -> None:
    """Ray Tune function trainable: reads `config`, reports CV metrics and a checkpoint per epoch."""
    config = with_defaults(config)
    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    fs = prepared.feature_set(feature_key(config, prepared))
    n_classes = len(prepared.classes)
    states = [new_fold_state(config, fs.maps.shape[1], n_classes, prepared.settings.seed + k)
              for k in range(len(prepared.folds))]
    from trainable.cam.camlayer import layer_cam_for  # builds backbones: imported only by a trial that runs one

    cam = layer_cam_for(config["backbone"], config["weights"], prepared.settings.cam_layer,
                        float(config["crop_margin"]), prepared.settings.input_size)
    start_epoch, history = 0, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        start_epoch, history = _restore(states, checkpoint)
    node = ray.get_runtime_context().get_node_id()
    # fault-tolerance drills (tests, docs/cluster.md): slow every epoch down so a worker can be killed mid-trial
    delay_s = float(os.environ.get("CXRTUNE_EPOCH_DELAY_S", "0") or 0)
    scoring = cached_scoring(config, prepared, fs) if cam is None else None
    for epoch in range(start_epoch, prepared.settings.epochs):
        if delay_s > 0:
            time.sleep(delay_s)
        metrics = run_epoch(states, config, prepared, fs, epoch, cam, scoring)
        metrics["objective"] = float(score(metrics))
        metrics["epoch"] = epoch + 1
        metrics["stage"] = "head"
        history.append({k: v for k, v in metrics.items() if not k.startswith("fold_") and k != "confusion"})
        info = {"node_id": node, "restored_from_epoch": start_epoch,  # > 0: resumed from a checkpoint
                "weights_source": fs.weights_info.get("source", ""),
                "weights_sha256": fs.weights_info.get("sha256") or "",
                "cam_grid": "x".join(map(str, cam.grid if cam else fs.maps.shape[2:]))}
        with tempfile.TemporaryDirectory(prefix="cxrtune-ckpt-") as d:
            tune.report(metrics | info, checkpoint=_save(d, states, epoch + 1, history))
    if int(config["ft_epochs"]) > 0:
        from trainable.train.finetune import run_finetune  # imported here: finetune builds on this module

        run_finetune(states, config, prepared, fs, score, history, checkpoint, start_epoch)

