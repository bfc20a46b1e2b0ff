"""cxrtune's trial side: data, backbones, Grad-CAM, training, and exported models.

    from trainable import load_model, preprocess_image, build_backbone, load_dataset

The names load on first use, so `import trainable` imports neither torch nor pandas.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "load_model": "trainable.export",
    "preprocess_image": "trainable.export",
    "build_backbone": "trainable.models.backbones",
    "load_dataset": "trainable.data.dataset",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'trainable' has no attribute {name!r}")
