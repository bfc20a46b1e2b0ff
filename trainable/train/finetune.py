"""The fine-tuning stage: backbone + head per fold on the decoded images, after the head epochs.

`run_trial` runs `FtStage` through the lockstep engine (`trainable.train.lockstep`) when
`ft_epochs` > 0. Each fold starts from the ImageNet (or
configured) backbone and the head its head stage trained, and trains both at `ft_lr` (Adam) on
the decoded images (`Prepared.image_array()`), augmented on the fly by the trial's policy through
the same geometry code as the feature cache (`trainable.data.images.geometry`). Every ft epoch is
reported to Tune like a head epoch (`training_iteration` continues; `stage` = "ft"), so ASHA
gives the expensive stage only to trials that earned it.

Space keys (defaults in `trainable.shared.TRIAL_DEFAULTS`):
  ft_epochs  int, 0 = no fine-tuning.
  ft_lr      learning rate of the stage (backbone and head).
  ft_blocks  "all", or N: only the last N *blocks* of the backbone train. A block is one group
             of timm's own `group_matcher(coarse=True)` (what timm uses for layer-wise LR decay):
             the stem, each stage (EfficientNet `blocks.i`, ResNet `layerN`, DenseNet
             `denseblockN`+`transitionN`, VGG conv groups …) and the final conv/norm. Models
             without a matcher (torchxrayvision) use the children of their feature sequence.
  ft_bn      "frozen" (default): every BatchNorm stays in eval mode with its affine parameters
             frozen: per-fold batches of a few hundred X-rays give noisy batch statistics, and
             moving the ImageNet running statistics shifts the features the head was trained on
             (Keras' fine-tuning guide does the same). "train": BN of the trainable blocks
             uses batch statistics and updates its running statistics and affine parameters.
  patience   early stopping: a fold stops after `patience` ft epochs without a lower loss on its
             *inner split* (`inner_split`: ~20% of the fold's training patients per class, held
             aside, so the validation fold only scores; 0 = never stops); either way each fold ends
             restored to its best ft epoch by that loss (Keras' `restore_best_weights`), and the
             trial's last report is of the restored models. The export refit does the same on all
             images (`finetune_all`).

Training levers (README "Training levers"; `trainable.train.ft_levers`), in the stage and in the
export refit alike: `balance` weighs the loss exactly as in the head stage
(`trainable.train.balance.epoch_loss_weights` on each epoch's training rows: class weights, or
per-sample weights for `group`); `cam_loss` λ > 0 adds λ × the share of the signed Grad-CAM
evidence outside the region, computed on the backbone's live maps of the augmented batch being
trained (α through the head with create_graph, so the step's one backward reaches the head and the
trainable backbone blocks) with the lung mask of that same augmented view (each image's base-size
mask through its image's affine and crop). λ = 0 computes none of it.

After each ft epoch the Grad-CAM lung/edge mass is recomputed with the fine-tuned backbone: its
target-layer maps of the validation images come from the same forward pass as the predictions,
and the fast formula (`trainable.cam.explain`) is exact for the GAP head on those maps.
With settings.cam_layer other than `final`, each fold's LayerCam (trainable.cam.camlayer) explains
the fold's own fine-tuned model at that layer instead, as the head stage does with the frozen one.
Checkpoints hold each fold's model, optimizer, best state and counters, so a trial resumes mid-stage.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trainable.cam.camlayer import FINAL, LayerCam
from trainable.cam.explain import edge_band, explanation_scores, focus_reference
from trainable.data.augment import AUGMENT_POLICIES
from trainable.data.images import geometry, to_model_input, view_params
from trainable.models.backbones import build_backbone, process_backbone
from trainable.models.features import inference_batch_size
from trainable.models.featureset import FeatureSet
from trainable.models.head import Classifier, Head
from trainable.shared import Prepared
from trainable.train.balance import epoch_loss_weights
from trainable.train.checkpoint import restore_ft
from trainable.train.ft_levers import LiveCam, ft_batch_loss, live_cam
from trainable.train.head_stage import FoldState
from trainable.train.lockstep import FoldResult, cam_targets, fold_result, run_lockstep
from trainable.train.oversample import oversampled_indices

FT_BN_POLICIES = ("frozen", "train")


def _device() -> torch.device:
    """CUDA when the trial was given a GPU (`gpus_per_trial`), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm and timm's BatchNormAct2d


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """The backbone's parameter names (relative to `Backbone.model`) in blocks, input → output."""
    body = model.body
    matcher = getattr(body, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        groups = group_parameters(body, matcher(coarse=True))
        blocks = [[f"body.{n}" for n in names] for names in groups.values()]
    else:  # no timm matcher: descend while there is one child with parameters, then its children
        prefix, mod = "body", body
        while True:
            kids = [(n, c) for n, c in mod.named_children() if any(True for _ in c.parameters())]
            if len(kids) != 1:
                break
            prefix, mod = f"{prefix}.{kids[0][0]}", kids[0][1]
        blocks = [[f"{prefix}.{n}.{p}" for p, _ in c.named_parameters()] for n, c in kids]
    return [b for b in blocks if b]


def _n_blocks(ft_blocks: object, available: int) -> int:
    if str(ft_blocks) == "all":
        return available
    return max(0, min(int(ft_blocks), available))


def set_trainable(model: Classifier, ft_blocks: object, ft_bn: str) -> int:
    """requires_grad for the head and the last `ft_blocks` blocks; returns the trainable backbone parameters."""
    blocks = backbone_blocks(model.backbone)
    n = _n_blocks(ft_blocks, len(blocks))
    train = {f"backbone.{p}" for b in blocks[len(blocks) - n:] for p in b}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head.") or name in train)
    if ft_bn == "frozen":
        for m in model.backbone.modules():
            if isinstance(m, _BN):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    return sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)


def train_mode(model: Classifier, ft_bn: str) -> None:
    """Train mode, except BatchNorm layers that must not move (all of them when `ft_bn` is frozen)."""
    model.train()
    for m in model.backbone.modules():
        if isinstance(m, _BN) and (ft_bn == "frozen" or not any(p.requires_grad for p in m.parameters(False))):
            m.eval()


def model_input(images: np.ndarray, pre: dict, margin: float, input_size: int,
                params: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (N, S, S) → normalised (N, C, H, W), channels_last (≈2× faster depthwise convs on CPU)."""
    x = geometry(images, margin, input_size, params)
    x = to_model_input(x, pre["in_chans"], tuple(pre["mean"]), tuple(pre["std"]))
    return x.contiguous(memory_format=torch.channels_last)


def epoch_params(policy: str, n: int, seed: int, fold: int, epoch: int) -> np.ndarray:
    """Fresh affine parameters for one ft epoch of one fold (seeded; identity for `none`)."""
    sub = int(np.random.default_rng([seed, fold, epoch, 7]).integers(2**62))
    return view_params(AUGMENT_POLICIES[policy], n, sub, 1)


class EarlyStopping:
    """Best-so-far tracker on validation loss: keeps a copy of the best state; `stop` after
    `patience` epochs without improvement (patience 0: never stops, still keeps the best)."""

    def __init__(self, patience: int) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0 (got {patience})")
        self.patience = patience
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.bad_epochs = 0
        self.losses: list[float] = []

    def update(self, loss: float, epoch: int, model: nn.Module) -> bool:
        """Record epoch `epoch`'s loss; True when it is the best so far (its state is kept)."""
        self.losses.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


@dataclass
class FtFold:
    model: Classifier
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    early: EarlyStopping
    stopped: bool = False
    current: dict = field(default_factory=dict)   # this epoch's validation result
    best: dict = field(default_factory=dict)      # the best epoch's validation result
    cam: LayerCam | None = None                   # settings.cam_layer over this fold's own backbone


def new_ft_fold(config: dict, fs: FeatureSet, head: Head, seed: int, cam_layer: str = FINAL,
                input_size: int = 0) -> FtFold:
    # a copy of the process's one build: K folds don't each read the weights again
    backbone = copy.deepcopy(process_backbone(config["backbone"], config["weights"]))
    # a non-final cam_layer is explained on the model being fine-tuned (same modules), as in the head stage
    cam = None if cam_layer == FINAL else LayerCam(backbone, cam_layer, float(config["crop_margin"]), input_size)
    model = Classifier(backbone.model, copy.deepcopy(head))
    model.to(device=_device(), memory_format=torch.channels_last)
    set_trainable(model, config["ft_blocks"], config["ft_bn"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=float(config["ft_lr"]),
                           weight_decay=float(config["weight_decay"]))
    return FtFold(model, opt, torch.Generator().manual_seed(seed), EarlyStopping(int(config["patience"])),
                  cam=cam)


def fold_model(config: dict, num_features: int, n_classes: int, state: dict) -> Classifier:
    """A fold's fine-tuned model (eval, CPU) from its checkpointed state dict (`state["ft"]["folds"][k]["model"]`)."""
    backbone = build_backbone(config["backbone"], "random")  # every weight comes from `state`
    head = Head(num_features, int(config["hidden"]), n_classes, float(config["dropout"]))
    model = Classifier(backbone.model, head)
    model.load_state_dict(state)
    return model.eval()


def train_ft_epoch(model: Classifier, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                   images: np.ndarray, rows: np.ndarray, y: np.ndarray, config: dict, pre: dict,
                   input_size: int, params: np.ndarray, weight: torch.Tensor | None,
                   sample_weight: torch.Tensor | None = None, cam: LiveCam | None = None) -> float:
    """One shuffled pass over `rows` (each augmented by its row of `params`); mean training loss.

    `weight` / `sample_weight` (aligned with `rows`): the `balance` loss weights; `cam`: the
    Grad-CAM loss on the batch's live maps, with each view's own lung mask (`trainable.train.ft_levers`)."""
    train_mode(model, config["ft_bn"])
    order = torch.randperm(len(rows), generator=generator).numpy()
    bs, total = int(config["batch_size"]), 0.0
    from trainable.progress import track

    dev = next(model.parameters()).device
    weight = None if weight is None else weight.to(dev)
    for s in track(range(0, len(rows), bs), "fine-tuning epoch", total=len(rows), unit="images",
                   step=lambda s: len(order[s:s + bs])):
        b = order[s:s + bs]
        x = model_input(images[rows[b]], pre, float(config["crop_margin"]), input_size, params[b]).to(dev)
        target = torch.as_tensor(y[rows[b]]).to(dev)
        sw = None if sample_weight is None else sample_weight[torch.as_tensor(b)].to(dev)
        term = None if cam is None else (cam.lam, cam.outside(rows[b], params[b]))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = ft_batch_loss(model, x, target, weight, sw, term)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(b)
    return total / len(rows)


@torch.no_grad()
def predict_with_maps(model: Classifier, images: np.ndarray, pre: dict, margin: float, input_size: int,
                      batch_size: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(probabilities, target-layer maps) of unaugmented images: one forward serves both."""
    model.eval()
    dev = next(model.parameters()).device
    batch_size = batch_size or inference_batch_size(dev)
    probs, maps = [], []
    for s in range(0, len(images), batch_size):
        m = model.backbone(model_input(images[s:s + batch_size], pre, margin, input_size).to(dev)).float()
        probs.append(torch.softmax(model.head(m.mean(dim=(2, 3))), 1).cpu())
        maps.append(m.cpu().contiguous())
    return torch.cat(probs).numpy(), torch.cat(maps)


def _epoch_rows(config: dict, tr: np.ndarray, y: np.ndarray, seed: int, fold: int,
                epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows of one ft epoch (minority twice when oversampling) and their augmentations."""
    rows = oversampled_indices(tr, y)[0] if config["oversample"] else tr
    return rows, epoch_params(config["augment"], len(rows), seed, fold, epoch)


# the share of a fold's training patients held aside for fine-tuning's early stopping (per class)
INNER_FRACTION = 0.2


def inner_split(rows: np.ndarray, y: np.ndarray, patients: np.ndarray | None, seed: int, fold: int,
                fraction: float = INNER_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, stop rows): about `fraction` of the patients of each class in `rows` (at least one
    when the class has two or more) are held aside, whole, for early stopping, so the outer
    validation fold only scores. Seeded by (seed, fold). No stop rows when the data are too small:
    early stopping then watches the training loss."""
    if patients is None or len(rows) == 0:
        return rows, rows[:0]
    rng = np.random.default_rng([seed, fold, 11])
    pats = np.asarray(patients)[rows]
    first_label = {}
    for p, label in zip(pats, y[rows]):
        first_label.setdefault(p, label)
    held: set = set()
    for c in sorted(set(first_label.values())):
        of_class = sorted(p for p, label in first_label.items() if label == c)
        if len(of_class) >= 2:
            n = max(1, int(round(fraction * len(of_class))))
            held |= set(rng.permutation(of_class)[:n].tolist())
    stop = np.isin(pats, list(held))
    return rows[~stop], rows[stop]


def inner_loss(model: Classifier, images: np.ndarray, y: np.ndarray, pre: dict, margin: float,
               input_size: int) -> float:
    """Mean cross-entropy of unaugmented images (the early-stopping signal)."""
    probs, _ = predict_with_maps(model, images, pre, margin, input_size)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))


class FtStage:
    """The lockstep `Stage` of the fine-tuning epochs: each fold's backbone + head train on the
    augmented images of most of its training patients and early-stop on the rest (`inner_split`:
    the outer validation fold only scores); they are validated on the unaugmented images of the
    validation fold (predictions and Grad-CAM from the same forward pass). A stopped fold keeps its
    best result; on the stage's last epoch every fold is restored to its best epoch (by the inner
    loss) and reports that."""

    def __init__(self, states: list[FoldState], config: dict, prepared: Prepared, fs: FeatureSet,
                 resume: dict | None = None) -> None:
        s = prepared.settings
        self.config, self.prepared, self.fs = config, prepared, fs
        self.images = prepared.image_array()
        self.y = np.asarray(prepared.labels)
        self.folds = [new_ft_fold(config, fs, st.head, s.seed + 1000 + k, s.cam_layer, s.input_size)
                      for k, st in enumerate(states)]
        self.done = restore_ft(self.folds, resume) if resume else 0
        self.cam = live_cam(config, prepared, fs.maps.shape[2:])  # None when cam_loss is 0
        self.splits = [inner_split(tr, self.y, prepared.patients, s.seed, k) for k, (tr, _) in enumerate(prepared.folds)]
        cam = self.folds[0].cam if self.folds else None
        self.reference = focus_reference(prepared.lung_masks[float(config["crop_margin"])],
                                         edge_band(s.input_size, s.edge_band),
                                         *(cam.grid if cam is not None else fs.maps.shape[2:]))

    def run_fold(self, k: int, epoch: int) -> FoldResult | None:
        ff, config, s, y = self.folds[k], self.config, self.prepared.settings, self.y
        if ff.stopped:
            return None
        fit, stop = self.splits[k]
        rows, params = _epoch_rows(config, fit, y, s.seed, k, epoch)
        weight, sample_weight = epoch_loss_weights(config, self.prepared, rows)  # as the head stage
        loss = train_ft_epoch(ff.model, ff.optimizer, ff.generator, self.images, rows, y, config,
                              self.fs.preprocessing, s.input_size, params, weight, sample_weight, self.cam)
        watched = inner_loss(ff.model, self.images[stop], y[stop], self.fs.preprocessing,
                             float(config["crop_margin"]), s.input_size) if len(stop) else loss
        ff.current = self._validate(ff, k, loss)
        ff.current["metrics"]["ft_inner_loss"] = watched
        if ff.early.update(watched, epoch + 1, ff.model):
            ff.best = ff.current
        if ff.early.stop:  # restored now; its best result stands for it in later epochs
            ff.stopped = True
            ff.early.restore(ff.model)
        return ff.current

    def finish_epoch(self, epoch: int, results: list[FoldResult | None], final: bool
                     ) -> tuple[list[FoldResult], dict[str, float], bool]:
        last = final or all(ff.stopped for ff in self.folds)
        if last:
            for ff in self.folds:
                ff.early.restore(ff.model)
        reported = [ff.best if (last or ff.stopped) else ff.current for ff in self.folds]
        extra = {"ft_epochs_kept": float(np.mean([ff.early.best_epoch for ff in self.folds])),
                 # 1.0 when `patience` ended the stage: every fold stopped before ft_epochs
                 "ft_patience_stop": float(all(ff.stopped for ff in self.folds))}
        return reported, extra, last

    def _validate(self, ff: FtFold, k: int, train_loss: float) -> FoldResult:
        prepared, config, s = self.prepared, self.config, self.prepared.settings
        va = prepared.folds[k][1]
        margin = float(config["crop_margin"])
        lung = prepared.lung_masks[margin][va]
        probs, maps = predict_with_maps(ff.model, self.images[va], self.fs.preprocessing, margin, s.input_size)
        targets = cam_targets(s.cam_target, self.y[va], probs, prepared.classes)
        edge = edge_band(s.input_size, s.edge_band)
        if ff.cam is not None:  # settings.cam_layer: full-model Grad-CAM at that layer of the fine-tuned backbone
            lung_mass, edge_mass = ff.cam.masses(ff.model.head, self.images[va], targets, lung, edge)
        else:
            head = copy.deepcopy(ff.model.head).cpu()  # the exact Grad-CAM formula runs on the CPU maps
            lung_mass, edge_mass = explanation_scores(head, maps, targets, lung, edge)
        return fold_result(prepared, va, probs, lung_mass, edge_mass, self.reference, train_loss)


def finetune_folds(states: list[FoldState], config: dict, prepared: Prepared, fs: FeatureSet,
                   on_epoch: Callable[[int, dict, list[FtFold], bool], None] | None = None,
                   resume: dict | None = None) -> list[FtFold]:
    """Fine-tune every fold in lockstep for `ft_epochs` (fewer when every fold stopped early).

    `on_epoch(j, metrics, folds, last)` is called after ft epoch j (0-based) with the CV metrics;
    on the last one every fold is already restored to its best epoch. `resume`: the checkpoint's
    "ft" entry (`trainable.train.checkpoint.ft_state`). Returns the folds."""
    stage = FtStage(states, config, prepared, fs, resume)
    report = None if on_epoch is None else (lambda j, metrics, last: on_epoch(j, metrics, stage.folds, last))
    run_lockstep(stage, prepared, range(stage.done, int(config["ft_epochs"])), report)
    return stage.folds


def finetune_all(config: dict, prepared: Prepared, fs: FeatureSet, head: Head, n_epochs: int
                 ) -> tuple[Classifier, int]:
    """The export refit: fine-tune backbone + `head` on every image the way each fold was: up to
    `n_epochs`, early stopping on an inner split of the patients (`patience`), restored to the best
    epoch by the inner loss. Returns the model and the ft epochs it kept."""
    s = prepared.settings
    images = prepared.image_array()
    y = np.asarray(prepared.labels)
    ff = new_ft_fold(config, fs, head, s.seed + 1000)
    fit, stop = inner_split(np.arange(len(y)), y, prepared.patients, s.seed, 999)  # 999: not a CV fold
    cam = live_cam(config, prepared, fs.maps.shape[2:])
    from trainable.progress import track

    for j in track(range(n_epochs), f"export refit: fine-tuning on {len(fit)} images"):
        rows, params = _epoch_rows(config, fit, y, s.seed, 999, j)
        weight, sample_weight = epoch_loss_weights(config, prepared, rows)
        loss = train_ft_epoch(ff.model, ff.optimizer, ff.generator, images, rows, y, config, fs.preprocessing,
                              s.input_size, params, weight, sample_weight, cam)
        watched = inner_loss(ff.model, images[stop], y[stop], fs.preprocessing, float(config["crop_margin"]),
                             s.input_size) if len(stop) else loss
        ff.early.update(watched, j + 1, ff.model)
        if ff.early.stop:
            break
    ff.early.restore(ff.model)
    return ff.model.cpu().eval(), ff.early.best_epoch
