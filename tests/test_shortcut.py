"""The point of the product: on data where an edge marker predicts covid (0.9), the model chosen
with lung focus in the objective (w > 0) reads the marker less than the metric-only choice (w = 0)
and generalises better to a test set where markers are shuffled (independent of the class).

One seeded sweep on a real local Ray cluster reports every trial-epoch; the two selections apply
the objective (`search.objective.objective_score`) with w = 0 and w = 1 to the same history.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from search.objective import objective_score
from search.outputs.select import local_prepared, trial_config
from search.rundir import load_sweep
from trainable.data.dataset import load_dataset
from trainable.data.images import decode_images, geometry, to_model_input
from trainable.data.phantom import synthesize
from trainable.export import export_model, load_model

SPACE = """
name: shortcut
task: covid_vs_rest
data: {synthetic: {n_patients: 36, size: 128, shortcut: 0.9, seed: 1, lesion_strength: 0.4}}
folds: 3
epochs: 15
num_samples: 4
seed: 0
base_size: 128
input_size: 112
views: 1
cam_target: covid              # where does the evidence FOR covid fall?
objective: {mode: weighted, metric: balanced_accuracy, w: 0.0}
asha: {grace_period: 15, reduction_factor: 2}   # no early stop: both selections see every epoch
space:
  backbone: efficientnet_lite0
  hidden: 64
  lr: 0.003
  batch_size: 16
  crop_margin: {choice: [0.0, 0.08]}   # 0 keeps the marker band, 0.08 crops it away
"""


def _select(history: pd.DataFrame, w: float) -> tuple[str, pd.Series]:
    score = history.apply(lambda r: objective_score(r.to_dict(), mode="weighted", metric="balanced_accuracy",
                                                    w=w), axis=1)
    best = history.loc[score.idxmax()]
    return best["trial_id"], best


def _test_accuracy(model_dir: Path, test_dir: Path) -> float:
    model, meta = load_model(model_dir)
    test = load_dataset(test_dir, "covid_vs_rest")
    pre = meta["preprocessing"]
    images, _ = decode_images(test, pre["base_size"])
    x = to_model_input(geometry(images, pre["crop_margin"], pre["input_size"]), pre["in_chans"],
                       tuple(pre["mean"]), tuple(pre["std"]))
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return float(balanced_accuracy_score(test.labels, pred))


@pytest.mark.timeout(900)
def test_lung_focus_selection_beats_metric_only_selection_on_shuffled_markers(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    proc = subprocess.run([sys.executable, "-m", "search.cli", "run", "--space", str(tmp_path / "space.yaml"),
                           "--out", str(tmp_path), "--name", "sweep"], capture_output=True, text=True,
                          timeout=800, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "sweep"
    spec, trials, saved = load_sweep(results)
    assert set(trials["crop_margin"]) == {0.0, 0.08}, "the seeded sweep must try both crops"
    history = pd.read_csv(results / "history.csv", dtype={"trial_id": str})
    picks = {w: _select(history, w) for w in (0.0, 1.0)}
    (tid0, at0), (tid1, at1) = picks[0.0], picks[1.0]
    assert tid0 != tid1
    synthesize(tmp_path / "shuffled", n_patients=36, size=128, shortcut=0.5, seed=2, lesion_strength=0.4)
    rows = [trials[trials["trial_id"] == t].iloc[0] for t in (tid0, tid1)]
    prepared = local_prepared(results, spec, saved, rows, print)
    acc = {}
    for w, (tid, at), row in zip((0.0, 1.0), (picks[0.0], picks[1.0]), rows):
        out = export_model(tmp_path / f"w{w:g}", trial_config(row, spec), prepared, int(at["epoch"]), {})
        acc[w] = _test_accuracy(out, tmp_path / "shuffled")
    print(f"w=0: trial {tid0} crop {rows[0]['crop_margin']} CV ba {at0['balanced_accuracy']:.3f} "
          f"lung {at0['lung_mass']:.3f} edge {at0['edge_mass']:.3f} shuffled-test ba {acc[0.0]:.3f}")
    print(f"w=1: trial {tid1} crop {rows[1]['crop_margin']} CV ba {at1['balanced_accuracy']:.3f} "
          f"lung {at1['lung_mass']:.3f} edge {at1['edge_mass']:.3f} shuffled-test ba {acc[1.0]:.3f}")
    assert at1["edge_mass"] < at0["edge_mass"]
    assert at1["lung_mass"] > at0["lung_mass"]
    assert acc[1.0] > acc[0.0]
