"""Evidence a person can see: Grad-CAM montages of validation images, one column per model.

Each column is one trial; each row one validation image, explained by the head of the fold that
did NOT train on it (the trial's last checkpoint holds one head per fold), so the picture shows
out-of-fold evidence — what cross-validation scored. When the trial fine-tuned, its last checkpoint
holds each fold's fine-tuned model (restored to its best ft epoch), and the maps are recomputed with
that fold's own backbone, as the fine-tuning stage did for its lung / edge mass. With the sweep's
`cam_layer` other than `final` the maps are full-model Grad-CAM at that layer (a LayerCam over the
ImageNet backbone, or over the fold's fine-tuned one), as CV scored them; the lung masks are the
sweep's (`prepared.lung_masks`: its `lung_masks` source).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainable.atomic import atomic_file  # noqa: E402
from trainable.cam.camlayer import FINAL, LayerCam, layer_cam_for, layer_cam_on  # noqa: E402
from trainable.cam.explain import edge_band, gradcam_from_maps, normalise_and_resize, region_masses  # noqa: E402
from trainable.data.images import geometry, read_gray  # noqa: E402
from trainable.models.head import Classifier, Head, predict_proba  # noqa: E402
from trainable.shared import Prepared, with_defaults  # noqa: E402
from trainable.train.checkpoint import fold_models, read_checkpoint  # noqa: E402
from trainable.train.finetune import fold_model, predict_with_maps  # noqa: E402
from trainable.train.lockstep import cam_targets  # noqa: E402


def fold_heads(results: Path, trial_id: str) -> list[dict]:
    """The per-fold state dicts of a trial's best-epoch checkpoint (the sweep keeps it beside the
    latest: search/sweep.py's CheckpointConfig): each fold's head, or its whole fine-tuned model
    (keys `backbone.*`, `head.*`) when the trial reached the fine-tuning stage."""
    return fold_models(best_checkpoint(results, trial_id))


def best_checkpoint(results: Path, trial_id: str) -> dict:
    """The kept checkpoint whose last epoch has the highest objective (the earliest of equal ones,
    as trials.csv's best_epoch takes it), read."""
    dirs = sorted((results / "tune").glob(f"*_{trial_id}_*"))
    ckpts = sorted((c for d in dirs for c in d.glob("checkpoint_*")), key=lambda p: p.name)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint of trial {trial_id} under {results / 'tune'}")
    states = [read_checkpoint(c) for c in ckpts]
    # after fine-tuning, the heads alone would explain the ImageNet maps: fold_models gives the whole models
    return max(enumerate(states), key=lambda i_s: (_last_objective(i_s[1]), -i_s[0]))[1]


def _last_objective(state: dict) -> float:
    history = state.get("history") or []
    value = history[-1].get("objective") if history else None
    return float(value) if value is not None and value == value else float("-inf")


def _finetuned(states: list[dict]) -> bool:
    return any(k.startswith("backbone.") for k in states[0])


def pick_images(prepared: Prepared, n: int, seed: int = 0) -> np.ndarray:
    """`n` images taken round-robin over the classes, in a seeded order (deterministic)."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(prepared.labels == c))) for c in range(len(prepared.classes))]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
    return np.array(picked)


def trial_cams(prepared: Prepared, config: dict, heads: list[dict], picks: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(CAM at input size, predicted class, lung mass, edge mass) of each picked image, at the
    sweep's `cam_layer` (`final`: exactly from the last maps)."""
    config = with_defaults(config)
    fs = prepared.features_for(config)
    fold_of = np.empty(len(prepared.labels), np.int64)
    for k, (_, va) in enumerate(prepared.folds):
        fold_of[va] = k
    s = prepared.settings
    size, margin = s.input_size, float(config["crop_margin"])
    lung = prepared.lung_masks[margin]
    edge = edge_band(size, s.edge_band)
    cams, preds = [], []
    models: dict[int, tuple[Classifier, LayerCam | None]] = {}
    # head-only trials: CV's LayerCam over the frozen backbone (None at `final`)
    frozen_cam = None if _finetuned(heads) else layer_cam_for(config["backbone"], config["weights"],
                                                               s.cam_layer, margin, size)
    for i in picks:
        image = prepared.image_array()[i:i + 1]
        if _finetuned(heads):  # this fold's fine-tuned backbone: its maps, not the cached ImageNet ones
            k = int(fold_of[i])
            if k not in models:
                model = fold_model(config, fs.maps.shape[1], len(prepared.classes), heads[k])
                models[k] = model, (None if s.cam_layer == FINAL else
                                    layer_cam_on(model.backbone, fs.preprocessing, s.cam_layer, margin, size))
            model, cam = models[k]
            head = model.head
            probs, maps = predict_with_maps(model, image, fs.preprocessing, margin, size)
            pooled = None   # fine-tuning pools globally (space: pool lungs needs ft_epochs 0)
        else:
            head = Head(fs.maps.shape[1], int(config["hidden"]), len(prepared.classes), float(config["dropout"]))
            head.load_state_dict(heads[fold_of[i]])
            cam = frozen_cam
            maps = torch.from_numpy(fs.maps[i:i + 1].astype(np.float32))
            # pool: lungs: the cached lung-masked vector of view 0 (the head's input; Grad-CAM stays exact)
            pooled = maps.mean(dim=(2, 3)) if config["pool"] == "gap" else \
                torch.tensor(fs.pooled[config["augment"]][0][i:i + 1])   # a copy: object-store arrays are read-only
            probs = predict_proba(head, pooled)
        preds.append(int(probs.argmax()))
        target = cam_targets(s.cam_target, prepared.labels[i:i + 1], probs, prepared.classes)
        if cam is None:
            cams.append(normalise_and_resize(gradcam_from_maps(head, maps, target, pooled), size)[0].detach().numpy())
        else:  # the sweep's cam_layer: full-model Grad-CAM at that layer, as CV's LayerCam
            cams.append(cam.cams(head, image, target)[0].numpy())
    cams_arr = np.stack(cams)
    lung_mass, edge_mass = region_masses(cams_arr, lung[picks], edge)
    return cams_arr, np.array(preds), lung_mass, edge_mass


def write_montage(out_png: Path, prepared: Prepared, columns: list[tuple[str, dict, list[dict]]],
                  n_images: int = 8) -> Path:
    """A grid: rows = validation images, columns = (title, config, fold heads) of each model."""
    picks = pick_images(prepared, n_images, prepared.settings.seed)
    size = prepared.settings.input_size
    band = max(1, int(np.ceil(size * prepared.settings.edge_band)))
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(3.1 * len(columns), 3.2 * len(picks)),
                             squeeze=False)
    for c, (title, config, heads) in enumerate(columns):
        config = with_defaults(config)
        margin = float(config["crop_margin"])
        cams, preds, lung_mass, edge_mass = trial_cams(prepared, config, heads, picks)
        for r, i in enumerate(picks):
            ax = axes[r, c]
            img = geometry(read_gray(prepared.paths[i], prepared.settings.base_size)[None], margin, size)[0, 0]
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.imshow(cams[r], cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.contour(prepared.lung_masks[margin][i], levels=[0.5], colors="lime", linewidths=1.0)
            ax.add_patch(plt.Rectangle((band - 0.5, band - 0.5), size - 2 * band, size - 2 * band,
                                       fill=False, ls="--", lw=0.8, ec="white"))
            truth, pred = prepared.classes[prepared.labels[i]], prepared.classes[preds[r]]
            ax.set_title(f"{'' if r else title + chr(10)}{prepared.ids[i]}: {truth}→{pred}\n"
                         f"lung {lung_mass[r]:.2f}  edge {edge_mass[r]:.2f}", fontsize=8)
            ax.axis("off")
    target = prepared.settings.cam_target
    layer = prepared.settings.cam_layer
    fig.suptitle(f"Grad-CAM (target: {target if target not in ('true', 'predicted') else target + ' class'}; "
                 f"layer: {layer}; lung masks: {prepared.settings.lung_masks})"
                 "\ngreen: lung mask · dashed: edge band", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / len(picks)))
    with atomic_file(out_png) as f:
        fig.savefig(f, dpi=80, format="png")
    plt.close(fig)
    return out_png
