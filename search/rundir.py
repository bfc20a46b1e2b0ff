"""The results directory of a sweep: the one reader of what a run wrote there.

    RESULTS/space.json     the spec, settings, data location and hash, storage (written first)
    RESULTS/heldout.json   the held-out patients (search.outputs.heldout)
    RESULTS/folds.csv      image id → validation fold, as every trial used them (checked on reload)
    RESULTS/trials.csv     one row per trial (search.outputs.results; rewritten live as trials end)
    RESULTS/history.csv    one row per trial and epoch
    RESULTS/summary.json, selection.json, confusion.json, best/, selected/, report.html, tune/

Writers use `trainable.atomic`; readers here never see a torn file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from search.space import SweepSpec
from trainable.atomic import atomic_write_text  # noqa: F401 - part of this module's API: how the directory is written
from trainable.data.dataset import Dataset, load_dataset
from trainable.errors import CxrtuneError

FOLDS_FILE = "folds.csv"
# the layout of trials.csv / history.csv (docs/columns.md), written into summary.json: raised when a
# column is renamed or removed or changes meaning
SCHEMA_VERSION = 1
_IDS = {"trial_id": str}  # hex trial ids such as 12e45678 must not turn into numbers


class SweepError(CxrtuneError, RuntimeError):
    """The sweep cannot start or finish (existing results, every trial failed, …)."""


# what a run writes before its first trial ends (atomic writes' temporary files start with ".")
_BEFORE_FIRST_TRIAL = frozenset({"space.json", "heldout.json", "data", "tune", "optuna.db"})


def holds_sweep(path: Path) -> bool:
    """`path` is (or was meant to be) a sweep's results directory: it holds space.json or trials.csv."""
    return (Path(path) / "space.json").is_file() or (Path(path) / "trials.csv").is_file()


def stopped_before_first_trial(results: Path) -> bool:
    """Only what a run writes before its first trial ends is here (no trials.csv): a run that failed
    on its data, resources or features. Whether Tune saved a state is the caller's check."""
    entries = [p.name for p in Path(results).iterdir() if not p.name.startswith(".")]
    return "space.json" in entries and set(entries) <= _BEFORE_FIRST_TRIAL


def load_record(results: Path) -> dict:
    """space.json: what `resume`, `select` and held-out scoring need to rebuild a run."""
    space_json = Path(results) / "space.json"
    if not space_json.is_file():
        raise SweepError(f"{results} is not a cxrtune results directory (no space.json)")
    return json.loads(space_json.read_text())


def load_sweep(results: Path) -> tuple[SweepSpec, pd.DataFrame, dict]:
    """(spec, trials.csv, space.json record) of a finished sweep."""
    results = Path(results)
    if not (results / "trials.csv").is_file() or not (results / "space.json").is_file():
        raise SweepError(f"{results} is not a finished sweep (trials.csv and space.json are needed)")
    record = load_record(results)
    return SweepSpec.model_validate(record["spec"]), read_trials(results), record


def write_folds(results: Path, ids: list[str], folds: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """folds.csv: the validation fold of every search image (what `select`/montages must reuse)."""
    atomic_write_text(Path(results) / FOLDS_FILE, _folds_table(ids, folds).to_csv(index=False))


def check_folds(results: Path, ids: list[str], folds: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Refuse folds rebuilt elsewhere (another scikit-learn, changed data) that differ from folds.csv:
    a montage would explain images with heads that trained on them."""
    path = Path(results) / FOLDS_FILE
    if not path.is_file():  # sweeps written before folds.csv existed
        return
    saved = pd.read_csv(path, dtype={"id": str}).sort_values("id").reset_index(drop=True)
    rebuilt = _folds_table(ids, folds).sort_values("id").reset_index(drop=True)
    if not saved.equals(rebuilt):
        differ = set(saved.itertuples(index=False)) ^ set(rebuilt.itertuples(index=False))
        first = sorted(differ)[0]
        raise SweepError(f"{path}: the folds rebuilt from the data differ from the sweep's ({len(differ)} "
                         f"row(s), e.g. image {first[0]!r}); the data or scikit-learn changed since the run")


def _folds_table(ids: list[str], folds: list[tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    fold_of = np.full(len(ids), -1, np.int64)
    for k, (_, va) in enumerate(folds):
        fold_of[va] = k
    return pd.DataFrame({"id": [str(i) for i in ids], "fold": fold_of})


def sweep_dataset(record: dict, spec: SweepSpec) -> Dataset:
    """The data the sweep ran on, read again from where space.json says (held-out patients included)."""
    return load_dataset(record["data"], spec.task, record.get("data_format", "auto"))


def read_trials(results: Path) -> pd.DataFrame:
    return pd.read_csv(Path(results) / "trials.csv", dtype=_IDS, float_precision="round_trip")


def read_history(results: Path) -> pd.DataFrame:
    """history.csv, or an empty table with its key columns when the sweep has none."""
    path = Path(results) / "history.csv"
    return pd.read_csv(path, dtype=_IDS) if path.is_file() else pd.DataFrame(columns=["trial_id", "epoch", "objective"])


def read_json(path: Path) -> dict:
    """A JSON file of the directory, or {} when it is missing or unreadable (optional pieces)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
