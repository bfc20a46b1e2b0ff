"""Sweeps as Ray jobs: submit, watch, stop, list (`cxrtune submit|status|logs|stop|jobs`).

A job is `cxrtune run … --address auto` (or `cxrtune resume …`) run by the cluster's job server
on the head node. `submit` stages the project's code (`search/`, `trainable/`, `spaces/`) and
the space file into a temporary directory and ships it as the job's runtime_env `working_dir`,
so every node runs exactly the code that was submitted; the Python packages come from the
cluster's image (`cluster.yaml` installs them). Results go to `--out` on the head node (default
`~/cxrtune-results`) and, with `--storage s3://…`, next to the Tune experiment in the bucket.

The Jobs API lives on the Ray dashboard port (8265), which `cluster.yaml` binds to 127.0.0.1
on the head: reach it through `ray dashboard cluster.yaml` (an SSH tunnel), never an open port.
Ray token authentication: the client sends `Authorization: Bearer <token>` read from
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (`ray get-auth-token`).

    >>> sid = submit_sweep("http://127.0.0.1:8265", space="spaces/default.yaml")  # doctest: +SKIP
    >>> job_status("http://127.0.0.1:8265", sid)["status"]                          # doctest: +SKIP
    'RUNNING'
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from trainable.errors import CxrtuneError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("search", "trainable", "spaces")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_OUT = "~/cxrtune-results"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(CxrtuneError, RuntimeError):
    """The job server cannot be reached, refuses the request, or does not know the job."""


def job_address(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL, else
    the local end of `ray dashboard cluster.yaml` (http://127.0.0.1:8265)."""
    if address:
        return address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """Ray token-auth header from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (that order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None):
    """A `ray.job_submission.JobSubmissionClient` for the job server, with the auth header."""
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except Exception as e:  # noqa: BLE001 - connection refused, auth, version: one line for the user
        raise JobError(f"cannot reach the Ray job server at {url} ({_first_line(e)}); is the cluster up "
                       f"and `ray dashboard cluster.yaml` running?") from None


def stage_working_dir(space_file: Path | None, dest: Path) -> Path:
    """Copy the code and the space file (as job/space.yaml) into `dest`, the job's working_dir."""
    for name in CODE_DIRS:
        shutil.copytree(PROJECT_ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if space_file is not None:
        (dest / "job").mkdir()
        shutil.copyfile(space_file, dest / "job" / "space.yaml")
    return dest


def sweep_entrypoint(*, name: str, out: str, data: str | None = None, storage: str | None = None,
                     resume: str | None = None) -> str:
    """The job's shell command: `python -m search.cli run|resume …` on the head node."""
    if resume:
        args = ["resume", resume, "--address", "auto"]
    else:
        args = ["run", "--space", "job/space.yaml", "--address", "auto", "--out", out, "--name", name]
        if data:
            args += ["--data", data]
        if storage:
            args += ["--storage", storage]
    return "python -m search.cli " + " ".join(_shell_word(a) for a in args)


def _shell_word(arg: str) -> str:
    """Quoted for the job's shell, except that a leading ~/ still means the head node's home."""
    if arg.startswith("~/"):
        return '"$HOME"/' + shlex.quote(arg[2:])
    return shlex.quote(arg)


def submit_sweep(address: str | None = None, *, space: str | Path = "default", data: str | None = None,
                 out: str = DEFAULT_OUT, name: str | None = None, storage: str | None = None,
                 resume: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit a sweep (or `resume` a results directory on the cluster); returns the submission id.

    The space file is validated here first, so a bad one never becomes a failed job."""
    from search.space import load_space, resolve_space_file

    space_file = None if resume else resolve_space_file(space)
    spec_name = "resume" if resume else load_space(space_file).name
    run_name = name or f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    results = resume or f"{out.rstrip('/')}/{run_name}"
    # environment for the driver as `KEY=VALUE` before the command, not runtime_env env_vars: the
    # driver forwards them to its tasks itself (`search.sweep.start_ray`), and Ray refuses a job
    # and a driver runtime_env that set the same variable
    env_vars = {k: v for k, v in os.environ.items()
                if k in ("HF_HUB_OFFLINE", "CXRTUNE_ALLOW_DOWNLOAD", "CXRTUNE_EPOCH_DELAY_S")}
    env_vars.update(env or {})
    entrypoint = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env_vars.items()))
    entrypoint = (entrypoint + " " if entrypoint else "") + sweep_entrypoint(
        name=run_name, out=out, data=data, storage=storage, resume=resume)
    c = client(address)
    submission_id = f"cxrtune-{Path(results).name}-{time.strftime('%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="cxrtune-job-") as tmp:
        stage_working_dir(space_file, Path(tmp))
        try:
            return c.submit_job(
                entrypoint=entrypoint, submission_id=submission_id,
                runtime_env={"working_dir": tmp},
                metadata={"cxrtune": "resume" if resume else "run", "name": Path(results).name,
                          "results": results, "storage": storage or ""})
        except Exception as e:  # noqa: BLE001
            raise JobError(f"job server refused the submission: {_first_line(e)}") from None


def job_status(address: str | None, job: str) -> dict:
    """Status, message, times, entrypoint and results directory of one job."""
    info = _call(lambda c: c.get_job_info(job), address, job)
    meta = info.metadata or {}
    return {"submission_id": info.submission_id or job, "status": str(info.status.value),
            "message": info.message or "", "entrypoint": info.entrypoint,
            "start": _clock(info.start_time), "end": _clock(info.end_time),
            "results": meta.get("results", ""), "storage": meta.get("storage", "")}


def job_logs(address: str | None, job: str) -> str:
    return _call(lambda c: c.get_job_logs(job), address, job)


def follow_logs(address: str | None, job: str) -> Iterator[str]:
    """Chunks of the job's output as it is written, until the job ends."""
    c = client(address)
    _call(lambda _: c.get_job_status(job), address, job, c)
    agen = c.tail_job_logs(job)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop_job(address: str | None, job: str, wait_s: float = 0.0) -> str:
    """Ask the job to stop (SIGTERM: Tune saves its state, the sweep can be resumed); its status."""
    c = client(address)
    _call(lambda _: c.stop_job(job), address, job, c)
    deadline = time.time() + wait_s
    status = str(c.get_job_status(job).value)
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(c.get_job_status(job).value)
    return status


def list_jobs(address: str | None = None) -> list[dict]:
    """Every job the cluster knows, newest first, cxrtune's marked with their results directory."""
    jobs = _call(lambda c: c.list_jobs(), address, "")
    rows = [{"submission_id": j.submission_id or j.job_id, "status": str(j.status.value),
             "start": _clock(j.start_time), "end": _clock(j.end_time),
             "results": (j.metadata or {}).get("results", ""), "_t": j.start_time or 0} for j in jobs]
    return [{k: v for k, v in r.items() if k != "_t"} for r in sorted(rows, key=lambda r: -r["_t"])]


def wait_for(address: str | None, job: str, timeout_s: float, poll_s: float = 1.0,
             on_poll: Callable[[str], None] | None = None) -> str:
    """Block until the job reaches a terminal status (or the timeout); the last status seen."""
    c = client(address)
    deadline = time.time() + timeout_s
    while True:
        status = str(c.get_job_status(job).value)
        if on_poll:
            on_poll(status)
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(poll_s)


def _call(fn, address: str | None, job: str, c=None):
    c = c or client(address)
    try:
        return fn(c)
    except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError for unknown jobs
        text = _first_line(e)
        if job and ("does not exist" in text or "not found" in text.lower()):
            raise JobError(f"no job {job!r} on {job_address(address)} (`cxrtune jobs` lists them)") from None
        raise JobError(f"job server at {job_address(address)}: {text}") from None


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
