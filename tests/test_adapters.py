"""Adapters: each layout is detected, read into manifest rows, and decodes through trainable.data.images.

Every fixture is generated here, in the exact layout of the public release it stands for.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import write_manifest_dataset
from trainable.data.adapters import ADAPTERS, detect_format, read_table
from trainable.data.dataset import load_dataset
from trainable.data.dicom import is_dicom, read_dicom
from trainable.data.images import decode_images, read_gray
from trainable.errors import DataError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _png(path: Path, size: tuple[int, int] = (24, 24), value: int | None = None, seed: int = 0) -> Path:
    """A random (or constant) grayscale image; the format follows the suffix (.png, .jpeg, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    a = np.full((h, w), value, np.uint8) if value is not None else rng.integers(0, 255, (h, w), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


# --------------------------------------------------------------------------- manifest, folders
def test_manifest_is_detected_and_keeps_its_columns(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "m")
    ds = load_dataset(root)
    assert ds.format == "manifest" and detect_format(root) == "manifest"
    assert {"id", "path", "label", "finding", "patient_id", "source", "view", "mask_path",
            "license", "original_name"} <= set(ds.table.columns)
    assert load_dataset(root / "manifest.csv", "covid_vs_rest").classes == ("rest", "covid")


def test_class_folders_are_detected(tmp_path: Path) -> None:
    for cls in ("normal", "covid"):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", seed=i)
    ds = load_dataset(tmp_path)
    assert ds.format == "folders" and ds.classes == ("covid", "normal")
    assert ds.table["patient_id"].nunique() == 4          # no ids known: one patient per image
    assert not ADAPTERS["folders"].patients_known


def test_forced_format_that_does_not_fit_is_named(tmp_path: Path) -> None:
    for cls in ("normal", "covid"):
        _png(tmp_path / cls / "0.png")
    with pytest.raises(DataError, match="no manifest.csv"):
        load_dataset(tmp_path, format="manifest")
    with pytest.raises(DataError, match="format 'nope' is unknown; known formats: auto, manifest"):
        load_dataset(tmp_path, format="nope")


def test_unknown_layout_lists_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no known data layout.*manifest.*ieee8023.*kermany"):
        load_dataset(tmp_path / "empty")


# --------------------------------------------------------------------------- Kermany
KERMANY_FILES = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person7_virus_16.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1430-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg"],
    "test/PNEUMONIA": ["person1_virus_6.jpeg", "person100_bacteria_475.jpeg"],
}


def _kermany(root: Path) -> Path:
    for folder, names in KERMANY_FILES.items():
        for k, name in enumerate(names):
            _png(root / folder / name, (28, 24), seed=k)
    (root / "train" / "NORMAL" / ".DS_Store").write_text("finder junk")
    return root


def test_kermany_layout(tmp_path: Path) -> None:
    root = _kermany(tmp_path / "chest_xray")
    assert detect_format(root) == "kermany"
    ds = load_dataset(root)
    t = ds.table.set_index("id")
    assert ds.format == "kermany" and ds.classes == ("normal", "pneumonia") and len(ds) == 11
    assert t.loc["train/PNEUMONIA/person1_bacteria_1", "finding"] == "bacterial"
    assert t.loc["train/PNEUMONIA/person7_virus_16", "finding"] == "viral"
    assert t.loc["train/NORMAL/IM-0115-0002", "finding"] == "normal"
    assert t.loc["train/NORMAL/IM-0115-0001", "patient_id"] == "kermany-IM-0115"
    assert t.loc["train/NORMAL/IM-0115-0002", "patient_id"] == "kermany-IM-0115"
    assert t.loc["train/NORMAL/NORMAL2-IM-1427-0001", "patient_id"] == "kermany-NORMAL2-IM-1427"
    # person1 has images in train and test: one patient, never split across folds
    assert set(t.index[t["patient_id"] == "kermany-person1"]) == {
        "train/PNEUMONIA/person1_bacteria_1", "train/PNEUMONIA/person1_bacteria_2", "test/PNEUMONIA/person1_virus_6"}
    assert set(t["split"]) == {"train", "val", "test"} and set(t["source"]) == {"kermany"}
    assert (t["view"] == "frontal").all() and (t["mask_path"] == "").all()
    images, _ = decode_images(ds, 16)                      # JPEGs decode through the same path
    assert images.shape == (11, 16, 16)
    assert load_dataset(root, "three_class").classes == ("normal", "covid", "pneumonia")


# --------------------------------------------------------------------------- COVID-19 Radiography Database
def test_covid19_radiography_layout_with_smaller_masks(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for cls, prefix in (("COVID", "COVID"), ("Normal", "Normal"), ("Viral Pneumonia", "Viral Pneumonia"),
                        ("Lung_Opacity", "Lung_Opacity")):
        for i in (1, 2):
            _png(root / cls / "images" / f"{prefix}-{i}.png", (30, 30), seed=i)
            mask = np.zeros((20, 20), np.uint8)            # the release: 299×299 images, 256×256 masks
            mask[5:15, 3:9] = mask[5:15, 11:17] = 255
            (root / cls / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask).save(root / cls / "masks" / f"{prefix}-{i}.png")
    (root / "COVID.metadata.xlsx").write_bytes(b"not read")
    (root / "README.md.txt").write_text("readme")
    assert detect_format(root) == "covid19_radiography"
    ds = load_dataset(root, "three_class")
    t = ds.table.set_index("id")
    assert ds.format == "covid19_radiography" and len(ds) == 8
    assert t.loc["Viral Pneumonia/Viral Pneumonia-1", ["label", "finding"]].tolist() == ["pneumonia", "viral"]
    assert t.loc["Lung_Opacity/Lung_Opacity-2", ["label", "finding"]].tolist() == ["pneumonia", "lung_opacity"]
    assert t.loc["COVID/COVID-1", "label"] == "covid" and t.loc["Normal/Normal-2", "label"] == "normal"
    assert ds.table["patient_id"].nunique() == 8
    # masks were resized to their image (nearest) into the cache, not into the data directory
    assert all(str(tmp_path / "cache") in p for p in ds.table["mask_path"])
    images, masks = decode_images(ds, 30)
    assert masks[0, 15, 7] and not masks[0, 15, 15] and not masks[0, 2, 2]


def test_covid19_radiography_mask_of_another_shape_is_left_for_the_decoder(tmp_path: Path) -> None:
    root = tmp_path / "db"
    for cls in ("COVID", "Normal"):
        _png(root / cls / "images" / f"{cls}-1.png", (30, 30))
        _png(root / cls / "masks" / f"{cls}-1.png", (20, 10), value=255)
    ds = load_dataset(root)
    with pytest.raises(DataError, match=r"mask .*masks/COVID-1.png is 20x10 but its image .* is 30x30"):
        decode_images(ds, 16)


# --------------------------------------------------------------------------- ieee8023
def _v7labs_member(nonempty: bool = True) -> tuple[str, tuple[int, int], np.ndarray]:
    """Name, size and lung pixels (>= 192) of an annotation torchxrayvision ships."""
    from trainable.data.lungs import v7labs_zip_path

    with zipfile.ZipFile(v7labs_zip_path()) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith("/") or not name.lower().endswith(".png"):
                continue
            with Image.open(io.BytesIO(zf.read(name))) as im:
                lung = np.asarray(im.convert("L")) >= 192
                if lung.any() == nonempty and max(im.size) <= 1200:
                    return name.split("/", 1)[1], im.size, lung
    pytest.skip("no suitable v7labs annotation in this torchxrayvision")


IEEE_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "view",
                "modality", "date", "location", "folder", "filename", "doi", "url", "license",
                "clinical_notes", "other_notes"]


def _ieee8023(root: Path, masked_name: str, masked_size: tuple[int, int]) -> Path:
    rows = [  # patientid, sex, age, finding, view, modality, folder, filename
        ("2", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", masked_name),
        ("2", "M", "65", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "images", "p2-day3.jpg"),
        ("2", "M", "65", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "p2-lateral.jpg"),
        ("3", "F", "40", "Pneumonia/Viral/COVID-19", "Axial", "CT", "volumes", "p3-ct.nii.gz"),
        ("4", "F", "", "No Finding", "AP", "X-ray", "images", "p4.png"),
        ("5", "M", "52", "Pneumonia/Bacterial/Streptococcus", "PA", "X-ray", "images", "p5.jpeg"),
        ("6", "", "", "SARS", "PA", "X-ray", "images", "p6.jpg"),
        ("7", "F", "70", "ARDS", "AP semi erect", "X-ray", "images", "p7.png"),
        ("8", "", "", "todo", "PA", "X-ray", "images", "p8.png"),
        ("9", "F", "33", "COVID-19, ARDS", "PA", "X-ray", "images", "p9.png"),
    ]
    records = []
    for pid, sex, age, finding, view, modality, folder, filename in rows:
        rec = dict.fromkeys(IEEE_COLUMNS, "")
        rec.update(patientid=pid, sex=sex, age=age, finding=finding, view=view, modality=modality,
                   folder=folder, filename=filename, license="CC BY")
        records.append(rec)
        if folder == "images":
            _png(root / "images" / filename, masked_size if filename == masked_name else (26, 22))
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_csv(root / "metadata.csv", index=False)
    return root


def test_ieee8023_layout_frontal_xrays_labels_and_v7labs_masks(tmp_path: Path) -> None:
    name, size, lung = _v7labs_member()
    root = _ieee8023(tmp_path / "covid-chestxray-dataset", name, size)
    assert detect_format(root) == "ieee8023"
    ds = load_dataset(root)
    t = ds.table.set_index("original_name")
    assert ds.format == "ieee8023"
    assert set(t.index) == {name, "p2-day3.jpg", "p4.png", "p5.jpeg", "p6.jpg", "p7.png", "p9.png"}
    assert t.loc[name, ["label", "finding", "patient_id", "view", "sex", "age"]].tolist() == \
        ["covid", "covid", "ieee8023-p2", "PA", "M", "65"]
    assert t.loc["p2-day3.jpg", "patient_id"] == "ieee8023-p2"
    assert t.loc["p4.png", ["label", "finding"]].tolist() == ["normal", "normal"]
    assert t.loc["p5.jpeg", ["label", "finding"]].tolist() == ["pneumonia", "streptococcus"]
    assert t.loc["p6.jpg", ["label", "finding"]].tolist() == ["pneumonia", "sars"]
    assert t.loc["p7.png", ["label", "finding"]].tolist() == ["pneumonia", "ards"]
    assert t.loc["p9.png", "label"] == "covid"
    assert (t["source"] == "ieee8023").all()
    # the annotation is found by file name; the other images have none
    assert t.loc[name, "mask_path"] != "" and (t.drop(index=name)["mask_path"] == "").all()
    images, masks = decode_images(ds, 64)
    k = list(ds.table["original_name"]).index(name)
    expected = np.asarray(Image.fromarray(lung.astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)) >= 128
    assert (masks[k] == expected).mean() > 0.99 and masks[k].any()


def test_ieee8023_annotation_of_another_size_is_not_used(tmp_path: Path) -> None:
    name, size, _ = _v7labs_member()
    root = _ieee8023(tmp_path / "d", name, (size[0] + 7, size[1]))
    t = load_dataset(root).table.set_index("original_name")
    assert t.loc[name, "mask_path"] == ""


def test_ieee8023_missing_image_names_the_metadata_row(tmp_path: Path) -> None:
    name, size, _ = _v7labs_member()
    root = _ieee8023(tmp_path / "d", name, size)
    (root / "images" / "p6.jpg").unlink()
    with pytest.raises(DataError, match=r"metadata.csv: row 8: path .*images/p6.jpg does not exist"):
        load_dataset(root)


# --------------------------------------------------------------------------- DICOM
def _dicom(path: Path, pixels: np.ndarray, *, patient: str = "P1", photometric: str = "MONOCHROME2",
           bits_stored: int = 12, window: tuple[float, float] | None = None, voi_lut: np.ndarray | None = None,
           slope: float | None = None, intercept: float | None = None, view: str = "PA",
           preamble: bool = True) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"     # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.Modality = patient, "F", "045Y", "DX"
    ds.ViewPosition, ds.InstitutionName, ds.Manufacturer = view, "General Hospital", "ACME"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])         # LUTData
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (8, 1))
    mono2 = read_dicom(_dicom(tmp_path / "m2.dcm", ramp))
    mono1 = read_dicom(_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255             # no window: the image's own range
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_dicom_window_is_applied(tmp_path: Path) -> None:
    px = np.array([[0, 1000, 1500, 2000, 4095]], np.uint16).repeat(4, 0)
    out = read_dicom(_dicom(tmp_path / "w.dcm", px, window=(1500, 1001)))   # window 1000..2000
    assert out[0].tolist()[0:2] == [0, 0] and out[0, 3] == 255 and out[0, 4] == 255
    assert abs(int(out[0, 2]) - 128) <= 1
    # Rescale slope/intercept (modality LUT) comes before the window
    out = read_dicom(_dicom(tmp_path / "r.dcm", px // 2, window=(1500, 1001), slope=2.0, intercept=0.0))
    assert abs(int(out[0, 2]) - 128) <= 1 and out[0, 0] == 0 and out[0, 4] == 255


def test_dicom_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    px = np.array([[0, 1, 2, 3]], np.uint16).repeat(4, 0)
    lut = np.array([0, 60000, 30000, 65535])                     # a non-monotonic LUT: only a LUT does this
    out = read_dicom(_dicom(tmp_path / "v.dcm", px, bits_stored=2 + 14, window=(1, 1), voi_lut=lut))
    assert out[0].tolist() == [0, round(60000 / 65535 * 255), round(30000 / 65535 * 255), 255]


def test_dicom_16_bit_is_scaled_not_truncated(tmp_path: Path) -> None:
    px = np.array([[0, 16384, 32768, 65535]], np.uint16).repeat(4, 0)
    out = read_dicom(_dicom(tmp_path / "16.dcm", px, bits_stored=16))
    assert out[0].tolist() == [0, 64, 128, 255]


def test_dicom_decodes_through_the_image_path_and_without_suffix(tmp_path: Path) -> None:
    px = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    plain = _dicom(tmp_path / "IMG0001", px)                     # no suffix: found by its DICM magic
    assert is_dicom(plain) and not is_dicom(_png(tmp_path / "x.png"))
    assert read_gray(str(plain), 32).shape == (32, 32)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken.dcm"):
        read_gray(str(bad), 32)


def test_dicom_class_folders_patient_from_patient_id(tmp_path: Path) -> None:
    root = tmp_path / "dicoms"
    rng = np.random.default_rng(0)
    for cls, patients in (("covid", ["C1", "C1", "C2"]), ("normal", ["N1", "N2", "N3"])):
        for k, pid in enumerate(patients):
            _dicom(root / cls / f"study{k}" / f"img{k}.dcm", rng.integers(0, 4096, (20, 20)), patient=pid,
                   photometric="MONOCHROME1" if k == 0 else "MONOCHROME2", view="AP" if k else "PA")
    _png(root / "covid" / "notes.png")                           # not a DICOM: ignored by this layout
    assert detect_format(root) == "dicom"
    ds = load_dataset(root, "covid_vs_rest")
    t = ds.table.set_index("id")
    assert ds.format == "dicom" and len(ds) == 6
    assert t.loc["covid/study0/img0", "patient_id"] == t.loc["covid/study1/img1", "patient_id"] == "dicom-C1"
    assert ds.table["patient_id"].nunique() == 5
    assert t.loc["covid/study0/img0", ["view", "sex", "age", "site"]].tolist() == ["PA", "F", "45", "General Hospital"]
    images, _ = decode_images(ds, 16)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16)


def test_manifest_may_point_at_dicom_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for k in range(4):
        _dicom(tmp_path / "dcm" / f"{k}.dcm", rng.integers(0, 4096, (16, 16)), patient=f"p{k}")
        rows.append({"path": f"dcm/{k}.dcm", "label": ("covid", "normal")[k % 2], "patient_id": f"p{k}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    ds = load_dataset(tmp_path)
    assert decode_images(ds, 8)[0].shape == (4, 8, 8)


def test_read_table_returns_relative_rows_and_root(tmp_path: Path) -> None:
    root = _kermany(tmp_path / "k")
    table, found_root, fmt = read_table(root)
    assert fmt == "kermany" and found_root == root.resolve()
    assert not any(Path(p).is_absolute() for p in table["path"])


def test_run_passes_format_to_the_loader(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = write_manifest_dataset(tmp_path / "m")
    proc = subprocess.run([sys.executable, "-m", "search.cli", "run", "--data", str(root), "--format", "kermany",
                           "--out", str(tmp_path / "results"), "--name", "x"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no images found (expected {train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg)" in proc.stderr
