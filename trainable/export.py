"""Entry point 3 of 3: export a trial's configuration as a model users can load, and load it.

An export directory holds
  model.pt       state_dict of `Classifier` (backbone + global-average-pool + head), or of
                 `LungPoolClassifier` for `pool: lungs` (lung-masked pooling, the atlas lung region at
                 the map grid as a buffer; `trainable.models.lung_pool`)
  metadata.json  backbone name and the exact timm architecture + pretrained tag it resolved to
                 (`timm_arch`, `timm_tag`; load_model builds exactly that), weights provenance, classes, preprocessing (base size, crop,
                 input size, mean/std, channels), Grad-CAM target layer (dotted name in the
                 module), the trial config and its cross-validated metrics.
The head is refit on every image of the sweep for the trial's best number of epochs; when that
best epoch is a fine-tuning epoch, backbone and head are then fine-tuned on every image for the
ft epochs the trial's folds kept, and model.pt holds the fine-tuned backbone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainable.atomic import atomic_dir
from trainable.data.images import geometry, read_gray, to_model_input
from trainable.errors import ModelError
from trainable.model_dir import check_model_dir
from trainable.models.backbones import build_backbone
from trainable.models.featureset import FeatureSet
from trainable.models.head import Classifier, Head
from trainable.models.lung_pool import atlas_cell_weights, pooled_classifier
from trainable.models.registry import UnknownBackboneError, get_spec
from trainable.progress import track
from trainable.shared import Prepared, with_defaults
from trainable.train.finetune import INNER_FRACTION, finetune_all
from trainable.train.head_stage import (
    cached_scoring,
    cam_term,
    new_fold_state,
    train_head_epoch,
    train_view,
)
from trainable.train.oversample import oversampled_rows


def refit_head(config: dict, prepared: Prepared, fs: FeatureSet, epochs: int) -> Head:
    """Train the head on all images (same schedule and views as a trial's fold)."""
    config = with_defaults(config)
    pooled = fs.pooled[config["augment"]]
    st = new_fold_state(config, pooled.shape[-1], len(prepared.classes), prepared.settings.seed)
    y = np.asarray(prepared.labels)
    everything = np.arange(len(y))
    # the trial's Grad-CAM loss too (None when cam_loss is 0); its loss weights come from `balance`
    cam = cam_term(config, prepared, cached_scoring(config, prepared, fs)) if float(config["cam_loss"]) > 0 else None
    for epoch in track(range(epochs), f"export refit: head on {len(y)} images"):
        v = train_view(epoch, len(pooled), prepared.settings.seed, 0)
        rows, views = (oversampled_rows(everything, y, v, len(pooled), epoch, prepared.settings.seed, 0)
                       if config["oversample"] else (everything, np.full(len(y), v)))
        train_head_epoch(st, config, prepared, pooled, rows, views, cam)
    return st.head.eval()


def ft_epochs_to_refit(config: dict, prepared: Prepared, epochs: int, metrics: dict) -> int:
    """Fine-tuning epochs of the export: none when the trial's best epoch was a head epoch, else the
    ft epochs up to that best epoch — the budget the scored folds had; within it the refit early-stops
    and restores on an inner split of the patients exactly as each fold did (`finetune_all`)."""
    if int(config["ft_epochs"]) <= 0 or epochs <= prepared.settings.epochs:
        return 0
    return int(epochs - prepared.settings.epochs)


def export_model(out_dir: str | Path, config: dict, prepared: Prepared, epochs: int,
                 metrics: dict) -> Path:
    """Refit and write `out_dir` atomically (a temp dir renamed into place)."""
    config = with_defaults(config)
    fs = prepared.features_for(config)
    n_ft = ft_epochs_to_refit(config, prepared, epochs, metrics)
    if n_ft and config["pool"] != "gap":
        raise ValueError("pool: lungs with ft_epochs > 0: fine-tuning with lung pooling is not implemented")
    head = refit_head(config, prepared, fs, max(1, min(epochs, prepared.settings.epochs)))
    backbone = build_backbone(config["backbone"], config["weights"])
    if n_ft:  # the fine-tuned backbone and head go into model.pt (trainable.train.finetune)
        model, kept = finetune_all(config, prepared, fs, head, n_ft)
    else:  # pool: lungs: forward(x) pools over the atlas lungs aligned to the crop unless given a mask
        s, grid = prepared.settings, tuple(fs.maps.shape[2:])
        lung = None if config["pool"] == "gap" else atlas_cell_weights(
            s.base_size, s.atlas_threshold, float(config["crop_margin"]), s.input_size, *grid)
        model = pooled_classifier(config["pool"], backbone.model, head, lung).eval()
    meta = {
        "format": "cxrtune-model/1",
        "backbone": config["backbone"],
        **exact_arch(config["backbone"]),
        "weights": fs.weights_info,
        "classes": list(prepared.classes),
        "num_features": int(backbone.num_features),
        "hidden": int(config["hidden"]),
        "dropout": float(config["dropout"]),
        "preprocessing": {**fs.preprocessing, "base_size": prepared.settings.base_size,
                          "grayscale": True, "value_range": "[0, 1] before mean/std"},
        "target_layer": f"backbone.{backbone.target_layer}",
        "pool": config["pool"], "pool_grid": list(fs.maps.shape[2:]),   # load_model rebuilds the pooling
        "edge_band": prepared.settings.edge_band,
        # how CV scored Grad-CAM and groups: evaluate, held-out scoring and the montages score the same way
        "scoring": {k: getattr(prepared.settings, k) for k in
                    ("lung_masks", "atlas_threshold", "cam_target", "cam_layer", "min_cell", "group_column",
                     "edge_band")},
        "atlas_threshold": prepared.settings.atlas_threshold,
        "config": config,
        "epochs": int(epochs),
        # ft_epochs: what the refit kept (its inner-split early stopping); budget: what it could run
        "finetuned": {"ft_epochs": int(kept), "budget": n_ft, "ft_lr": float(config["ft_lr"]),
                      "ft_blocks": config["ft_blocks"], "ft_bn": config["ft_bn"],
                      "early_stopping": f"inner split of {INNER_FRACTION:.0%} of the patients per class"}
                     if n_ft else None,
        "cv_metrics": metrics,
        "data_hash": prepared.data_hash,
    }
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    return out


def same_export(src: str | Path, trial_id: str, epochs: int) -> bool:
    """Whether `src` is an export of trial `trial_id` refit for `epochs` (so `copy_export` can reuse it)."""
    path = Path(src) / "metadata.json"
    if not path.is_file() or not (Path(src) / "model.pt").is_file():
        return False
    meta = json.loads(path.read_text())
    return meta.get("cv_metrics", {}).get("trial_id") == trial_id and meta.get("epochs") == int(epochs)


def copy_export(src: str | Path, out_dir: str | Path, metrics: dict) -> Path:
    """`src`'s model under `out_dir` with other `cv_metrics`, written atomically: for the same trial and
    epochs the seeded refit would write the same weights again (a fine-tuned refit costs minutes)."""
    meta = json.loads((Path(src) / "metadata.json").read_text())
    meta["cv_metrics"] = metrics
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        shutil.copy2(Path(src) / "model.pt", tmp / "model.pt")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    return out


def exact_arch(backbone: str) -> dict:
    """What ``backbone`` resolved to: source, the exact timm architecture and pretrained tag (None for
    torchxrayvision) and the torchxrayvision weights key (None for timm)."""
    spec = get_spec(backbone)
    timm = spec.source == "timm"
    return {"backbone_source": spec.source, "timm_arch": spec.arch if timm else None,
            "timm_tag": spec.tag if timm else None, "xrv_weights": None if timm else spec.arch}


def recorded_backbone(meta: dict) -> str:
    """The name to build an export's backbone from: the exact timm ``arch.tag`` its metadata recorded
    (so a later change of what an alias means cannot load model.pt into another network), else
    (torchxrayvision, or an export from before `timm_arch` was recorded) the backbone name."""
    arch = meta.get("timm_arch")
    if not arch:
        return str(meta["backbone"])
    return f"{arch}.{meta['timm_tag']}" if meta.get("timm_tag") else str(arch)


def _json_default(o: object) -> object:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def load_model(model_dir: str | Path) -> tuple[Classifier, dict]:
    """The exported `torch.nn.Module` in eval mode (input: preprocessed float N×C×H×W) and its metadata.

    >>> model, meta = load_model("results/default/best")          # doctest: +SKIP
    >>> x = preprocess_image("chest.png", meta)                    # doctest: +SKIP
    >>> probs = model(x).softmax(1)                                # doctest: +SKIP
    """
    model_dir = Path(model_dir)
    meta = check_model_dir(model_dir)
    weights = model_dir / "model.pt"
    try:  # the exact recorded architecture; weights come from model.pt, no download
        backbone = build_backbone(recorded_backbone(meta), "random")
    except UnknownBackboneError as e:
        raise ModelError(f"{model_dir / 'metadata.json'}: {e}") from None
    head = Head(meta["num_features"], meta["hidden"], len(meta["classes"]), meta["dropout"])
    pool = meta.get("pool", "gap")  # exports from before `pool` existed are gap
    lung = torch.zeros(*meta["pool_grid"]) if pool == "lungs" else None  # the buffer comes from model.pt
    model = pooled_classifier(pool, backbone.model, head, lung)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise ModelError(f"{weights} cannot be read ({type(e).__name__}: {_first_line(e)}): "
                         f"the export is corrupt (export it again)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ModelError(f"{weights} does not fit {model_dir / 'metadata.json'} (backbone {meta['backbone']!r}, "
                         f"hidden {meta['hidden']}): {_first_line(e)}") from None
    return model.eval(), meta


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def preprocess_image(image: str | Path | np.ndarray, meta: dict) -> torch.Tensor:
    """A grayscale image (file or uint8 array) → the model's input tensor (1, C, H, W)."""
    pre = meta["preprocessing"]
    size = pre["base_size"]
    if not isinstance(image, np.ndarray):
        image = read_gray(str(image), size)
    elif image.shape != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    x = geometry(image[None], pre["crop_margin"], pre["input_size"])
    return to_model_input(x, pre["in_chans"], tuple(pre["mean"]), tuple(pre["std"]))
