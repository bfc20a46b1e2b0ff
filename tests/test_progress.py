"""Progress of the slow loops (trainable/progress.py): plain periodic lines when stdout is not a
terminal (a pipe here, as in logs, CI and Ray Jobs), nothing for a loop shorter than the quiet start,
a rich bar when asked for one. Each case runs in a subprocess whose stdout is a real pipe."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

LINE = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+), "
                  r"(?P<speed>[\d.]+ \w+/s|[\d.]+ s/\w+), (ETA \d+ s|done in [\d.]+ s)$")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def _lines(stdout: str, label: str) -> list[re.Match]:
    found = [LINE.match(line) for line in stdout.splitlines()]
    return [m for m in found if m and m["label"] == label]


def test_plain_lines_every_tenth_of_a_real_loop() -> None:
    proc = _run("import time\nfrom trainable.progress import track\n"
                "for _ in track(range(20), 'demo loop'):\n    time.sleep(0.02)\n",
                CXRTUNE_PROGRESS="auto", CXRTUNE_PROGRESS_AFTER_S="0")
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stdout, "demo loop")
    assert [int(m["done"]) for m in lines] == list(range(2, 21, 2)), proc.stdout
    assert all(m["total"] == "20" and m["unit"] == "epochs" for m in lines)
    assert lines[-1].group(0).endswith(" s") and "done in" in lines[-1].group(0)
    assert "ETA" in lines[0].group(0)


def test_a_loop_shorter_than_the_quiet_start_says_nothing() -> None:
    proc = _run("from trainable.progress import track\nfor _ in track(range(50), 'quick'):\n    pass\n",
                CXRTUNE_PROGRESS_AFTER_S="2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_a_real_feature_pass_logs_images_per_second() -> None:
    code = ("import numpy as np\n"
            "from trainable.models.featureset import FeatureKey\n"
            "from trainable.models.features import compute_features\n"
            "images = np.random.default_rng(0).integers(0, 255, (24, 64, 64), dtype=np.uint8)\n"
            "key = FeatureKey('efficientnet_lite0', 'random', 0.0, 64)\n"
            "fs = compute_features(images, key, {'none': 1}, seed=0)\n"
            "print('maps', tuple(fs.maps.shape))\n")
    proc = _run(code, CXRTUNE_PROGRESS_AFTER_S="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _lines(proc.stdout, "features efficientnet_lite0")
    assert len(lines) >= 2, proc.stdout
    assert {m["unit"] for m in lines} == {"images"} and {m["total"] for m in lines} == {"24"}
    assert lines[-1]["done"] == "24" and "img/s" in lines[-1]["speed"]
    assert "maps (24," in proc.stdout


def test_rich_bar_when_asked_and_no_plain_lines() -> None:
    proc = _run("import time\nfrom trainable.progress import progress\n"
                "with progress('bar demo', 10) as advance:\n"
                "    for _ in range(10):\n        time.sleep(0.05)\n        advance(1)\n"
                "print('finished')\n",
                CXRTUNE_PROGRESS="rich", CXRTUNE_PROGRESS_AFTER_S="0")
    assert proc.returncode == 0, proc.stderr
    assert "bar demo" in proc.stdout and "finished" in proc.stdout
    assert not _lines(proc.stdout, "bar demo")


def test_trial_lines_count_each_trials_own_fine_tuning_budget() -> None:
    """A sweep mixing ft_epochs 0 and 2: a head-only trial that ran its 6 epochs "ran", it was not
    stopped; a fine-tuned one cut at 6 of its 8 was."""
    from ray.tune.experiment import Trial

    from search.callbacks.progress import ProgressLine

    lines: list[str] = []
    progress = ProgressLine(total=2, epochs=6, metric="auc", log=lines.append)
    for ft in (0, 2):
        trial = Trial("cxrtune", config={"ft_epochs": ft}, trial_id=f"t{ft}", stub=True)
        progress.on_trial_result(0, [], trial, {"training_iteration": 6, "objective": 0.5, "auc": 0.9})
        progress.on_trial_complete(0, [], trial)
    assert "trial t0 ran 6 epochs" in lines[0] and "0 stopped" in lines[0], lines
    assert "trial t2 stopped after 6/8 epochs" in lines[1] and "1 stopped" in lines[1], lines
