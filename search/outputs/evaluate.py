"""`cxrtune evaluate --model DIR --data DIR`: score an exported model on another data set.

The data can be in any adapter's layout (`trainable.data.adapters`). Its labels are matched to the
model's classes: as they are when every label is a class of the model, else through the task
whose classes the model has (e.g. `normal` and `pneumonia` → `rest` for a `covid_vs_rest`
model); anything else is a DataError naming the labels that do not fit.

Every image is decoded and cropped exactly as in the sweep (`trainable.data.images`) and run through
the model; its lung / edge mass is scored the way the sweep's CV scored it (metadata.json `scoring`,
`search.outputs.scoring`): Grad-CAM for the sweep's `cam_target` class, at its `cam_layer` (`final`:
exactly from the backbone's last maps, `trainable.cam.explain`; another layer: full-model Grad-CAM at
that layer of the exported model, `trainable.cam.camlayer`), `lung_mass` on the lung masks of its
`lung_masks` source (auto: the data's where it has them, else the atlas; data; atlas; pspnet:
torchxrayvision's PSPNet for every image), `edge_mass` on the outer `edge_band` of the model input.
The result records the layer, its grid and the mask source of every image.

>>> result = evaluate("results/default/best", "data/holdout")      # doctest: +SKIP
>>> print("\\n".join(report_lines(result)))                         # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

from search.outputs.scoring import check_scoring_inputs, layer_cam_as_scored, lung_masks_as_scored, scoring_settings
from trainable.atomic import atomic_write_text
from trainable.cam.explain import FocusReference, edge_band, explanation_scores, focus, focus_reference
from trainable.data.dataset import TASKS, Dataset, load_dataset
from trainable.data.images import decode_images, geometry, mask_geometry, to_model_input
from trainable.errors import DataError
from trainable.export import load_model
from trainable.model_dir import check_model_dir
from trainable.models.features import inference_batch_size
from trainable.train.groups import group_cells, group_metrics
from trainable.train.lockstep import cam_targets
from trainable.train.metrics import auc


def match_labels(dataset: Dataset, classes: list[str], source: str) -> dict[str, str]:
    """data label → model class: identity when every label is a class, else a task's mapping."""
    labels = sorted(set(dataset.table["label"].astype(str)))
    if set(labels) <= set(classes):
        return {lab: lab for lab in labels}
    tasks = [t for t, spec in TASKS.items() if spec is not None and list(spec[0]) == list(classes)]
    for task in tasks:
        if set(labels) <= set(TASKS[task][1]):
            return {lab: TASKS[task][1][lab] for lab in labels}
    # the offending labels only: those neither a class nor mapped by the model's task
    known = set(classes).union(*(TASKS[t][1] for t in tasks))
    unknown = [lab for lab in labels if lab not in known]
    via = f" or through task {tasks[0]!r} ({', '.join(sorted(TASKS[tasks[0]][1]))})" if tasks else ""
    raise DataError(f"{source}: label(s) {', '.join(map(repr, unknown))} do not match the model's "
                    f"classes {classes}: every label must be one of them{via} "
                    f"(first rows: {'; '.join(_first_rows(dataset, unknown))})")


def _first_rows(dataset: Dataset, labels: list[str]) -> list[str]:
    """Each label with the first image that has it: "'xyz' at image img3, images/3.png"."""
    table, root = dataset.table, getattr(dataset, "root", None)
    out = []
    for lab in labels:
        first = table.index[table["label"].astype(str) == lab][0]
        row = table.loc[first]
        where = [f"image {row['id']}"] if "id" in row else [f"row {first}"]
        if "path" in row:
            path = Path(str(row["path"]))
            where.append(str(path.relative_to(root) if root and path.is_relative_to(root) else path))
        out.append(f"{lab!r} at {', '.join(where)}")
    return out


def evaluate(model_dir: str | Path, data: str | Path, format: str = "auto", batch_size: int | None = None,
             log: Callable[[str], None] = lambda m: None) -> dict:
    """Metrics, per-class precision/recall/F1, confusion matrix and Grad-CAM lung/edge mass, overall,
    per source and per image (`per_image`: id, label, predicted, probabilities, masses)."""
    return evaluate_dataset(model_dir, load_dataset(data, "labels", format), str(data), batch_size, log)


def evaluate_dataset(model_dir: str | Path, dataset: Dataset, data: str, batch_size: int | None = None,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    """`evaluate` on a loaded data set (e.g. a sweep's held-out patients, `search.outputs.heldout`);
    `data` names it in messages and in the result. `batch_size`: default `inference_batch_size()`."""
    batch_size = batch_size or inference_batch_size()
    scoring = scoring_settings(check_model_dir(model_dir))
    check_scoring_inputs(scoring, model_dir)  # PSPNet's weights, before the model is built or any image decoded
    model, meta = load_model(model_dir)
    classes = [str(c) for c in meta["classes"]]
    mapping = match_labels(dataset, classes, str(data))
    y = np.array([classes.index(mapping[lab]) for lab in dataset.table["label"].astype(str)], np.int64)
    pre = meta["preprocessing"]
    size, margin, input_size = int(pre["base_size"]), float(pre["crop_margin"]), int(pre["input_size"])
    cam = layer_cam_as_scored(model.backbone, meta, scoring, model_dir, batch_size)
    log(f"decoding {len(dataset)} images at {size}px")
    images, masks = decode_images(dataset, size)
    masks, mask_source = lung_masks_as_scored(scoring, dataset, images, masks, str(data), log)
    edge = edge_band(input_size, float(scoring["edge_band"]))
    probs, lung, edge_m, area, ref_u, ref_m = [], [], [], [], [], []
    grid: tuple[int, ...] = ()
    log(f"scoring with {meta['backbone']} ({len(classes)} classes; Grad-CAM of the {scoring['cam_target']} class"
        f" at {'the final layer' if cam is None else scoring['cam_layer']}; lung masks {scoring['lung_masks']})")
    for s in range(0, len(images), batch_size):
        sl = slice(s, s + batch_size)
        x = to_model_input(geometry(images[sl], margin, input_size), int(pre["in_chans"]),
                           tuple(pre["mean"]), tuple(pre["std"]))
        lm = mask_geometry(masks[sl], margin, input_size)
        with torch.no_grad():
            maps = model.backbone(x).float()
            pooled = model.pool(maps, lm)  # pool: lungs: each image's mask, as the sweep scored with
            probs.append(torch.softmax(model.head(pooled), 1).numpy())
        targets = cam_targets(str(scoring["cam_target"]), y[sl], probs[-1], tuple(classes))
        if cam is None:   # the exact formula from the last maps, as CV's fast path
            a, b = explanation_scores(model.head, maps, targets, lm, edge, pooled=pooled)
            grid = tuple(maps.shape[2:])
        else:             # the sweep's cam_layer: full-model Grad-CAM at that layer, as CV's LayerCam
            a, b = cam.masses(model.head, images[sl], targets, lm, edge)
            grid = cam.grid
        ref = focus_reference(lm, edge, *grid)
        lung.append(a)
        edge_m.append(b)
        area.append(lm.mean(axis=(1, 2)))
        ref_u.append(ref.uniform)
        ref_m.append(ref.mask)
    p = np.concatenate(probs)
    lung_mass, edge_mass, lung_area = np.concatenate(lung), np.concatenate(edge_m), np.concatenate(area)
    reference = FocusReference(np.concatenate(ref_u), np.concatenate(ref_m), lung_area)
    result = {"model": str(model_dir), "data": str(data), "format": dataset.format,
              "backbone": meta["backbone"], "classes": classes, "label_mapping": mapping,
              "images": int(len(dataset)), "patients": int(len(set(dataset.patients))),
              "masks": mask_counts(mask_source), "scoring": scoring,
              "cam_grid": "x".join(map(str, grid)),
              "trained_on_this_data": _same_data(dataset, meta.get("data_hash"))}
    result.update(scores(y, p, classes, lung_mass, edge_mass, lung_area))
    result["metrics"]["focus"] = focus(lung_mass, edge_mass, reference)
    result["by_source"] = _by_group(dataset.table["source"].astype(str).to_numpy(), y, p, lung_mass, edge_mass)
    result.update(_group_scores(dataset, y, p, classes, scoring))
    result["metrics"].update(result.get("group_metrics", {}))
    result["per_image"] = [
        {"id": i, "label": classes[t], "predicted": classes[int(pr.argmax())],
         "probabilities": [round(float(v), 5) for v in pr], "lung_mass": round(float(lm), 5),
         "edge_mass": round(float(em), 5), "mask": str(src)}
        for i, t, pr, lm, em, src in zip(dataset.table["id"].astype(str), y, p, lung_mass, edge_mass, mask_source)]
    return result


def mask_counts(mask_source: np.ndarray) -> dict[str, int]:
    """Images per lung-mask source: data and atlas always, pspnet when it was used."""
    counts = {k: int((mask_source == k).sum()) for k in ("data", "atlas", "pspnet")}
    return counts if counts["pspnet"] else {k: counts[k] for k in ("data", "atlas")}


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str], lung_mass: np.ndarray,
           edge_mass: np.ndarray, lung_area: np.ndarray) -> dict:
    """Pure function of labels, probabilities and per-image masses."""
    n = len(classes)
    pred = probs.argmax(1)
    idx = list(range(n))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    present = [k for k in idx if (y == k).any()]
    metrics = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean([rec[k] for k in present])),
        "auc": auc(y, probs, probs.shape[1], over="present"),
        "macro_f1": float(np.mean([f1[k] for k in present])),
        "loss": float(log_loss(y, np.clip(probs, 1e-7, 1.0), labels=idx)),
        "lung_mass": float(lung_mass.mean()),
        "edge_mass": float(edge_mass.mean()),
        "lung_enrichment": float(lung_mass.mean() / max(lung_area.mean(), 1e-9)),
    }
    per_class = {c: {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                     "support": int(support[k]),
                     "lung_mass": float(lung_mass[y == k].mean()) if support[k] else math.nan,
                     "edge_mass": float(edge_mass[y == k].mean()) if support[k] else math.nan}
                 for k, c in enumerate(classes)}
    cm = confusion_matrix(y, pred, labels=idx)
    return {"metrics": metrics, "per_class": per_class,
            "confusion_matrix": {"labels": classes, "rows_true_columns_predicted": cm.tolist()}}


def _by_group(groups: np.ndarray, y: np.ndarray, probs: np.ndarray, lung: np.ndarray,
              edge: np.ndarray) -> dict:
    out = {}
    names = sorted(set(groups))
    if len(names) < 2:
        return out
    pred = probs.argmax(1)
    for g in names:
        m = groups == g
        out[g or "(blank)"] = {"images": int(m.sum()), "accuracy": float((pred[m] == y[m]).mean()),
                               "lung_mass": float(lung[m].mean()), "edge_mass": float(edge[m].mean())}
    return out


def _group_scores(dataset: Dataset, y: np.ndarray, probs: np.ndarray, classes: list[str], scoring: dict) -> dict:
    """Worst-group accuracy and within-group AUC over the sweep's `group_column` × class cells, as CV
    computes them (its `min_cell`), with every cell's n; nothing when the data lacks the column."""
    column = scoring.get("group_column")
    if not column or column not in dataset.table:
        return {}
    groups = dataset.table[column].astype(str).to_numpy()
    gm = group_metrics(y, probs, groups, tuple(classes), min_cell=int(scoring.get("min_cell", 1)))
    return {"group_column": column, "group_metrics": {k: gm[k] for k in ("worst_group_accuracy", "within_group_auc")},
            "group_cells": group_cells(y, groups, tuple(classes))}


def _same_data(dataset: Dataset, data_hash: str | None) -> bool:
    if not data_hash:
        return False
    return any(dataclasses.replace(dataset, task=t).content_hash() == data_hash for t in TASKS)


def report_lines(result: dict) -> list[str]:
    """The result as a readable table."""
    m = result["metrics"]
    classes = result["classes"]
    mapped = {k: v for k, v in result["label_mapping"].items() if k != v}
    lines = [f"model: {result['model']} ({result['backbone']}; classes {', '.join(classes)})",
             f"data: {result['data']} (format {result['format']}; {result['images']} images, "
             f"{result['patients']} patients; lung masks: {result['masks']['data']} from the data, "
             f"{result['masks']['atlas']} atlas"
             + (f", {result['masks']['pspnet']} PSPNet" if result["masks"].get("pspnet") else "") + ")"]
    if mapped:
        lines.append("labels mapped: " + ", ".join(f"{k} → {v}" for k, v in mapped.items()))
    if result.get("trained_on_this_data"):
        lines.append("note: the model was trained on this very data set: these are training-set "
                     "numbers, not a test")
    lines.append(f"accuracy {m['accuracy']:.3f} · balanced accuracy {m['balanced_accuracy']:.3f} · "
                 f"AUC {m['auc']:.3f} · macro F1 {m['macro_f1']:.3f} · loss {m['loss']:.3f}")
    sc = result.get("scoring", {})
    target = sc.get("cam_target", "true")
    lines.append(f"lung_mass {m['lung_mass']:.3f} · edge_mass {m['edge_mass']:.3f} · "
                 f"lung_enrichment {m['lung_enrichment']:.2f}  (Grad-CAM for the "
                 f"{target + ' class' if target in ('true', 'predicted') else target} at "
                 f"{sc.get('cam_layer', 'final')} layer, {result.get('cam_grid', '?')} grid)")
    w = max(5, *(len(c) for c in classes))
    lines.append(f"{'class':<{w}}  precision  recall     f1  support  lung_mass  edge_mass")
    for c in classes:
        r = result["per_class"][c]
        lines.append(f"{c:<{w}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  "
                     f"{r['support']:7d}  {r['lung_mass']:9.3f}  {r['edge_mass']:9.3f}")
    lines.append("confusion matrix (rows: true, columns: predicted):")
    cw = max(w, *(len(c) for c in classes), 6)
    lines.append(" " * (cw + 2) + "  ".join(f"{c:>{cw}}" for c in classes))
    for c, row in zip(classes, result["confusion_matrix"]["rows_true_columns_predicted"]):
        lines.append(f"{c:<{cw}}  " + "  ".join(f"{v:>{cw}d}" for v in row))
    if "group_metrics" in result:
        g = result["group_metrics"]
        lines.append(f"by {result['group_column']} × class (min_cell {sc.get('min_cell', 1)}): worst-group accuracy "
                     f"{g['worst_group_accuracy']:.3f} · within-group AUC {g['within_group_auc']:.3f} · cells "
                     + ", ".join(f"{k} n={n}" for k, n in result["group_cells"].items()))
    if result["by_source"]:
        lines.append("by source: " + " · ".join(
            f"{g}: {r['images']} images, accuracy {r['accuracy']:.3f}, lung_mass {r['lung_mass']:.3f}"
            for g, r in result["by_source"].items()))
    return lines


def write_json(result: dict, out: str | Path) -> Path:
    """`result` as strict JSON (NaN → null), written atomically."""
    out = Path(out)
    atomic_write_text(out, json.dumps(json_safe(result), indent=2, allow_nan=False))
    return out


def json_safe(o: object) -> object:
    """`o` with numpy scalars as Python numbers, tuples as lists, keys as strings, NaN/inf as None."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.integer, np.floating)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
