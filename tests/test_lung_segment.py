"""Lung-mask sources (`lung_masks: auto | data | atlas | pspnet`) and torchxrayvision's PSPNet path.

Offline here PSPNet's weights are absent: a `pspnet` sweep must fail before any work, naming the file
and the places looked at. The post-processing (left + right lung channels → one bool mask at the
frame size) runs on a real PSPNet module with random weights (built without xrv's downloading
constructor) and on hand-made logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_SPACE, cxrtune
from trainable.cam.lung_segment import (
    PSPNET_FILE,
    LungSegmentationError,
    build_pspnet,
    choose_lung_masks,
    lung_channels,
    lung_mask_from_output,
    pspnet_masks,
    pspnet_weights,
    pspnet_weights_places,
)
from trainable.errors import DataError


@pytest.fixture
def no_pspnet_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchxrayvision cache, downloads off (the real environment variables, no mocks)."""
    cache = tmp_path / "xrv-cache"
    monkeypatch.setenv("CXRTUNE_XRV_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CXRTUNE_PSPNET_WEIGHTS", raising=False)
    if any(p.is_file() for p in pspnet_weights_places()):
        pytest.skip("PSPNet weights are present in ~/.torchxrayvision on this machine")
    return cache


def test_missing_weights_error_names_the_file_and_every_place(no_pspnet_weights: Path) -> None:
    with pytest.raises(LungSegmentationError) as e:
        pspnet_weights()
    msg = str(e.value)
    assert "\n" not in msg and PSPNET_FILE in msg and "HF_HUB_OFFLINE is set" in msg
    assert str(no_pspnet_weights / PSPNET_FILE) in msg and ".torchxrayvision/models_data" in msg
    assert not no_pspnet_weights.exists()  # nothing downloaded, no directory made


def test_pspnet_sweep_fails_before_any_work(tmp_path: Path, no_pspnet_weights: Path) -> None:
    space = tmp_path / "pspnet.yaml"
    space.write_text(TINY_SPACE + "lung_masks: pspnet\n")
    proc = cxrtune("run", "--space", str(space), "--out", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert PSPNET_FILE in proc.stderr and str(no_pspnet_weights / PSPNET_FILE) in proc.stderr
    assert not (tmp_path / "results").exists() and not no_pspnet_weights.exists()


def test_lung_channels_union_resized_to_the_frame() -> None:
    left, right = lung_channels()
    assert (left, right) == (4, 5)  # "Left Lung", "Right Lung" in xrv's PSPNet.targets
    logits = torch.full((2, 14, 512, 512), -5.0)
    logits[0, left, 100:400, 60:240] = 5.0     # left lung only
    logits[0, right, 100:400, 280:460] = 5.0   # right lung only
    logits[0, 8, :, :] = 9.0                    # the heart channel is not lung
    mask = lung_mask_from_output(logits, 64)
    assert mask.shape == (2, 64, 64) and mask.dtype == bool
    expected = np.zeros((64, 64), bool)
    expected[13:50, 8:30] = True
    expected[13:50, 35:57] = True
    # both lungs, nothing else; boundaries within one pixel of the scaled rectangles
    assert (mask[0] != expected).sum() <= 4 * (37 + 22)
    assert mask[0, 30, 18] and mask[0, 30, 45] and not mask[0, 30, 32] and not mask[0, 5, 5]
    assert not mask[1].any()
    with pytest.raises(ValueError, match="must be"):
        lung_mask_from_output(logits[0], 64)


def test_real_pspnet_module_output_goes_through_the_post_processing() -> None:
    net = build_pspnet(None)  # xrv's ChestX-Det PSPNet network, random weights, no download
    assert not net.training
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 96, 96))  # any size runs; the sweep feeds 512 (xrv's native)
    assert out.shape == (1, 14, 96, 96)
    mask = lung_mask_from_output(out, 80)
    assert mask.shape == (1, 80, 80) and mask.dtype == bool
    left, right = lung_channels()
    either = (torch.maximum(out[0, left], out[0, right]) > 0).numpy()
    assert mask[0].mean() == pytest.approx(either.mean(), abs=0.05)


def test_mask_sources_auto_data_atlas(tmp_path: Path) -> None:
    images = np.zeros((3, 16, 16), np.uint8)
    data = np.zeros((3, 16, 16), bool)
    data[0, 4:12, 4:12] = True
    has = np.array([True, False, True])
    atlas = np.zeros((16, 16), bool)
    atlas[2:14, 2:8] = True
    args = dict(images=images, data_masks=data, has_mask=has, ids=["a", "b", "c"], images_digest="x",
                root=None, atlas=lambda: atlas)
    masks, src = choose_lung_masks("auto", **args)
    assert src.tolist() == ["data", "atlas", "data"] and (masks[1] == atlas).all() and (masks[0] == data[0]).all()
    masks, src = choose_lung_masks("atlas", **args)
    assert src.tolist() == ["atlas"] * 3 and all((m == atlas).all() for m in masks)
    with pytest.raises(DataError, match=r"lung_masks: data needs a lung mask .* 1 of 3 have none \(first: b\)"):
        choose_lung_masks("data", **args)


@pytest.mark.slow  # writes a 270 MB random state dict and runs PSPNet at 512 px on the CPU (~1–2 min)
def test_pspnet_masks_load_a_weights_file_and_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / PSPNET_FILE
    # saved the way the release file is (from DataParallel: `module.` prefixes)
    torch.save({f"module.{k}": v for k, v in build_pspnet(None).state_dict().items()}, weights)
    monkeypatch.setenv("CXRTUNE_PSPNET_WEIGHTS", str(weights))
    images = np.random.default_rng(0).integers(0, 255, (1, 64, 64), dtype=np.uint8)
    logs: list[str] = []
    first = pspnet_masks(images, "digest-1", tmp_path / "cache", logs.append)
    assert first.shape == (1, 64, 64) and first.dtype == bool and "segmented" in logs[-1]
    again = pspnet_masks(images, "digest-1", tmp_path / "cache", logs.append)
    assert "read from the disk cache" in logs[-1] and (again == first).all()
