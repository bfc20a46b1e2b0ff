"""The training levers in the fine-tuning stage (trainable.train.ft_levers): `cam_loss` on the live
maps of the augmented batch, and `balance` weights as the head stage computes them.

Exactness: the ft batch's Grad-CAM term and its gradient w.r.t. the backbone's AND the head's
parameters equal Grad-CAM by a forward hook on the full model (real resnet18, random weights,
float64), with the outside-lung weights of the augmented view checked against the lung mask sent
through the *image* path (`geometry`). Then the real stage on a tiny phantom set (efficientnet_lite0,
ImageNet weights offline, 64 px): λ > 0 trains and changes the loss, `balance: group` uses
per-sample weights, a checkpointed λ > 0 stage resumes to the same weights, and the export refit
with both levers writes a model `trainable.load_model` loads and runs.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import trainable
from trainable.cam.explain import edge_band
from trainable.cam.loss import region_weights
from trainable.data.dataset import load_dataset
from trainable.data.images import geometry, mask_geometry
from trainable.data.phantom import synthesize
from trainable.export import export_model, preprocess_image
from trainable.models.backbones import build_backbone
from trainable.models.featureset import FeatureKey
from trainable.models.head import Classifier, Head, weighted_cross_entropy
from trainable.prepare import prepare_local
from trainable.shared import Settings, with_defaults
from trainable.train.balance import epoch_loss_weights
from trainable.train.checkpoint import ft_state
from trainable.train.finetune import FtStage, finetune_all, finetune_folds, model_input, train_mode
from trainable.train.ft_levers import LiveCam, ft_batch_loss, live_cam
from trainable.train.head_stage import new_fold_state, run_epoch

SIZE = 128   # resnet18 at 128 px: a 4×4 map grid


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a trial gets (small autograd steps oversubscribe two shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lungs(n: int, size: int) -> np.ndarray:
    """Two ellipses per image, off-centre and shifted per image, so flips and shifts move them."""
    yy, xx = np.mgrid[:size, :size] / size
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        dy = 0.04 * (i % 3 - 1)
        for cx, ry in ((0.28, 0.3), (0.66, 0.22)):
            out[i] |= ((yy - 0.45 - dy) / ry) ** 2 + ((xx - cx) / 0.15) ** 2 <= 1
    return out


# per image (dx, dy, zoom, angle, hflip, vflip): every kind of move the policies make
PARAMS = np.array([[0.08, -0.05, 1.1, 12.0, 1, 0],
                   [-0.1, 0.04, 0.92, -20.0, 0, 1],
                   [0.0, 0.0, 1.0, 0.0, 1, 0],
                   [0.05, 0.05, 1.05, 35.0, 1, 1]])


def _hook_term(model: Classifier, layer: torch.nn.Module, x: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The reference: Grad-CAM of the full model by a forward hook on the target layer (two classes:
    the logit difference), the gradient w.r.t. the activations averaged over space (create_graph,
    so it stays differentiable), E = Σ α A, share of |E| outside, mean over images."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = seen["a"]
    (grad_a,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), a, create_graph=True)
    cam = (grad_a.mean(dim=(2, 3), keepdim=True) * a).sum(1)
    return ((cam.abs() * outside).flatten(1).sum(1) / cam.abs().flatten(1).sum(1)).mean()


@pytest.mark.parametrize("mode", ["eval", "bn_train"])
def test_live_cam_term_and_gradient_equal_hook_gradcam_on_the_full_model(mode: str) -> None:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", "random")
    # dropout: the term explains the head in eval mode; in the train-mode case dropout is 0 so the
    # reference's forward (train mode) is the same function
    head = Head(bb.num_features, 8, 2, dropout=0.3 if mode == "eval" else 0.0)
    model = Classifier(bb.model, head).double()
    if mode == "eval":
        model.eval()
    else:
        train_mode(model, "train")   # BatchNorm on batch statistics, as ft_bn: train trains
    rng = np.random.default_rng(0)
    base = 160   # base size: the crop margin then resizes to the input size
    images = rng.integers(0, 255, (4, base, base), dtype=np.uint8)
    lungs = _lungs(4, base)
    pre = {"in_chans": bb.preprocessing.in_chans, "mean": bb.preprocessing.mean, "std": bb.preprocessing.std}
    margin = 0.05
    x = model_input(images, pre, margin, SIZE, PARAMS).double()
    target = torch.tensor([0, 1, 1, 0])
    lam = 2.5
    for region in ("outside_lungs", "edge"):
        edge = edge_band(SIZE, 0.2)
        cam = LiveCam(lam, region, np.packbits(lungs, axis=-1), base, margin, SIZE, edge, (4, 4))
        outside = cam.outside(np.arange(4), PARAMS)
        # independently: the mask through the image path (uint8 image → geometry) lands on the same cells
        as_image = geometry((lungs * 255).astype(np.uint8), margin, SIZE, PARAMS)[:, 0].numpy() >= 0.5
        np.testing.assert_array_equal(region_weights(as_image, edge, region, 4, 4).numpy(), outside.numpy())
        unaugmented = region_weights(mask_geometry(lungs, margin, SIZE), edge, region, 4, 4)
        assert (unaugmented - outside).abs().max() > 0.05   # it is the view's mask, not view 0's

        params = [p for p in model.parameters() if p.requires_grad]
        n_backbone = sum(1 for _ in model.backbone.parameters())
        total, term = ft_batch_loss(model, x, target, None, None, (lam, outside))
        assert model.head.training == (mode != "eval")   # the head's mode is restored
        fast = torch.autograd.grad(term, params, allow_unused=True)
        ref = lam * _hook_term(model, model.get_submodule(f"backbone.{bb.target_layer}"), x, outside.double())
        slow = torch.autograd.grad(ref, params, allow_unused=True)

        assert 0 < term.item() < lam and term.item() == pytest.approx(ref.item(), rel=1e-9)
        ce = weighted_cross_entropy(model(x), target, None)
        assert total.item() == pytest.approx(ce.item() + term.item(), rel=1e-9)
        moved = 0
        for i, (g, r) in enumerate(zip(fast, slow)):
            if r is None:   # the last bias: no gradient on either path
                assert g is None or float(g.abs().max()) == 0.0
                continue
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-12)
            moved += i < n_backbone and float(r.abs().max()) > 1e-8
        assert moved > 10   # the loss reaches the backbone's parameters, not only the head's


# --- the real stage on a tiny phantom set ----------------------------------------------------------

KEY = FeatureKey("efficientnet_lite0", "imagenet", 0.0, 64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ftlevers")
    manifest = synthesize(root / "data", n_patients=8, size=64, shortcut=0.5, seed=1, images_per_patient=(2, 2))
    ds = load_dataset(manifest.parent, "covid_vs_rest")
    settings = Settings(folds=2, epochs=1, base_size=64, input_size=64, views=2, cache_dir="off", min_cell=1)
    p = prepare_local(ds, settings, [KEY], ["light"], progress=lambda m: None)
    # the phantom has one source: two groups of different sizes, unequal within each class
    groups = np.where(np.arange(len(p.labels)) % 4 == 0, "small", "big")
    return dataclasses.replace(p, groups=groups)


def _config(**kw) -> dict:
    return with_defaults({"hidden": 16, "batch_size": 8, "augment": "light", "ft_epochs": 1, "ft_lr": 1e-3,
                          "balance": "class", **kw})


@pytest.fixture(scope="module")
def heads(prepared):
    """The head stage (λ = 0) once: every ft run below starts from these heads (deep copies)."""
    config = _config()
    fs = prepared.feature_set(KEY)
    states = [new_fold_state(config, fs.maps.shape[1], 2, k) for k in range(len(prepared.folds))]
    run_epoch(states, config, prepared, fs, 0)
    return fs, states


def test_cam_loss_in_the_ft_stage_trains_and_changes_the_loss(prepared, heads) -> None:
    fs, states = heads
    runs = {}
    for lam in (0.0, 5.0):
        config = _config(cam_loss=lam, cam_loss_region="outside_lungs")
        seen: list[dict] = []
        folds = finetune_folds(copy.deepcopy(states), config, prepared, fs,
                               lambda j, m, f, last, seen=seen: seen.append(m))
        runs[lam] = (seen, folds)
    for seen, _ in runs.values():
        assert len(seen) == 1
        assert all(np.isfinite(v) for v in seen[0].values() if isinstance(v, float))
        assert 0 <= seen[0]["lung_mass"] <= 1
    # λ·share is added to every batch's loss (share ≈ 0.5 here): the training loss is clearly higher
    assert runs[5.0][0][0]["train_loss"] > runs[0.0][0][0]["train_loss"] + 0.5
    w0 = runs[0.0][1][0].model.backbone.state_dict()
    w1 = runs[5.0][1][0].model.backbone.state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)   # the λ term moved the backbone differently
    # λ = 0 pays nothing: no Grad-CAM loss object at all
    assert FtStage(copy.deepcopy(states), _config(), prepared, fs).cam is None


def test_cam_loss_stage_resumes_from_its_checkpoint_to_the_same_weights(prepared, heads) -> None:
    fs, states = heads
    config = _config(cam_loss=2.0, cam_loss_region="edge", ft_epochs=2, patience=0)
    torch.manual_seed(5)
    straight = finetune_folds(copy.deepcopy(states), config, prepared, fs)
    torch.manual_seed(5)
    one = finetune_folds(copy.deepcopy(states), {**config, "ft_epochs": 1}, prepared, fs)
    saved, rng = ft_state(one, 1), torch.get_rng_state()   # what a checkpoint holds (run_trial restores the RNG)
    torch.set_rng_state(rng)
    resumed = finetune_folds(copy.deepcopy(states), config, prepared, fs, resume=copy.deepcopy(saved))
    for a, b in zip(straight, resumed):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.early.losses == b.early.losses


def test_balance_group_in_the_ft_stage_uses_per_sample_weights(prepared, heads) -> None:
    fs, states = heads
    fit = np.arange(len(prepared.labels))
    weight, sample = epoch_loss_weights(_config(balance="group"), prepared, fit)
    assert weight is None and sample is not None and len(sample) == len(fit)
    assert float(sample.mean()) == pytest.approx(1.0) and len(set(sample.tolist())) > 2

    def first_fold_loss(config: dict, p=prepared) -> float:
        torch.manual_seed(3)
        return FtStage(copy.deepcopy(states), config, p, fs).run_fold(0, 0)["metrics"]["train_loss"]

    by_class = first_fold_loss(_config(balance="class"))
    # one group: every (group × class) cell is a class, so group weights are the class weights
    one_group = dataclasses.replace(prepared, groups=np.full(len(prepared.labels), "all"))
    assert first_fold_loss(_config(balance="group"), one_group) == pytest.approx(by_class, rel=1e-5)
    # two unequal groups: other weights, another loss
    assert abs(first_fold_loss(_config(balance="group")) - by_class) > 1e-4


def test_export_refit_with_cam_loss_and_group_balance_loads_and_predicts(prepared, heads, tmp_path: Path) -> None:
    fs, states = heads
    config = _config(cam_loss=3.0, balance="group")
    out = export_model(tmp_path / "best", config, prepared, prepared.settings.epochs + 1, {"ft_epochs_kept": 1.0})
    model, meta = trainable.load_model(out)
    assert meta["finetuned"]["ft_epochs"] >= 1 and meta["config"]["cam_loss"] == 3.0
    x = preprocess_image(prepared.image_array()[0], meta)
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert probs.shape == (1, 2) and torch.isfinite(probs).all()
    # the refit applies the levers: the same refit without them ends elsewhere
    head = copy.deepcopy(states[0].head)
    with_levers, _ = finetune_all(config, prepared, fs, copy.deepcopy(head), 1)
    without, _ = finetune_all(_config(balance="class"), prepared, fs, copy.deepcopy(head), 1)
    a, b = with_levers.state_dict(), without.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert live_cam(config, prepared, fs.maps.shape[2:]) is not None
