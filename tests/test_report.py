"""Fast tests of the report (no sweep): the Pareto front, ASHA rungs, the HTML built from a hand-made
results directory (present and absent pieces), `cxrtune report`, and the tracker callbacks.

The report of a real sweep, opened in Chromium, is tested in tests/test_browser.py.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from search.report.html import ReportError, asha_rungs, build_report, load_sweep, pareto_front, write_report

ROOT = Path(__file__).resolve().parents[1]


# ─────────────────────────────────────────── Pareto front ───────────────────────────────────────────

def test_pareto_front_keeps_exactly_the_non_dominated_points() -> None:
    x = [0.10, 0.50, 0.30, 0.20, 0.50, 0.05]
    y = [0.90, 0.50, 0.40, 0.95, 0.50, 0.95]
    # (0.3, 0.4) is dominated by (0.5, 0.5); (0.1, 0.9) by (0.2, 0.95); (0.05, 0.95) by (0.2, 0.95);
    # the two equal points (0.5, 0.5) dominate each other on neither axis: both stay
    assert pareto_front(x, y).tolist() == [False, True, False, True, True, False]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([], []).tolist() == []
    assert pareto_front([0.3], [0.7]).tolist() == [True]
    assert pareto_front([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]).tolist() == [False, False, True]  # one dominates all
    assert pareto_front([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]).tolist() == [True, True, True]    # a pure trade-off
    # NaN is never on the front and never dominates
    assert pareto_front([0.1, np.nan, 0.2], [0.9, 1.0, np.nan]).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="same length"):
        pareto_front([0.1, 0.2], [0.1])


def test_pareto_front_matches_a_sort_and_sweep_on_random_points() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        x, y = rng.integers(0, 8, n) / 8, rng.integers(0, 8, n) / 8  # a coarse grid: many ties
        # independent algorithm: by x descending (y descending within), a point is on the front when its
        # y beats every point with a larger x, and it is not strictly below a point at the same x
        expected = np.zeros(n, bool)
        best_y_right = -np.inf
        for xv in sorted(set(x), reverse=True):
            at = np.flatnonzero(x == xv)
            top = y[at].max()
            if top > best_y_right:
                expected[at[y[at] == top]] = True
            best_y_right = max(best_y_right, top)
        assert pareto_front(x, y).tolist() == expected.tolist(), (x, y)


def test_asha_rungs_are_rays_milestones_below_max_t() -> None:
    assert asha_rungs(1, 2, 2) == [1]
    assert asha_rungs(2, 3, 18) == [2, 6]
    assert asha_rungs(1, 3, 27) == [1, 3, 9]
    assert asha_rungs(4, 2, 4) == []


# ──────────────────────────────────── a hand-made results directory ─────────────────────────────────

IDS = ["00a1b2c3", "12e45678", "9f9f9f9f", "c0ffee00", "deadbeef"]  # 12e45678 would parse as a float


def make_results(root: Path, extras: bool) -> Path:
    """What `cxrtune run` leaves: 5 trials (one stopped by ASHA, one failed); `extras` adds selected/,
    selection.json, confusion.json and the Grad-CAM montages."""
    root.mkdir(parents=True)
    metric = [0.90, 0.85, 0.70, 0.80, np.nan]
    lung = [0.30, 0.60, 0.40, 0.50, np.nan]
    edge = [0.40, 0.10, 0.20, 0.20, np.nan]
    trials = pd.DataFrame({
        "trial_id": IDS, "hidden": [64, 128, 64, 256, 64], "lr": [1e-3, 3e-3, 1e-2, 5e-4, 1e-4],
        "augment": ["none", "light", "none", "light", "none"], "backbone": "efficientnet_lite0",
        "status": ["TERMINATED"] * 4 + ["ERROR"], "epochs_run": [6, 6, 2, 6, 0],
        "stopped_early": [False, False, True, False, False], "best_epoch": [5, 6, 2, 4, np.nan],
        "best_balanced_accuracy": metric, "best_lung_mass": lung, "best_edge_mass": edge,
        "best_lung_enrichment": [1.0, 2.0, 1.3, 1.7, np.nan],
        "best_objective": [m + 0.5 * (lg - e) for m, lg, e in zip(metric, lung, edge)],
        "error": ["", "", "", "", "RuntimeError: out of memory <boom>"],
    }).sort_values("best_objective", ascending=False)
    trials.to_csv(root / "trials.csv", index=False)
    rows = []
    for tid, n in zip(IDS, [6, 6, 2, 6, 0]):
        for e in range(1, n + 1):
            rows.append({"trial_id": tid, "epoch": e, "balanced_accuracy": 0.5 + 0.05 * e, "loss": 1 / e,
                         "train_loss": 0.9 / e, "lung_mass": 0.3, "edge_mass": 0.2, "objective": 0.5 + 0.04 * e})
    pd.DataFrame(rows).to_csv(root / "history.csv", index=False)
    objective = {"mode": "weighted", "metric": "balanced_accuracy", "w": 0.5, "lung_floor": 0.0}
    (root / "summary.json").write_text(json.dumps({
        "name": "handmade", "space_file": "/spaces/x.yaml", "wall_s": 321.0, "trials": 5, "finished": 4,
        "stopped_early": 1, "failed": 1, "best_trial": "12e45678", "objective": objective,
        "data": {"root": "/data/x", "images": 120, "hash": "cafe1234", "classes": ["rest", "covid"]},
        "timings": {"features_s": 12.5}, "versions": {"torch": "2.x", "ray": "2.y"}, "python": "3.11",
        "machine": "x86_64"}))
    (root / "space.json").write_text(json.dumps({
        "spec": {"objective": objective, "asha": {"grace_period": 2, "reduction_factor": 3},
                 "space": {"backbone": "efficientnet_lite0", "hidden": {"choice": [64, 128, 256]},
                           "lr": {"loguniform": [1e-4, 1e-2]}, "augment": {"choice": ["none", "light"]}}},
        "settings": {"folds": 3, "epochs": 6}, "space_file": "/spaces/x.yaml", "data": "/data/x"}))
    (root / "best").mkdir()
    (root / "best" / "metadata.json").write_text(json.dumps({"cv_metrics": {"trial_id": "12e45678"}}))
    if extras:
        (root / "selected").mkdir()
        (root / "selected" / "metadata.json").write_text(json.dumps({"cv_metrics": {"trial_id": "12e45678"}}))
        (root / "selection.json").write_text(json.dumps({"within": 0.1, "selected": "12e45678",
                                                         "metric_best": "00a1b2c3"}))
        (root / "confusion.json").write_text(json.dumps(
            {tid: {"classes": ["rest", "covid"], "matrix": [[40, 10], [5, 45]]} for tid in IDS[:4]}))
        for sub, colour in (("best", (255, 0, 0)), ("selected", (0, 255, 0))):
            (root / sub / "gradcam.png").write_bytes(_png(colour))
        (root / "gradcam_comparison.png").write_bytes(_png((0, 0, 255)))
    return root


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def _leaderboard_rows(page: str) -> list[str]:
    body = page.split('id="leaderboard-table"')[1].split("<tbody>")[1].split("</tbody>")[0]
    return re.findall(r"<tr[^>]*>.*?</tr>", body)


def test_report_embeds_every_piece_that_is_present(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", extras=True)
    page = build_report(root)
    assert "<title>cxrtune report — handmade</title>" in page
    for section in ("summary", "leaderboard", "tradeoff", "asha", "gradcam", "models"):
        assert f'<section id="{section}">' in page
    rows = _leaderboard_rows(page)
    assert len(rows) == 5
    assert "<code>12e45678</code>" in rows[0] and "objective-best" in rows[0] and "selected" in rows[0]
    assert "metric-best" in rows[2] and "<code>00a1b2c3</code>" in rows[2]  # objectives 1.1, 0.95, 0.85
    assert "stopped by ASHA at 2" in page and "failed (ERROR)" in rows[-1]
    assert "RuntimeError: out of memory &lt;boom&gt;" in rows[-1]  # escaped, on hover
    for sub in ("best", "selected"):
        assert base64.b64encode((root / sub / "gradcam.png").read_bytes()).decode() in page
    assert base64.b64encode((root / "gradcam_comparison.png").read_bytes()).decode() in page
    assert page.count('class="confusion"') == 3  # objective-best/selected, metric-best, third by objective
    assert "80.0%" in page and "90.0%" in page  # recall per class: 40/50 and 45/50
    # Pareto front on (lung_mass, metric): 00a1b2c3 (0.30, 0.90) and 12e45678 (0.60, 0.85) only
    assert "<code>00a1b2c3, 12e45678</code>" in page
    assert "cafe1234" in page and "/spaces/x.yaml" in page and "hidden ∈ {64, 128, 256}" in page
    assert "is not in this results directory" not in page
    assert re.findall(r'(?:src|href)="(?!data:|#)([^"]*)"', page) == []  # self-contained


def test_report_says_plainly_what_is_absent(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", extras=False)
    page = build_report(root)
    assert "best/gradcam.png is not in this results directory" in page
    assert "selected/gradcam.png is not in this results directory (selected/ itself is absent)" in page
    assert "confusion.json is not in this results directory" in page
    assert 'class="confusion"' not in page and "gradcam_comparison" not in page
    assert "cxrtune select RESULTS_DIR" in page
    assert len(_leaderboard_rows(page)) == 5
    assert page.count("<img ") == 2 + 3  # scatter, ASHA, curves of the 3 top models; no montage is faked


def test_trial_ids_stay_strings(tmp_path: Path) -> None:
    sweep = load_sweep(make_results(tmp_path / "r", extras=True))
    assert sweep.trials["trial_id"].tolist()[0] == "12e45678"
    assert sweep.roles == {"objective-best": "12e45678", "metric-best": "00a1b2c3", "selected": "12e45678"}


def test_write_report_is_atomic_and_not_a_results_dir_is_a_user_error(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", extras=False)
    out = write_report(root, hardware={"cluster_cpus": 8, "cluster_gpus": 2.0, "nodes": 2}, log=lambda m: None)
    assert out == root / "report.html" and oct(out.stat().st_mode & 0o777) == "0o644"
    assert json.loads((root / "hardware.json").read_text())["nodes"] == 2
    assert "8 CPU, 2 GPU, 2 node(s)" in out.read_text()
    assert [p.name for p in root.glob(".report.html*")] == []
    with pytest.raises(ReportError, match="no trials.csv"):
        build_report(tmp_path)


def test_cxrtune_report_command(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", extras=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "search.cli", "report", str(root), "--out", str(tmp_path / "x.html")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x.html").read_text().startswith("<!DOCTYPE html>")
    bad = subprocess.run([sys.executable, "-m", "search.cli", "report", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing'} is not a sweep's results "
                                               f"directory (no trials.csv)"]


# ─────────────────────────────────────────────── trackers ───────────────────────────────────────────────

def test_trackers_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from search.callbacks.trackers import tracker_callbacks

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    kinds = [type(c) for c in tracker_callbacks()]
    assert kinds == [CSVLoggerCallback, JsonLoggerCallback]
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"  # Ray adds no TensorBoard logger on its own
    assert TBXLoggerCallback in [type(c) for c in tracker_callbacks(tensorboard=True)]


def test_mlflow_tracker_uri_and_missing_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.callbacks.trackers import TrackerError, mlflow_tracking_uri, tracker_callbacks

    assert mlflow_tracking_uri(str(tmp_path / "mlruns")) == (tmp_path / "mlruns").as_uri()
    assert mlflow_tracking_uri((tmp_path / "m").as_uri()) == (tmp_path / "m").as_uri()
    assert mlflow_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    (tmp_path / "f").write_text("")
    with pytest.raises(TrackerError, match="is a file"):
        mlflow_tracking_uri(str(tmp_path / "f"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow-skinny were not installed
    with pytest.raises(TrackerError, match=r"cxrtune\[track\]"):
        tracker_callbacks(mlflow_uri=str(tmp_path / "mlruns"))


def test_mlflow_tracker_uses_a_local_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra: pip install -e '.[test]'")
    from ray import cloudpickle
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from search.callbacks.trackers import tracker_callbacks

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cb = tracker_callbacks(mlflow_uri=str(tmp_path / "mlruns"), experiment="e1")[-1]
    assert isinstance(cb, MLflowLoggerCallback)
    assert cb.tracking_uri == (tmp_path / "mlruns").as_uri() and cb.experiment_name == "e1"
    cb = cloudpickle.loads(cloudpickle.dumps(cb))  # as a restored Tuner gets it back (tuner.pkl)
    cb.setup()  # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: setup sets it
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert (tmp_path / "mlruns").is_dir()


def test_the_first_screen_shows_the_confound_and_the_cards_show_group_metrics(tmp_path: Path) -> None:
    """report.html puts the data's label × group table and its warning before the held-out and the
    leaderboard sections, and every card and leaderboard row carries the group metrics."""
    root = make_results(tmp_path / "r", extras=True)
    space = json.loads((root / "space.json").read_text())
    space["confounding"] = ["label × source (2 group(s)):", "  label  kermany  ieee8023", "  covid  0  77",
                            "warning: every `normal` image comes from `kermany`"]
    (root / "space.json").write_text(json.dumps(space))
    page = build_report(root)
    assert page.index('id="confounding"') < page.index('id="heldout"') < page.index('id="leaderboard"')
    assert "every `normal` image comes from `kermany`" in page and "label × source" in page
    assert page.count("<dt>worst_group_accuracy</dt>") >= 1 and "within_group_auc" in page
