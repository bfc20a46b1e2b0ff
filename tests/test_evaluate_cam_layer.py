"""After a `cam_layer` sweep, `evaluate`, the held-out scoring and the montages score Grad-CAM at that
layer of the exported (or fold) model — full-model Grad-CAM, checked here against pytorch-grad-cam
on the loaded module — not with the final-layer formula; and a `lung_masks: pspnet` model evaluated
without PSPNet's weights is a one-line error, exit 2, never a silent fallback to other masks.

The "sweep" of the fast tests is its two real steps without Ray: the space file's held-out split
(`search_split`) and `best/` refit and exported from the search part with the space's settings
(`export_model`), as `finish_sweep` does; the slow test runs the whole `cxrtune run`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from search.outputs.evaluate import evaluate, evaluate_dataset, report_lines
from search.outputs.evidence import trial_cams
from search.outputs.heldout import score_model, search_split
from search.space import SweepSpec, load_space
from tests.conftest import ROOT, cxrtune
from tests.test_cam_layer import SPACE as CAM_LAYER_SPACE
from trainable.cam.explain import edge_band, explanation_scores, region_masses
from trainable.cam.lung_segment import (
    PSPNET_FILE,
    LungSegmentationError,
    pspnet_weights_places,
)
from trainable.data.dataset import load_dataset
from trainable.data.holdout import Holdout
from trainable.data.images import decode_images, geometry, mask_geometry, to_model_input
from trainable.data.phantom import synthesize
from trainable.export import export_model, load_model
from trainable.models.backbones import build_backbone, process_backbone
from trainable.models.featureset import FeatureKey
from trainable.models.head import Classifier, Head
from trainable.prepare import prepare_local
from trainable.shared import Prepared

LAYER = "body.blocks.4"   # 4×4 at 64 px; the final layer is 2×2
CONFIG = {"backbone": "efficientnet_lite0", "weights": "imagenet", "hidden": 16, "lr": 1e-2,
          "augment": "none", "crop_margin": 0.08}
SPACE = f"""
name: evalcam
task: covid_vs_rest
data: {{synthetic: {{n_patients: 16, size: 64, seed: 1}}}}
folds: 2
holdout: 0.25
epochs: 2
num_samples: 1
base_size: 64
input_size: 64
views: 1
cam_layer: {LAYER}
space: {{backbone: efficientnet_lite0}}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Full-model Grad-CAM of 64-px images is quicker on one thread than on two shared ones (5-10x
    on the 2-core test machine); the numbers do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Swept:
    """A cam_layer sweep's pieces: its space, data, held-out split, search-part Prepared and best/."""

    spec: SweepSpec
    data: Path
    split: Holdout
    prepared: Prepared
    best: Path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Swept:
    work = tmp_path_factory.mktemp("evalcam")
    (work / "space.yaml").write_text(SPACE)
    spec = load_space(work / "space.yaml")
    data = work / "data"
    synthesize(data, n_patients=16, size=64, shortcut=0.0, seed=1, images_per_patient=(1, 2))
    split = search_split(spec, load_dataset(data, spec.task))
    key = FeatureKey(CONFIG["backbone"], CONFIG["weights"], CONFIG["crop_margin"], spec.input_size)
    prepared = prepare_local(split.search, spec.settings(), [key], ["none"], progress=lambda m: None)
    best = export_model(work / "best", CONFIG, prepared, epochs=6, metrics={"trial_id": "t0"})
    return Swept(spec, data, split, prepared, best)


def _reference(model_dir: Path, data: Path) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Per image id: (lung, edge) mass of pytorch-grad-cam at LAYER of the loaded model, for the true
    class, on the data's masks; and of the final layer's fast formula (what must not be used)."""
    model, meta = load_model(model_dir)
    pre = meta["preprocessing"]
    ds = load_dataset(data, "labels")   # as `evaluate` reads it: the phantom's own labels
    images, masks = decode_images(ds, pre["base_size"])
    x = to_model_input(geometry(images, pre["crop_margin"], pre["input_size"]), pre["in_chans"],
                       tuple(pre["mean"]), tuple(pre["std"]))
    lungs = mask_geometry(masks, pre["crop_margin"], pre["input_size"])
    edge = edge_band(pre["input_size"], meta["edge_band"])
    y = [meta["classes"].index(lab) for lab in ds.table["label"].map({"covid": "covid"}).fillna("rest")]
    with GradCAM(model=model, target_layers=[model.get_submodule(f"backbone.{LAYER}")]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in y])
    lung, edge_m = region_masses(maps, lungs, edge)
    with torch.no_grad():
        last = model.backbone(x)
    fast = explanation_scores(model.head, last, torch.tensor(y), lungs, edge)
    ids = ds.table["id"].astype(str).tolist()
    return ({i: (float(a), float(b)) for i, a, b in zip(ids, lung, edge_m)},
            {i: (float(a), float(b)) for i, a, b in zip(ids, *fast)})


@pytest.fixture(scope="module")
def reference(swept: Swept) -> tuple[dict, dict]:
    return _reference(swept.best, swept.data)


def test_evaluate_scores_at_the_sweeps_layer(swept: Swept, reference: tuple[dict, dict]) -> None:
    meta = json.loads((swept.best / "metadata.json").read_text())
    assert meta["scoring"]["cam_layer"] == LAYER and meta["scoring"]["lung_masks"] == "auto"
    result = evaluate(swept.best, swept.data)
    assert result["scoring"]["cam_layer"] == LAYER and result["cam_grid"] == "4x4"
    assert result["masks"] == {"data": result["images"], "atlas": 0}
    at_layer, fast = reference
    got = {p["id"]: (p["lung_mass"], p["edge_mass"]) for p in result["per_image"]}
    ids = sorted(got)
    assert ids == sorted(at_layer) and all(p["mask"] == "data" for p in result["per_image"])
    np.testing.assert_allclose([got[i] for i in ids], [at_layer[i] for i in ids], atol=2e-4)
    # not the final layer's formula: the two differ on these images
    assert np.abs(np.array([got[i] for i in ids]) - np.array([fast[i] for i in ids])).max() > 1e-2
    assert f"at {LAYER} layer, 4x4 grid" in "\n".join(report_lines(result))


def test_heldout_scoring_uses_the_layer_and_records_it(swept: Swept, reference: tuple[dict, dict]) -> None:
    r = score_model(swept.best, swept.split, swept.spec, log=lambda m: None)
    assert r["scoring"]["cam_layer"] == LAYER and r["scoring"]["cam_grid"] == "4x4"
    assert r["scoring"]["lung_masks"] == "auto" and r["min_cell"] == swept.spec.min_cell
    held = swept.split.heldout.table["id"].astype(str).tolist()
    assert held and r["masks"] == {"data": len(held), "atlas": 0}
    at_layer, fast = reference
    assert r["metrics"]["lung_mass"] == pytest.approx(np.mean([at_layer[i][0] for i in held]), abs=2e-4)
    assert r["metrics"]["edge_mass"] == pytest.approx(np.mean([at_layer[i][1] for i in held]), abs=2e-4)
    assert abs(r["metrics"]["lung_mass"] - np.mean([fast[i][0] for i in held])) > 1e-3


def test_montage_maps_are_grad_cam_at_the_layer(swept: Swept) -> None:
    prepared = swept.prepared
    torch.manual_seed(0)
    heads = [Head(1280, CONFIG["hidden"], len(prepared.classes), 0.0).state_dict() for _ in prepared.folds]
    picks = np.array([0, 1, len(prepared.labels) - 1])
    cams, _, lung_mass, edge_mass = trial_cams(prepared, CONFIG, heads, picks)
    assert cams.shape == (3, 64, 64)
    bb = process_backbone(CONFIG["backbone"], CONFIG["weights"])
    pre = bb.preprocessing
    s = prepared.settings
    fold_of = {int(i): k for k, (_, va) in enumerate(prepared.folds) for i in va}
    for r, i in enumerate(picks):  # each image by the head of the fold that did not train on it
        head = Head(1280, CONFIG["hidden"], len(prepared.classes), 0.0)
        head.load_state_dict(heads[fold_of[int(i)]])
        model = Classifier(bb.model, head.eval())
        x = to_model_input(geometry(prepared.image_array()[i:i + 1], CONFIG["crop_margin"], s.input_size),
                           pre.in_chans, pre.mean, pre.std)
        with GradCAM(model=model, target_layers=[model.get_submodule(f"backbone.{LAYER}")]) as cam:
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(prepared.labels[i]))])
        np.testing.assert_allclose(cams[r], ref[0], atol=1e-4)
        lm, em = region_masses(ref, prepared.lung_masks[CONFIG["crop_margin"]][i:i + 1],
                               edge_band(s.input_size, s.edge_band))
        assert (lung_mass[r], edge_mass[r]) == pytest.approx((lm[0], em[0]), abs=1e-4)


def test_montage_of_a_finetuned_trial_explains_each_folds_own_backbone_at_the_layer(swept: Swept) -> None:
    prepared = swept.prepared
    torch.manual_seed(1)
    # what a fine-tuned trial's checkpoint holds per fold: its whole model (`backbone.*`, `head.*`);
    # random backbones here, so the ImageNet one (the head-only path) would give other maps
    folds = [Classifier(build_backbone(CONFIG["backbone"], "random").model,
                        Head(1280, CONFIG["hidden"], len(prepared.classes), 0.0)).eval() for _ in prepared.folds]
    picks = np.array([0, len(prepared.labels) - 1])
    cams, _, _, _ = trial_cams(prepared, CONFIG, [m.state_dict() for m in folds], picks)
    pre = process_backbone(CONFIG["backbone"], CONFIG["weights"]).preprocessing
    fold_of = {int(i): k for k, (_, va) in enumerate(prepared.folds) for i in va}
    for r, i in enumerate(picks):
        model = folds[fold_of[int(i)]]
        x = to_model_input(geometry(prepared.image_array()[i:i + 1], CONFIG["crop_margin"], prepared.settings.input_size),
                           pre.in_chans, pre.mean, pre.std)
        with GradCAM(model=model, target_layers=[model.get_submodule(f"backbone.{LAYER}")]) as cam:
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(prepared.labels[i]))])
        np.testing.assert_allclose(cams[r], ref[0], atol=1e-4)


@pytest.fixture
def no_pspnet_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An empty torchxrayvision cache, downloads off (real environment variables, as in test_lung_segment)."""
    monkeypatch.setenv("CXRTUNE_XRV_CACHE_DIR", str(tmp_path / "xrv-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CXRTUNE_PSPNET_WEIGHTS", raising=False)
    if any(p.is_file() for p in pspnet_weights_places()):
        pytest.skip("PSPNet weights are present in ~/.torchxrayvision on this machine")
    return dict(os.environ)


def _as_pspnet_model(best: Path, out: Path) -> Path:
    """best/ as a `lung_masks: pspnet` sweep would have exported it (only the recorded source differs)."""
    shutil.copytree(best, out)
    meta = json.loads((out / "metadata.json").read_text())
    meta["scoring"]["lung_masks"] = "pspnet"
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def test_pspnet_model_without_the_weights_is_one_line_and_exit_2(swept: Swept, tmp_path: Path,
                                                                  no_pspnet_weights: dict[str, str]) -> None:
    model = _as_pspnet_model(swept.best, tmp_path / "pspnet-best")
    with pytest.raises(LungSegmentationError, match="scoring.lung_masks: pspnet"):
        evaluate_dataset(model, swept.split.heldout, "held-out")   # the held-out scoring's path
    proc = subprocess.run([sys.executable, "-m", "search.cli", "evaluate", "--model", str(model),
                           "--data", str(swept.data)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env=no_pspnet_weights)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert PSPNET_FILE in lines[0] and "CXRTUNE_PSPNET_WEIGHTS" in lines[0] and str(model) in lines[0]
    assert "or use lung_masks" not in lines[0]  # a sweep's advice; an export's masks are not a choice
    assert "lung_mass" not in proc.stdout       # nothing was scored with other masks


@pytest.mark.slow  # writes a 270 MB random state dict and runs PSPNet at 512 px on the CPU (~1–2 min)
def test_pspnet_model_is_scored_on_pspnet_masks(swept: Swept, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainable.cam.lung_segment import build_pspnet, pspnet_masks

    weights = tmp_path / PSPNET_FILE
    torch.save({f"module.{k}": v for k, v in build_pspnet(None).state_dict().items()}, weights)
    monkeypatch.setenv("CXRTUNE_PSPNET_WEIGHTS", str(weights))
    model = _as_pspnet_model(swept.best, tmp_path / "pspnet-best")
    ds = swept.split.heldout
    result = evaluate_dataset(model, ds, "held-out")
    assert result["masks"] == {"data": 0, "atlas": 0, "pspnet": len(ds)}
    assert {p["mask"] for p in result["per_image"]} == {"pspnet"}
    # the masses are on PSPNet's masks (every image, as CV's rule for pspnet), at the layer
    loaded, meta = load_model(model)
    pre = meta["preprocessing"]
    images, _ = decode_images(ds, pre["base_size"])
    masks = pspnet_masks(images, "test", None, log=lambda m: None)
    lungs = mask_geometry(masks, pre["crop_margin"], pre["input_size"])
    x = to_model_input(geometry(images, pre["crop_margin"], pre["input_size"]), pre["in_chans"],
                       tuple(pre["mean"]), tuple(pre["std"]))
    y = [meta["classes"].index(p["label"]) for p in result["per_image"]]
    with GradCAM(model=loaded, target_layers=[loaded.get_submodule(f"backbone.{LAYER}")]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in y])
    lung, _ = region_masses(maps, lungs, edge_band(pre["input_size"], meta["edge_band"]))
    np.testing.assert_allclose([p["lung_mass"] for p in result["per_image"]], lung, atol=2e-4)


@pytest.mark.slow  # a whole `cxrtune run` at the layer (~1.5 min on 2 cores)
@pytest.mark.timeout(400)
def test_sweep_records_the_layer_for_heldout_and_evaluate(tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    space.write_text(CAM_LAYER_SPACE.replace("n_patients: 12", "n_patients: 16") + "holdout: 0.25\n")
    proc = cxrtune("run", "--space", str(space), "--out", str(tmp_path), "--name", "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "r"
    meta = json.loads((results / "best" / "metadata.json").read_text())
    assert meta["scoring"]["cam_layer"] == LAYER
    test = json.loads((results / "test_metrics.json").read_text())
    assert test["best"]["scoring"]["cam_layer"] == LAYER and test["best"]["scoring"]["cam_grid"] == "4x4"
    assert f"layer {LAYER} (grid 4x4)" in (results / "leaderboard.md").read_text()
    assert pd.read_csv(results / "trials.csv")["cam_grid"].tolist() == ["4x4"]
    assert (results / "best" / "gradcam.png").is_file()
