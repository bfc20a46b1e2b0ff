"""Durable sweeps: where a sweep's state lives, what a stopped driver leaves behind, how to go on.

* **Storage.** Tune's experiment (trial results, checkpoints, searcher and scheduler state) goes
  to `--storage` (a shared directory or a cloud URI such as `s3://bucket/prefix`) under the
  sweep's name, or to `RESULTS/tune` by default. On a multi-node cluster it must be storage
  every node reaches: Ray persists each checkpoint from the node that made it.
* **A stopped driver.** SIGTERM (what `ray job stop` / `cxrtune stop` send) ends the Tune loop
  the way Ctrl+C does: Tune snapshots the experiment one last time, the command exits with code
  143 and `cxrtune resume RESULTS` picks it up. While the sweep runs, `trials.csv` lists every
  trial that has ended so far; it is rewritten atomically (temp file + rename), so a killed
  driver leaves the previous complete version, never a torn one.
* **Resume.** `resume_sweep` rebuilds the trainable exactly as the run did (spec from
  `space.json`, the same data, checked by content hash, `prepare`), restores the Tuner with
  unfinished and errored trials resumed from their last checkpoints, and writes the results as
  a finished run does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pandas as pd
from ray import tune

from search.outputs.results import SweepError, atomic_write_text, trial_rows

REPORT_SKIP = {"data", "tune"}  # not copied to --storage with the report files


class SweepInterrupted(SweepError):
    """The driver was asked to stop (SIGTERM); the experiment state was saved for `cxrtune resume`."""

    def __init__(self, results: Path) -> None:
        self.results = results
        super().__init__(f"sweep stopped; its state is saved. Continue it with: cxrtune resume {results}")


# ------------------------------------------------------------------------------------ storage

def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in str(path)


def tune_location(results: Path, storage: str | None) -> tuple[str, str]:
    """(storage_path, name) for Tune's RunConfig: `RESULTS/tune`, or `STORAGE/<sweep name>/tune`.

    Local paths are made absolute (Tune rejects relative ones); URIs pass through."""
    if not storage:
        return str(results), "tune"
    if is_uri(storage):
        return f"{storage.rstrip('/')}/{results.name}", "tune"
    return str(Path(storage).expanduser().resolve() / results.name), "tune"


def experiment_path(results: Path, storage: str | None) -> str:
    root, name = tune_location(results, storage)
    return f"{root}/{name}"


def publish_results(results: Path, storage: str | None, log: Callable[[str], None] = print) -> str | None:
    """Copy the report files (trials.csv, leaderboard, best/, summary, report.html, …) next to
    the Tune experiment in `storage`, so they outlive the head node. No-op without `--storage`."""
    if not storage:
        return None
    import pyarrow.fs as pafs

    root = tune_location(results, storage)[0]
    if not is_uri(root) and Path(root).resolve() == Path(results).resolve():
        return None  # --storage is the results' parent: the files are there already
    fs, base = pafs.FileSystem.from_uri(root if is_uri(root) else Path(root).as_uri())
    for entry in sorted(results.iterdir()):
        if entry.name in REPORT_SKIP or entry.name.startswith("."):
            continue
        dest = f"{base}/{entry.name}"
        if entry.is_dir():
            fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(entry), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    log(f"report files copied to {root}")
    return root


def mirror_checkpoints(result_grid, results: Path, storage: str | None) -> int:
    """With `--storage`, copy each trial's last checkpoint (the fold heads: small) from storage to
    RESULTS/tune/<trial dir>/checkpoint_N, where the local tools (Grad-CAM montages, select,
    explain) read them. Each copy lands under a temporary name and is renamed into place."""
    if not storage:
        return 0
    copied = 0
    for result in result_grid:
        ckpt = result.checkpoint
        if ckpt is None or not result.path:
            continue
        dest = results / "tune" / Path(result.path).name / Path(ckpt.path).name
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}-partial")
            shutil.rmtree(tmp, ignore_errors=True)
            ckpt.to_directory(str(tmp))
            os.replace(tmp, dest)
        copied += 1
    return copied


# ------------------------------------------------------------------------- graceful stop (SIGTERM)

@contextmanager
def graceful_stop() -> Iterator[SimpleNamespace]:
    """Within the block, SIGTERM asks Tune to stop as Ctrl+C does (`state.requested` is set).

    Tune installs its stop handler (for SIGINT and SIGUSR1) when `fit()` starts; SIGTERM is
    forwarded to it. Before that, or on a second SIGTERM, it raises KeyboardInterrupt."""
    state = SimpleNamespace(requested=False)

    def on_sigterm(signum, frame):  # noqa: ANN001 - signal handler signature
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if state.requested or not callable(tune_handler):
            state.requested = True
            raise KeyboardInterrupt
        state.requested = True
        tune_handler(signum, frame)

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield state
        return
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------ live trials.csv

class LiveTrials(tune.Callback):
    """Rewrites `RESULTS/trials.csv` (atomically) each time a trial ends, so a stopped or killed
    sweep still shows what finished; the final table (`search.outputs.results.write_results`) replaces it.

    Rows come from the same `trial_rows` as the final table. The history of running trials is
    part of Tune's experiment snapshot (`get_state`), so a resumed trial's row covers all its
    epochs; rows already in the file are kept."""

    def __init__(self, results: Path, epochs: int) -> None:
        self.results, self.epochs = Path(results), epochs
        self.history: dict[str, list[dict]] = {}

    def get_state(self) -> dict | None:
        return {"history": self.history} if self.history else None

    def set_state(self, state: dict) -> None:
        self.history = dict(state.get("history", {}))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keep = {k: v for k, v in result.items() if k != "config" and not k.startswith("fold_")}
        rows = [r for r in self.history.get(trial.trial_id, [])
                if r.get("training_iteration") != keep.get("training_iteration")]
        self.history[trial.trial_id] = rows + [keep]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, error=f"trial failed (see {trial.path})")

    def _ended(self, trial, error: str | None) -> None:
        rows = self.history.pop(trial.trial_id, [])
        ended = SimpleNamespace(metrics={"trial_id": trial.trial_id}, config=dict(trial.config),
                                path=trial.path, error=error,
                                metrics_dataframe=pd.DataFrame(rows) if rows else None)
        try:
            self._merge(trial_rows([ended], self.epochs))
        except Exception as e:  # noqa: BLE001 - the live table is a convenience, never a reason to fail
            print(f"warning: live trials.csv not updated ({type(e).__name__}: {e})")

    def _merge(self, df: pd.DataFrame) -> None:
        path = self.results / "trials.csv"
        if path.is_file():
            before = pd.read_csv(path, dtype={"trial_id": str}, float_precision="round_trip")
            df = pd.concat([before[~before["trial_id"].isin(df["trial_id"])], df], ignore_index=True)
        if "best_objective" in df:
            df = df.sort_values("best_objective", ascending=False, na_position="last")
        atomic_write_text(path, df.reset_index(drop=True).to_csv(index=False))


# ---------------------------------------------------------------------------------- resume

def load_record(results: Path) -> dict:
    space_json = results / "space.json"
    if not space_json.is_file():
        raise SweepError(f"{results} is not a cxrtune results directory (no space.json)")
    return json.loads(space_json.read_text())


def resume_sweep(results: str | Path, *, address: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Continue a stopped or crashed sweep in place: unfinished and errored trials resume from
    their last checkpoints, finished ones are kept as they are, then the results are written."""
    from search.outputs.heldout import check_split, search_split
    from search.space import SweepSpec
    from search.sweep import finish_sweep, make_trainable, prepare, start_ray
    from trainable.data.dataset import load_dataset

    t_start = time.time()
    results = Path(results).expanduser().resolve()
    record = load_record(results)
    spec = SweepSpec.model_validate(record["spec"])
    storage = record.get("storage")
    path = record.get("tune_path") or experiment_path(results, storage)
    if not tune.Tuner.can_restore(path):
        raise SweepError(f"nothing to resume at {path}: the sweep stopped before Tune saved its state; "
                         f"start it again with `cxrtune run`")
    dataset = load_dataset(record["data"], spec.task, record.get("data_format", "auto"))
    if record.get("data_hash") and dataset.content_hash() != record["data_hash"]:
        raise SweepError(f"data at {record['data']} changed since the sweep started "
                         f"(content hash {dataset.content_hash()} != {record['data_hash']}); not resuming")
    split = search_split(spec, dataset, log)  # the same held-out patients as the run (checked)
    check_split(results, split)
    dataset = split.search
    start_ray(address, log)
    prepared = prepare(spec, dataset, log)
    log(f"resuming {path} (unfinished and errored trials continue from their last checkpoints)")
    tuner = tune.Tuner.restore(path, trainable=make_trainable(spec, prepared),
                               resume_unfinished=True, resume_errored=True)
    return finish_sweep(results, spec, Path(record.get("space_file", "")), dataset, prepared, tuner,
                        t_start=t_start, storage=storage, log=log, split=split)
