"""An exported model directory (model.pt + metadata.json), checked without torch.

`load_model`, `cxrtune evaluate` and `cxrtune explain` call `check_model_dir` first, so a missing,
corrupt or partial export is a one-line error before anything heavy is imported or computed.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainable.errors import ModelError

# what load_model, preprocess_image, evaluate and explain read from metadata.json
_META_KEYS = ("backbone", "classes", "num_features", "hidden", "dropout", "preprocessing")
_PREPROCESSING_KEYS = ("base_size", "crop_margin", "input_size", "in_chans", "mean", "std")


def read_metadata(model_dir: Path) -> dict:
    """metadata.json of an export, checked for the fields a loaded model needs (ModelError naming
    the file and the first missing field otherwise)."""
    meta_file = model_dir / "metadata.json"
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist")
    if not meta_file.is_file():
        raise ModelError(f"{model_dir} is not a cxrtune model directory (no metadata.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{meta_file}: not valid JSON ({e}): the export is corrupt or partial "
                         f"(export it again)") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_file}: expected a JSON object (got {type(meta).__name__})")
    missing = [k for k in _META_KEYS if k not in meta]
    pre = meta.get("preprocessing")
    if isinstance(pre, dict):
        missing += [f"preprocessing.{k}" for k in _PREPROCESSING_KEYS if k not in pre]
    for key in ("timm_arch", "timm_tag"):  # optional (older exports lack them); load_model builds timm_arch
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ModelError(f"{meta_file}: {key} must be a string or null (got {meta[key]!r})")
    pool = meta.get("pool", "gap")  # optional: exports from before `pool` existed are gap
    if pool not in ("gap", "lungs"):
        raise ModelError(f"{meta_file}: pool must be 'gap' or 'lungs' (got {pool!r})")
    if pool == "lungs" and not (isinstance(meta.get("pool_grid"), list) and len(meta["pool_grid"]) == 2):
        missing.append("pool_grid")
    if missing:
        raise ModelError(f"{meta_file}: missing field(s) {', '.join(missing)}: not a complete cxrtune "
                         f"export (export it again)")
    return meta


def check_model_dir(model_dir: str | Path) -> dict:
    """`read_metadata` plus model.pt present: the metadata of a complete export."""
    model_dir = Path(model_dir)
    meta = read_metadata(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise ModelError(f"{model_dir / 'model.pt'} is missing: {model_dir} is a partial export (export it again)")
    return meta
