"""`--storage s3://…` against a real S3-compatible server on loopback (moto's standalone server):
a sweep, a SIGTERM and `cxrtune resume`, with the endpoint named the way a user names MinIO's
(AWS_ENDPOINT_URL and keys in the environment; pyarrow, Ray's storage layer, reads them). The
report files and the Tune experiment are read back from the bucket through pyarrow's S3FileSystem."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")

from test_resume import ENV, read_trials, same_rows
from test_resume import SPACE as RESUME_SPACE

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "cxr-sweeps"
SPACE = """
name: s3tiny
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 96, shortcut: 0.9, seed: 3}}
folds: 2
epochs: 1
num_samples: 2
base_size: 96
input_size: 64
views: 1
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""


@pytest.fixture(scope="module")
def s3_env() -> dict[str, str]:
    """A moto S3 server on 127.0.0.1 with one bucket; the environment a user would export."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def bucket_fs(env: dict[str, str]):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                             secret_key="testing", region="us-east-1")


def listing(env: dict[str, str], prefix: str) -> dict[str, int]:
    """Every object under BUCKET/prefix: relative path -> size."""
    import pyarrow.fs as pafs

    base = f"{BUCKET}/{prefix}"
    infos = bucket_fs(env).get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def read_object(env: dict[str, str], key: str) -> bytes:
    with bucket_fs(env).open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


def cli(*args: str, env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow  # a real sweep through the S3 server (~70 s on 2 cores): `python -m pytest -m slow`
def test_sweep_keeps_experiment_and_report_in_the_bucket(tmp_path: Path, s3_env: dict[str, str]) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**ENV, "CXRTUNE_EPOCH_DELAY_S": "0", "CXRTUNE_CACHE_DIR": str(tmp_path / "cache"), **s3_env}
    res = cli("run", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "results"),
              "--name", "r", "--storage", f"s3://{BUCKET}/fast", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    results = tmp_path / "results" / "r"
    record = json.loads((results / "space.json").read_text())
    assert record["tune_path"] == f"s3://{BUCKET}/fast/r/tune"

    objects = listing(s3_env, "fast/r")
    # the report files next to the experiment, byte for byte; not the generated data
    for name in ("report.html", "leaderboard.md", "trials.csv", "summary.json", "best/model.pt"):
        assert objects.get(name), f"{name} missing from the bucket: {sorted(objects)[:30]}"
        assert read_object(s3_env, f"fast/r/{name}") == (results / name).read_bytes()
    assert not any(k.startswith("data/") for k in objects)
    assert b"<html" in read_object(s3_env, "fast/r/report.html").lower()
    # Tune's experiment state and each trial's checkpoint were written by Ray into the bucket
    assert any(k.startswith("tune/experiment_state") for k in objects)
    assert len({k.split("/")[1] for k in objects if k.startswith("tune/") and "/checkpoint_" in k}) == 2
    assert not (results / "tune" / "experiment_state").exists()
    # checkpoints copied back under RESULTS/tune for the local tools
    assert len(list((results / "tune").glob("*/checkpoint_*/state.pt"))) == 2


def test_unreachable_storage_is_one_line_exit_2(tmp_path: Path, s3_env: dict[str, str]) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = f"s3://{BUCKET}/x"
    env = {**ENV, **s3_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    res = cli("run", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "results"),
              "--name", "r", "--storage", storage, env=env, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --storage {storage}: not usable"), lines[-5:]


@pytest.mark.parametrize("storage, says", [
    (f"s3://no-such-bucket-{os.getpid()}/x", "bucket 'no-such-bucket"),
    ("nosuchfs://bucket/x", "not usable"),
    (f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:9&scheme=http", "not usable"),
])
def test_bad_storage_uri_is_refused(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                    storage: str, says: str) -> None:
    from search.durable import check_storage
    from search.rundir import SweepError

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SweepError) as e:
        check_storage(storage)
    assert says in str(e.value) and storage in str(e.value) and "\n" not in str(e.value)


def test_query_string_uri_keeps_its_query() -> None:
    from search.durable import experiment_path, tune_location

    uri = "s3://b/p?endpoint_override=minio:9000&scheme=http"
    assert tune_location(Path("/x/r"), uri)[0] == "s3://b/p/r?endpoint_override=minio:9000&scheme=http"
    assert experiment_path(Path("/x/r"), uri) == "s3://b/p/r/tune?endpoint_override=minio:9000&scheme=http"


@pytest.mark.slow  # a slowed sweep, SIGTERM, then resume, all through the S3 server (~90 s)
def test_sigterm_then_resume_from_the_bucket(tmp_path: Path, s3_env: dict[str, str]) -> None:
    (tmp_path / "space.yaml").write_text(RESUME_SPACE)
    env = {**ENV, "CXRTUNE_CACHE_DIR": str(tmp_path / "cache"), **s3_env}
    results, storage = tmp_path / "results" / "r", f"s3://{BUCKET}/resume"
    t0 = time.time()
    with open(tmp_path / "run.out", "w") as out, open(tmp_path / "run.err", "w") as errf:  # files: a pipe could fill
        proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--space", str(tmp_path / "space.yaml"),
                                 "--out", str(tmp_path / "results"), "--name", "r", "--storage", storage],
                                cwd=ROOT, env=env, stdout=out, stderr=errf)
    try:
        live = results / "trials.csv"
        while not (live.is_file() and len(read_trials(live)) >= 2):
            assert proc.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
            assert time.time() - t0 < 300, "two trials did not finish in 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "run.err").read_text()
    assert proc.returncode == 143, err[-3000:]
    before = read_trials(results / "trials.csv")
    assert 2 <= len(before) < 3
    # the stopped sweep's state is in the bucket only
    assert any(k.startswith("experiment_state") for k in listing(s3_env, "resume/r/tune"))
    assert not (results / "tune").exists()

    res = cli("resume", str(results), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    after = read_trials(results / "trials.csv")
    assert len(after) == 3 and after["trial_id"].is_unique and (after["epochs_run"] == 3).all()
    assert same_rows(before, after) == []
    assert read_object(s3_env, "resume/r/trials.csv") == (results / "trials.csv").read_bytes()
    assert read_object(s3_env, "resume/r/report.html") == (results / "report.html").read_bytes()
    print(f"\ns3 resume test: total {time.time() - t0:.0f}s")
