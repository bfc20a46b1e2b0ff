"""Issue 15 acceptance: best/ of a sweep whose trials train with cam_loss, balance: group and a
fine-tuning stage exports, loads with `load_model`, and `cxrtune explain` / `evaluate` work on it.

As in test_finetune_sweep, the head stage's learning rate is too small to move the heads, so the
ft epoch is the best one and best/ must hold the fine-tuned backbone trained with the levers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tests.conftest import cxrtune
from trainable.export import load_model
from trainable.models.backbones import build_backbone

LEVERS_SPACE = """
name: levers
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 64, shortcut: 1.0, seed: 2, confound: anatomy, confound_rate: 0.9}}
folds: 2
epochs: 1
num_samples: 2
base_size: 64
input_size: 64
views: 2
group_column: body
min_cell: 2
asha: {grace_period: 1, reduction_factor: 2}
objective: {w: 0.0}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: 16
  batch_size: 16
  augment: light
  lr: {loguniform: [1.0e-7, 2.0e-7]}
  cam_loss: 1.0
  cam_loss_region: outside_lungs
  balance: group
  ft_epochs: 1
  ft_blocks: 2
  ft_lr: {loguniform: [5.0e-4, 1.0e-3]}
"""


def test_a_levers_trial_exports_loads_explains_and_evaluates(tmp_path: Path) -> None:
    (tmp_path / "levers.yaml").write_text(LEVERS_SPACE)
    proc = cxrtune("run", "--space", str(tmp_path / "levers.yaml"), "--out", str(tmp_path), "--name", "levers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "levers"
    trials = pd.read_csv(results / "trials.csv")
    assert (trials["cam_loss"] == 1.0).all() and (trials["balance"] == "group").all()
    assert (trials["epochs_run"] == 2).all(), trials[["trial_id", "best_epoch", "best_objective"]]
    assert trials.sort_values("best_objective", ascending=False).iloc[0]["best_epoch"] == 2, trials[["trial_id", "best_epoch", "best_objective"]]
    model, meta = load_model(results / "best")
    config = meta["config"]
    assert (config["cam_loss"], config["balance"], config["ft_epochs"]) == (1.0, "group", 1)
    assert meta["finetuned"]["ft_epochs"] == 1
    imagenet = build_backbone("efficientnet_lite0", "imagenet").model.state_dict()
    tuned = model.backbone.state_dict()
    assert any(not torch.equal(imagenet[k], tuned[k]) for k in imagenet)   # the fine-tuned backbone
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)

    data = results / "data"   # the sweep's embedded phantom, as `cxrtune run` wrote it
    manifest = pd.read_csv(data / "manifest.csv")
    images = [data / p for p in manifest["path"].head(2)]
    proc = cxrtune("explain", *map(str, images), "--model", str(results / "best"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "x" / "explain.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(0.0 <= ln["lung_mass"] <= 1.0 for ln in lines)
    cams = [np.load(p) for p in sorted((tmp_path / "x").glob("*.cam.npy"))]
    assert len(cams) == 2 and all(np.isfinite(c).all() and c.max() > 0 for c in cams)

    proc = cxrtune("evaluate", "--model", str(results / "best"), "--data", str(data), "--out",
                   str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert len(result["per_image"]) == len(manifest)
    for metric in ("balanced_accuracy", "lung_mass", "edge_mass", "worst_group_accuracy"):
        assert np.isfinite(result["metrics"][metric]), metric
