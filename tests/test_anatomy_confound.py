"""A shortcut inside the chest: the anatomy-confound phantom, and worst-group selection beating the
metric-best model on a test set where the body trait is independent of the class.

`cxrtune data synth --confound anatomy` gives each patient an adult-like or child-like body that
follows the class (covid → adult, the rest → child) except in minority cells; the lesions stay the
true signal. Lung-vs-edge Grad-CAM mass cannot see this shortcut; the group metrics can.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import cxrtune
from trainable.data.phantom import synthesize


def _cells(manifest: Path) -> pd.DataFrame:
    t = pd.read_csv(manifest).drop_duplicates("patient_id")
    return pd.crosstab(t["label"] == "covid", t["body"])


def test_confounded_phantom_has_minority_cells_and_is_deterministic(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", n_patients=40, size=64, seed=5, confound="anatomy", confound_rate=0.75)
    b = synthesize(tmp_path / "b", n_patients=40, size=64, seed=5, confound="anatomy", confound_rate=0.75)
    assert a.read_bytes() == b.read_bytes()
    table = pd.read_csv(a)
    assert set(table["body"]) == {"adult", "child"}
    first = table["path"].iloc[0]
    assert (a.parent / first).read_bytes() == (b.parent / first).read_bytes()
    cells = _cells(a)   # patients: rows covid?, columns body
    n_covid, n_rest = int(cells.loc[True].sum()), int(cells.loc[False].sum())
    assert cells.loc[True, "adult"] == round(0.75 * n_covid) and cells.loc[True, "child"] > 0
    assert cells.loc[False, "child"] == round(0.75 * n_rest) and cells.loc[False, "adult"] > 0
    # the test set: the body is independent of the class
    cells = _cells(synthesize(tmp_path / "c", n_patients=40, size=64, seed=6, confound="anatomy",
                              confound_rate=0.5))
    assert abs(cells.loc[True, "adult"] - cells.loc[True, "child"]) <= 1
    assert abs(cells.loc[False, "adult"] - cells.loc[False, "child"]) <= 1
    # the trait is visible: a child's trunk is slimmer (fewer body pixels across the mid-chest row)
    width = {body: [] for body in ("adult", "child")}
    for row in table.itertuples():
        image = np.array(Image.open(a.parent / row.path))
        width[row.body].append((image[image.shape[0] // 2] > 40).sum())
    assert np.mean(width["child"]) < 0.92 * np.mean(width["adult"])
    # without a confound the manifest keeps its columns (no body column)
    assert "body" not in pd.read_csv(synthesize(tmp_path / "d", n_patients=6, size=64)).columns


def test_bad_confound_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"confound='bodies': must be one of"):
        synthesize(tmp_path / "x", n_patients=6, size=64, confound="bodies")
    proc = cxrtune("data", "synth", "--out", str(tmp_path / "y"), "--n-patients", "6", "--size", "64",
                   "--confound", "anatomy", "--confound-rate", "0.3")
    assert proc.returncode == 2, proc.stderr
    assert "confound_rate=0.3: must be a number in [0.5, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "y" / "manifest.csv").exists()


SPACE = """
name: anatomy
task: covid_vs_rest
data: {synthetic: {n_patients: 60, size: 96, seed: 1, lesion_strength: 0.6, confound: anatomy, confound_rate: 0.9}}
folds: 2
epochs: 8
num_samples: 6
seed: 0
base_size: 96
input_size: 64
views: 1
group_column: body              # worst-group accuracy over (body × class) cells
min_cell: 3
objective: {mode: weighted, metric: balanced_accuracy, w: 0.0}   # best/ = the metric-best trial
asha: {grace_period: 8}         # no early stop: every trial is compared on the same epochs
space:
  backbone: efficientnet_lite0
  batch_size: 16
  hidden: {choice: [16, 128]}
  lr: {choice: [0.001, 0.01]}
  crop_margin: {choice: [0.0, 0.2]}   # 0.2 cuts the chest wall (the body trait) away, keeps the lungs
"""


def _evaluate(tmp_path: Path, model: Path, test: Path, name: str) -> tuple[float, float]:
    """`cxrtune evaluate` on the test set: balanced accuracy, and worst (body × class) recall."""
    out = tmp_path / f"{name}.json"
    proc = cxrtune("evaluate", "--model", str(model), "--data", str(test), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    images = pd.DataFrame(result["per_image"]).merge(pd.read_csv(test / "manifest.csv")[["id", "body"]], on="id")
    recall = (images["label"] == images["predicted"]).groupby([images["body"], images["label"]]).mean()
    return float(result["metrics"]["balanced_accuracy"]), float(recall.min())


@pytest.mark.slow  # a 60-patient sweep plus two refits (~90 s): `python -m pytest -m slow`
@pytest.mark.timeout(600)
def test_worst_group_selection_beats_metric_best_on_a_trait_independent_test_set(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    proc = cxrtune("run", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path), "--name", "sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "sweep"
    trials = pd.read_csv(results / "trials.csv", dtype={"trial_id": str})
    assert set(trials["crop_margin"]) == {0.0, 0.2}, "the seeded sweep must try both crops"
    for column in ("best_worst_group_accuracy", "best_within_group_auc", "best_recall_adult_rest",
                   "best_recall_child_covid", "best_recall_adult_covid", "best_recall_child_rest"):
        assert column in trials and trials[column].notna().all(), column
    proc = cxrtune("data", "synth", "--out", str(tmp_path / "test"), "--n-patients", "60", "--size", "96",
                   "--seed", "11", "--lesion-strength", "0.6", "--confound", "anatomy", "--confound-rate", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cxrtune("select", str(results), "--within", "0", "--metric", "worst_group_accuracy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    selection = json.loads((results / "selection.json").read_text())
    best = json.loads((results / "best" / "metadata.json").read_text())
    metric_best = trials.loc[trials["best_balanced_accuracy"].idxmax()]
    assert best["cv_metrics"]["trial_id"] == metric_best["trial_id"] != selection["selected"]
    chosen = trials[trials["trial_id"] == selection["selected"]].iloc[0]
    assert chosen["best_worst_group_accuracy"] > metric_best["best_worst_group_accuracy"]
    ba_best, wg_best = _evaluate(tmp_path, results / "best", tmp_path / "test", "best")
    ba_selected, wg_selected = _evaluate(tmp_path, results / "selected", tmp_path / "test", "selected")
    print(f"metric-best {metric_best['trial_id']} (crop {metric_best['crop_margin']}, hidden "
          f"{metric_best['hidden']}, lr {metric_best['lr']}): CV ba {metric_best['best_balanced_accuracy']:.3f} "
          f"wga {metric_best['best_worst_group_accuracy']:.3f}; test ba {ba_best:.3f} wga {wg_best:.3f}")
    print(f"worst-group {chosen['trial_id']} (crop {chosen['crop_margin']}, hidden {chosen['hidden']}, lr "
          f"{chosen['lr']}): CV ba {chosen['best_balanced_accuracy']:.3f} wga "
          f"{chosen['best_worst_group_accuracy']:.3f}; test ba {ba_selected:.3f} wga {wg_selected:.3f}")
    assert ba_selected > ba_best
    assert wg_selected > wg_best   # its worst (body × class) cell on the test set, too
