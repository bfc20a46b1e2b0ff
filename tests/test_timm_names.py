"""timm names verbatim: any timm.list_models() name[.tag] as a backbone, aliases resolving to exact
timm names, the exact architecture recorded (metadata.json, trials.csv) and rebuilt by load_model,
nasnetmobile refused, unknown names one line. Random weights, 64 px phantoms, nothing downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from search.outputs.results import trial_rows
from search.space import load_space
from trainable.data.dataset import load_dataset
from trainable.data.phantom import synthesize
from trainable.export import export_model, load_model
from trainable.models.backbones import build_backbone
from trainable.models.featureset import FeatureKey
from trainable.models.head import Classifier, Head
from trainable.models.registry import UnknownBackboneError, get_spec
from trainable.models.weights import WeightsNotFoundError, resolve_weights
from trainable.prepare import prepare_local
from trainable.shared import Settings

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
SMALL = "mobilenetv3_small_050"  # 0.6M parameters, not in the registry


def _cxrtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})


def _export(work: Path, backbone: str) -> Path:
    synthesize(work / "data", n_patients=8, size=64, shortcut=0.0, seed=1)
    ds = load_dataset(work / "data", "covid_vs_rest")
    settings = Settings(folds=2, base_size=64, input_size=64, views=1)
    config = {"backbone": backbone, "weights": "random", "hidden": 8, "lr": 1e-2, "augment": "none",
              "crop_margin": 0.0}
    prepared = prepare_local(ds, settings, [FeatureKey(backbone, "random", 0.0, 64)], ["none"],
                             progress=lambda m: None)
    return export_model(work / "best", config, prepared, epochs=2, metrics={})


# --------------------------------------------------------------------------- resolution


def test_verbatim_timm_name_builds_with_its_feature_info_cam_layer() -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = get_spec(SMALL)
    assert (spec.arch, spec.tag, spec.timm_name) == (SMALL, "lamb_in1k", f"{SMALL}.lamb_in1k")
    backbone = build_backbone(SMALL, weights="random")
    import timm

    last_stage = timm.create_model(SMALL, pretrained=False, features_only=True).feature_info.module_name()[-1]
    assert backbone.target_layer == f"body.{last_stage}"
    x = torch.randn(1, 3, 64, 64)
    seen: list[torch.Tensor] = []
    handle = backbone.model.get_submodule(backbone.target_layer).register_forward_hook(
        lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        maps = backbone.model(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], maps) and maps.shape[1] == backbone.num_features
    model = Classifier(backbone.model, Head(backbone.num_features, 8, 2, 0.0)).eval()
    layer = model.backbone.get_submodule(backbone.target_layer)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])
    assert heat.shape == (1, 64, 64)


def test_tagged_name_and_a_registry_arch_keep_the_exact_tag() -> None:
    spec = get_spec("resnet50.a2_in1k")
    assert (spec.arch, spec.tag, spec.target_layer) == ("resnet50", "a2_in1k", "body.layer4")
    assert get_spec("resnet50").tag == "a1_in1k"
    own = get_spec("efficientnet_lite0.ra_in1k")  # timm's own efficientnet_lite0, written with its tag
    assert own.timm_name == "efficientnet_lite0.ra_in1k" and own.target_layer == "body.bn2"


@pytest.mark.parametrize(("alias", "exact"), [
    ("efficientnet_lite0", "tf_efficientnet_lite0.in1k"), ("efficientnet_lite1", "tf_efficientnet_lite1.in1k"),
    ("xception", "legacy_xception.tf_in1k"), ("mobilenet", "mobilenetv1_100.ra4_e3600_r224_in1k"),
    ("inception_v3", "inception_v3.tv_in1k"), ("vgg16", "vgg16.tv_in1k"), ("resnet50v2", "resnetv2_50.a1h_in1k"),
])
def test_aliases_resolve_to_exact_timm_names(alias: str, exact: str) -> None:
    import timm

    assert get_spec(alias).timm_name == exact
    assert exact in timm.list_pretrained()  # a real timm name and tag, not a guess


def test_nasnetmobile_is_refused_in_one_line_naming_the_substitute(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackboneError, match="mnasnet_100") as caught:
        get_spec("nasnetmobile")
    assert "no NASNet-A Mobile" in str(caught.value) and "\n" not in str(caught.value)
    assert get_spec("mnasnet_100").timm_name == "mnasnet_100.rmsp_in1k"


def test_unknown_and_non_convolutional_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'convnext_tiny'") as caught:
        get_spec("convnext_tinyy")
    assert "\n" not in str(caught.value)
    with pytest.raises(UnknownBackboneError, match="no pretrained tag 'nope'"):
        get_spec("resnet18.nope")
    with pytest.raises(UnknownBackboneError, match="convolutional backbone"):
        get_spec("vit_tiny_patch16_224")
    space = tmp_path / "space.yaml"
    space.write_text("name: t\nfolds: 2\nepochs: 1\nspace: {backbone: {choice: [resnet18, convnext_tinyy]}}\n")
    proc = _cxrtune("run", "--space", str(space), "--data", "synthetic", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "convnext_tinyy" in err and "'convnext_tiny'" in err
    assert "Traceback" not in proc.stderr


def test_space_accepts_verbatim_timm_names(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(f"name: t\nfolds: 2\nepochs: 1\nspace: {{backbone: {{choice: [{SMALL}, resnet50.a1_in1k, efficientnet_lite0]}}}}\n")
    assert load_space(space).choices("backbone") == [SMALL, "resnet50.a1_in1k", "efficientnet_lite0"]


def test_offline_pretrained_weights_of_a_verbatim_name_are_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match=rf"timm/{SMALL}\.lamb_in1k") as caught:
        resolve_weights(SMALL, "imagenet")
    assert "weights: random" in str(caught.value)
    assert resolve_weights(SMALL, "random").kind == "random"


# --------------------------------------------------------------------------- recorded and rebuilt


def test_trials_csv_rows_record_the_exact_arch() -> None:
    ended = [SimpleNamespace(metrics={"trial_id": f"t{i}"}, config={"backbone": b}, path="", error=None,
                             metrics_dataframe=None)
             for i, b in enumerate(["efficientnet_lite0", SMALL, "xrv-densenet121-res224-all"])]
    df = trial_rows(ended, epochs=1)
    assert df[["timm_arch", "timm_tag"]].values.tolist() == [
        ["tf_efficientnet_lite0", "in1k"], [SMALL, "lamb_in1k"], ["", ""]]
    assert isinstance(df, pd.DataFrame)


def test_export_of_a_verbatim_name_records_and_reloads_the_exact_arch(tmp_path: Path) -> None:
    out = _export(tmp_path, SMALL)
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["backbone"], meta["timm_arch"], meta["timm_tag"]) == (SMALL, SMALL, "lamb_in1k")
    model, _ = load_model(out)
    x = torch.randn(2, 3, 64, 64)
    state = torch.load(out / "model.pt", weights_only=True)
    rebuilt = Classifier(build_backbone(f"{SMALL}.lamb_in1k", "random").model,
                         Head(meta["num_features"], meta["hidden"], 2, meta["dropout"]))
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt.eval()(x))


def test_load_model_builds_the_recorded_arch_not_a_look_alike(tmp_path: Path) -> None:
    """timm's own efficientnet_lite0 takes tf_efficientnet_lite0's weights strictly and silently gives
    other features; load_model must build what metadata recorded, whatever `backbone` says."""
    import timm

    out = _export(tmp_path, "efficientnet_lite0")
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["timm_arch"], meta["timm_tag"]) == ("tf_efficientnet_lite0", "in1k")
    model, _ = load_model(out)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.backbone(x)
        look_alike = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
        body = {k[len("backbone.body."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
        look_alike.load_state_dict(body, strict=True)  # loads without a complaint
        gap = (look_alike.forward_features(x) - reference).abs().max().item()
    assert gap > 1e-3, gap  # same keys and shapes, other network: why the arch must be recorded
    # a name whose meaning differs (timm's own efficientnet_lite0) in `backbone` changes nothing
    meta["backbone"] = "efficientnet_lite0.ra_in1k"
    (out / "metadata.json").write_text(json.dumps(meta))
    again, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(again.backbone(x), reference)
