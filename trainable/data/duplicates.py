"""Duplicate images across patients, merged into the key that folds and the held-out split group by.

`cxrtune data check` flags an exact or near duplicate (`trainable.data.datacheck`: sha1 of the
decoded pixels, 256-bit difference hash within NEAR_BITS) whose copies carry different patient ids:
patient-grouped folds would put one copy in training and the other in validation. Here the
same hashes link those patients (union-find over patient ids), and every image gets the column
`fold_group`: its patient id, or for linked patients one shared key. A near pair (dHash) is
merged only when its 32×32 thumbnails also correlate >= NEAR_CORR: the phantom's patients are drawn
from one template and share dHashes without being copies (data check lists them as candidates). `patient_folds` and
`split_holdout` group by it, so a pair never straddles a split.

The hashes need one decode of every image (≈ 3 s for cxr-real's 999 PNGs on 2 threads); the
groups are cached under the cache directory by the data's content hash (and the thresholds), so `resume`, `select`
and later sweeps over the same data only pay the content hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from trainable.atomic import atomic_write_text
from trainable.data.datacheck import (
    NEAR_BITS,
    difference_hash,
    near_pairs,
    union_groups,
)
from trainable.data.dataset import Dataset
from trainable.data.images import open_image

COLUMN = "fold_group"
THUMB = 32
# a dHash near pair is merged only when the thumbnails also correlate this well: a re-encoded or
# resized copy scores > 0.999, while distinct phantom patients (one template) share a dHash at 0.91–0.98
NEAR_CORR = 0.99


def fold_groups(dataset: Dataset) -> np.ndarray:
    """What folds and the held-out split group by: `fold_group` when merged, else the patient id."""
    if COLUMN in dataset.table:
        return dataset.table[COLUMN].astype(str).to_numpy()
    return np.asarray(dataset.patients).astype(str)


def _hashes(path: str) -> tuple[str, np.ndarray, np.ndarray]:
    """sha1 of the pixels, dHash (both as `data check`), and a unit-norm 32×32 thumbnail."""
    img = open_image(path, "image")  # the decoder (and hashes) `data check` uses
    thumb = np.asarray(img.resize((THUMB, THUMB), Image.BILINEAR), np.float64).ravel()
    thumb -= thumb.mean()
    return (hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest(), difference_hash(img),
            thumb / (np.linalg.norm(thumb) + 1e-9))


def duplicate_image_groups(paths: list[str], near_bits: int = NEAR_BITS,
                           workers: int | None = None) -> list[list[int]]:
    """Indices of images that are exact or near duplicates of each other (groups of >= 2)."""
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        found = list(pool.map(_hashes, paths))
    first: dict[str, int] = {}
    pairs = []
    for k, (pixels, _, _) in enumerate(found):
        if pixels in first:
            pairs.append((first[pixels], k))
        else:
            first[pixels] = k
    if len(found) > 1:
        thumbs = np.stack([t for _, _, t in found])
        pairs += [(a, b) for a, b in near_pairs(np.stack([h for _, h, _ in found]), near_bits)
                  if thumbs[a] @ thumbs[b] >= NEAR_CORR]
    return union_groups(len(paths), pairs)


def _cached_groups(dataset: Dataset, near_bits: int, cache: Path | None) -> list[list[str]]:
    """Image-id groups, from the cache when the same data was hashed before."""
    file = None
    if cache is not None:
        file = cache / "duplicates" / f"{dataset.content_hash()}-{near_bits}-{NEAR_CORR}.json"
        if file.is_file():
            return json.loads(file.read_text())
    ids = dataset.table["id"].astype(str).tolist()
    groups = [[ids[k] for k in g] for g in duplicate_image_groups(dataset.table["path"].tolist(), near_bits)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(groups))
    return groups


def merge_duplicates(dataset: Dataset, near_bits: int = NEAR_BITS,
                     cache: Path | None = None) -> tuple[Dataset, list[list[str]]]:
    """`dataset` with the column `fold_group`, and the merged patient groups (each >= 2 patients)."""
    patients = np.asarray(dataset.patients).astype(str)
    of_id = dict(zip(dataset.table["id"].astype(str), patients))
    parent = {p: p for p in patients.tolist()}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for group in _cached_groups(dataset, near_bits, cache):
        roots = sorted({find(of_id[i]) for i in group if i in of_id})
        for r in roots[1:]:
            parent[r] = roots[0]        # the smallest id names the merged group: stable across runs
    members: dict[str, set[str]] = {}
    for p in parent:
        members.setdefault(find(p), set()).add(p)
    merged = sorted(sorted(m) for m in members.values() if len(m) > 1)
    table = dataset.table.copy()
    table[COLUMN] = [find(p) for p in patients.tolist()]
    table.attrs = dict(dataset.table.attrs)
    return dataclasses.replace(dataset, table=table), merged
