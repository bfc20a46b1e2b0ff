"""Resume: SIGTERM the driver after >= 2 trials finished, `cxrtune resume`, and every trial appears
exactly once in trials.csv with the finished trials' rows unchanged; nothing is left torn. The
Tune experiment lives in `--storage` (another directory, as a shared mount would be) and the report
files are copied next to it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
name: resumetiny
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 96, shortcut: 0.9, seed: 3}}
folds: 2
holdout: 0.25
epochs: 3
num_samples: 3
base_size: 96
input_size: 64
views: 1
asha: {grace_period: 3, reduction_factor: 2}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""
# every epoch sleeps this long, so trial 3 is still running when the first two have finished
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTUNE_EPOCH_DELAY_S": "1",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def read_trials(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"trial_id": str}, float_precision="round_trip")


def same_rows(before: pd.DataFrame, after: pd.DataFrame) -> list[str]:
    """Columns (of those both tables have) where a trial's row differs; floats to 1e-12."""
    a = after.set_index("trial_id").loc[before["trial_id"]]
    b = before.set_index("trial_id")
    diffs = []
    for col in (c for c in b.columns if c in a.columns):
        x, y = b[col], a[col]
        if x.dtype.kind == "f" and y.dtype.kind == "f":
            ok = np.allclose(x.to_numpy(), y.to_numpy(), rtol=1e-12, atol=0, equal_nan=True)
        else:
            ok = (x.astype(str).to_numpy() == y.astype(str).to_numpy()).all()
        if not ok:
            diffs.append(col)
    return diffs


@pytest.mark.slow  # a slowed sweep, SIGTERM, then resume (~80 s): `python -m pytest -m slow`
def test_sigterm_then_resume_finishes_every_trial_once(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**ENV, "CXRTUNE_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache of our own
    results, store = tmp_path / "results" / "r", tmp_path / "store"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--space", str(tmp_path / "space.yaml"),
                             "--out", str(tmp_path / "results"), "--name", "r", "--storage", str(store)],
                            cwd=ROOT, env=env, stdout=open(tmp_path / "run.out", "w"),
                            stderr=open(tmp_path / "run.err", "w"))  # files: a full pipe would block the sweep
    try:
        live = results / "trials.csv"
        while not (live.is_file() and len(read_trials(live)) >= 2):
            assert proc.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
            assert time.time() - t0 < 300, "two trials did not finish in 300 s"
            time.sleep(0.2)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    t_stopped = time.time()
    err = (tmp_path / "run.err").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert f"cxrtune resume {results}" in " ".join(err.split())

    # nothing torn: every file a killed run leaves parses, every checkpoint loads
    before = read_trials(results / "trials.csv")
    assert 2 <= len(before) < 3 and (before["status"] == "TERMINATED").all()
    assert json.loads((results / "space.json").read_text())["tune_path"] == str(store / "r" / "tune")
    assert not (results / "tune").exists()  # the experiment is in --storage only
    checkpoints = list((store / "r" / "tune").glob("*/checkpoint_*/state.pt"))
    assert checkpoints and all(torch.load(c, weights_only=False)["epoch"] >= 1 for c in checkpoints)
    assert not list(results.glob(".trials.csv-*")), "a temp file was left behind"
    heldout_before = (results / "heldout.json").read_bytes()

    t_resume = time.time()
    res = subprocess.run([sys.executable, "-m", "search.cli", "resume", str(results)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    t_done = time.time()
    assert res.returncode == 0, res.stderr[-3000:]

    after = read_trials(results / "trials.csv")
    assert len(after) == 3 and after["trial_id"].is_unique
    assert (after["status"] == "TERMINATED").all() and (after["epochs_run"] == 3).all()
    assert set(before["trial_id"]) < set(after["trial_id"])
    assert same_rows(before, after) == []
    history = pd.read_csv(results / "history.csv", dtype={"trial_id": str})
    assert not history.duplicated(["trial_id", "epoch"]).any() and len(history) == 9
    assert json.loads((results / "summary.json").read_text())["trials"] == 3
    assert (results / "best" / "model.pt").is_file()
    # the resumed sweep kept the held-out split it started with, and scored best/ on it
    assert (results / "heldout.json").read_bytes() == heldout_before
    held = json.loads(heldout_before)["patient_ids"]
    tested = json.loads((results / "test_metrics.json").read_text())
    assert held and tested["heldout"]["patient_ids"] == held and "best" in tested
    # the report files were copied next to the experiment in --storage (not the generated data)
    assert (store / "r" / "trials.csv").read_bytes() == (results / "trials.csv").read_bytes()
    assert (store / "r" / "best" / "model.pt").is_file() and not (store / "r" / "data").exists()
    # and each trial's last checkpoint was copied back under RESULTS/tune for the local tools
    assert len(list((results / "tune").glob("*/checkpoint_*/state.pt"))) == 3
    print(f"\nresume test: SIGTERM after {t_term - t0:.0f}s, driver exited {t_stopped - t_term:.1f}s later, "
          f"resume ran {t_done - t_resume:.0f}s; total {t_done - t0:.0f}s")
