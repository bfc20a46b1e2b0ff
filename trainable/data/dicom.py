"""DICOM radiographs → 8-bit grayscale, the way a viewer displays them.

`read_dicom` decodes one file with pydicom and applies, in the DICOM standard's order
(PS3.3 C.11, PS3.4 N.2.1.1):

  1. the modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence);
  2. the VOI transform: a VOI LUT Sequence when the file has one, else the first
     Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID), else the image's own
     min–max range — so 12- and 16-bit data are scaled to 0–255, never truncated;
  3. MONOCHROME1 (0 = white) inverted, so the lungs are dark as in MONOCHROME2 and in PNGs.

`trainable.data.images` calls `open_dicom` for `.dcm`/`.dicom` files and for any file that starts
with the DICM preamble, so DICOM images go through exactly the same resize and crop as PNGs.
`read_header` gives the tags the DICOM adapter uses (patient, view, sex, age, site).

>>> img = open_dicom("chest.dcm")        # doctest: +SKIP
>>> img.mode                             # doctest: +SKIP
'L'
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trainable.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE = 128            # bytes before the b"DICM" magic in a Part 10 file
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def is_dicom(path: str | Path) -> bool:
    """True for a `.dcm`/`.dicom` name, or another name (not a common raster suffix) whose file
    has the DICM magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in _RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PREAMBLE + 4)
    except OSError:
        return False
    return head[_PREAMBLE:_PREAMBLE + 4] == b"DICM"


def _dcmread(path: str | Path, what: str, **kw):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force=True also reads files without the 128-byte preamble (older, non-Part-10 writers)
        ds = pydicom.dcmread(str(path), force=True, **kw)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {what} {path}: not a readable DICOM file "
                        f"({type(e).__name__}: {e})") from None
    if not _looks_like_dicom(path, ds):
        raise DataError(f"cannot read {what} {path}: not a DICOM file (no DICM marker at byte 128 and "
                        f"no DICOM data elements{_content_hint(path)})")
    return ds


# groups every radiograph has at least one element of: identification, patient, acquisition,
# relationship, image pixel description (a non-DICOM file read with force=True has none)
_IMAGE_GROUPS = (0x0008, 0x0010, 0x0018, 0x0020, 0x0028, 0x7FE0)


def _looks_like_dicom(path: str | Path, ds) -> bool:
    """A Part 10 file (DICM magic), or a preamble-less one whose elements are real DICOM ones."""
    try:
        with open(path, "rb") as fh:
            if fh.read(_PREAMBLE + 4)[_PREAMBLE:] == b"DICM":
                return True
    except OSError:
        return False
    return any(tag.group in _IMAGE_GROUPS for tag in ds.keys())


def _content_hint(path: str | Path) -> str:
    """'; it is a PNG file' for a raster image with a DICOM name, else ''."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return ""
    for magic, kind in ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
                        (b"MM\x00*", "TIFF"), (b"BM", "BMP")):
        if head.startswith(magic):
            return f"; it is a {kind} file: give it its own suffix"
    return ""


def read_header(path: str | Path) -> dict[str, str]:
    """Patient, view and acquisition tags as strings ("" where absent); no pixel data is read."""
    ds = _dcmread(path, "DICOM header", stop_before_pixels=True)
    tags = {"patient_id": "PatientID", "view": "ViewPosition", "sex": "PatientSex",
            "age": "PatientAge", "site": "InstitutionName", "manufacturer": "Manufacturer",
            "modality": "Modality", "study": "StudyInstanceUID"}
    out = {k: str(ds.get(tag, "") or "").strip() for k, tag in tags.items()}
    out["age"] = _age_years(out["age"])
    return out


def _age_years(age: str) -> str:
    """DICOM Age String ('045Y', '006M', '010D', '002W') → years as a string ('' if unparsable)."""
    if len(age) == 4 and age[:3].isdigit() and age[3].upper() in "YMWD":
        n = int(age[:3])
        years = {"Y": n, "M": n / 12, "W": n / 52, "D": n / 365}[age[3].upper()]
        return f"{years:g}" if age[3].upper() == "Y" else f"{years:.2f}"
    return ""


def read_dicom(path: str | Path, what: str = "image") -> np.ndarray:
    """One DICOM radiograph as uint8 (rows, columns), displayed as its VOI transform says.

    Raises DataError naming the file for a file that is not DICOM, has no pixel data, cannot be
    decoded (e.g. a compressed transfer syntax without a decoder plugin) or is not grayscale/RGB.
    """
    ds = _dcmread(path, what)
    where = f"cannot read {what} {path}"
    if "PixelData" not in ds:
        raise DataError(f"{where}: DICOM file has no pixel data (PixelData tag missing)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for undecodable pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name}; compressed data may need pylibjpeg or GDCM)" if syntax else ""
        raise DataError(f"{where}: cannot decode DICOM pixel data: {e}{hint}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]                      # a radiograph series stored as frames: the first one
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR") or arr.ndim == 3:
        from pydicom.pixels import apply_color_lut

        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        rgb = np.asarray(arr)
        if rgb.dtype != np.uint8:
            rgb = (_min_max(rgb.astype(np.float64)) * 255 + 0.5).astype(np.uint8)
        return np.asarray(Image.fromarray(rgb[..., :3]).convert("L"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{where}: PhotometricInterpretation {photometric or '(missing)'!r} is not "
                        f"supported (MONOCHROME1, MONOCHROME2 or RGB)")
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    gray = _voi(values, ds, where)
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    return (np.clip(gray, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def open_dicom(path: str | Path, what: str = "image") -> Image.Image:
    """`read_dicom` as a PIL image in mode 'L' (what `trainable.data.images` works with)."""
    return Image.fromarray(read_dicom(path, what))


def _voi(values: np.ndarray, ds, where: str) -> np.ndarray:
    """The VOI transform of modality values, mapped to [0, 1] (0 = black on a MONOCHROME2 display)."""
    seq = ds.get("VOILUTSequence")
    if seq:
        from pydicom.pixels import apply_voi

        item = seq[0]
        # a LUT is indexed by integer values (the modality output rounded, as a display does)
        out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
        lut = _lut_values(item)
        lo, hi = float(lut.min()), float(lut.max())
        if hi <= lo:
            raise DataError(f"{where}: VOI LUT Sequence is constant (every entry {lo:g})")
        return (out - lo) / (hi - lo)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds["WindowCenter"]), _first(ds["WindowWidth"])
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return _window(values, center, width, function, where)
    return _min_max(values)


def _window(x: np.ndarray, center: float, width: float, function: str, where: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3 windowing with an output range of [0, 1]."""
    if function == "LINEAR":
        if width < 1:
            raise DataError(f"{where}: Window Width {width:g} must be >= 1 for LINEAR windowing")
        c, w = center - 0.5, width - 1.0
        if w == 0:
            return (x > c).astype(np.float64)
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if width <= 0:
        raise DataError(f"{where}: Window Width {width:g} must be > 0 for {function} windowing")
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise DataError(f"{where}: VOI LUT Function {function!r} is not one of LINEAR, LINEAR_EXACT, SIGMOID")


def _first(elem) -> float:
    """First value of a DS element that may list several windows."""
    return float(elem.value[0]) if elem.VM > 1 else float(elem.value)


def _lut_values(item) -> np.ndarray:
    """The entries of a LUT item (LUTData is a list for US/SS, raw bytes for OW)."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        bits = int(item.LUTDescriptor[2])
        return np.frombuffer(data, dtype="<u2" if bits > 8 else "u1")
    return np.atleast_1d(np.asarray(data, dtype=np.float64))


def _min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x, dtype=np.float64)
