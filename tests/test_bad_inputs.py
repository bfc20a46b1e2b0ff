"""Bad input is refused before any work: one line on stderr naming the file, row or field and the
rule, exit code 2, no traceback, and nothing on disk changed (nothing created, nothing rewritten).

Every case but the `resources` one is found before Ray starts; the `resources` one needs the
cluster's size, so it is its own test."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import TINY_SPACE, cxrtune, write_manifest_dataset

BASE_SPACE = """
name: bad
folds: 2
epochs: 1
num_samples: 2
space:
  backbone: efficientnet_lite0
  weights: random
  hidden: {choice: [8, 16]}
"""
RANGES = {  # space parameter → a range that reaches an invalid value only when sampled
    "lr": "{uniform: [-0.01, 0.01]}",
    "hidden": "{randint: [0, 4]}",
    "dropout": "{uniform: [0.5, 1.0]}",
    "batch_size": "{randint: [0, 32]}",
    "ft_lr": "{uniform: [0.0, 0.001]}",
    "weight_decay": "{uniform: [-0.1, 0.1]}",
}
CONFIG = {"backbone": "efficientnet_lite0", "weights": "imagenet", "hidden": 8, "lr": 1e-2,
          "augment": "none", "crop_margin": 0.0}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input the cases need, made once: space files, a real exported model and broken copies
    of it, data with one unknown label, an old sweep directory, non-images."""
    from trainable.data.dataset import load_dataset
    from trainable.export import export_model
    from trainable.models.featureset import FeatureKey
    from trainable.prepare import prepare_local
    from trainable.shared import Settings

    w = tmp_path_factory.mktemp("bad")
    for key, rng in RANGES.items():
        text = BASE_SPACE.replace("  hidden: {choice: [8, 16]}", f"  hidden: 8\n  {key}: {rng}") \
            if key == "hidden" else BASE_SPACE + f"  {key}: {rng}\n"
        (w / f"{key}.yaml").write_text(text.replace("  hidden: 8\n  hidden:", "  hidden:"))
    data = write_manifest_dataset(w / "data", n_patients=6, size=32)
    settings = Settings(folds=2, base_size=32, input_size=32, views=1)
    key = FeatureKey(CONFIG["backbone"], CONFIG["weights"], CONFIG["crop_margin"], settings.input_size)
    prepared = prepare_local(load_dataset(data, "covid_vs_rest"), settings, [key], ["none"], progress=lambda m: None)
    model = export_model(w / "model", CONFIG, prepared, epochs=1, metrics={})
    for name in ("corrupt_meta", "partial_meta", "no_weights"):
        shutil.copytree(model, w / name)
    (w / "corrupt_meta" / "metadata.json").write_text('{"backbone": "efficientnet_li')
    (w / "partial_meta" / "metadata.json").write_text(json.dumps({"backbone": "efficientnet_lite0", "classes": ["rest", "covid"]}))
    (w / "no_weights" / "model.pt").unlink()
    flu = shutil.copytree(data, w / "flu")
    table = pd.read_csv(flu / "manifest.csv")
    table.loc[3, "label"] = "flu"
    table.to_csv(flu / "manifest.csv", index=False)
    old = w / "results" / "old"
    old.mkdir(parents=True)
    (old / "space.json").write_text("{}")
    (old / "trials.csv").write_text("trial_id\n1\n")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(w / "good.png")
    (w / "fake.dcm").write_text("this is a text file with a DICOM name\n")
    (w / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    (w / "tiny.yaml").write_text(TINY_SPACE)
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


CASES = [  # (case, command with {w} for the work directory, exit code, regex the one stderr line matches)
    *[(f"space-{key}-range", f"run --space {{w}}/{key}.yaml --out {{w}}/runs", 2,
       rf"error: {{w}}/{key}\.yaml: space\.{key}: \w+ \[.*\] can draw .*, but {key} must be") for key in RANGES],
    ("select-within-5", "select {w}/results/old --within 5", 2, r"error: within \(--within\) must be in \[0, 1\].*got 5\)"),
    ("select-within-negative", "select {w}/results/old --within -0.1", 2, r"error: within \(--within\) must be in \[0, 1\].*got -0\.1\)"),
    ("select-metric-nonsense", "select {w}/results/old --metric nonsense", 2,
     r"error: metric \(--metric\) 'nonsense' is not one .*valid: balanced_accuracy, macro_f1, auc, accuracy"),
    ("evaluate-corrupt-metadata", "evaluate --model {w}/corrupt_meta --data {w}/data", 2,
     r"error: {w}/corrupt_meta/metadata\.json: not valid JSON"),
    ("evaluate-partial-metadata", "evaluate --model {w}/partial_meta --data {w}/data", 2,
     r"error: {w}/partial_meta/metadata\.json: missing field\(s\) num_features, hidden, dropout, preprocessing"),
    ("explain-partial-metadata", "explain {w}/good.png --model {w}/partial_meta --out {w}/explained", 2,
     r"error: {w}/partial_meta/metadata\.json: missing field\(s\)"),
    ("evaluate-no-model-pt", "evaluate --model {w}/no_weights --data {w}/data", 2,
     r"error: {w}/no_weights/model\.pt is missing"),
    ("explain-no-model-pt", "explain {w}/good.png --model {w}/no_weights --out {w}/explained", 2,
     r"error: {w}/no_weights/model\.pt is missing"),
    ("evaluate-unknown-label", "evaluate --model {w}/model --data {w}/flu", 2,
     r"error: {w}/flu: label\(s\) 'flu' do not match the model's classes \['rest', 'covid'\].*"
     r"\(first rows: 'flu' at image img3, images/3\.png\)$"),
    ("run-into-old-sweep", "run --space {w}/tiny.yaml --out {w}/results --name old", 2,
     r"error: {w}/results/old already holds results; choose another --name \(nothing was changed\)"),
    ("run-out-is-a-sweep", "run --space {w}/tiny.yaml --out {w}/results/old --name new", 2,
     r"error: --out {w}/results/old: {w}/results/old is a sweep's results directory"),
    ("explain-dcm-not-dicom", "explain {w}/good.png {w}/fake.dcm --model {w}/model --out {w}/explained", 2,
     r"error: cannot read image {w}/fake\.dcm: not a DICOM file \(no DICM marker at byte 128"),
    ("explain-broken-second-image", "explain {w}/good.png {w}/broken.png --model {w}/model --out {w}/explained", 2,
     r"error: cannot read image {w}/broken\.png"),
    ("explain-missing-image", "explain {w}/good.png {w}/nowhere.png --model {w}/model --out {w}/explained", 2,
     r"error: image {w}/nowhere\.png does not exist"),
]


@pytest.mark.parametrize("case, command, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(work: Path, case: str, command: str, code: int,
                                                          pattern: str) -> None:
    before = _snapshot(work)
    proc = cxrtune(*command.format(w=work).split(), timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert re.search(pattern.replace("{w}", re.escape(str(work))), lines[0]), lines[0]
    assert _snapshot(work) == before  # a failed explain leaves no (empty or partial) --out behind


def test_resources_larger_than_the_machine(work: Path, tmp_path: Path) -> None:
    """Found right after `ray.init`, before any image is decoded into features or any trial starts."""
    space = tmp_path / "big.yaml"
    space.write_text(TINY_SPACE + "resources: {cpus_per_trial: 64}\n")
    proc = cxrtune("run", "--space", str(space), "--data", str(work / "data"), "--out", str(tmp_path / "r"),
                   "--name", "big", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"error: resources\.cpus_per_trial is 64 but the largest node of the Ray cluster has \d+ CPU",
                     last), last
    assert "computing frozen-backbone features" not in proc.stderr
    assert not (tmp_path / "r" / "big" / "trials.csv").exists()
