"""Real lung annotations: the v7labs masks shipped with torchxrayvision, and an atlas prior.

torchxrayvision's wheel carries ``data/semantic_masks_v7labs_lungs.zip``: 517 lung
annotations of the COVID-19 image data collection (Cohen et al.), one 8-bit image per
radiograph with both lungs in it. Pixels >= 192 are lung; 127 marks arrows the annotators
drew, which are not lung. 82 files are empty (no lung drawn) and are skipped.

The file is found through the package's import location, so torchxrayvision's model code
is never imported here.

Example
-------
>>> masks = load_lung_masks(64)                 # doctest: +SKIP
>>> masks.shape, masks.dtype                    # doctest: +SKIP
((435, 64, 64), dtype('bool'))
>>> lung_atlas(64).mean()                       # doctest: +SKIP
0.33...
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from trainable.atomic import atomic_file

_ZIP_NAME = "semantic_masks_v7labs_lungs.zip"
_LUNG_LEVEL = 192            # annotation value at or above which a pixel is lung
_MIN_SIZE, _MAX_SIZE = 8, 1024
_CHUNK = 32                   # annotations decoded per batch (lets `limit` stop early)
_DEFAULT_CACHE = Path("~/.cache/cxrtune/atlas")


def v7labs_zip_path() -> Path:
    """Path of ``semantic_masks_v7labs_lungs.zip`` inside the installed torchxrayvision.

    Raises
    ------
    FileNotFoundError
        torchxrayvision is not installed, or its wheel lacks the zip (the message names
        the path looked at).
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{_ZIP_NAME}: the torchxrayvision package is not installed, "
                                "so its lung annotations cannot be found")
    looked = [Path(p) / "data" / _ZIP_NAME for p in spec.submodule_search_locations]
    for path in looked:
        if path.is_file():
            return path
    raise FileNotFoundError(f"lung annotations not found: looked at {', '.join(map(str, looked))}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size={size!r}: must be an int")
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(f"size={size}: must be in [{_MIN_SIZE}, {_MAX_SIZE}]")


def _decode(data: bytes, size: int) -> np.ndarray:
    """One annotation -> bool (size, size): lung indicator, area-resized, thresholded at 0.5."""
    with Image.open(io.BytesIO(data)) as im:
        lung = im.convert("L").point(lambda v: 255 if v >= _LUNG_LEVEL else 0)
    # PIL's bilinear downscale widens its kernel with the scale factor (area-like);
    # reducing_gap first box-reduces the large originals, which is much faster.
    small = lung.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small) >= 128


@functools.lru_cache(maxsize=8)
def load_lung_masks(size: int, limit: int | None = None) -> np.ndarray:
    """Every non-empty v7labs lung annotation resized to ``size`` x ``size``.

    Parameters
    ----------
    size : int
        Output side in pixels, in [8, 1024]. The aspect ratio is squashed, as for the images.
    limit : int or None
        Return at most this many masks (the first ones in file-name order).

    Returns
    -------
    np.ndarray
        Read-only bool array (n, size, size), True on lung; cached per (size, limit).
    """
    _check_size(size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise ValueError(f"limit={limit!r}: must be None or an int >= 1")
    with zipfile.ZipFile(v7labs_zip_path()) as zf:
        names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
        blobs = [zf.read(n) for n in names]
    masks: list[np.ndarray] = []
    decode = functools.partial(_decode, size=size)
    # PNG decoding releases the GIL, so threads cut the cold start; chunks let `limit` stop early
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(blobs), _CHUNK):
            masks.extend(m for m in pool.map(decode, blobs[start:start + _CHUNK]) if m.any())
            if limit is not None and len(masks) >= limit:
                masks = masks[:limit]
                break
    if not masks:
        raise FileNotFoundError(f"{v7labs_zip_path()}: no non-empty lung mask at size {size}")
    out = np.stack(masks)
    out.setflags(write=False)   # shared through the cache: callers must copy to change it
    return out


@functools.lru_cache(maxsize=4)
def _zip_digest(path: Path, mtime_ns: int) -> str:
    """sha256 of the annotation zip (keyed by mtime so a reinstall is noticed)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_file(cache_dir: Path | None, stem: str) -> Path:
    zpath = v7labs_zip_path()
    digest = _zip_digest(zpath, zpath.stat().st_mtime_ns)[:16]
    root = Path(cache_dir if cache_dir is not None else _DEFAULT_CACHE).expanduser()
    return root / f"v7labs-{digest}-{stem}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy so a reader never sees a half-written file."""
    with atomic_file(path) as fh:
        np.save(fh, array)


def _load_cached(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):   # missing or corrupt: recompute and overwrite
        return None


def lung_atlas_probability(size: int, cache_dir: Path | None = None) -> np.ndarray:
    """Share of the real annotations that mark each pixel as lung: float32 (size, size) in [0, 1].

    Cached on disk in ``cache_dir`` (default ``~/.cache/cxrtune/atlas``), keyed by size and
    the annotation zip's sha256.
    """
    _check_size(size)
    path = _cache_file(cache_dir, f"s{size}-prob")
    prob = _load_cached(path)
    if prob is None or prob.shape != (size, size):
        prob = load_lung_masks(size).mean(axis=0, dtype=np.float64).astype(np.float32)
        _save_atomic(path, prob)
    return prob


def lung_atlas(size: int, threshold: float = 0.5, cache_dir: Path | None = None) -> np.ndarray:
    """Atlas lung prior: bool (size, size), True where at least ``threshold`` of masks say lung.

    Parameters
    ----------
    size : int
        Side in pixels.
    threshold : float
        In (0, 1]; 0.5 keeps the pixels that most annotations call lung.
    cache_dir : Path or None
        Where the .npy files live (default ``~/.cache/cxrtune/atlas``); keyed by size,
        threshold and the annotation zip's sha256, written atomically.
    """
    _check_size(size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
            or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: must be a number in (0, 1]")
    path = _cache_file(cache_dir, f"s{size}-t{float(threshold):g}")
    atlas = _load_cached(path)
    if atlas is None or atlas.shape != (size, size) or atlas.dtype != bool:
        atlas = lung_atlas_probability(size, cache_dir) >= float(threshold)
        _save_atomic(path, atlas)
    return atlas
