"""Data layouts → one manifest-shaped table: the adapters `trainable.data.dataset.load_dataset` reads through.

Every adapter turns a directory in one public layout into rows with the manifest columns
(`id, path, label, finding, patient_id, source, view, mask_path`, plus any extra columns the
layout offers, e.g. `split`, `sex`, `age`, `site`). Paths may be relative to the returned root
or absolute; `trainable.data.dataset` resolves and checks them. No image is decoded here (DICOM headers
and derived mask files are the only reads).

| format                | layout                                               | patients               |
|-----------------------|------------------------------------------------------|------------------------|
| `manifest`            | `manifest.csv` (or the CSV file), paths relative to it | `patient_id` column  |
| `ieee8023`            | covid-chestxray-dataset: `metadata.csv` + `images/`  | `patientid`            |
| `kermany`             | `{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`         | `personN` / `IM-XXXX`  |
| `covid19_radiography` | `<class>/images/*.png` (+ `<class>/masks/*.png`)     | unknown: one per image |
| `dicom`               | `<class>/**/*.dcm` (any depth)                       | DICOM PatientID        |
| `folders`             | `<class>/*.png` (ImageFolder)                        | unknown: one per image |

`detect_format` tries them in this order (the first that matches wins); `--format` forces one.

>>> table, root, fmt = read_table("data/kermany")          # doctest: +SKIP
>>> fmt, sorted(table["label"].unique())                    # doctest: +SKIP
('kermany', ['normal', 'pneumonia'])
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from trainable.atomic import atomic_file
from trainable.data.dicom import is_dicom, read_header
from trainable.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
REQUIRED_COLUMNS = ("path", "label", "patient_id")
OPTIONAL_COLUMNS = ("id", "finding", "source", "view", "mask_path")
MANIFEST_COLUMNS = ("id", "path", "label", "finding", "patient_id", "source", "view", "mask_path")


@dataclass(frozen=True)
class Adapter:
    """One data layout: how to recognise it and how to read it into a manifest-shaped table."""

    name: str
    layout: str                                   # one line, shown in errors and `--help`
    detect: Callable[[Path], bool]
    read: Callable[[Path], tuple[pd.DataFrame, Path]]
    patients_known: bool                          # False: every image is counted as its own patient


def cache_root() -> Path:
    """Where adapters write derived files (extracted or resized masks): $CXRTUNE_CACHE_DIR or
    ~/.cache/cxrtune. Never inside the data directory."""
    return Path(os.environ.get("CXRTUNE_CACHE_DIR", "~/.cache/cxrtune")).expanduser()


# --------------------------------------------------------------------------- manifest
def _detect_manifest(path: Path) -> bool:
    return path.is_file() or (path / "manifest.csv").is_file()


def _read_manifest_layout(path: Path) -> tuple[pd.DataFrame, Path]:
    csv = path if path.is_file() else path / "manifest.csv"
    if not csv.is_file():
        raise DataError(f"{path}: no manifest.csv in it (format 'manifest' needs DIR/manifest.csv "
                        f"with columns {', '.join(MANIFEST_COLUMNS)})")
    return read_manifest(csv), csv.parent.resolve()


def _read_csv(csv: Path, columns: tuple[str, ...] | list[str], what: str, kind: str, rule: str) -> pd.DataFrame:
    """A CSV read as strings, with `columns` present (DataError naming the file and the rule)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{csv}: not a readable {what} ({e})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing {kind} {', '.join(missing)}; {rule}")
    return table


def read_manifest(csv: Path) -> pd.DataFrame:
    """A manifest CSV with its required columns present and non-empty, optional ones filled with ""."""
    table = _read_csv(csv, REQUIRED_COLUMNS, "CSV manifest", "required column(s)",
                      f"a manifest needs {', '.join(REQUIRED_COLUMNS)}")
    if table.empty:
        raise DataError(f"{csv}: the manifest has no rows")
    for col in REQUIRED_COLUMNS:
        blank = table.index[table[col].str.strip() == ""]
        if len(blank):
            raise DataError(f"{csv}: row {blank[0] + 2} has an empty {col!r} (every row needs one)")
    table = _with_optional_columns(table)
    if (table["id"] == "").all():
        table["id"] = table["path"].map(lambda p: Path(p).stem)
    table.attrs["source_file"] = str(csv)
    return table


def _with_optional_columns(table: pd.DataFrame) -> pd.DataFrame:
    for col in OPTIONAL_COLUMNS:
        if col not in table.columns:
            table[col] = ""
    return table


def _table(rows: list[dict[str, str]], source_file: Path, what: str) -> pd.DataFrame:
    if not rows:
        raise DataError(f"{source_file}: no images found ({what})")
    table = _with_optional_columns(pd.DataFrame(rows).fillna(""))
    table.attrs["source_file"] = str(source_file)
    return table


def _sorted_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- class folders
def _detect_folders(path: Path) -> bool:
    return path.is_dir() and any(_images_in(d) for d in _sorted_dirs(path))


def _read_folders(root: Path) -> tuple[pd.DataFrame, Path]:
    """ImageFolder layout: root/<class>/<image>; each image is its own patient (no ids known)."""
    rows = []
    for class_dir in _sorted_dirs(root):
        for img in _images_in(class_dir):
            rows.append({"id": f"{class_dir.name}/{img.stem}", "path": str(img.relative_to(root)),
                         "label": class_dir.name, "patient_id": f"{class_dir.name}/{img.stem}"})
    if not rows:
        raise DataError(f"{root}: no manifest.csv and no class folders with images "
                        f"({', '.join(IMAGE_SUFFIXES)}) in it")
    return _table(rows, root, "class folders"), root.resolve()


# --------------------------------------------------------------------------- Kermany
KERMANY_SPLITS = ("train", "val", "test")
KERMANY_CLASSES = {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
_KERMANY_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)", re.IGNORECASE)
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def _detect_kermany(path: Path) -> bool:
    return path.is_dir() and any((path / s / c).is_dir() for s in KERMANY_SPLITS for c in KERMANY_CLASSES)


def _read_kermany(root: Path) -> tuple[pd.DataFrame, Path]:
    """Kermany et al. 2018 "Chest X-Ray Images (Pneumonia)": pediatric, frontal.

    `personN_bacteria_M.jpeg` / `personN_virus_M.jpeg` → finding bacterial / viral, patient personN;
    `IM-XXXX-YYYY.jpeg` / `NORMAL2-IM-XXXX-YYYY.jpeg` → normal, patient `[NORMAL2-]IM-XXXX`.
    The same person number in two splits is taken to be the same patient (never split apart).
    """
    rows = []
    for split in KERMANY_SPLITS:
        for cls, label in KERMANY_CLASSES.items():
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for img in _images_in(folder):
                patient, finding = _kermany_patient(img.stem, label)
                rows.append({"id": f"{split}/{cls}/{img.stem}", "path": str(img.relative_to(root)),
                             "label": label, "finding": finding, "patient_id": f"kermany-{patient}",
                             "source": "kermany", "view": "frontal", "split": split,
                             "original_name": f"{split}/{cls}/{img.name}"})
    return _table(rows, root, f"expected {{{','.join(KERMANY_SPLITS)}}}/{{NORMAL,PNEUMONIA}}/*.jpeg"), \
        root.resolve()


def _kermany_patient(stem: str, label: str) -> tuple[str, str]:
    m = _KERMANY_PERSON.match(stem)
    if m:
        return m.group(1).lower(), "bacterial" if m.group(2).lower() == "bacteria" else "viral"
    m = _KERMANY_NORMAL.match(stem)
    if m:
        return m.group(1).upper(), label
    return stem, label            # a name outside the convention: its own patient


# --------------------------------------------------------------------------- COVID-19 Radiography Database
# folder name (lower case, '_' for spaces) → (label, finding)
RADIOGRAPHY_CLASSES = {"covid": ("covid", "covid"), "normal": ("normal", "normal"),
                       "viral_pneumonia": ("pneumonia", "viral"),
                       "lung_opacity": ("pneumonia", "lung_opacity")}


def _detect_radiography(path: Path) -> bool:
    return path.is_dir() and any((d / "images").is_dir() for d in _sorted_dirs(path))


def _read_radiography(root: Path) -> tuple[pd.DataFrame, Path]:
    """COVID-19 Radiography Database (Chowdhury et al. 2020, Rahman et al. 2021; Kaggle):
    `<class>/images/<name>.png` with lung masks at `<class>/masks/<name>.png`.

    Classes COVID / Normal / Viral Pneumonia / Lung_Opacity → labels covid / normal / pneumonia /
    pneumonia (findings covid, normal, viral, lung_opacity); other folder names are labels as they
    are. The release has no patient ids, so every image is its own patient. Its masks are 256×256
    while its images are 299×299: a mask with the image's aspect ratio but another size is resized
    (nearest neighbour) into the cache, so it goes through exactly the image's geometry.
    """
    rows = []
    for class_dir in _sorted_dirs(root):
        if not (class_dir / "images").is_dir():
            continue
        key = re.sub(r"[\s-]+", "_", class_dir.name.strip().lower())
        label, finding = RADIOGRAPHY_CLASSES.get(key, (class_dir.name, class_dir.name))
        for img in _images_in(class_dir / "images"):
            mask = class_dir / "masks" / img.name
            rows.append({"id": f"{class_dir.name}/{img.stem}", "path": str(img.relative_to(root)),
                         "label": label, "finding": finding,
                         "patient_id": f"covid19_radiography-{class_dir.name}/{img.stem}",
                         "source": "covid19_radiography", "view": "",
                         "mask_path": str(fit_mask(mask, img)) if mask.is_file() else "",
                         "original_name": f"{class_dir.name}/images/{img.name}"})
    return _table(rows, root, "expected <class>/images/*.png"), root.resolve()


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:        # header only: no pixels are decoded
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def fit_mask(mask: Path, image: Path) -> Path:
    """`mask`, or a copy resized to its image's size when it is a uniform rescale of it.

    A mask with another aspect ratio (or an unreadable file) is returned as it is, so the decoder
    reports it by name. Copies go to `cache_root()/masks/`, keyed by the mask's path, size, mtime
    and the target size, written atomically.
    """
    m_size, i_size = _image_size(mask), _image_size(image)
    if m_size is None or i_size is None or m_size == i_size:
        return mask
    if abs(m_size[0] / m_size[1] - i_size[0] / i_size[1]) > 0.01:
        return mask
    st = mask.stat()
    key = hashlib.sha1(f"{mask.resolve()}|{st.st_size}|{st.st_mtime_ns}|{i_size}".encode()).hexdigest()[:20]
    out = cache_root() / "masks" / f"{key}.png"
    if not out.is_file():
        with Image.open(mask) as im:
            resized = im.convert("L").resize(i_size, Image.NEAREST)
        _save_png_atomic(resized, out)
    return out


def _save_png_atomic(img: Image.Image, out: Path) -> None:
    with atomic_file(out) as fh:
        img.save(fh, format="PNG")


# --------------------------------------------------------------------------- ieee8023 covid-chestxray-dataset
IEEE_COLUMNS = ("patientid", "finding", "view", "filename")
_IEEE_SKIP = {"todo", "unknown"}
_PNEUMONIA_WORDS = ("pneumonia", "sars", "mers", "ards", "streptococcus", "pneumocystis", "klebsiella",
                    "legionella", "chlamydophila", "mycoplasma", "e.coli", "staphylococcus", "influenza",
                    "varicella", "herpes", "nocardia", "aspiration", "lipoid", "bacterial", "viral",
                    "fungal", "aspergillosis", "h1n1", "moraxella")


def _detect_ieee8023(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.csv").is_file() and (path / "images").is_dir()


def _read_ieee8023(root: Path, frontal_only: bool = True) -> tuple[pd.DataFrame, Path]:
    """Cohen et al. COVID-19 image data collection (github.com/ieee8023/covid-chestxray-dataset).

    X-rays only (no CT); frontal views (PA, AP, AP Supine, AP semi erect…) unless
    `frontal_only=False`; rows with finding `todo`/`Unknown` dropped. Labels: covid when the finding
    names COVID-19, normal for `No Finding`, pneumonia for the other pneumonias (SARS, ARDS,
    Streptococcus, … and `Pneumonia/...` paths); anything else keeps its finding as label.
    `finding` is the last, most specific part (covid, sars, ards, streptococcus, …).
    Lung masks: the v7labs annotations torchxrayvision ships, matched by file name, when the
    annotation has the image's size (extracted, binarised, into `cache_root()`).
    """
    csv = root / "metadata.csv"
    meta = _read_csv(csv, IEEE_COLUMNS, "CSV", "column(s)",
                     f"the covid-chestxray-dataset metadata has {', '.join(IEEE_COLUMNS)}")
    keep = ~meta["finding"].str.strip().str.lower().isin(_IEEE_SKIP)
    if "modality" in meta:
        keep &= meta["modality"].str.strip().str.lower().isin(["x-ray", "xray", "cr", "dx", ""])
    if "folder" in meta:
        keep &= meta["folder"].str.strip().isin(["images", ""])
    if frontal_only:
        keep &= meta["view"].str.strip().str.upper().str.match(r"^(PA|AP)\b")
    meta = meta[keep].drop_duplicates("filename")
    masks = _V7labsMasks()
    rows = []
    for i, r in meta.iterrows():
        name = r["filename"].strip()
        label, finding = _ieee_label(r["finding"])
        image = root / "images" / name
        rows.append({"id": f"ieee8023-{Path(name).stem}", "path": f"images/{name}", "label": label,
                     "finding": finding, "patient_id": f"ieee8023-p{r['patientid'].strip()}",
                     "source": "ieee8023", "view": r["view"].strip(),
                     "mask_path": masks.mask_for(name, image),
                     "sex": r.get("sex", "").strip(), "age": r.get("age", "").strip(),
                     "offset": r.get("offset", "").strip(), "location": r.get("location", "").strip(),
                     "license": r.get("license", "").strip(), "original_name": name,
                     "metadata_row": str(i + 2)})
    return _table(rows, csv, "no frontal X-ray rows in metadata.csv"), root.resolve()


def _ieee_label(finding: str) -> tuple[str, str]:
    text = finding.strip()
    low = text.lower()
    if "covid" in low:
        return "covid", "covid"
    if low in ("no finding", "normal"):
        return "normal", "normal"
    leaf = re.split(r"[/,]", text)[-1].strip().lower() or low
    if any(word in low for word in _PNEUMONIA_WORDS):
        return "pneumonia", leaf
    return leaf, leaf


class _V7labsMasks:
    """torchxrayvision's v7labs lung annotations, looked up by the image's file name."""

    PREFIX = "semantic_masks_v7labs_lungs/"

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.lower: dict[str, str] = {}
        try:
            from trainable.data.lungs import v7labs_zip_path

            self.zip_path: Path | None = v7labs_zip_path()
        except FileNotFoundError:
            self.zip_path = None
            return
        with zipfile.ZipFile(self.zip_path) as zf:
            names = [n for n in zf.namelist() if n.startswith(self.PREFIX) and not n.endswith("/")]
        self.names = {n[len(self.PREFIX):]: n for n in names}
        self.lower = {k.lower(): v for k, v in self.names.items()}
        st = self.zip_path.stat()
        self.dir = cache_root() / "v7labs-masks" / hashlib.sha1(
            f"{self.zip_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]

    def mask_for(self, name: str, image: Path) -> str:
        """Absolute path of the binarised (0/255) mask PNG, or "" (none, or drawn at another size)."""
        member = self.names.get(name) or self.lower.get(name.lower())
        if member is None or self.zip_path is None:
            return ""
        out = self.dir / f"{name}.png"
        if not out.is_file():
            with zipfile.ZipFile(self.zip_path) as zf, Image.open(io.BytesIO(zf.read(member))) as im:
                # >= 192 is lung; 127 marks arrows the annotators drew (trainable.data.lungs)
                lung = im.convert("L").point(lambda v: 255 if v >= 192 else 0)
            _save_png_atomic(lung, out)
        size = _image_size(image)
        with Image.open(out) as im:
            if size is not None and im.size != size:
                return ""
        return str(out)


# --------------------------------------------------------------------------- DICOM
def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return [f for f in files if is_dicom(f)]


def _detect_dicom(path: Path) -> bool:
    if not path.is_dir():
        return False
    for class_dir in _sorted_dirs(path):
        for n, (dirpath, dirnames, filenames) in enumerate(os.walk(class_dir)):
            if any(is_dicom(Path(dirpath) / f) for f in sorted(filenames)[:20] if not f.startswith(".")):
                return True
            if n > 50:
                break
    return False


def _read_dicom_folders(root: Path) -> tuple[pd.DataFrame, Path]:
    """`root/<class>/**/<file>.dcm`: label = class folder; patient = PatientID; view = ViewPosition;
    sex, age (years), site (InstitutionName) and manufacturer from the header. A file whose header
    cannot be read keeps its own id as patient and is reported when it is decoded."""
    rows = []
    for class_dir in _sorted_dirs(root):
        for f in _dicom_files(class_dir):
            rel = f.relative_to(root)
            ident = str(rel.with_suffix("")) if f.suffix.lower() in (".dcm", ".dicom") else str(rel)
            try:
                h = read_header(f)
            except DataError:
                h = {}
            rows.append({"id": ident, "path": str(rel), "label": class_dir.name, "finding": class_dir.name,
                         "patient_id": f"dicom-{h['patient_id']}" if h.get("patient_id") else f"dicom-file-{ident}",
                         "source": "dicom", "view": h.get("view", ""), "sex": h.get("sex", ""),
                         "age": h.get("age", ""), "site": h.get("site", ""),
                         "manufacturer": h.get("manufacturer", ""), "original_name": str(rel)})
    return _table(rows, root, "expected <class>/**/*.dcm"), root.resolve()


# --------------------------------------------------------------------------- registry
ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("manifest", "DIR/manifest.csv (id, path, label, finding, patient_id, source, view, mask_path, ...)",
            _detect_manifest, _read_manifest_layout, patients_known=True),
    Adapter("ieee8023", "covid-chestxray-dataset: DIR/metadata.csv + DIR/images/",
            _detect_ieee8023, _read_ieee8023, patients_known=True),
    Adapter("kermany", "Kermany pneumonia: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg",
            _detect_kermany, _read_kermany, patients_known=True),
    Adapter("covid19_radiography", "COVID-19 Radiography Database: DIR/<class>/images/*.png (+ masks/)",
            _detect_radiography, _read_radiography, patients_known=False),
    Adapter("dicom", "DICOM class folders: DIR/<class>/**/*.dcm", _detect_dicom, _read_dicom_folders,
            patients_known=True),
    Adapter("folders", "class folders: DIR/<class>/*.png", _detect_folders, _read_folders,
            patients_known=False),
)}
FORMATS = ("auto", *ADAPTERS)


def detect_format(path: str | Path) -> str:
    """The first adapter whose layout `path` has; DataError listing the layouts when none does."""
    path = Path(path)
    for name, adapter in ADAPTERS.items():
        if adapter.detect(path):
            return name
    layouts = "; ".join(f"{a.name}: {a.layout}" for a in ADAPTERS.values())
    raise DataError(f"{path}: no known data layout found (looked for {layouts})")


def read_table(path: str | Path, format: str = "auto") -> tuple[pd.DataFrame, Path, str]:
    """(manifest-shaped table, root its relative paths are under, format name) for `path`."""
    path = Path(path).expanduser()
    if format not in FORMATS:
        raise DataError(f"format {format!r} is unknown; known formats: {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    name = detect_format(path) if format == "auto" else format
    if name != "manifest" and not path.is_dir():
        raise DataError(f"{path}: format {name!r} needs a directory ({ADAPTERS[name].layout})")
    table, root = ADAPTERS[name].read(path)
    table.attrs.setdefault("source_file", str(path))
    return table, root, name
