"""A failed run never blocks its re-run: a sweep whose data has a corrupt image stops before Ray
starts (exit 2, one line naming the file); once the image is fixed, `cxrtune run` with the same
--name reuses the directory and finishes."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cxrtune, write_manifest_dataset

SPACE = """
name: rerun
task: covid_vs_rest
folds: 2
epochs: 1
num_samples: 2
base_size: 32
input_size: 32
views: 1
asha: {grace_period: 1, reduction_factor: 2}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [8, 16]}
  augment: none
  crop_margin: 0.0
"""


@pytest.mark.slow  # two sweeps (~75 s): `python -m pytest -m slow`
def test_run_that_failed_on_its_data_runs_again_under_the_same_name(tmp_path: Path) -> None:
    data = write_manifest_dataset(tmp_path / "data", n_patients=8, size=32)
    image = data / "images" / "3.png"
    good = image.read_bytes()
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"torn" * 8)
    (tmp_path / "space.yaml").write_text(SPACE)
    run = ("run", "--space", str(tmp_path / "space.yaml"), "--data", str(data), "--out", str(tmp_path / "out"),
           "--name", "r1")

    failed = cxrtune(*run)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert f"cannot read image {image}" in failed.stderr.strip().splitlines()[-1]
    assert "ray cluster:" not in failed.stderr  # decoded before Ray starts
    resumed = cxrtune("resume", str(tmp_path / "out" / "r1"))
    assert resumed.returncode == 2 and "--name r1" in resumed.stderr, resumed.stderr[-2000:]

    image.write_bytes(good)  # the image fixed
    again = cxrtune(*run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing " in again.stderr and "stopped before its first trial" in again.stderr
    trials = (tmp_path / "out" / "r1" / "trials.csv").read_text().strip().splitlines()
    assert len(trials) == 3  # header + 2 trials
