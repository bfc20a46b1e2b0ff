"""The sweep's held-out test patients: split before the search, scored after it.

`search_split` holds out `spec.holdout` of the patients (`trainable.data.holdout`); the folds, every
trial, `best/` and `selected/` see only the rest. `heldout.json` records the held-out patient and
image ids when the sweep starts; `cxrtune resume` and `cxrtune select` rebuild the same split and
check it against that file. At the end, `score_heldout` runs `best/` and `selected/` on the
held-out images through `search.outputs.evaluate` (metrics, confusion, Grad-CAM lung/edge mass scored
as CV scored it: the sweep's `cam_layer`, `lung_masks` source, atlas threshold and CAM target, from
metadata.json `scoring`; `search.outputs.scoring`) plus the group metrics at the sweep's `min_cell`, and writes `test_metrics.json`, a section of
leaderboard.md and `summary.json["heldout"]`; report.html shows it (`section_heldout`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from search.outputs.evaluate import evaluate_dataset, json_safe
from search.report.heldout_section import ROLES, heldout_markdown
from search.rundir import SweepError, load_sweep, sweep_dataset
from search.space import SweepSpec
from trainable.atomic import atomic_write_text
from trainable.cache import cache_root
from trainable.data.dataset import Dataset
from trainable.data.duplicates import merge_duplicates
from trainable.data.holdout import Holdout, split_holdout
from trainable.train.groups import group_cells, group_metrics


def search_split(spec: SweepSpec, dataset: Dataset, log: Callable[[str], None] = lambda m: None) -> Holdout:
    """Split `dataset` as the space file says (`holdout`, `seed`, stratified by label and
    `group_column`); every class keeps at least `folds` patients for the search."""
    t0 = time.perf_counter()
    # duplicates across patients (`cxrtune data check`'s hashes) join one group for folds and holdout
    dataset, merged = merge_duplicates(dataset, cache=cache_root(spec.settings().cache_dir))
    log(f"duplicate images across patients: {len(merged)} group(s) of patients merged for folds and the "
        f"held-out split ({sum(map(len, merged))} patients; {time.perf_counter() - t0:.1f}s)")
    split = split_holdout(dataset, spec.holdout, spec.seed, spec.group_column, min_search_patients=spec.folds,
                          merged=tuple(tuple(m) for m in merged))
    if split.heldout is not None:
        rec = split.record()
        log(f"held-out test split (holdout {spec.holdout}, seed {spec.seed}): {rec['heldout']['patients']} "
            f"patients / {rec['heldout']['images']} images never seen by the search; the search uses "
            f"{rec['search']['patients']} patients / {rec['search']['images']} images")
    return split


def write_split(results: Path, split: Holdout) -> None:
    """heldout.json: the held-out patient and image ids (empty lists when holdout is 0)."""
    atomic_write_text(results / "heldout.json", json.dumps(split.record(), indent=1))


def check_split(results: Path, split: Holdout) -> None:
    """On resume/select: the rebuilt split must be the recorded one (a sweep without heldout.json
    predates the held-out split and has none)."""
    path = results / "heldout.json"
    if not path.is_file():
        if split.heldout is not None:
            raise SweepError(f"{results} has no heldout.json but its space asks for holdout "
                             f"{split.fraction}: the sweep ran without a held-out split")
        return
    recorded = json.loads(path.read_text()).get("patient_ids", [])
    if recorded != split.heldout_patients:
        raise SweepError(f"{path}: the held-out patients rebuilt from the data differ from the recorded "
                         f"ones ({len(split.heldout_patients)} vs {len(recorded)}); the data changed")


def search_dataset(results: Path, spec: SweepSpec, dataset: Dataset) -> Dataset:
    """The search part of `dataset` for a finished sweep in `results` (checked against heldout.json)."""
    split = search_split(spec, dataset)
    check_split(results, split)
    return split.search


def score_model(model_dir: Path, split: Holdout, spec: SweepSpec, log: Callable[[str], None]) -> dict:
    """One exported model on the held-out images: `search.outputs.evaluate`'s result plus group metrics."""
    r = evaluate_dataset(model_dir, split.heldout, f"held-out patients of {model_dir.parent.name}", log=log)
    meta = json.loads((model_dir / "metadata.json").read_text())
    classes = r["classes"]
    y = np.array([classes.index(p["label"]) for p in r["per_image"]])
    probs = np.array([p["probabilities"] for p in r["per_image"]])
    groups = (split.heldout.table[spec.group_column].astype(str).to_numpy()
              if spec.group_column in split.heldout.table else np.array(["all"] * len(y)))
    # worst-group accuracy and within-group AUC as CV computes them (the sweep's min_cell); the recall of
    # every cell, however small, is listed too, each with its n (`group_cells`, same keys)
    gm = group_metrics(y, probs, groups, tuple(classes), min_cell=spec.min_cell)
    every = group_metrics(y, probs, groups, tuple(classes), min_cell=1)
    cells = group_cells(y, groups, tuple(classes))
    cv = meta.get("cv_metrics", {})
    return {"trial_id": cv.get("trial_id"), "config": meta.get("config", {}),
            "metrics": r["metrics"] | {k: gm[k] for k in ("worst_group_accuracy", "within_group_auc")},
            "min_cell": spec.min_cell,
            # how lung / edge mass were scored (as CV): the layer, its grid, the mask source and images per source
            "scoring": {**r["scoring"], "cam_grid": r["cam_grid"]}, "masks": r["masks"],
            "group_recall": {k: v for k, v in every.items() if k.startswith("recall_")}, "group_cells": cells,
            "per_class": r["per_class"], "confusion_matrix": r["confusion_matrix"], "by_source": r["by_source"],
            "per_image": [{k: p[k] for k in ("id", "label", "predicted", "probabilities")} for p in r["per_image"]],
            "cv_metrics": {k: v for k, v in cv.items() if k != "trial_id"}}


def score_heldout(results: Path, split: Holdout, spec: SweepSpec, log: Callable[[str], None] = print) -> dict | None:
    """Score best/ and selected/ on the held-out images; write test_metrics.json, the leaderboard
    section and summary.json["heldout"]. Returns what test_metrics.json holds (None: no split)."""
    if split.heldout is None:
        return None
    out = {"heldout": {k: v for k, v in split.record().items() if k != "image_ids"}}
    scored: dict[str, dict] = {}  # one result per exported model: selected/ is often best/'s trial
    for role, name in ROLES:
        meta_path = results / role / "metadata.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        trial_id = meta.get("cv_metrics", {}).get("trial_id")
        same = json.dumps([trial_id, meta.get("epochs"), meta.get("finetuned")], default=str)
        if trial_id is not None and same in scored:
            log(f"{role}/ is the model of trial {trial_id}, already scored on the held-out patients")
            out[role] = scored[same]
            continue
        log(f"scoring {role}/ on the held-out patients")
        out[role] = scored[same] = score_model(results / role, split, spec, log)
    atomic_write_text(results / "test_metrics.json", json.dumps(json_safe(out), indent=1, allow_nan=False))
    board = results / "leaderboard.md"
    if board.is_file():
        text = board.read_text().split("\n## Held-out test", 1)[0].rstrip("\n")
        atomic_write_text(board, text + "\n\n" + "\n".join(heldout_markdown(out)) + "\n")
    summary_path = results / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["heldout"] = json_safe({**out["heldout"], **{role: {"trial_id": out[role]["trial_id"],
                                                                   **out[role]["metrics"]}
                                                            for role, _ in ROLES if role in out}})
        atomic_write_text(summary_path, json.dumps(summary, indent=2, allow_nan=False))
    for line in heldout_markdown(out)[2:]:
        log(line)
    return out


def rescore_heldout(results: Path, log: Callable[[str], None] = print) -> dict | None:
    """After `cxrtune select` re-exported selected/: score the exported models on the recorded
    held-out patients again (no-op for a sweep without a held-out split)."""
    results = Path(results)
    path = results / "heldout.json"
    if not path.is_file() or not json.loads(path.read_text()).get("patient_ids"):
        return None
    spec, _, saved = load_sweep(results)
    split = search_split(spec, sweep_dataset(saved, spec))
    check_split(results, split)
    return score_heldout(results, split, spec, log)

