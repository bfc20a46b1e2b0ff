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
* **Resume.** `search.sweep.resume_sweep` rebuilds the trainable exactly as the run did and
  restores the Tuner from `experiment_path`.
"""
from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

from search.rundir import SweepError

REPORT_SKIP = {"data", "tune"}  # not copied to --storage with the report files
# where an S3-compatible endpoint (MinIO, Ceph, moto…) is named: handed to the Ray workers with the
# job (runtime_env), as they must reach the same storage; credentials stay with each node's setup
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


class SweepInterrupted(SweepError):
    """The driver was asked to stop (SIGTERM); the experiment state was saved for `cxrtune resume`."""

    def __init__(self, results: Path) -> None:
        self.results = results
        super().__init__(f"sweep stopped; its state is saved. Continue it with: cxrtune resume {results}")


# ------------------------------------------------------------------------------------ storage

def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in str(path)


def _join(uri: str, name: str) -> str:
    """`uri`/`name`, keeping a query (`s3://bucket/prefix?endpoint_override=…`) at the end."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def check_storage(storage: str | None) -> None:
    """Before any work: a `--storage` URI must name a filesystem pyarrow (Ray's storage layer)
    knows, be reachable with the credentials and endpoint in the environment (AWS_ENDPOINT_URL…),
    and, for a bucket, the bucket must exist. One line (SweepError) otherwise."""
    if not is_uri(storage):
        return
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(storage)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket if isinstance(fs, pafs.S3FileSystem) else path)
    except (OSError, pa.ArrowException, ValueError) as e:
        reason = " ".join(str(e).split())  # pyarrow's messages span lines
        raise SweepError(f"--storage {storage}: not usable ({reason[:300]})") from None
    if isinstance(fs, pafs.S3FileSystem) and info.type == pafs.FileType.NotFound:
        raise SweepError(f"--storage {storage}: bucket {bucket!r} does not exist at "
                         f"{_endpoint()}; create it first")


def _endpoint() -> str:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"{os.environ[var]} ({var})"
    return "the default AWS endpoint"


def tune_location(results: Path, storage: str | None) -> tuple[str, str]:
    """(storage_path, name) for Tune's RunConfig: `RESULTS/tune`, or `STORAGE/<sweep name>/tune`.

    Local paths are made absolute (Tune rejects relative ones); URIs pass through."""
    if not storage:
        return str(results), "tune"
    if is_uri(storage):
        return _join(storage, results.name), "tune"
    return str(Path(storage).expanduser().resolve() / results.name), "tune"


def experiment_path(results: Path, storage: str | None) -> str:
    root, name = tune_location(results, storage)
    return _join(root, name) if is_uri(root) else f"{root}/{name}"


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

    def on_sigterm(signum, frame):
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
