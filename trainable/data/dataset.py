"""Load a chest X-ray data set (manifest CSV, class folders or a public layout) and validate it.

The layout is read by an adapter (`trainable.data.adapters`: manifest, ieee8023, kermany,
covid19_radiography, dicom, folders), detected automatically or chosen with `format`.

Everything after `load_dataset` trusts its output: absolute paths that exist, labels mapped to
the task's classes, a patient id per image. Pixels are checked later, when they are decoded
(`trainable.data.images`), so a corrupt file is reported by name there.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainable.data.adapters import IMAGE_SUFFIXES, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, read_table  # noqa: F401
from trainable.errors import DataError

# task name -> (class names in output order, label -> class name); `None` keeps labels as they are
TASKS: dict[str, tuple[tuple[str, ...], dict[str, str]] | None] = {
    "covid_vs_rest": (("rest", "covid"), {"covid": "covid", "normal": "rest", "pneumonia": "rest"}),
    "three_class": (("normal", "covid", "pneumonia"),
                    {"normal": "normal", "covid": "covid", "pneumonia": "pneumonia"}),
    # COVID vs non-COVID viral pneumonia, chosen by the `finding` column (see VIRAL_FINDINGS);
    # every other image (normal, bacterial, fungal, ARDS, unspecified) is dropped
    "covid_vs_viral": (("viral", "covid"), {"covid": "covid", "viral": "viral"}),
    "labels": None,
}

# `finding` values (lower case) that are a non-COVID viral pneumonia: Kermany's `virus` files and the
# COVID-19 Radiography Database's Viral Pneumonia (adapters: "viral"), ieee8023's viral leaves (SARS-CoV-1,
# MERS, influenza, varicella, herpes, RSV). COVID is label `covid`, whatever its finding says.
VIRAL_FINDINGS = frozenset({"viral", "virus", "sars", "mers", "mers-cov", "influenza", "h1n1", "varicella",
                            "herpes", "rsv"})
FINDING_TASKS = ("covid_vs_viral",)


@dataclass(frozen=True)
class Dataset:
    """A validated data set: one row per image, labels as class indices."""

    root: Path
    table: pd.DataFrame          # id, path (absolute), label, finding, patient_id, source, mask_path ("" = none)
    classes: tuple[str, ...]
    labels: np.ndarray           # int64 class index per row
    task: str
    format: str = "manifest"     # the adapter that read it (trainable.data.adapters.ADAPTERS)
    notes: tuple[str, ...] = ()  # what loading changed, for the driver's log (images a task dropped)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def patients(self) -> np.ndarray:
        return self.table["patient_id"].to_numpy()

    @property
    def has_masks(self) -> np.ndarray:
        return (self.table["mask_path"] != "").to_numpy()

    def content_hash(self) -> str:
        """Hash of the manifest rows and of every image's and mask's bytes: changes when any image,
        mask or label does (a file rewritten with the same size and time too)."""
        h = hashlib.sha256()
        for row in self.table[["id", "path", "label", "patient_id", "mask_path"]].itertuples(index=False):
            h.update("|".join(map(str, row)).encode())
            for p in (row.path, row.mask_path):
                if p:
                    h.update(file_digest(p).encode())
        h.update(self.task.encode())
        return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (≈ 0.3 s for cxr-real's 999 images: read every time, never trusted
    to a size or a modification time)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_dataset(path: str | Path, task: str = "labels", format: str = "auto") -> Dataset:
    """Read `path` (a directory in one of the adapters' layouts, or a manifest CSV file).

    `format` is "auto" (detect) or an adapter name: manifest, ieee8023, kermany,
    covid19_radiography, dicom, folders. Raises DataError naming the file, row or field and the
    rule it broke.
    """
    if task not in TASKS:
        raise DataError(f"task {task!r} is unknown; known tasks: {', '.join(TASKS)}")
    table, root, fmt = read_table(path, format)
    table.attrs["format"] = fmt
    table = _resolve_paths(table, root)
    notes: tuple[str, ...] = ()
    if task in FINDING_TASKS:
        table, notes = _by_finding(table, task, root)
    classes, labels = _map_labels(table, task, root)
    return Dataset(root=root, table=table, classes=classes, labels=labels, task=task, format=fmt, notes=notes)


def _by_finding(table: pd.DataFrame, task: str, root: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """covid_vs_viral: label covid → covid, a viral `finding` (VIRAL_FINDINGS) → viral, the rest dropped."""
    source = table.attrs.get("source_file", str(root))
    finding = table["finding"].fillna("").astype(str).str.strip().str.lower() if "finding" in table else None
    if finding is None or not finding.astype(bool).any():
        raise DataError(f"{source}: task {task!r} needs a `finding` column (viral, sars, …) and the data has "
                        f"{'none' if finding is None else 'it empty on every row'}")
    covid = table["label"] == "covid"
    viral = ~covid & finding.isin(VIRAL_FINDINGS)
    if not viral.any():
        raise DataError(f"{source}: task {task!r} found no viral finding (finding one of "
                        f"{sorted(VIRAL_FINDINGS)}); findings present: {sorted(set(finding) - {''})}")
    keep = covid | viral
    out = table[keep].copy()
    out["label"] = np.where(covid[keep], "covid", "viral")
    out.attrs = dict(table.attrs)
    dropped = int((~keep).sum())
    note = (f"task {task}: kept {int(covid.sum())} covid and {int(viral.sum())} viral-pneumonia images; "
            f"dropped {dropped} that are neither")
    logging.getLogger(__name__).info(note)
    return out.reset_index(drop=True), (note,)


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
                raise DataError(f"{source}: {_row(table, i)}: {col} {p} does not exist")
            resolved.append(str(p))
        table[col] = resolved
    dup = table["id"][table["id"].duplicated()]
    if len(dup):
        raise DataError(f"{source}: id {dup.iloc[0]!r} appears more than once (ids must be unique)")
    table.attrs["source_file"] = source
    return table.reset_index(drop=True)


def _row(table: pd.DataFrame, i: int) -> str:
    """How a user finds row `i` in the file they gave: the CSV line, or the image's id."""
    if "metadata_row" in table.columns:
        return f"row {table['metadata_row'].iloc[i]}"
    if table.attrs.get("format", "manifest") == "manifest":
        return f"row {i + 2}"
    return f"image {table['id'].iloc[i]}"


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
        raise DataError(f"{source}: {_row(table, i)}: label {table['label'][i]!r} is not one of "
                        f"{sorted(mapping)} (task {task!r})")
    index = {c: k for k, c in enumerate(classes)}
    labels = table["label"].map(lambda lab: index[mapping[lab]]).to_numpy(np.int64)
    present = set(labels.tolist())
    if len(present) < 2:
        raise DataError(f"{source}: only class {classes[labels[0]]!r} is present; "
                        f"a classifier needs at least two classes")
    return classes, labels
