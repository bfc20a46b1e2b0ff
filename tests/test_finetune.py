"""The fine-tuning stage (trainable.train.finetune) on a tiny phantom set with the real ImageNet
efficientnet_lite0 (offline weights), in this process: backbone blocks, BN policy, early stopping,
export with the fine-tuned backbone, Grad-CAM of fine-tuned folds (montage, cam_layer).

Speed: one torch thread; the ImageNet backbone is built once per module (`imagenet`), one frozen-BN
fine-tuning run is shared (`tuned`), and the data are 16 images at 64 px."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from search.outputs.evidence import fold_heads, pick_images, trial_cams
from trainable.cam.camlayer import LayerCam
from trainable.cam.explain import edge_band, explanation_scores
from trainable.data.dataset import load_dataset
from trainable.data.phantom import synthesize
from trainable.export import export_model, load_model
from trainable.models.backbones import build_backbone
from trainable.models.featureset import FeatureKey
from trainable.models.head import Classifier, Head
from trainable.prepare import prepare_local
from trainable.shared import Settings, with_defaults
from trainable.train.checkpoint import ft_state, save_checkpoint
from trainable.train.finetune import (EarlyStopping, FtStage, backbone_blocks, finetune_folds, inner_loss, inner_split,
                                      predict_with_maps, set_trainable)
from trainable.train.head_stage import new_fold_state, run_epoch
from trainable.train.lockstep import cam_targets


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a trial gets (OMP_NUM_THREADS): on a 2-core machine shared with other
    work, two threads made an ft step ~10× slower (thread oversubscription), one thread never is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ft")
    manifest = synthesize(root / "data", n_patients=8, size=64, shortcut=0.5, seed=1,
                          images_per_patient=(2, 2))
    ds = load_dataset(manifest.parent, "covid_vs_rest")
    settings = Settings(folds=2, epochs=1, base_size=64, input_size=64, views=2, cache_dir="off")
    key = FeatureKey("efficientnet_lite0", "imagenet", 0.0, 64)
    return prepare_local(ds, settings, [key], ["light"], progress=lambda m: None)


def _config(**kw) -> dict:
    return with_defaults({"hidden": 16, "batch_size": 8, "augment": "light", "ft_epochs": 1,
                          "ft_lr": 1e-3, **kw})


@pytest.fixture(scope="module")
def imagenet() -> dict[str, torch.Tensor]:
    """The ImageNet backbone's weights, built once for the module."""
    return _backbone_state(build_backbone("efficientnet_lite0", "imagenet").model)


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    return build_backbone("resnet18", "random").model


@pytest.fixture(scope="module")
def tuned(prepared):
    """One frozen-BN fine-tuning run (1 ft epoch), shared: (config, fs, head states, folds, reports)."""
    config = _config(ft_bn="frozen")
    fs, states = _head_stage(prepared, config)
    seen: list[dict] = []
    folds = finetune_folds(states, config, prepared, fs, lambda j, m, f, last: seen.append(m))
    return config, fs, states, folds, seen


def _head_stage(prepared, config):
    fs = prepared.feature_set(FeatureKey("efficientnet_lite0", "imagenet", 0.0, 64))
    states = [new_fold_state(config, fs.maps.shape[1], 2, k) for k in range(len(prepared.folds))]
    run_epoch(states, config, prepared, fs, 0)
    return fs, states


def _backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_blocks_cover_every_parameter_in_forward_order(resnet18) -> None:
    model = resnet18
    blocks = backbone_blocks(model)
    names = [n for b in blocks for n in b]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert blocks[0][0].startswith("body.conv1") and blocks[-1][0].startswith("body.layer4")


def test_ft_blocks_last_n_and_bn_frozen_leaves_only_convs_trainable(resnet18) -> None:
    model = Classifier(copy.deepcopy(resnet18), Head(512, 8, 2, 0.0))
    n_trainable = set_trainable(model, 1, "frozen")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.", "backbone.body.layer4")) for n in trainable)
    assert not any(".bn" in n for n in trainable)
    assert n_trainable == sum(p.numel() for n, p in model.backbone.named_parameters() if "layer4" in n
                              and ".bn" not in n and "downsample.1" not in n)


def test_head_stage_leaves_backbone_and_finetune_changes_it_with_bn_stats_frozen(prepared, imagenet,
                                                                                   tuned) -> None:
    # the head stage trains on cached features of the frozen backbone: its pooled features are still
    # what the ImageNet backbone computes (test_export_holds_the_finetuned_backbone: a head-only
    # export holds the ImageNet weights exactly)
    config, fs, states, folds, seen = tuned
    model = build_backbone("efficientnet_lite0", "random").model
    model.load_state_dict(imagenet)
    x = torch.from_numpy(fs.maps[:2].astype(np.float32)).mean(dim=(2, 3))
    with torch.no_grad():
        probs, maps = predict_with_maps(Classifier(model, copy.deepcopy(states[0].head)), prepared.image_array()[:2],
                                        fs.preprocessing, 0.0, 64)
    assert torch.allclose(maps.mean(dim=(2, 3)), x, rtol=1e-2, atol=1e-2)  # fp16 cache
    assert len(seen) == 1 and np.isfinite(seen[0]["loss"]) and 0 <= seen[0]["lung_mass"] <= 1
    tuned = _backbone_state(folds[0].model.backbone)
    weights = [k for k in imagenet if k.endswith("weight") and "bn" not in k]
    assert any(not torch.equal(imagenet[k], tuned[k]) for k in weights)
    # BN policy "frozen": running statistics and affine parameters unchanged
    bn_keys = [k for k in imagenet if ".bn" in k and k.endswith(("running_mean", "running_var", "weight", "bias"))]
    assert bn_keys and all(torch.equal(imagenet[k], tuned[k]) for k in bn_keys)


def test_bn_policy_train_moves_running_stats(prepared, imagenet) -> None:
    config = _config(ft_bn="train")
    fs, states = _head_stage(prepared, config)
    tuned = _backbone_state(finetune_folds(states, config, prepared, fs)[0].model.backbone)
    assert any(not torch.equal(imagenet[k], tuned[k]) for k in imagenet if k.endswith("running_mean"))


def test_early_stopping_restores_the_best_epoch() -> None:
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2)
    states = []
    for epoch, loss in enumerate([0.5, 0.3, 0.6, 0.9], start=1):  # val loss rises after epoch 2
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        states.append(model.weight.detach().clone())
        stop.update(loss, epoch, model)
        if stop.stop:
            break
    assert epoch == 4 and stop.stop and stop.best_epoch == 2
    stop.restore(model)
    assert torch.equal(model.weight, states[1])


def test_early_stopping_in_the_stage_restores_each_folds_best(prepared) -> None:
    # a learning rate far too high: the validation loss does not keep falling, so folds stop
    # early and end at their best epoch, which the last report is about
    config = _config(ft_epochs=3, ft_lr=0.5, patience=1)
    fs, states = _head_stage(prepared, config)
    reports: list[tuple[int, dict, bool]] = []
    folds = finetune_folds(states, config, prepared, fs, lambda j, m, f, last: reports.append((j, m, last)))
    assert reports[-1][2]
    for ff in folds:
        losses = ff.early.losses  # the inner split's losses: the validation fold only scores
        assert ff.early.best_epoch == int(np.argmin(losses)) + 1
        assert ff.best["metrics"]["ft_inner_loss"] == min(losses)
        best = ff.early.best_state
        assert all(torch.equal(v, best[k]) for k, v in ff.model.state_dict().items())
    assert reports[-1][1]["ft_epochs_kept"] == np.mean([ff.early.best_epoch for ff in folds])


def test_export_holds_the_finetuned_backbone(prepared, imagenet, tmp_path: Path) -> None:
    config = _config()
    s = prepared.settings
    head_only = export_model(tmp_path / "head", config, prepared, s.epochs, {})
    tuned = export_model(tmp_path / "ft", config, prepared, s.epochs + 1, {"ft_epochs_kept": 1.0})
    m0, meta0 = load_model(head_only)
    m1, meta1 = load_model(tuned)
    assert meta0["finetuned"] is None and meta1["finetuned"]["ft_epochs"] == 1
    b0, b1 = _backbone_state(m0.backbone), _backbone_state(m1.backbone)
    assert all(torch.equal(imagenet[k], b0[k]) for k in imagenet)
    assert any(not torch.equal(imagenet[k], b1[k]) for k in imagenet)


def _write_trial_checkpoint(results: Path, trial_id: str, states, folds, epochs: int) -> None:
    """The checkpoint `run_finetune` reports after its last ft epoch (trainable.train.checkpoint.save_checkpoint with ft_state)."""
    d = results / "tune" / f"run_{trial_id}_00000" / "checkpoint_000001"
    d.mkdir(parents=True)
    save_checkpoint(str(d), states, epochs, [], ft=ft_state(folds, 1))


def test_montage_of_a_finetuned_trial_uses_its_finetuned_backbone(prepared, tuned, tmp_path: Path) -> None:
    config, fs, states, folds, seen = tuned
    _write_trial_checkpoint(tmp_path, "abc12345", states, folds, prepared.settings.epochs)
    picks = pick_images(prepared, 6, prepared.settings.seed)
    fold_states = fold_heads(tmp_path, "abc12345")
    _, preds, lung, edge = trial_cams(prepared, config, fold_states, picks)
    # what the fine-tuning stage reported for the restored (best) ft epoch, per picked image
    fold_of = {int(i): k for k, (_, va) in enumerate(prepared.folds) for i in va}
    want_lung, want_edge, want_pred = [], [], []
    for i in picks:
        best = folds[fold_of[int(i)]].best
        pos = int(np.flatnonzero(best["va"] == i)[0])
        want_lung.append(best["lung_mass"][pos])
        want_edge.append(best["edge_mass"][pos])
        want_pred.append(int(best["probs"][pos].argmax()))
    np.testing.assert_allclose(lung, want_lung, atol=1e-4)
    np.testing.assert_allclose(edge, want_edge, atol=1e-4)
    assert preds.tolist() == want_pred
    # the heads alone on the cached ImageNet maps (what the montage drew before) tell another story
    _, _, head_lung, head_edge = trial_cams(prepared, config, [st.head.state_dict() for st in states], picks)
    assert np.abs(head_lung - lung).max() > 1e-3 or np.abs(head_edge - edge).max() > 1e-3


def test_cam_layer_is_used_by_the_finetuning_stage(prepared) -> None:
    layer = "body.blocks.4"  # stride 16: 4×4 at 64 px, the final layer is 2×2
    at_layer = dataclasses.replace(prepared, settings=dataclasses.replace(prepared.settings, cam_layer=layer))
    config = _config()
    fs, states = _head_stage(at_layer, config)
    folds = finetune_folds(states, config, at_layer, fs)
    s = at_layer.settings
    edge = edge_band(s.input_size, s.edge_band)
    images, y = at_layer.image_array(), np.asarray(at_layer.labels)
    for ff, (_, va) in zip(folds, at_layer.folds):
        assert ff.cam is not None and ff.cam.grid == (4, 4)
        lung = at_layer.lung_masks[0.0][va]
        probs, maps = predict_with_maps(ff.model, images[va], fs.preprocessing, 0.0, s.input_size)
        targets = cam_targets(s.cam_target, y[va], probs, at_layer.classes)
        # a LayerCam built over this fold's own fine-tuned model: the reported masses are its masses
        direct = LayerCam(dataclasses.replace(build_backbone("efficientnet_lite0", "random"),
                                              model=ff.model.backbone), layer, 0.0, s.input_size)
        lm, em = direct.masses(ff.model.head, images[va], targets, lung, edge)
        np.testing.assert_allclose(ff.best["lung_mass"], lm, atol=1e-5)
        np.testing.assert_allclose(ff.best["edge_mass"], em, atol=1e-5)
        final_lm, _ = explanation_scores(ff.model.head, maps, targets, lung, edge)
        assert np.abs(final_lm - lm).max() > 1e-3  # not the final layer's 2×2 masses


def test_early_stopping_never_sees_the_validation_fold(prepared) -> None:
    """Honest CV: each fold early-stops on patients held aside from its *training* patients, and the
    loss it watches is that of those images under the fold's model (recomputed here)."""
    y = np.asarray(prepared.labels)
    for k, (tr, va) in enumerate(prepared.folds):
        fit, stop = inner_split(tr, y, prepared.patients, prepared.settings.seed, k)
        assert len(stop) and set(fit) | set(stop) == set(tr) and not set(stop) & set(va)
        assert not set(prepared.patients[stop]) & set(prepared.patients[fit])  # whole patients
        for c in set(y[tr]):  # every class with two or more training patients is watched
            if len(set(prepared.patients[tr][y[tr] == c])) >= 2:
                assert c in set(y[stop])
    config = _config(ft_epochs=2, ft_lr=1e-3, patience=1)
    fs, states = _head_stage(prepared, config)
    stage = FtStage(states, config, prepared, fs)
    result = stage.run_fold(0, 0)
    fit, stop = stage.splits[0]
    ff = stage.folds[0]
    again = inner_loss(ff.model, prepared.image_array()[stop], y[stop], fs.preprocessing, 0.0, prepared.settings.input_size)
    assert result["metrics"]["ft_inner_loss"] == pytest.approx(again, abs=1e-6) == pytest.approx(ff.early.losses[0], abs=1e-6)
    assert result["metrics"]["ft_inner_loss"] != pytest.approx(result["metrics"]["loss"], abs=1e-9)
