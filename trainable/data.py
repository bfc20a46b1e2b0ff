"""Load a chest X-ray data set (manifest CSV or class folders) and validate it at the boundary.

Everything after `load_dataset` trusts its output: absolute paths that exist, labels mapped to
the task's classes, a patient id per image. Pixels are checked later, when they are decoded
(`trainable.images`), so a corrupt file is reported by name there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainable.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
REQUIRED_COLUMNS = ("path", "label", "patient_id")
OPTIONAL_COLUMNS = ("id", "finding", "source", "view", "mask_path")

# task name -> (class names in output order, label -> class name); `None` keeps labels as they are
TASKS: dict[str, tuple[tuple[str, ...], dict[str, str]] | None] = {
    "covid_vs_rest": (("rest", "covid"), {"covid": "covid", "normal": "rest", "pneumonia": "rest"}),
    "three_class": (("normal", "covid", "pneumonia"),
                    {"normal": "normal", "covid": "covid", "pneumonia": "pneumonia"}),
    "labels": None,
}


@dataclass(frozen=True)
class Dataset:
    """A validated data set: one row per image, labels as class indices."""

    root: Path
    table: pd.DataFrame          # id, path (absolute), label, finding, patient_id, source, mask_path ("" = none)
    classes: tuple[str, ...]
    labels: np.ndarray           # int64 class index per row
    task: str

    def __len__(self) -> int:
        return len(self.table)

    @property
    def patients(self) -> np.ndarray:
        return self.table["patient_id"].to_numpy()

    @property
    def has_masks(self) -> np.ndarray:
        return (self.table["mask_path"] != "").to_numpy()

    def content_hash(self) -> str:
        """Hash of the manifest rows and file sizes/mtimes: changes when any image or label does."""
        h = hashlib.sha256()
        for row in self.table[["id", "path", "label", "patient_id", "mask_path"]].itertuples(index=False):
            h.update("|".join(map(str, row)).encode())
            for p in (row.path, row.mask_path):
                if p:
                    st = Path(p).stat()
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(self.task.encode())
        return h.hexdigest()[:16]


def load_dataset(path: str | Path, task: str = "labels") -> Dataset:
    """Read `path` (a directory with manifest.csv, a manifest CSV file, or class folders).

    Raises DataError naming the file, row or field and the rule it broke.
    """
    if task not in TASKS:
        raise DataError(f"task {task!r} is unknown; known tasks: {', '.join(TASKS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        table, root = _read_manifest(path), path.parent.resolve()
    elif (path / "manifest.csv").is_file():
        table, root = _read_manifest(path / "manifest.csv"), path.resolve()
    else:
        table, root = _scan_class_folders(path), path.resolve()
    table = _resolve_paths(table, root)
    classes, labels = _map_labels(table, task, root)
    return Dataset(root=root, table=table, classes=classes, labels=labels, task=task)


def _read_manifest(csv: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{csv}: not a readable CSV manifest ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing required column(s) {', '.join(missing)}; "
                        f"a manifest needs {', '.join(REQUIRED_COLUMNS)}")
    if table.empty:
        raise DataError(f"{csv}: the manifest has no rows")
    for col in REQUIRED_COLUMNS:
        blank = table.index[table[col].str.strip() == ""]
        if len(blank):
            raise DataError(f"{csv}: row {blank[0] + 2} has an empty {col!r} (every row needs one)")
    for col in OPTIONAL_COLUMNS:
        if col not in table.columns:
            table[col] = ""
    if (table["id"] == "").all():
        table["id"] = table["path"].map(lambda p: Path(p).stem)
    table.attrs["source_file"] = str(csv)
    return table


def _scan_class_folders(root: Path) -> pd.DataFrame:
    """ImageFolder layout: root/<class>/<image>; each image is its own patient (no ids known)."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in sorted(class_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"id": f"{class_dir.name}/{img.stem}", "path": str(img.relative_to(root)),
                             "label": class_dir.name, "patient_id": f"{class_dir.name}/{img.stem}"})
    if not rows:
        raise DataError(f"{root}: no manifest.csv and no class folders with images "
                        f"({', '.join(IMAGE_SUFFIXES)}) in it")
    table = pd.DataFrame(rows)
    for col in OPTIONAL_COLUMNS:
        if col not in table.columns:
            table[col] = ""
    table.attrs["source_file"] = str(root)
    return table


def _resolve_paths(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    source = table.attrs.get("source_file", str(root))
    table = table.copy()
    for col in ("path", "mask_path"):
        resolved = []
        for i, rel in enumerate(table[col]):
            if not rel:
                resolved.append("")
                continue
            p = Path(rel) if Path(rel).is_absolute() else root / rel
            if not p.is_file():
                raise DataError(f"{source}: row {i + 2}: {col} {p} does not exist")
            resolved.append(str(p))
        table[col] = resolved
    dup = table["id"][table["id"].duplicated()]
    if len(dup):
        raise DataError(f"{source}: id {dup.iloc[0]!r} appears more than once (ids must be unique)")
    table.attrs["source_file"] = source
    return table.reset_index(drop=True)


def _map_labels(table: pd.DataFrame, task: str, root: Path) -> tuple[tuple[str, ...], np.ndarray]:
    source = table.attrs.get("source_file", str(root))
    spec = TASKS[task]
    if spec is None:
        classes = tuple(sorted(table["label"].unique()))
        mapping = {c: c for c in classes}
    else:
        classes, mapping = spec
    unknown = table.index[~table["label"].isin(list(mapping))]
    if len(unknown):
        i = unknown[0]
        raise DataError(f"{source}: row {i + 2}: label {table['label'][i]!r} is not one of "
                        f"{sorted(mapping)} (task {task!r})")
    index = {c: k for k, c in enumerate(classes)}
    labels = table["label"].map(lambda lab: index[mapping[lab]]).to_numpy(np.int64)
    present = set(labels.tolist())
    if len(present) < 2:
        raise DataError(f"{source}: only class {classes[labels[0]]!r} is present; "
                        f"a classifier needs at least two classes")
    return classes, labels
