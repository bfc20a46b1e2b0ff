"""`cxrtune data check`: counts, duplicates, confounding; unreadable files one per line; exit 0 / 2."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import REAL_DATA, write_manifest_dataset
from trainable.data.datacheck import check_data, difference_hash

ROOT = Path(__file__).resolve().parents[1]


def _cxrtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _folders_with_bad_files(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("normal", "covid"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / cls / f"{i}.png")
    good = (root / "normal" / "0.png").read_bytes()
    (root / "normal" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "covid" / "notes.png").write_text("this is a text file, not a PNG")
    return root


def test_truncated_and_fake_png_are_listed_file_by_file_and_exit_2(tmp_path: Path) -> None:
    root = _folders_with_bad_files(tmp_path / "bad")
    proc = _cxrtune("data", "check", str(root))
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout.splitlines()
    truncated = [line for line in out if "truncated.png" in line]
    fake = [line for line in out if "notes.png" in line]
    assert len(truncated) == 1 and "unreadable image" in truncated[0] and "truncated" in truncated[0]
    assert len(fake) == 1 and "unreadable image" in fake[0] and "cannot identify image file" in fake[0]
    assert "result: NOT usable (2 problem(s)" in proc.stdout
    assert "images: 8 (6 readable)" in proc.stdout


def test_counts_masks_and_duplicates_across_patients(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d", n_patients=6, per_patient=2, size=48)
    img = root / "images"
    shutil.copy(img / "0.png", img / "3.png")                    # exact copy under another patient
    a = np.asarray(Image.open(img / "4.png"), np.int16)
    Image.fromarray(np.clip(a + 6, 0, 255).astype(np.uint8)).save(img / "7.png")   # brighter: near copy
    result = check_data(root)
    assert result.usable, result.problems
    s = result.summary
    assert s["images"] == 12 and s["by_label"] == {"normal": 6, "covid": 6} and s["patients"] == 6
    assert s["images_per_patient"] == {"2": 6} and s["masks"] == 12 and s["sizes"] == {"48x48": 12}
    groups = {tuple(d["ids"]): d for d in s["duplicates"]}
    exact = groups[("img0", "img3")]
    near = groups[("img4", "img7")]
    assert exact["kind"] == "exact" and exact["across_patients"] and exact["patients"] == ["p0", "p1"]
    assert exact["across_labels"]                                 # p0 normal, p1 covid
    assert near["kind"] == "near" and near["across_patients"]
    text = "\n".join(result.lines)
    assert "exact [ACROSS PATIENTS, DIFFERENT LABELS]: img0, img3 (p0, p1)" in text
    assert any("span patients" in w for w in result.warnings)


def test_dhash_ignores_brightness_and_tells_images_apart() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 200, (64, 64), dtype=np.uint8)
    b = rng.integers(0, 200, (64, 64), dtype=np.uint8)
    ha, hb = difference_hash(Image.fromarray(a)), difference_hash(Image.fromarray(a + 40))
    assert ha.shape == (256,) and (ha != hb).sum() == 0
    assert (ha != difference_hash(Image.fromarray(b))).sum() > 64


def test_missing_file_and_wrong_size_mask_are_problems(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d")
    (root / "images" / "2.png").unlink()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "5.png")
    result = check_data(root)
    assert not result.usable
    assert any(p.startswith("missing image") and p.endswith("images/2.png: does not exist") for p in result.problems)
    assert any("masks/5.png: is 12x10 but its image" in p for p in result.problems)


def test_one_patient_per_label_is_not_usable_and_group_by_column(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d", n_patients=3, labels=("normal", "covid", "covid"))
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    df["site"] = np.where(df["label"] == "covid", "A", "B")
    df.to_csv(root / "manifest.csv", index=False)
    result = check_data(root, group_by="site")
    assert any("label 'normal' has 1 patient" in p for p in result.problems)
    assert result.summary["confounding"]["column"] == "site"
    assert result.summary["confounding"]["cramers_v"] == pytest.approx(1.0)


def test_unknown_group_by_column_is_one_line_exit_2(tmp_path: Path) -> None:
    root = write_manifest_dataset(tmp_path / "d")
    proc = _cxrtune("data", "check", str(root), "--group-by", "scanner")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "group-by column 'scanner' is not in the data" in lines[0]


@pytest.mark.skipif(not (REAL_DATA / "manifest.csv").is_file(), reason="cxr-real is not on this machine")
def test_cxr_real_is_usable_and_shows_the_source_confound() -> None:
    proc = _cxrtune("data", "check", str(REAL_DATA))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "images: 999 (999 readable), patients: 963, labels: 3" in out
    assert "by label: pneumonia 472 · normal 450 · covid 77" in out
    assert "by source: kermany 900 · ieee8023 99" in out
    assert "lung masks: 74 of 999" in out
    assert ("warning: every `normal` image comes from `kermany` and no `covid` image does: "
            "a model can separate `normal` from `covid` by source alone") in out
    assert out.rstrip().endswith("result: usable")
