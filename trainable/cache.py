"""Content-addressed on-disk caches: decoded images and frozen-backbone features.

A sweep decodes its images and runs each frozen backbone once; these caches keep both on disk so
the next sweep (or a second one running at the same time) over the same data does neither again.

* **Decoded images**, per (dataset content hash, base size): the uint8 (N, S, S) array that
  `trainable.data.images.decode_images` returns, and the data's own lung masks (bit-packed).
* **Features**, per (FeatureKey, weights sha256, augmentation views, seed, decoded images): the
  fp16 view-0 maps and the pooled vectors of every view (`trainable.models.features.FeatureSet`).

An entry's key is the sha256 of a JSON description of everything it depends on — the inputs
above, the source of the modules that compute it and the versions of the libraries they call — so
a change to any of them addresses a new entry and a stale one is never read. Layout::

    <root>/<kind>/<key>/meta.json        description, per-array sha256 / dtype / shape, info
    <root>/<kind>/<key>/<array>.npy
    <root>/<kind>/<key>.lock             flock: one process builds an entry, the others wait for it

Every array is checked against its sha256 when it is read: a corrupt, truncated or half-written
entry is reported, deleted and rebuilt, never used. Entries are written to a temporary directory
and renamed into place, so a crash leaves no partial entry behind.

The root is `Settings.cache_dir`, else ``$CXRTUNE_CACHE_DIR``, else ``~/.cache/cxrtune``; the
value ``off`` disables the disk cache (everything is computed, nothing written). Deleting the
directory is always safe. The lock is `fcntl.flock`: it works between processes on one machine
(and on most network file systems with a lock manager); without it builds are not deduplicated
but stay correct (the rename is atomic).

Example::

    >>> import numpy as np, tempfile
    >>> from trainable.cache import DiskCache
    >>> cache = DiskCache(tempfile.mkdtemp(), "demo")
    >>> e = cache.get_or_create({"x": 1}, lambda: ({"a": np.arange(3)}, {"note": "built"}))
    >>> e.hit, cache.get_or_create({"x": 1}, lambda: 1 / 0).hit
    (False, True)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainable.atomic import atomic_dir

try:  # POSIX; elsewhere builds are not deduplicated (still correct: the rename is atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "CXRTUNE_CACHE_DIR"
DEFAULT_ROOT = Path("~/.cache/cxrtune")
FORMAT = 1  # bump when the on-disk layout changes
_OFF = ("off", "none", "0", "false", "no")

Build = Callable[[], "tuple[dict[str, np.ndarray], dict]"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cache directory: `cache_dir`, else $CXRTUNE_CACHE_DIR, else ~/.cache/cxrtune.

    None when the chosen value is "off" (or empty): no disk cache. The path is made absolute
    here, in the driver, so Ray workers with another working directory find the same place.
    """
    value = os.fspath(cache_dir) if cache_dir is not None else os.environ.get(CACHE_ENV, str(DEFAULT_ROOT))
    if value.strip().lower() in ("", *_OFF):
        return None
    return Path(value).expanduser().resolve()


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes (C order): the content address of decoded images."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


def code_fingerprint(modules: tuple[str, ...], packages: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 (12 hex) of each module's source file and the installed version of each package."""
    out = {}
    for name in modules:
        path = importlib.import_module(name).__file__
        out[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else "?"
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def directory_size(path: str | os.PathLike | None) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    if path is None or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class CorruptEntry(Exception):
    """A cache entry whose files do not match its recorded hashes, shapes or dtypes."""


@dataclass
class Entry:
    """One cache entry, read back or just built."""

    arrays: dict[str, np.ndarray]
    info: dict
    digests: dict[str, str]           # array name -> sha256 of its bytes
    hit: bool                         # True: read from disk; False: built now
    path: Path | None                 # the entry's directory (None: no disk cache)
    seconds: float                    # time to read (hit) or to build and write (miss)


class DiskCache:
    """Entries of one kind (`images`, `features`, ...) under `root/kind`, addressed by content."""

    def __init__(self, root: str | os.PathLike | None, kind: str,
                 log: Callable[[str], None] = print) -> None:
        if not kind.isidentifier():
            raise ValueError(f"cache kind must be an identifier (got {kind!r})")
        self.root = None if root is None else Path(root)
        self.kind = kind
        self.log = log

    def key(self, description: dict) -> str:
        """The content address: sha256 of the canonical JSON of `description`."""
        text = json.dumps({"kind": self.kind, "format": FORMAT, **description}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, description: dict) -> Path | None:
        return None if self.root is None else self.root / self.kind / self.key(description)

    def get(self, description: dict) -> Entry | None:
        """The verified entry for `description`, or None (absent, or corrupt and now deleted).

        Needs no lock: an entry becomes visible only complete (it is renamed into place)."""
        if self.root is None:
            return None
        t0 = time.perf_counter()
        entry = self._read(self.path(description))
        if entry is not None:
            entry.seconds = time.perf_counter() - t0
        return entry

    def get_or_create(self, description: dict, build: Build) -> Entry:
        """The entry for `description`: read and verified from disk, or built by `build()` and written.

        `build` returns (arrays, info): named numpy arrays and a JSON-able dict. While one process
        builds an entry, the others asking for the same one wait on its lock, then read it.
        """
        t0 = time.perf_counter()
        if self.root is None:
            return self._uncached(build, t0)
        path = self.path(description)
        with contextlib.ExitStack() as stack:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(_locked(path.parent / f"{path.name}.lock"))
            except OSError as e:  # e.g. a home directory a cluster worker cannot write: compute, don't keep
                self.log(f"cache: cannot use {path.parent} ({type(e).__name__}: {e}); not caching")
                return self._uncached(build, t0)
            entry = self._read(path)
            if entry is not None:
                entry.seconds = time.perf_counter() - t0
                return entry
            arrays, info = build()
            try:
                digests = self._write(path, arrays, info, description)
            except OSError as e:  # disk full, read-only: the result is still right, only not kept
                self.log(f"cache: could not write {path} ({type(e).__name__}: {e}); not caching")
                return Entry(arrays, info, {n: array_digest(a) for n, a in arrays.items()}, False, None,
                             time.perf_counter() - t0)
        return Entry(arrays, info, digests, False, path, time.perf_counter() - t0)

    @staticmethod
    def _uncached(build: Build, t0: float) -> Entry:
        arrays, info = build()
        return Entry(arrays, info, {n: array_digest(a) for n, a in arrays.items()}, False, None,
                     time.perf_counter() - t0)

    def _read(self, path: Path) -> Entry | None:
        """The verified entry at `path`; None when absent; a corrupt one is deleted (and None)."""
        if not path.exists():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            arrays, digests = {}, {}
            for name, rec in meta["arrays"].items():
                a = np.load(path / f"{name}.npy", allow_pickle=False)
                if a.dtype.str != rec["dtype"] or list(a.shape) != rec["shape"]:
                    raise CorruptEntry(f"{name}.npy is {a.dtype.str}{list(a.shape)}, "
                                       f"expected {rec['dtype']}{rec['shape']}")
                digest = array_digest(a)
                if digest != rec["sha256"]:
                    raise CorruptEntry(f"{name}.npy has sha256 {digest[:12]}…, expected {rec['sha256'][:12]}…")
                arrays[name], digests[name] = a, digest
            info = meta["info"]
        except (OSError, ValueError, KeyError, TypeError, CorruptEntry) as e:
            self.log(f"cache: {path} is corrupt ({type(e).__name__}: {e}); deleting and rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Entry(arrays, info, digests, True, path, 0.0)

    def _write(self, path: Path, arrays: dict[str, np.ndarray], info: dict, description: dict) -> dict[str, str]:
        with atomic_dir(path) as tmp:
            records, digests = {}, {}
            for name, a in arrays.items():
                a = np.ascontiguousarray(a)
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, a, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                digests[name] = array_digest(a)
                records[name] = {"sha256": digests[name], "dtype": a.dtype.str, "shape": list(a.shape)}
            meta = {"kind": self.kind, "format": FORMAT, "description": description, "arrays": records,
                    "info": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        return digests


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- decoded images


@dataclass
class DecodedImages:
    """`decode_images`' output, with the content address of the image array."""

    images: np.ndarray       # uint8 (N, S, S)
    masks: np.ndarray        # bool (N, S, S); all False where the data has no mask
    digest: str              # sha256 of `images`: part of every feature entry's key
    hit: bool
    seconds: float
    path: Path | None = None


def decoded_images(dataset, base_size: int, root: Path | None,
                   log: Callable[[str], None] = print) -> DecodedImages:
    """Images and masks decoded and resized once per (dataset content hash, base size)."""
    from trainable.data.images import decode_images

    description = {"data": dataset.content_hash(), "n": len(dataset), "base_size": int(base_size),
                   "code": code_fingerprint(("trainable.data.images", "trainable.data.dicom"),
                                            ("numpy", "pillow", "pydicom"))}

    def build() -> tuple[dict[str, np.ndarray], dict]:
        images, masks = decode_images(dataset, base_size)
        arrays = {"images": images}
        if masks.any():
            arrays["masks"] = np.packbits(masks, axis=-1)
        return arrays, {"images": len(images), "base_size": int(base_size), "root": str(dataset.root)}

    e = DiskCache(root, "images", log).get_or_create(description, build)
    images = e.arrays["images"]
    if "masks" in e.arrays:
        masks = np.unpackbits(e.arrays["masks"], axis=-1, count=base_size).astype(bool)
    else:
        masks = np.zeros(images.shape, bool)
    return DecodedImages(images, masks, e.digests["images"], e.hit, e.seconds, e.path)


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureStore:
    """Where a feature task looks for its FeatureSet: a cache root and the images' content address.

    Small and picklable: the driver resolves it and ships it to the Ray tasks.
    """

    root: Path | None
    images_digest: str

    def description(self, key, views: dict[str, int], seed: int, weights_sha256: str, device: str,
                    masks_digest: str | None = None) -> dict:
        """What a FeatureSet depends on; `key` is a `trainable.models.features.FeatureKey`. A gap key's
        description has the fields it had before `pool` existed; a lungs key's adds the lung masks
        (`masks_digest`) and the modules that pool with them."""
        key_d = asdict(key)
        modules = ("trainable.models.features", "trainable.models.fold_bn", "trainable.data.images",
                   "trainable.models.backbones", "trainable.models.weights")
        extra = {}
        if key_d.pop("pool", "gap") != "gap":
            key_d["pool"] = key.pool
            modules += ("trainable.models.lung_features", "trainable.models.lung_pool")
            extra = {"lung_masks": masks_digest}
        return {"key": key_d, "weights_sha256": weights_sha256, "device": device,
                "views": {p: (1 if p == "none" else int(n)) for p, n in sorted(views.items())},
                "seed": int(seed), "images": self.images_digest, **extra,
                "code": code_fingerprint(modules, ("torch", "timm", "numpy"))}


def cached_features(images: np.ndarray | None, key, views: dict[str, int], seed: int,
                    store: FeatureStore | None, log: Callable[[str], None] = print, batch_size: int | None = None,
                    compute: bool = True, masks: np.ndarray | None = None):
    """`trainable.models.features.compute_features`, read from / written to the feature cache
    (`compute_lung_features` for a `pool: lungs` key, which needs `masks`: the base-size lung masks).

    Random weights are never cached (their initialisation is not content-addressable). On a hit
    `images_through_backbone` is 0 and `seconds` the time to read; `extra["cache"]` says which.
    `compute=False` only looks: None on a miss (the driver's probe before it starts feature tasks).
    """
    import torch

    from trainable.models.featureset import FeatureSet
    from trainable.models.weights import resolve_weights

    def build_features():
        if key.pool == "lungs":
            from trainable.models.lung_features import compute_lung_features

            return compute_lung_features(images, masks, key, views, seed, batch_size)
        from trainable.models.features import compute_features

        return compute_features(images, key, views, seed, batch_size)

    weights_sha = None if key.weights == "random" else resolve_weights(key.backbone, key.weights).sha256
    if store is None or store.root is None or not weights_sha:
        if not compute:
            return None
        fs = build_features()
        fs.extra["cache"] = "off"
        return fs

    def build() -> tuple[dict[str, np.ndarray], dict]:
        fs = build_features()
        arrays = {"maps": fs.maps, **{f"pooled.{p}": v for p, v in fs.pooled.items()}}
        info = {"preprocessing": fs.preprocessing, "target_layer": fs.target_layer,
                "weights_info": fs.weights_info, "seconds": fs.seconds,
                "images_through_backbone": fs.images_through_backbone}
        return arrays, info

    # `feature_maps` runs on a GPU under float16 autocast when it sees one: other numbers, other entry
    device = "cuda-fp16-autocast" if torch.cuda.is_available() else "cpu-fp32"
    masks_digest = None if masks is None or key.pool == "gap" else array_digest(np.packbits(masks, axis=-1))
    description = store.description(key, views, seed, weights_sha, device, masks_digest)
    cache = DiskCache(store.root, "features", log)
    e = cache.get_or_create(description, build) if compute else cache.get(description)
    if e is None:
        return None
    info = e.info
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocessing"].items()}
    pooled = {name.removeprefix("pooled."): a for name, a in e.arrays.items() if name.startswith("pooled.")}
    return FeatureSet(key=key, maps=e.arrays["maps"], pooled=pooled, preprocessing=pre,
                      target_layer=info["target_layer"], weights_info=dict(info["weights_info"]),
                      seconds=e.seconds if e.hit else info["seconds"],
                      images_through_backbone=0 if e.hit else info["images_through_backbone"],
                      extra={"cache": "hit" if e.hit else "miss", "cache_path": str(e.path),
                             "computed_seconds": info["seconds"],
                             "computed_images": info["images_through_backbone"]})
