"""One tiny end-to-end sweep with the fine-tuning stage and the training levers (cam_loss,
balance: group): the real CLI, local Ray, phantom data. best/ must export, load with `load_model`,
and `cxrtune explain` / `evaluate` must work on it (issue 15's acceptance).

The space makes the ft epoch the best one: the head stage's learning rate is too small to move the
heads off their initialisation, the objective is the metric alone, and fine-tuning learns the
phantom's marker shortcut. So best/ must hold the fine-tuned backbone, and the test fails if the
fine-tuned weights are dropped anywhere between the trial and best/."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from search.outputs.evidence import fold_heads
from tests.conftest import cxrtune
from trainable.export import load_model
from trainable.models.backbones import build_backbone

FT_SPACE = """
name: ft
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
  oversample: true
  lr: {loguniform: [1.0e-7, 2.0e-7]}
  cam_loss: 1.0
  balance: group
  ft_epochs: 1
  ft_lr: {loguniform: [5.0e-4, 1.0e-3]}
"""


def test_sweep_with_finetuning_exports_the_finetuned_backbone(tmp_path: Path) -> None:
    (tmp_path / "ft.yaml").write_text(FT_SPACE)
    proc = cxrtune("run", "--space", str(tmp_path / "ft.yaml"), "--out", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "results").glob("ft*")  # the name may carry a timestamp
    history = pd.read_csv(results / "history.csv")
    for _, h in history.groupby("trial_id"):  # ASHA's max_t covers the ft epoch: both ran
        assert h["stage"].tolist() == ["head", "ft"] and h["epoch"].tolist() == [1, 2]
        assert h[["train_loss", "loss"]].notna().all().all()
    assert (results / "curves.png").stat().st_size > 1000
    trials = pd.read_csv(results / "trials.csv")
    assert (trials["epochs_run"] == 2).all() and not trials["stopped_early"].any()
    imagenet = build_backbone("efficientnet_lite0", "imagenet").model.state_dict()
    for tid in trials["trial_id"].astype(str):  # each trial's last checkpoint holds its fine-tuned folds
        for fold in fold_heads(results, tid):
            assert any(not torch.equal(v, fold[f"backbone.{k}"]) for k, v in imagenet.items())
    best = trials.sort_values("best_objective", ascending=False).iloc[0]
    assert best["best_epoch"] == 2, trials[["trial_id", "best_epoch", "best_objective"]]
    model, meta = load_model(results / "best")
    tuned = model.backbone.state_dict()
    # the best epoch is the ft epoch: model.pt holds a fine-tuned backbone, not the ImageNet one
    assert meta["epochs"] == 2 and meta["finetuned"]["ft_epochs"] == 1
    assert any(not torch.equal(imagenet[k], tuned[k]) for k in imagenet)
    x = torch.zeros(1, 3, 64, 64)
    assert model(x).shape == (1, 2)
    assert (trials["cam_loss"] == 1.0).all() and (trials["balance"] == "group").all()
    assert (meta["config"]["cam_loss"], meta["config"]["balance"]) == (1.0, "group")

    data = results / "data"   # the sweep's embedded phantom, as `cxrtune run` wrote it
    manifest = pd.read_csv(data / "manifest.csv")
    images = [data / p for p in manifest["path"].head(2)]
    proc = cxrtune("explain", *map(str, images), "--model", str(results / "best"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "x" / "explain.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(0.0 <= ln["lung_mass"] <= 1.0 for ln in lines)
    cams = [np.load(p) for p in sorted((tmp_path / "x").glob("*.cam.npy"))]
    assert len(cams) == 2 and all(c.shape == (64, 64) and np.isfinite(c).all() and c.min() >= 0 for c in cams)
    proc = cxrtune("evaluate", "--model", str(results / "best"), "--data", str(data), "--out",
                   str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert len(result["per_image"]) == len(manifest)
    for metric in ("balanced_accuracy", "lung_mass", "edge_mass", "worst_group_accuracy"):
        assert np.isfinite(result["metrics"][metric]), metric
    assert set(result["group_cells"]) and sum(result["group_cells"].values()) == len(manifest)
