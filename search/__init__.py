"""cxrtune's driver side: sweeps, selection, evaluation, reports (`search.api`).

    from search import run_sweep, load_space, resume_sweep, select_trial, evaluate

The names load on first use, so `import search` imports neither Ray nor torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "load_space", "resume_sweep", "run_sweep", "select_trial"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from search import api

        return getattr(api, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
