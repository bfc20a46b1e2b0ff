"""The head stage's Grad-CAM loss (trainable.cam.loss) and group-balanced training
(trainable.train.balance).

Exactness: the loss and its gradient w.r.t. the head's parameters equal an independent
computation — Grad-CAM by hooks on the full model `Classifier(backbone, head)` of a real (random
weights) resnet18 at the backbone's target layer, in float64, differentiated by autograd and
checked by central finite differences. Effect: on synthetic maps where an outside-lung channel
carries the label perfectly (a shortcut) and an inside-lung channel carries it less reliably,
λ > 0 changes the head's decisions: with the shortcut shuffled it is clearly more accurate.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from search.space import SpaceError, load_space
from trainable.cam.explain import edge_band
from trainable.cam.loss import cam_loss, outside_share, region_weights, signed_evidence
from trainable.data.dataset import load_dataset
from trainable.data.phantom import synthesize
from trainable.export import refit_head
from trainable.models.backbones import build_backbone
from trainable.models.featureset import FeatureKey
from trainable.models.head import Classifier, Head, class_weights, predict_proba, train_one_epoch
from trainable.prepare import prepare_local
from trainable.shared import Settings, with_defaults
from trainable.train.balance import balance_mode, group_weights, loss_weights
from trainable.train.head_stage import CamTerm, HeadStage, cached_scoring, new_fold_state
from trainable.train.lockstep import run_lockstep

SIZE = 128   # resnet18: a 4×4 map grid


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a trial gets: small autograd steps are many times slower with two
    threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_backbone("resnet18", "random")


def _lungs(n: int, size: int = SIZE) -> np.ndarray:
    """Two ellipses per image, shifted a little per image (bool (n, size, size))."""
    yy, xx = np.mgrid[:size, :size] / size
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        dy = 0.03 * (i % 3 - 1)
        for cx in (0.3, 0.7):
            out[i] |= ((yy - 0.5 - dy) / 0.3) ** 2 + ((xx - cx) / 0.16) ** 2 <= 1
    return out


def _hook_loss(model: Classifier, layer: torch.nn.Module, x: torch.Tensor, outside: torch.Tensor,
               n_classes: int) -> torch.Tensor:
    """The reference: Grad-CAM of the full model by a forward hook on the target layer. The
    gradient of the explained output w.r.t. the layer's activations, averaged over space (Grad-CAM's
    channel weights), weights the activations; signed map → outside share → mean over images."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = seen["a"]
    outputs = [logits[:, 1] - logits[:, 0]] if n_classes == 2 else [logits[:, c] for c in range(n_classes)]
    shares = []
    for out in outputs:
        (grad_a,) = torch.autograd.grad(out.sum(), a, create_graph=True, retain_graph=True)
        cam = (grad_a.mean(dim=(2, 3), keepdim=True) * a).sum(1)            # signed, (N, h, w)
        shares.append((cam.abs() * outside).flatten(1).sum(1) / cam.abs().flatten(1).sum(1))
    return torch.stack(shares, 1).mean(1).mean()


@pytest.mark.parametrize("n_classes", [2, 3])
def test_loss_and_gradient_equal_hook_gradcam_on_the_full_model(resnet18, n_classes: int) -> None:
    torch.manual_seed(1)
    bb = resnet18
    head = Head(bb.num_features, 8, n_classes, dropout=0.3).double()
    model = Classifier(bb.model, head).double().eval()
    x = torch.randn(4, bb.preprocessing.in_chans, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        maps = bb.model(x)   # what the feature cache holds: constants for the head stage
    assert maps.shape[2:] == (4, 4)
    lungs = _lungs(4)
    for region in ("outside_lungs", "edge"):
        outside = region_weights(lungs, edge_band(SIZE, 0.2), region, 4, 4).double()
        params = list(head.parameters())

        head.train()   # the loss explains the head as it predicts: dropout off
        fast = cam_loss(head, maps, outside)
        assert head.training
        fast_grads = torch.autograd.grad(fast, params, allow_unused=True)

        model.eval()
        ref = _hook_loss(model, model.get_submodule(f"backbone.{bb.target_layer}"), x, outside, n_classes)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)

        assert 0.0 < fast.item() < 1.0
        assert fast.item() == pytest.approx(ref.item(), abs=1e-10)
        # the last bias moves no gradient, so neither path depends on it
        assert fast_grads[-1] is None and ref_grads[-1] is None
        for g, r in zip(fast_grads[:-1], ref_grads[:-1]):
            assert torch.allclose(g, r, rtol=1e-7, atol=1e-10)
        assert max(float(g.abs().max()) for g in fast_grads[:-1]) > 1e-4   # the gradient is not trivially 0

    # central finite differences on a few parameters of the last and the first layer
    w = head.net[3].weight
    for p, idx in ((w, (n_classes - 1, 2)), (head.net[0].weight, (3, 7)), (head.net[0].bias, (5,))):
        (g,) = torch.autograd.grad(cam_loss(head, maps, outside), [p])
        h = 1e-6
        with torch.no_grad():
            p[idx] += h
            up = float(cam_loss(head, maps, outside))
            p[idx] -= 2 * h
            down = float(cam_loss(head, maps, outside))
            p[idx] += h
        assert float(g[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-8)


def test_region_weights_are_cell_fractions() -> None:
    lung = np.zeros((1, 8, 8), bool)
    lung[0, :, 2:4] = True              # 2×2 cells of 4 px: the lungs fill half of the two left cells
    out = region_weights(lung, edge_band(8, 0.125), "outside_lungs", 2, 2)[0]
    assert out.tolist() == [[0.5, 1.0], [0.5, 1.0]]
    # a 1-px band: 7 px per cell, 2 of them on the lungs in the left cells
    edge = region_weights(lung, edge_band(8, 0.125), "edge", 2, 2)[0]
    assert edge.tolist() == [[5 / 16, 7 / 16], [5 / 16, 7 / 16]]
    with pytest.raises(ValueError, match="cam_loss_region"):
        region_weights(lung, edge_band(8, 0.1), "corners", 2, 2)


def test_signed_evidence_is_the_logit_difference_map() -> None:
    """Two classes: one map per image, E = Σ_k alpha_k A^k of y_1 − y_0 (sign kept)."""
    head = Head(2, 2, 2, dropout=0.0)
    with torch.no_grad():
        head.net[0].weight.copy_(torch.eye(2))
        head.net[0].bias.fill_(10.0)        # both hidden units active: the head is linear here
        head.net[3].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        head.net[3].bias.zero_()
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 0, 0] = 4.0                  # channel 0 (votes class 1) fires at the top-left cell
    maps[0, 1, 1, 1] = 2.0                  # channel 1 (votes class 0) at the bottom-right
    e = signed_evidence(head, maps)
    assert e.shape == (1, 1, 2, 2)
    assert e[0, 0].tolist() == [[1.0, 0.0], [0.0, -0.5]]   # alpha = (±1)/4
    outside = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert outside_share(e, outside)[0].item() == pytest.approx(1.0 / 1.5)
    # no evidence at all (a dead head) counts as a uniform map, not as a perfect one
    assert outside_share(torch.zeros(1, 1, 2, 2), outside)[0].item() == pytest.approx(0.25)


def _shortcut_maps(n: int, rng: np.random.Generator, shuffle_shortcut: bool = False):
    """Synthetic 4×4 maps of 6 channels; the lungs are the centre 2×2 cells (16-px input).
    Channel 0 fires at the top-left corner cell (outside the lungs) exactly when y = 1: a perfect
    shortcut. Channel 1 fires on the lungs when a label flipped for 25% of images is 1. The rest is
    noise everywhere."""
    y = rng.integers(0, 2, n)
    maps = rng.normal(0, 0.3, (n, 6, 4, 4)).clip(0, None)
    short = y if not shuffle_shortcut else rng.permutation(y)
    maps[:, 0, 0, 0] += 3.0 * short
    lung_label = np.where(rng.random(n) < 0.25, 1 - y, y)
    maps[:, 1, 1:3, 1:3] += 1.0 * lung_label[:, None, None]
    lungs = np.zeros((n, 16, 16), bool)
    lungs[:, 4:12, 4:12] = True
    return torch.tensor(maps, dtype=torch.float32), torch.as_tensor(y), lungs


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in (0, 1)]))


def test_cam_loss_changes_decisions_not_only_the_map() -> None:
    rng = np.random.default_rng(0)
    maps, y, lungs = _shortcut_maps(600, rng)
    test_maps, test_y, test_lungs = _shortcut_maps(600, rng, shuffle_shortcut=True)
    pooled = maps.mean(dim=(2, 3))
    outside = region_weights(lungs, edge_band(16, 0.0), "outside_lungs", 4, 4)
    test_outside = region_weights(test_lungs, edge_band(16, 0.0), "outside_lungs", 4, 4)
    scores, shares = {}, {}
    for lam in (0.0, 2.0):
        torch.manual_seed(0)
        head = Head(6, 16, 2, dropout=0.0)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        term = CamTerm(lam, maps, pooled, outside) if lam > 0 else None
        for _ in range(30):
            train_one_epoch(head, opt, pooled, y, 32, gen, None,
                            penalty=None if term is None else term.penalty(head, np.arange(len(y))))
        pred = predict_proba(head, test_maps.mean(dim=(2, 3))).argmax(1)
        scores[lam] = _balanced_accuracy(test_y.numpy(), pred)
        with torch.no_grad():
            shares[lam] = float(cam_loss(head, test_maps, test_outside))
    # λ = 0 reads the corner; λ > 0 the lungs (≈ 0.75 reliable) — a decision change, not a map change
    assert scores[2.0] >= scores[0.0] + 0.05, scores
    assert scores[2.0] >= 0.68, scores
    assert shares[2.0] < shares[0.0] - 0.2, shares


def test_group_weights_make_every_cell_weigh_the_same() -> None:
    # class 0: group a ×6, b ×2 (small), c ×1 (small); class 1: a ×3 (small), b ×5, c ×8
    y = np.array([0] * 9 + [1] * 16)
    groups = np.array(list("aaaaaabbc") + list("aaabbbbbcccccccc"))
    w = group_weights(y, groups, min_cell=5)
    assert w.mean() == pytest.approx(1.0)
    cells = {"0a": (y == 0) & (groups == "a"), "0small": (y == 0) & np.isin(groups, ["b", "c"]),
             "1small": (y == 1) & (groups == "a"), "1b": (y == 1) & (groups == "b"),
             "1c": (y == 1) & (groups == "c")}
    totals = [w[m].sum() for m in cells.values()]
    assert totals == pytest.approx([len(y) / len(cells)] * len(cells))
    for m in cells.values():   # within a cell every image weighs the same
        assert np.ptp(w[m]) == pytest.approx(0.0)
    # with min_cell 1 every (group × class) cell is its own
    w1 = group_weights(y, groups, min_cell=1)
    assert [w1[(y == c) & (groups == g)].sum() for c in (0, 1) for g in "abc"] == pytest.approx([len(y) / 6] * 6)


def test_balance_modes_and_the_class_weighted_default() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    groups = np.array(["a"] * 6)
    assert balance_mode({"balance": "auto", "class_weighted": True}) == "class"
    assert balance_mode({"balance": "auto", "class_weighted": False}) == "none"
    assert balance_mode({"balance": "group", "class_weighted": False}) == "group"
    weight, sw = loss_weights({"balance": "class"}, y, groups, 3, 5)
    assert sw is None and torch.equal(weight, class_weights(y, 3))   # today's class weights, unchanged
    assert loss_weights({"balance": "auto", "class_weighted": False}, y, groups, 3, 5) == (None, None)
    # per-sample weights equal to the class weights give the class-weighted cross-entropy
    logits, yt = torch.randn(6, 3), torch.as_tensor(y)
    ce = torch.nn.functional.cross_entropy(logits, yt, weight=weight)
    sample = weight[yt]
    per = (torch.nn.functional.cross_entropy(logits, yt, reduction="none") * sample).sum() / sample.sum()
    assert float(per) == pytest.approx(float(ce), rel=1e-6)
    # one group: group balance is class balance (every class one cell)
    _, gw = loss_weights({"balance": "group"}, y, groups, 3, 1)
    assert torch.allclose(gw, sample / sample.mean())


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):
    """16 phantom images at 96 px (efficientnet_lite0, ImageNet weights offline: a 3×3 grid), two
    groups that cut across the classes."""
    root = tmp_path_factory.mktemp("camloss")
    manifest = synthesize(root / "data", n_patients=8, size=96, shortcut=0.9, seed=2, images_per_patient=(2, 2))
    ds = load_dataset(manifest.parent, "covid_vs_rest")
    settings = Settings(folds=2, epochs=EPOCHS, base_size=96, input_size=96, views=2, cache_dir="off", min_cell=2)
    key = FeatureKey("efficientnet_lite0", "imagenet", 0.0, 96)
    prepared = prepare_local(ds, settings, [key], ["light"], progress=lambda m: None)
    groups = np.array(["a", "a", "a", "b"] * (len(prepared.labels) // 4))
    return dataclasses.replace(prepared, groups=groups), prepared.feature_set(key)


EPOCHS = 20


def _config(**kw) -> dict:
    return with_defaults({"hidden": 16, "batch_size": 4, "augment": "light", "lr": 1e-2, "dropout": 0.0, **kw})


def _train_share(prepared, fs, heads) -> float:
    """The mean outside-lung share of the heads' signed evidence on their training images."""
    sc = cached_scoring(_config(), prepared, fs)
    s = prepared.settings
    outside = region_weights(prepared.lung_masks[0.0], edge_band(s.input_size, s.edge_band), "outside_lungs",
                             *sc.maps.shape[2:])
    with torch.no_grad():
        return float(np.mean([cam_loss(h, sc.maps[tr], outside[tr], sc.pooled[tr]).item()
                              for h, (tr, _) in zip(heads, prepared.folds)]))


def test_head_stage_and_refit_train_with_the_levers(phantom) -> None:
    prepared, fs = phantom
    shares, reported = {}, {}
    for lam in (0.0, 10.0):
        config = _config(cam_loss=lam, balance="group")
        states = [new_fold_state(config, fs.maps.shape[1], 2, k) for k in range(len(prepared.folds))]
        stage = HeadStage(states, config, prepared, fs)
        assert (stage.cam_term is None) == (lam == 0)   # λ = 0: the fast path does no extra work
        if lam:
            assert stage.cam_term.maps is stage.scoring.maps   # the scoring's float32 copy, not a second one
        seen = []
        run_lockstep(stage, prepared, range(EPOCHS), lambda e, m, last: seen.append(m))
        shares[lam] = _train_share(prepared, fs, [st.head for st in states])
        reported[lam] = seen[-1]
    # measured: 0.79 (λ = 0) vs 0.70 (λ = 10) on a 3×3 grid where the phantom's lungs are a fifth of the input
    assert shares[10.0] < shares[0.0] - 0.05, shares
    assert np.isfinite(reported[10.0]["train_loss"]) and "focus" in reported[10.0]

    # the export refit trains the same way: its balance and its Grad-CAM loss
    heads = {name: refit_head(_config(**kw), prepared, fs, EPOCHS) for name, kw in
             {"class": {"balance": "class"}, "group": {"balance": "group"},
              "group_cam": {"balance": "group", "cam_loss": 10.0}}.items()}
    w = {k: h.net[0].weight.detach() for k, h in heads.items()}
    assert not torch.allclose(w["class"], w["group"]) and not torch.allclose(w["group"], w["group_cam"])
    everything = [(np.arange(len(prepared.labels)), None)]
    assert _train_share(dataclasses.replace(prepared, folds=everything), fs, [heads["group_cam"]]) < \
        _train_share(dataclasses.replace(prepared, folds=everything), fs, [heads["group"]])


@pytest.mark.parametrize("space, message", [
    ("{cam_loss: -0.5}", "cam_loss must be a number >= 0"),
    ("{cam_loss: {uniform: [-1.0, 2.0]}}", "space.cam_loss: uniform [-1.0, 2.0] can draw -1.0"),
    ("{cam_loss_region: corners}", "cam_loss_region must be one of ['outside_lungs', 'edge']"),
    ("{balance: {choice: [none, groups]}}", "balance must be one of ['none', 'class', 'group']"),
    ("{balance: group, class_weighted: true}", "space.balance: set balance or class_weighted, not both"),
])
def test_space_file_checks_the_levers(tmp_path, space: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"num_samples: 1\nspace: {space}\n")
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    path.write_text("num_samples: 4\nspace: {cam_loss: {choice: [0.0, 1.0, 10.0]}, cam_loss_region: edge, "
                    "balance: {choice: [none, class, group]}, lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    assert load_space(path).searched() == ["cam_loss", "balance", "lr"]
