"""Experiment trackers, off by default: MLflow (`--mlflow URI`) and TensorBoard (`--tensorboard`).

Both go through Ray Tune's own logger callbacks, so every trial becomes an MLflow run (params = the
trial's config, metrics = what it reports each epoch, step = epoch) or a TensorBoard event file in
its trial directory (`RESULTS/tune/<trial>/events.out.tfevents.*`; `tensorboard --logdir
RESULTS/tune`). Ray adds a TensorBoard logger on its own whenever tensorboardX is installed; the
callbacks here are the full, explicit list instead, so nothing is logged that was not asked for.

    >>> cbs = tracker_callbacks(mlflow_uri=None, tensorboard=True)
    >>> [type(c).__name__ for c in cbs]
    ['CSVLoggerCallback', 'JsonLoggerCallback', 'TBXLoggerCallback']

`--mlflow` needs the MLflow client: `pip install 'cxrtune[track]'` (mlflow-skinny). A URI that is a
plain directory or `file://` uses MLflow's file store (no server, open it with `mlflow ui
--backend-store-uri URI`); `http(s)://` is a tracking server.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ray.air.integrations.mlflow import MLflowLoggerCallback  # imports mlflow only when instantiated
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from trainable.errors import CxrtuneError


class TrackerError(CxrtuneError):
    """A tracker was asked for and cannot be used (the CLI prints this on one line, exit 2)."""


def mlflow_tracking_uri(uri: str) -> str:
    """A plain path becomes an absolute `file://` URI (trials log from the driver, so local is fine)."""
    if not uri or not uri.strip():
        raise TrackerError("--mlflow needs a tracking URI: a directory, file:///path or http(s)://host:port")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme else uri).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise TrackerError(f"--mlflow {uri}: {path} is a file; an MLflow file store is a directory")
        return path.as_uri()
    return uri


class MLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow logger, allowed to use MLflow's file store when the URI is a local directory.

    MLflow 3 keeps the file store but refuses it unless MLFLOW_ALLOW_FILE_STORE is set; a local
    directory is what `--mlflow DIR` asks for. Set in `setup`, so a Tuner restored from its pickled
    callbacks (`cxrtune resume`) gets it too.
    """

    def setup(self, *args, **kwargs):
        if str(self.tracking_uri).startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return super().setup(*args, **kwargs)

    def log_trial_end(self, trial, failed: bool = False):
        # a trial whose actor died before it started has no MLflow run; Ray's callback would
        # raise KeyError and take the whole sweep down with it
        if trial not in self._trial_runs:
            return
        return super().log_trial_end(trial, failed=failed)


def mlflow_callback(uri: str, experiment: str, tags: dict[str, str] | None = None) -> Callback:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackerError("--mlflow needs the MLflow client, which is not installed: "
                           "pip install 'cxrtune[track]' (mlflow-skinny)") from None
    return MLflowCallback(tracking_uri=mlflow_tracking_uri(uri), experiment_name=experiment, tags=tags or {},
                          save_artifact=False)


def tracker_callbacks(mlflow_uri: str | None = None, tensorboard: bool = False, *,
                      experiment: str = "cxrtune", tags: dict[str, str] | None = None) -> list[Callback]:
    """Ray Tune logger callbacks for a sweep: CSV + JSON always (results are read from them), then
    TensorBoard and MLflow when asked for."""
    # the default loggers would add TensorBoard files unasked; this list replaces them
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    callbacks: list[Callback] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if tensorboard:
        callbacks.append(TBXLoggerCallback())
    if mlflow_uri is not None:
        callbacks.append(mlflow_callback(mlflow_uri, experiment, tags))
    return callbacks
