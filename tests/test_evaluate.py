"""`cxrtune evaluate`: an exported model scored on another data set, in any adapter's layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search.outputs.evaluate import evaluate, match_labels, scores
from trainable.data.dataset import load_dataset
from trainable.data.phantom import synthesize
from trainable.errors import DataError
from trainable.export import export_model, load_model, preprocess_image
from trainable.models.featureset import FeatureKey
from trainable.prepare import prepare_local
from trainable.shared import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"backbone": "efficientnet_lite0", "weights": "imagenet", "hidden": 16, "lr": 1e-2,
          "augment": "none", "crop_margin": 0.08}


def _cxrtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real covid_vs_rest model: phantom data → frozen ImageNet features → head refit → export."""
    work = tmp_path_factory.mktemp("model")
    synthesize(work / "train", n_patients=12, size=64, shortcut=0.0, seed=1)
    ds = load_dataset(work / "train", "covid_vs_rest")
    settings = Settings(folds=2, base_size=64, input_size=64, views=1)
    key = FeatureKey(CONFIG["backbone"], CONFIG["weights"], CONFIG["crop_margin"], settings.input_size)
    prepared = prepare_local(ds, settings, [key], ["none"], progress=lambda m: None)
    return export_model(work / "best", CONFIG, prepared, epochs=8, metrics={})


@pytest.fixture(scope="module")
def holdout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another folder in the manifest format (other patients, another seed)."""
    out = tmp_path_factory.mktemp("holdout") / "data"
    synthesize(out, n_patients=9, size=80, shortcut=0.0, seed=7)
    return out


def test_cli_evaluate_prints_metrics_and_writes_json(trained: Path, holdout: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = _cxrtune("evaluate", "--model", str(trained), "--data", str(holdout), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("accuracy", "balanced accuracy", "AUC", "lung_mass", "edge_mass", "precision",
                   "recall", "confusion matrix (rows: true, columns: predicted):",
                   "labels mapped: normal → rest, pneumonia → rest"):
        assert needle in text, needle
    result = json.loads(out.read_text())
    m = result["metrics"]
    for key in ("accuracy", "balanced_accuracy", "auc", "macro_f1", "lung_mass", "edge_mass"):
        assert key in m and (m[key] is None or np.isfinite(m[key]))
    assert 0 <= m["accuracy"] <= 1 and 0 < m["lung_mass"] <= 1 and 0 <= m["edge_mass"] <= 1
    assert result["classes"] == ["rest", "covid"] and result["format"] == "manifest"
    cm = np.array(result["confusion_matrix"]["rows_true_columns_predicted"])
    assert cm.shape == (2, 2) and cm.sum() == result["images"]
    assert set(result["per_class"]) == {"rest", "covid"}
    assert sum(r["support"] for r in result["per_class"].values()) == result["images"]
    assert result["masks"] == {"data": result["images"], "atlas": 0}
    assert result["trained_on_this_data"] is False


def test_mismatched_labels_are_one_clear_line_and_exit_2(trained: Path, tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    proc = _cxrtune("evaluate", "--model", str(trained), "--data", str(tmp_path / "pets"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "label(s) 'cat', 'dog' do not match the model's classes ['rest', 'covid']" in lines[0]


def test_evaluate_other_layouts_and_the_atlas(trained: Path, tmp_path: Path) -> None:
    """Kermany layout (labels mapped through the task; no masks: the atlas is used)."""
    root = tmp_path / "chest_xray"
    rng = np.random.default_rng(0)
    for split, cls, name in (("train", "NORMAL", "IM-0001-0001.jpeg"), ("train", "NORMAL", "IM-0002-0001.jpeg"),
                             ("test", "PNEUMONIA", "person1_virus_1.jpeg"),
                             ("test", "PNEUMONIA", "person2_bacteria_2.jpeg")):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (70, 60), dtype=np.uint8)).save(root / split / cls / name)
    result = evaluate(trained, root)
    assert result["format"] == "kermany" and result["images"] == 4
    assert result["label_mapping"] == {"normal": "rest", "pneumonia": "rest"}
    assert result["masks"] == {"data": 0, "atlas": 4}
    assert result["metrics"]["auc"] != result["metrics"]["auc"]        # one class only: AUC undefined (NaN)
    assert result["per_class"]["covid"]["support"] == 0


def test_training_data_is_recognised_and_predictions_match_the_loaded_model(trained: Path) -> None:
    result = evaluate(trained, trained.parent / "train")
    assert result["trained_on_this_data"] is True
    model, meta = load_model(trained)
    ds = load_dataset(trained.parent / "train")
    for k in (0, len(ds) - 1):                 # the same preprocessing as preprocess_image
        with torch.no_grad():
            probs = model(preprocess_image(ds.table["path"][k], meta)).softmax(1)[0].numpy()
        row = result["per_image"][k]
        assert row["id"] == ds.table["id"][k]
        np.testing.assert_allclose(row["probabilities"], probs, atol=1e-4)


def test_match_labels_and_scores() -> None:
    class _DS:  # the two attributes match_labels reads
        def __init__(self, labels: list[str]) -> None:
            import pandas as pd

            self.table = pd.DataFrame({"label": labels})

    assert match_labels(_DS(["covid", "normal"]), ["normal", "covid", "pneumonia"], "d") == \
        {"covid": "covid", "normal": "normal"}
    assert match_labels(_DS(["covid", "pneumonia"]), ["rest", "covid"], "d") == \
        {"covid": "covid", "pneumonia": "rest"}
    with pytest.raises(DataError, match=r"label\(s\) 'flu' do not match the model's classes \['rest', 'covid'\]"):
        match_labels(_DS(["covid", "flu"]), ["rest", "covid"], "d")
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    s = scores(y, probs, ["rest", "covid"], np.array([0.5, 0.5, 0.7, 0.9]), np.zeros(4), np.full(4, 0.25))
    assert s["metrics"]["accuracy"] == 0.75 and s["metrics"]["balanced_accuracy"] == 0.75
    assert s["metrics"]["auc"] == 1.0
    assert s["per_class"]["rest"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2,
                                                    "lung_mass": 0.5, "edge_mass": 0.0})
    assert s["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1], [0, 2]]
    assert s["metrics"]["lung_enrichment"] == pytest.approx(0.65 / 0.25)
