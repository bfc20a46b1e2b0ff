"""Fault tolerance: SIGKILL a running trial's worker process; FailureConfig(max_failures) from the
space restarts it from its last checkpoint (its epochs continue, never start over) and the sweep
completes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4

SPACE = f"""
name: fttiny
task: covid_vs_rest
data: {{synthetic: {{n_patients: 12, size: 96, shortcut: 0.9, seed: 3}}}}
folds: 2
epochs: {EPOCHS}
num_samples: 2
base_size: 96
input_size: 64
views: 1
max_failures: 2
asha: {{grace_period: {EPOCHS}, reduction_factor: 2}}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {{choice: [16, 32]}}
  lr: {{loguniform: [1.0e-3, 1.0e-2]}}
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTUNE_EPOCH_DELAY_S": "1.5",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def results_of(trial_dir: Path) -> list[dict]:
    """The trial's reported results so far (result.json, one JSON object a line)."""
    rows = []
    try:
        for line in (trial_dir / "result.json").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
    except FileNotFoundError:
        pass
    return rows


@pytest.mark.slow  # kills a Ray worker mid-trial and waits for the restart (~50 s): `python -m pytest -m slow`
def test_killed_trial_worker_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**ENV, "CXRTUNE_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache of our own
    results = tmp_path / "results" / "ft"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--space", str(tmp_path / "space.yaml"),
                             "--out", str(tmp_path / "results"), "--name", "ft"],
                            cwd=ROOT, env=env, stdout=open(tmp_path / "run.out", "w"),
                            stderr=open(tmp_path / "run.err", "w"))  # files: a full pipe would block the sweep
    victim = None
    try:
        while victim is None:
            assert proc.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
            assert time.time() - t0 < 300, "no trial reported an epoch in 300 s"
            for trial_dir in sorted((results / "tune").glob("run_trial_*")):
                rows = results_of(trial_dir)
                if rows and rows[-1]["epoch"] < EPOCHS - 1:  # mid-trial, at least 2 epochs to go
                    victim = (trial_dir, rows[-1]["trial_id"], rows[-1]["pid"], rows[-1]["epoch"])
                    os.kill(rows[-1]["pid"], signal.SIGKILL)  # the trial's worker process, not the driver
                    break
            time.sleep(0.1)
        t_kill = time.time()
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    t_done = time.time()
    assert proc.returncode == 0, (tmp_path / "run.err").read_text()[-3000:]
    trial_dir, trial_id, pid, epoch_at_kill = victim

    rows = results_of(trial_dir)
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(1, EPOCHS + 1)), f"epochs restarted or repeated: {epochs}"
    after = [r for r in rows if r["pid"] != pid]
    assert after, "the killed worker was never replaced"
    # the new worker started from the checkpoint the old one left, not from epoch 0
    assert after[0]["restored_from_epoch"] >= epoch_at_kill >= 1
    assert after[0]["epoch"] == after[0]["restored_from_epoch"] + 1

    trials = pd.read_csv(results / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all() and (trials["epochs_run"] == EPOCHS).all()
    history = pd.read_csv(results / "history.csv", dtype={"trial_id": str})
    assert history[history["trial_id"] == trial_id]["epoch"].tolist() == list(range(1, EPOCHS + 1))
    print(f"\nfault-tolerance test: killed trial {trial_id} (pid {pid}) after epoch {epoch_at_kill} "
          f"at {t_kill - t0:.0f}s; it resumed from epoch {after[0]['restored_from_epoch']}; "
          f"sweep done at {t_done - t0:.0f}s")
