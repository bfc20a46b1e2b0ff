"""The Python API: what the `cxrtune` commands do, as functions (`from search import …`).

Example (a real sweep on the built-in phantom data; about two minutes on 2 CPU cores)::

    from search import load_space, run_sweep, select_trial, evaluate
    spec = load_space("default")                      # or a path to a space YAML
    spec = spec.model_copy(update={"num_samples": 2, "epochs": 2})
    results = run_sweep(spec, out="results", name="from-python")
    select_trial(results, within=0.05)                 # → results/selected/
    print(evaluate(results / "best", results / "data")["metrics"])

Nothing here imports Ray or torch until a function runs, so `import search` stays fast.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from search.space import SweepSpec

Log = Callable[[str], None]


def local_ray_env(address: str | None) -> None:
    """Set before `ray` is imported. A local cluster (no `address`) binds every Ray server to
    127.0.0.1, not all interfaces: Ray does this on macOS/Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    asks for it on Linux. A Ray Client connection (ray://) with a Ray token at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) sends it. A driver joining a cluster directly
    (`auto`, HOST:PORT) keeps the mode it inherits: it must match the cluster's (cluster.yaml sets
    RAY_AUTH_MODE=token on its nodes), as the driver also serves RPCs to the cluster."""
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        return
    from search.jobs import auth_headers

    if address.startswith("ray://") and "RAY_AUTH_MODE" not in os.environ and auth_headers():
        os.environ["RAY_AUTH_MODE"] = "token"


def load_space(space: str | Path) -> SweepSpec:
    """A validated space: a YAML path, or the name of a shipped one (`default`, `santos2020`, …)."""
    from search.space import load_space as _load

    return _load(space)


def run_sweep(space: str | Path | SweepSpec = "default", *, data: str | None = None, out: str | Path = "results",
              name: str | None = None, address: str | None = None, storage: str | None = None,
              data_format: str = "auto", mlflow: str | None = None, tensorboard: bool = False,
              log: Log = print) -> Path:
    """Run a sweep (what `cxrtune run` does) and return its results directory.

    `space`: a space file, the name of a shipped one, or a `SweepSpec` (e.g. `load_space(…)` with
    fields changed by `model_copy(update=…)`). `data`: a data directory, `synthetic`, or None (the
    space's own `data`)."""
    local_ray_env(address)
    from search.space import SweepSpec, resolve_space_file
    from search.sweep import run_sweep as _run

    if isinstance(space, SweepSpec):
        spec, space_file = space, None
    else:
        spec, space_file = load_space(space), resolve_space_file(space)
    return _run(spec, space_file=space_file, data=data, out=out, name=name, address=address,
                mlflow=mlflow, tensorboard=tensorboard, data_format=data_format, storage=storage, log=log)


def resume_sweep(results: str | Path, *, address: str | None = None, log: Log = print) -> Path:
    """Continue a stopped or crashed sweep in place (what `cxrtune resume` does)."""
    local_ray_env(address)
    from search.sweep import resume_sweep as _resume

    return _resume(results, address=address, log=log)


def select_trial(results: str | Path, *, within: float | None = None, metric: str | None = None,
                 log: Log = print) -> Path:
    """Export the most lung-focused trial within Δ of the best metric to RESULTS/selected/, score it
    on the held-out patients and refresh report.html (what `cxrtune select` does); returns selected/."""
    check_selection(within, metric)  # before the heavy imports and before any file is read
    from search.outputs.heldout import rescore_heldout
    from search.outputs.select import export_selection

    results = Path(results)
    selected = export_selection(results, within=within, metric=metric, log=log)
    rescore_heldout(results, log)  # selected/ changed: its held-out scores follow
    if (results / "report.html").is_file():  # the report shows the selection: keep it in step
        from search.report.html import write_report

        write_report(results, log=log)
    return selected


def check_selection(within: float | None, metric: str | None) -> None:
    """`within` is a difference of metrics in [0, 1]; `metric` one a trial reports (CxrtuneError)."""
    from trainable.errors import CxrtuneError
    from trainable.train.metrics import OBJECTIVE_METRICS

    if within is not None and not 0 <= within <= 1:
        raise CxrtuneError(f"within (--within) must be in [0, 1]: a difference of metric values, "
                           f"which lie in [0, 1] (got {within:g})")
    if metric is not None and metric not in OBJECTIVE_METRICS:
        raise CxrtuneError(f"metric (--metric) {metric!r} is not one a sweep ranks by; valid: "
                           f"{', '.join(OBJECTIVE_METRICS)}")


def evaluate(model: str | Path, data: str | Path, *, format: str = "auto", log: Log = lambda m: None) -> dict:
    """Score an exported model directory on a data set (what `cxrtune evaluate` does)."""
    from search.outputs.evaluate import evaluate as _evaluate

    return _evaluate(model, data, format=format, log=log)
