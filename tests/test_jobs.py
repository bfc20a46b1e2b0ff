"""Job submission service end to end: a real Ray head on this machine (bound to 127.0.0.1, with the
dashboard's job server and token auth), `cxrtune submit` of a tiny sweep, SUCCEEDED, the results
it wrote; `status`, `logs`, `jobs`, `stop`."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_SPACE = """
name: jobtiny
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 96, shortcut: 0.9, seed: 3}}
folds: 2
epochs: 2
num_samples: 2
base_size: 96
input_size: 64
views: 1
asha: {grace_period: 2, reduction_factor: 2}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on (`ss -ltnpH`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        users = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if users & pids:
            found.append(line.split()[3])
    return found


def cxrtune(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on 127.0.0.1 with the dashboard (job server); always torn down."""
    if importlib.util.find_spec("aiohttp") is None:
        pytest.fail("the Ray job server needs ray[default] (aiohttp, …): install the project with "
                    "`pip install -e '.[test]'` once pyproject lists ray[default]")
    tmp = Path(tempfile.mkdtemp(prefix="cxrj-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dash = free_port(), free_port()
    token = secrets.token_hex(16)  # this cluster's own token: the test does not depend on ~/.ray
    saved_token = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = token  # for the job client calls made in this process
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "CXRTUNE_CACHE_DIR": str(tmp / "cache"),
           # Linux: bind every Ray server to the node IP given (127.0.0.1), not to all interfaces
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats", f"--temp-dir={tmp}"]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        from search.jobs import client

        deadline = time.time() + 90
        while True:
            try:
                client(url)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {(tmp / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield {"url": url, "env": env, "pid": proc.pid, "tmp": tmp}
    finally:
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # `--block` stops every process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:  # job drivers run in sessions of their own: make sure nothing is left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if saved_token is None:
            os.environ.pop("RAY_AUTH_TOKEN", None)
        else:
            os.environ["RAY_AUTH_TOKEN"] = saved_token


def test_head_is_private(head: dict) -> None:
    addresses = listening_addresses(descendants(head["pid"]))
    assert addresses, "no listening sockets found for the head's processes"
    public = [a for a in addresses if not re.match(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$", a)]
    assert not public, f"Ray servers listening beyond loopback: {public}"


def test_job_server_refuses_a_wrong_token(head: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.jobs import JobError, client

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(JobError, match="cannot reach the Ray job server"):
        client(head["url"])


@pytest.mark.slow  # a sweep as a Ray job (~50 s): `python -m pytest -m slow`
def test_submit_tiny_sweep_succeeds_and_writes_results(head: dict, tmp_path: Path) -> None:
    from search import jobs

    t0 = time.time()
    space = tmp_path / "jobtiny.yaml"
    space.write_text(TINY_SPACE)
    out = tmp_path / "results"
    # --follow streams the job's output and waits for it to end: exit 0 only when it SUCCEEDED
    proc = cxrtune("submit", "--address", head["url"], "--space", str(space), "--out", str(out),
                   "--name", "j1", "--follow", env=head["env"], timeout=400)
    sid = proc.stdout.strip().splitlines()[0]
    assert sid.startswith("cxrtune-j1"), proc.stdout[:500]
    logs = jobs.job_logs(head["url"], sid)
    assert proc.returncode == 0, (proc.stderr[-2000:], logs[-4000:])
    assert proc.stderr.strip().splitlines()[-1] == f"job {sid}: SUCCEEDED"
    assert jobs.job_status(head["url"], sid)["status"] == "SUCCEEDED"
    assert "trials (" in proc.stdout  # the sweep's closing line, streamed
    print(f"\njob {sid} SUCCEEDED in {time.time() - t0:.0f}s")

    results = out / "j1"
    trials = pd.read_csv(results / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    assert json.loads((results / "summary.json").read_text())["trials"] == 2
    assert (results / "best" / "model.pt").is_file() and (results / "leaderboard.md").is_file()
    assert "trials (" in logs  # the sweep's closing line reached the job's log

    st = cxrtune("status", sid, "--json", "--address", head["url"], env=head["env"])
    info = json.loads(st.stdout)
    assert info["status"] == "SUCCEEDED" and info["results"] == str(results)
    listed = json.loads(cxrtune("jobs", "--json", "--address", head["url"], env=head["env"]).stdout)
    assert any(j["submission_id"] == sid and j["status"] == "SUCCEEDED" for j in listed)
    assert "trials (" in cxrtune("logs", sid, "--address", head["url"], env=head["env"]).stdout


def test_stop_a_running_job(head: dict, tmp_path: Path) -> None:
    from search import jobs

    space = tmp_path / "slow.yaml"
    space.write_text(TINY_SPACE.replace("epochs: 2", "epochs: 20").replace("grace_period: 2", "grace_period: 20"))
    sid = jobs.submit_sweep(head["url"], space=space, out=str(tmp_path / "results"), name="j2",
                            env={"CXRTUNE_EPOCH_DELAY_S": "5"})
    deadline = time.time() + 60
    while jobs.job_status(head["url"], sid)["status"] == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.job_status(head["url"], sid)["status"] == "RUNNING"
    proc = cxrtune("stop", sid, "--wait", "60", "--address", head["url"], env=head["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "STOPPED"
    assert "cxrtune submit --resume" in proc.stderr


def test_unknown_job_is_one_line_and_exit_2(head: dict) -> None:
    proc = cxrtune("status", "no-such-job", "--address", head["url"], env=head["env"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-job" in lines[0] and "Traceback" not in proc.stderr


def test_entrypoint_and_auth_header(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from search.jobs import auth_headers, job_address, sweep_entrypoint

    cmd = sweep_entrypoint(name="n 1", out="~/cxrtune-results", data="synthetic", storage="s3://b/p")
    assert cmd == ("python -m search.cli run --space job/space.yaml --address auto --out \"$HOME\"/cxrtune-results "
                   "--name 'n 1' --data synthetic --storage s3://b/p")
    assert sweep_entrypoint(name="x", out="o", resume="/r/x") == "python -m search.cli resume /r/x --address auto"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert auth_headers() == {"Authorization": "Bearer secret"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("fromfile\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_headers() == {"Authorization": "Bearer fromfile"}
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the job server
    assert job_address(None) == "http://127.0.0.1:8265"
