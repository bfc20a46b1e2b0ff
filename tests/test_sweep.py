"""End to end: `cxrtune run` on a tiny space, on a real local Ray cluster, writes what users open."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from search.outputs.select import local_prepared, trial_config
from search.rundir import load_sweep
from tests.conftest import cxrtune
from trainable.export import (
    copy_export,
    export_model,
    load_model,
    preprocess_image,
    same_export,
)

METRIC_KEYS = ("balanced_accuracy", "macro_f1", "auc", "accuracy", "loss", "lung_mass", "edge_mass",
               "lung_enrichment", "objective")


def _cxrtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cxrtune(*args, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_run(tiny_sweep: Path) -> Path:
    return tiny_sweep


def test_run_writes_trials_leaderboard_and_best(tiny_run: Path) -> None:
    trials = pd.read_csv(tiny_run / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 4 and (trials["status"] == "TERMINATED").all()
    for key in ("hidden", "lr", "augment", "crop_margin", "epochs_run", "stopped_early",
                *(f"best_{k}" for k in METRIC_KEYS), *(f"final_{k}" for k in METRIC_KEYS)):
        assert key in trials, key
    assert trials["best_objective"].is_monotonic_decreasing
    assert trials["weights_source"].str.startswith("package:efficientnet-lite0").all()
    assert trials["trial_id"].nunique() == 4
    board = (tiny_run / "leaderboard.md").read_text()
    assert f"Winner: trial {trials['trial_id'][0]}" in board
    history = pd.read_csv(tiny_run / "history.csv", dtype={"trial_id": str})
    assert len(history) == trials["epochs_run"].sum()
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["best_trial"] == trials["trial_id"][0]


def test_exported_best_model_loads_and_predicts(tiny_run: Path) -> None:
    model, meta = load_model(tiny_run / "best")
    assert meta["classes"] == ["rest", "covid"] and meta["backbone"] == "efficientnet_lite0"
    image = next((tiny_run / "data" / "images").glob("*.png"))
    x = preprocess_image(image, meta)
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(), torch.tensor(1.0))
    assert isinstance(model.get_submodule(meta["target_layer"]), torch.nn.Module)


def test_existing_results_are_never_overwritten(tiny_run: Path) -> None:
    before = (tiny_run / "trials.csv").read_bytes()
    proc = _cxrtune("run", "--space", str(tiny_run.parent.parent / "tiny.yaml"), "--out",
                    str(tiny_run.parent), "--name", "t1", cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "already holds results" in proc.stderr
    assert (tiny_run / "trials.csv").read_bytes() == before


def test_missing_data_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _cxrtune("run", "--data", "/nonexistent", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent" in lines[0] and "Traceback" not in proc.stderr


def test_bad_space_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  lr: {loguniform: [0, 1]}\n")
    proc = _cxrtune("run", "--space", str(bad), "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "loguniform needs 0 < low < high" in proc.stderr and str(bad) in proc.stderr


def test_selected_is_most_lung_focused_within_delta_and_montages_exist(tiny_run: Path) -> None:
    trials = pd.read_csv(tiny_run / "trials.csv", dtype={"trial_id": str})
    selection = json.loads((tiny_run / "selection.json").read_text())
    ok = trials[trials["status"] == "TERMINATED"]
    near = ok[ok["best_balanced_accuracy"] >= ok["best_balanced_accuracy"].max() - selection["within"]]
    assert selection["selected"] == near.sort_values("best_lung_mass", ascending=False)["trial_id"].iloc[0]
    meta = json.loads((tiny_run / "selected" / "metadata.json").read_text())
    assert meta["cv_metrics"]["trial_id"] == selection["selected"]
    for png in ("gradcam_comparison.png", "selected/gradcam.png", "best/gradcam.png"):
        assert (tiny_run / png).stat().st_size > 1000, png


def test_select_command_with_wide_delta_takes_the_highest_lung_mass(tiny_run: Path) -> None:
    proc = _cxrtune("select", str(tiny_run), "--within", "1.0", cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = pd.read_csv(tiny_run / "trials.csv", dtype={"trial_id": str})
    selection = json.loads((tiny_run / "selection.json").read_text())
    assert selection["selected"] == trials.loc[trials["best_lung_mass"].idxmax(), "trial_id"]


def test_explain_writes_overlays_and_maps_that_match_pytorch_grad_cam(tiny_run: Path, tmp_path: Path) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = sorted((tiny_run / "data" / "images").glob("*.png"))[:2]
    proc = _cxrtune("explain", *map(str, images), "--model", str(tiny_run / "best"), "--out", str(tmp_path),
                    cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "explain.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    model, meta = load_model(tiny_run / "best")
    for image, line in zip(images, lines):
        assert 0 <= line["lung_mass"] <= 1 and 0 <= line["edge_mass"] <= 1
        assert (tmp_path / f"{image.stem}.overlay.png").stat().st_size > 1000
        cam = np.load(tmp_path / f"{image.stem}.cam.npy")
        x = preprocess_image(image, meta)
        target = meta["classes"].index(line["target"])
        with GradCAM(model=model, target_layers=[model.get_submodule(meta["target_layer"])]) as ref:
            expected = ref(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
        assert cam.shape == expected.shape == (64, 64)
        assert np.abs(cam - expected).max() <= 1e-4


def test_selected_equal_to_best_reuses_its_refit(tiny_run: Path, tmp_path: Path) -> None:
    """`select` copies best/ when it picks the same trial and epoch: what a second refit would write."""
    spec, trials, saved = load_sweep(tiny_run)
    best = trials[trials["status"] == "TERMINATED"].iloc[0]
    epochs = int(best["best_epoch"])
    assert same_export(tiny_run / "best", best["trial_id"], epochs)
    assert not same_export(tiny_run / "best", trials["trial_id"].iloc[1], epochs)
    assert not same_export(tiny_run / "best", best["trial_id"], epochs + 1)
    copied = copy_export(tiny_run / "best", tmp_path / "copy", {"trial_id": best["trial_id"], "selected_by": "x"})
    refit = export_model(tmp_path / "refit", trial_config(best, spec),
                         local_prepared(tiny_run, spec, saved, [best], lambda m: None), epochs, {})
    a, b = torch.load(copied / "model.pt"), torch.load(refit / "model.pt")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    meta = json.loads((copied / "metadata.json").read_text())
    assert meta["cv_metrics"] == {"trial_id": best["trial_id"], "selected_by": "x"}
    assert meta["config"] == json.loads((refit / "metadata.json").read_text())["config"]
