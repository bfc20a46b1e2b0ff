"""`cxrtune data check DIR`: what is in a data set, and can a sweep use it?

Reads the layout through the same adapters as `load_dataset`, but leniently: every file is
decoded (with the decoder training uses), and every problem is collected instead of stopping at
the first. The report gives

* counts per label, finding, source and view; patients per label; images per patient;
* lung masks present (per label); image size and mode distribution;
* exact duplicates (same decoded pixels) and near duplicates (256-bit difference hash,
  Hamming distance <= `near_bits`), flagged when a group spans patients (patient-grouped folds
  cannot keep such a pair apart) or labels;
* the confounding report (`trainable.data.confounding`) for one grouping column;
* unreadable or missing files, one per line with the reason.

The data set is *usable* (exit 0) when every image and mask decodes, masks match their images,
ids are unique, there are at least two labels and every label has at least two patients.
Everything else is a warning.

>>> result = check_data("../shared/data/cxr-real")      # doctest: +SKIP
>>> result.usable, result.summary["images"]             # doctest: +SKIP
(True, 999)
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from trainable.data.adapters import ADAPTERS, read_table
from trainable.data.confounding import confounding_report
from trainable.data.dataset import TASKS
from trainable.errors import DataError

HASH_SIDE = 16                # difference hash on a 17×16 thumbnail: 256 bits
NEAR_BITS = 12                # near duplicate: <= 12 of 256 bits differ (~5%)
MAX_LISTED = 20               # duplicate groups printed (all are in the summary)


@dataclass
class CheckResult:
    """The printable report, a JSON-ready summary, and whether a sweep can use the data."""

    usable: bool
    lines: list[str]
    summary: dict
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Image:
    size: tuple[int, int] | None = None
    mode: str = ""
    pixels: str = ""            # sha1 of the decoded 8-bit pixels
    dhash: np.ndarray | None = None
    error: str = ""
    mask_error: str = ""
    mask_empty: bool = False


def difference_hash(gray: Image.Image, side: int = HASH_SIDE) -> np.ndarray:
    """dHash: is each pixel of a (side+1)×side thumbnail brighter than its left neighbour? bool (side²,)."""
    a = np.asarray(gray.resize((side + 1, side), Image.BILINEAR), np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


def check_data(path: str | Path, format: str = "auto", group_by: str = "source",
               near_bits: int = NEAR_BITS, workers: int | None = None) -> CheckResult:
    """Inspect every file of the data set at `path`; DataError only when no layout can be read."""
    table, root, fmt = read_table(path, format)
    table = table.reset_index(drop=True)
    problems: list[str] = []
    warnings: list[str] = []
    paths, mask_paths = _resolve(table, root, problems)
    if table["id"].duplicated().any():
        dup = table["id"][table["id"].duplicated()].iloc[0]
        problems.append(f"id {dup!r} appears more than once (ids must be unique)")
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        images = list(pool.map(_inspect, paths, mask_paths))
    for p, m, info in zip(paths, mask_paths, images):
        if info.error:
            problems.append(f"unreadable image {p}: {info.error}")
        if info.mask_error:
            problems.append(f"unreadable mask {m}: {info.mask_error}")
    readable = np.array([im.size is not None for im in images])

    summary: dict = {"path": str(Path(path)), "root": str(root), "format": fmt,
                     "images": int(len(table)), "readable": int(readable.sum())}
    lines = [f"data: {path} (format {fmt}, root {root})",
             f"images: {len(table)} ({int(readable.sum())} readable), "
             f"patients: {table['patient_id'].nunique()}, labels: {table['label'].nunique()}"]
    lines += _counts(table, summary)
    lines += _patients(table, fmt, summary, problems, warnings)
    lines += _masks(table, images, summary, warnings)
    lines += _sizes(images, summary)
    lines += _duplicates(table, images, near_bits, summary, warnings)
    conf_lines, conf = confounding_report(table, group_by)
    summary["confounding"] = conf
    lines += conf_lines                       # its warnings stay next to its table
    lines.append("tasks these labels fit: " + (", ".join(_fitting_tasks(table["label"])) or "none"))

    usable = not problems
    summary.update(usable=usable, problems=problems, warnings=warnings + conf["warnings"])
    if warnings:
        lines.append(f"warnings ({len(warnings)}):")
        lines += [f"  warning: {w}" for w in warnings]
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  {p}" for p in problems]
    lines.append("result: usable" if usable else
                 f"result: NOT usable ({len(problems)} problem(s); fix them, or remove the files "
                 f"from the data set)")
    return CheckResult(usable=usable, lines=lines, summary=summary, problems=problems,
                       warnings=warnings + conf["warnings"])


def _fitting_tasks(labels: pd.Series) -> list[str]:
    """Tasks whose label mapping covers every label and leaves at least two classes."""
    present = set(labels.astype(str))
    out = []
    for task, spec in TASKS.items():
        mapping = {c: c for c in present} if spec is None else spec[1]
        if present <= set(mapping) and len({mapping[c] for c in present}) >= 2:
            out.append(task)
    return out


def _resolve(table: pd.DataFrame, root: Path, problems: list[str]) -> tuple[list[str], list[str]]:
    out: dict[str, list[str]] = {"path": [], "mask_path": []}
    for col in out:
        for rel in table[col].astype(str):
            if not rel:
                out[col].append("")
                continue
            p = Path(rel) if Path(rel).is_absolute() else root / rel
            if not p.is_file():
                what = "image" if col == "path" else "mask"
                problems.append(f"missing {what} {p}: does not exist")
                out[col].append("")
                continue
            out[col].append(str(p))
    return out["path"], out["mask_path"]


def _reason(e: DataError, path: str) -> str:
    msg = str(e)
    for what in ("image", "mask"):
        prefix = f"cannot read {what} {path}: "
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _inspect(path: str, mask_path: str) -> _Image:
    from trainable.data.dicom import is_dicom
    from trainable.data.images import open_image  # the decoder every image of a sweep goes through

    info = _Image()
    if not path:
        return info
    try:
        img = open_image(path, "image")
    except DataError as e:
        info.error = _reason(e, path)
        return info
    info.size = img.size
    info.mode = "DICOM" if is_dicom(path) else _mode(path)
    info.pixels = hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest()
    info.dhash = difference_hash(img)
    if mask_path:
        try:
            mask = open_image(mask_path, "mask")
        except DataError as e:
            info.mask_error = _reason(e, mask_path)
            return info
        if mask.size != img.size:
            info.mask_error = (f"is {mask.size[0]}x{mask.size[1]} but its image {path} is "
                               f"{img.size[0]}x{img.size[1]}: a mask must match its image")
        else:
            info.mask_empty = not np.any(np.asarray(mask) >= 128)
    return info


def _mode(path: str) -> str:
    try:
        with Image.open(path) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - it decoded a moment ago; the mode is only informative
        return "?"


def _fmt_counts(counts: pd.Series | Counter, limit: int = 12) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    text = " · ".join(f"{k or '(blank)'} {v}" for k, v in items[:limit])
    return text + (f" · … {len(items) - limit} more" if len(items) > limit else "")


def _counts(table: pd.DataFrame, summary: dict) -> list[str]:
    lines = []
    for col in ("label", "finding", "source", "view"):
        if col not in table or (col != "label" and (table[col] == "").all()):
            continue
        counts = table[col].astype(str).value_counts()
        summary[f"by_{col}"] = {str(k): int(v) for k, v in counts.items()}
        lines.append(f"by {col}: {_fmt_counts(counts)}")
    return lines


def _patients(table: pd.DataFrame, fmt: str, summary: dict, problems: list[str],
              warnings: list[str]) -> list[str]:
    per_label = table.groupby("label")["patient_id"].nunique()
    per_patient = table["patient_id"].value_counts()
    hist = per_patient.value_counts().sort_index()
    summary["patients"] = int(table["patient_id"].nunique())
    summary["patients_per_label"] = {str(k): int(v) for k, v in per_label.items()}
    summary["images_per_patient"] = {str(k): int(v) for k, v in hist.items()}
    lines = [f"patients per label: {_fmt_counts(per_label)}",
             "images per patient: " + " · ".join(f"{k} image{'s' if k > 1 else ''}: {v} patient(s)"
                                                 for k, v in hist.items())]
    if not ADAPTERS[fmt].patients_known:
        warnings.append(f"the {fmt} layout has no patient ids: every image counts as its own patient, "
                        f"so two images of one person can land in different folds")
    labels_per_patient = table.groupby("patient_id")["label"].nunique()
    mixed = labels_per_patient[labels_per_patient > 1]
    if len(mixed):
        example = mixed.index[0]
        their = sorted(table.loc[table["patient_id"] == example, "label"].astype(str).unique())
        warnings.append(f"{len(mixed)} patient(s) have images with different labels "
                        f"(e.g. {example!r}: {', '.join(their)})")
    if table["label"].nunique() < 2:
        problems.append(f"only one label ({table['label'].iloc[0]!r}): a classifier needs at least two")
    for label, n in per_label.items():
        if n < 2:
            problems.append(f"label {label!r} has {n} patient: cross-validation needs at least 2 "
                            f"(one per fold)")
    if len(per_label):
        summary["max_folds"] = int(per_label.min())
        lines.append(f"patient-grouped folds possible: up to {int(per_label.min())} "
                     f"(the fewest patients of any label)")
    return lines


def _masks(table: pd.DataFrame, images: list[_Image], summary: dict, warnings: list[str]) -> list[str]:
    has = table["mask_path"].astype(str) != ""
    per_label = table.assign(has=has).groupby("label")["has"].agg(["sum", "count"])
    empty = sum(im.mask_empty for im in images)
    summary["masks"] = int(has.sum())
    summary["masks_per_label"] = {str(k): [int(r["sum"]), int(r["count"])] for k, r in per_label.iterrows()}
    text = " · ".join(f"{k} {int(r['sum'])}/{int(r['count'])}" for k, r in per_label.iterrows())
    lines = [f"lung masks: {int(has.sum())} of {len(table)} ({has.mean():.0%}): {text}"
             + ("" if has.all() else "; the rest use the lung atlas")]
    if empty:
        summary["empty_masks"] = int(empty)
        warnings.append(f"{empty} lung mask(s) are empty (no pixel >= 128): lung_mass is 0 for them")
    if has.any() and per_label["sum"].min() == 0 and per_label["sum"].max() > 0:
        only = [str(k) for k, r in per_label.iterrows() if r["sum"] > 0]
        warnings.append(f"only {', '.join(only)} image(s) have their own lung masks; the others use the "
                        f"atlas, so lung_mass is measured differently per label")
    return lines


def _sizes(images: list[_Image], summary: dict) -> list[str]:
    sizes = [im.size for im in images if im.size is not None]
    if not sizes:
        return ["image sizes: none readable"]
    counts = Counter(f"{w}x{h}" for w, h in sizes)
    w = np.array([s[0] for s in sizes])
    h = np.array([s[1] for s in sizes])
    modes = Counter(im.mode for im in images if im.size is not None)
    summary["sizes"] = dict(counts.most_common())
    summary["width"] = {"min": int(w.min()), "median": float(np.median(w)), "max": int(w.max())}
    summary["height"] = {"min": int(h.min()), "median": float(np.median(h)), "max": int(h.max())}
    summary["modes"] = dict(modes)
    return [f"image sizes: {len(counts)} distinct: {_fmt_counts(counts, 6)}; width {w.min()}–{int(np.median(w))}–"
            f"{w.max()}, height {h.min()}–{int(np.median(h))}–{h.max()} (min–median–max)",
            f"image modes: {_fmt_counts(modes)}"]


def _some(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", … {len(items) - limit} more" if len(items) > limit else "")


def near_pairs(hashes: np.ndarray, near_bits: int, chunk: int = 64) -> list[tuple[int, int]]:
    """(i, j), i < j, whose hashes differ in at most `near_bits` bits."""
    packed = np.packbits(hashes, axis=1).view(np.uint64)       # (n, bits/64)
    pairs = []
    for s in range(0, len(packed), chunk):
        d = np.bitwise_count(packed[s:s + chunk, None, :] ^ packed[None, :, :]).sum(-1)
        i, j = np.nonzero(d <= near_bits)
        keep = j > i + s
        pairs += list(zip((i[keep] + s).tolist(), j[keep].tolist()))
    return pairs


def union_groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for k in range(n):
        members.setdefault(find(k), []).append(k)
    return [m for m in members.values() if len(m) > 1]


def _duplicates(table: pd.DataFrame, images: list[_Image], near_bits: int, summary: dict,
                warnings: list[str]) -> list[str]:
    ok = [k for k, im in enumerate(images) if im.dhash is not None]
    if len(ok) < 2:
        summary["duplicates"] = []
        return []
    exact_pairs = []
    first: dict[str, int] = {}
    for k in ok:
        if images[k].pixels in first:
            exact_pairs.append((first[images[k].pixels], k))
        else:
            first[images[k].pixels] = k
    hashes = np.stack([images[k].dhash for k in ok])
    near = [(ok[a], ok[b]) for a, b in near_pairs(hashes, near_bits)]
    groups = union_groups(len(images), exact_pairs + near)
    ids, patients, labels = (table[c].astype(str).to_numpy() for c in ("id", "patient_id", "label"))
    found = []
    for g in groups:
        kind = "exact" if len({images[k].pixels for k in g}) == 1 else "near"
        found.append({"kind": kind, "ids": [ids[k] for k in g],
                      "patients": sorted(set(patients[k] for k in g)),
                      "labels": sorted(set(labels[k] for k in g)),
                      "across_patients": len(set(patients[k] for k in g)) > 1,
                      "across_labels": len(set(labels[k] for k in g)) > 1})
    found.sort(key=lambda d: (not d["across_patients"], not d["across_labels"], d["kind"], d["ids"]))
    summary["duplicates"] = found
    n_exact = sum(d["kind"] == "exact" for d in found)
    across = [d for d in found if d["across_patients"]]
    lines = [f"duplicates: {n_exact} exact group(s), {len(found) - n_exact} near-duplicate group(s) "
             f"(256-bit dHash, <= {near_bits} bits apart); {len(across)} span patients"]
    for d in found[:MAX_LISTED]:
        flags = [f for f, on in (("ACROSS PATIENTS", d["across_patients"]),
                                 ("DIFFERENT LABELS", d["across_labels"])) if on]
        where = ", ".join(d["patients"]) if d["across_patients"] else f"same patient {d['patients'][0]}"
        lines.append(f"  {d['kind']}{' [' + ', '.join(flags) + ']' if flags else ''}: "
                     f"{_some(d['ids'])} ({_some(d['patients']) if d['across_patients'] else where})")
    if len(found) > MAX_LISTED:
        lines.append(f"  … {len(found) - MAX_LISTED} more group(s)")
    if across:
        warnings.append(f"{len(across)} duplicate group(s) span patients: the same picture under two "
                        f"patient ids leaks across folds (e.g. {_some(across[0]['ids'])})")
    return lines
