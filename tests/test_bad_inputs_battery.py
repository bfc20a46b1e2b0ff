"""The first-hour battery: bad space files, bad data and wrong paths, each refused before Ray starts
with one line naming the file / row / field and the rule, exit code 2, no traceback, nothing written.

The cases run the real command line in this process (`search.cli.main`, as the `cxrtune` script
does), so the battery costs one import of the CLI rather than one interpreter per case;
tests/test_bad_inputs.py runs the cases that need an exported model or a subprocess."""
from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY_SPACE, write_manifest_dataset

SPACE_EDITS: dict[str, tuple[str, str]] = {  # case → (text replaced in TINY_SPACE, replacement)
    "not-yaml": ("asha:", "space: [unclosed\nasha:"),
    "unknown-top-key": ("epochs: 2", "epochs: 2\nepochz: 3"),
    "unknown-parameter": ("  weights: imagenet", "  weights: imagenet\n  lrr: 0.1"),
    "unknown-backbone": ("backbone: efficientnet_lite0", "backbone: resnet9000"),
    "folds-1": ("folds: 2", "folds: 1"),
    "folds-40": ("folds: 2", "folds: 40"),
    "holdout-1.5": ("holdout: 0.2 ", "holdout: 1.5 "),
    "epochs-0": ("epochs: 2", "epochs: 0"),
    "num-samples-negative": ("num_samples: 4", "num_samples: -1"),
    "objective-metric-unknown": ("metric: balanced_accuracy", "metric: sensitivity"),
    "objective-mode-unknown": ("mode: weighted", "mode: lexicographic"),
    "grace-period-over-epochs": ("grace_period: 1", "grace_period: 5"),
    "augment-unknown": ("augment: {choice: [none, light]}", "augment: {choice: [none, heavy9]}"),
    "crop-margin-0.6": ("crop_margin: {choice: [0.0, 0.08]}", "crop_margin: 0.6"),
    "choice-empty": ("hidden: {choice: [16, 32]}", "hidden: {choice: []}"),
    "distribution-unknown": ("hidden: {choice: [16, 32]}", "hidden: {gaussian: [16, 32]}"),
    "loguniform-from-0": ("lr: {loguniform: [1.0e-3, 1.0e-2]}", "lr: {loguniform: [0, 1.0e-2]}"),
    "uniform-reversed": ("lr: {loguniform: [1.0e-3, 1.0e-2]}", "lr: {uniform: [0.01, 0.001]}"),
    "task-unknown": ("task: covid_vs_rest", "task: covid_vs_flu"),
    "phantom-shortcut-1.9": ("shortcut: 0.9", "shortcut: 1.9"),
    "phantom-patients-0": ("n_patients: 18", "n_patients: 0"),
}
SPACE_MESSAGES = {  # case → regex the line matches after "error: {space file}: "
    "not-yaml": r"not valid YAML \(line \d+, column \d+: ",
    "unknown-top-key": r"epochz: unknown key",
    "unknown-parameter": r"space: unknown parameter\(s\) \['lrr'\]; known: \[.*'lr'",
    "unknown-backbone": r"space(\.backbone)?: .*'resnet9000'",
    "folds-1": r"folds: .*greater than or equal to 2 \(got 1\)",
    "folds-40": r"folds: .*less than or equal to 20 \(got 40\)",
    "holdout-1.5": r"holdout: .*less than 1 \(got 1\.5\)",
    "epochs-0": r"epochs: .*greater than or equal to 1 \(got 0\)",
    "num-samples-negative": r"num_samples: .*greater than or equal to 1 \(got -1\)",
    "objective-metric-unknown": r"objective\.metric: .*'balanced_accuracy'.*\(got 'sensitivity'\)",
    "objective-mode-unknown": r"objective\.mode: .*\(got 'lexicographic'\)",
    "grace-period-over-epochs": r"asha\.grace_period \(5\) must be <= epochs \(2\)",
    "augment-unknown": r"space: augment must be one of \[.*'light'.*\] \(got 'heavy9'\)",
    "crop-margin-0.6": r"space: crop_margin must be a number in \[0, 0\.4\) \(got 0\.6\)",
    "choice-empty": r"space\.hidden\.choice: .*at least 1 item",
    "distribution-unknown": r"space\.hidden\.gaussian: unknown key",
    "loguniform-from-0": r"space\.lr: loguniform needs 0 < low < high",
    "uniform-reversed": r"space\.lr: uniform needs low < high",
    "task-unknown": r"task: .*'covid_vs_rest'.*\(got 'covid_vs_flu'\)",
    "phantom-shortcut-1.9": r"data\.synthetic\.shortcut: .*less than or equal to 1 \(got 1\.9\)",
    "phantom-patients-0": r"data\.synthetic\.n_patients: ",
}


def _garbage(table: pd.DataFrame, root: Path) -> None:
    (root / "manifest.csv").write_bytes(b"\x00\xff\x12garbage\x00" * 50)


def _not_an_image(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    (root / "images" / "3.png").write_bytes(b"hello")
    return table


def _set(column: str, row: int, value: object) -> Callable[[pd.DataFrame, Path], pd.DataFrame]:
    def edit(table: pd.DataFrame, root: Path) -> pd.DataFrame:
        table[column] = table[column].astype(object)
        table.loc[row, column] = value
        return table
    return edit


DATA_EDITS: dict[str, tuple[Callable, str]] = {  # case → (edit of a good manifest, regex of the line)
    "no-label-column": (lambda t, r: t.drop(columns=["label"]),
                        r"{d}/manifest\.csv: missing required column\(s\) label"),
    "missing-image": (_set("path", 2, "images/nowhere.png"),
                      r"{d}/manifest\.csv: row 4: path {d}/images/nowhere\.png does not exist"),
    "empty-patient": (_set("patient_id", 1, None), r"{d}/manifest\.csv: row 3 has an empty 'patient_id'"),
    "duplicate-id": (_set("id", 1, "img0"), r"{d}/manifest\.csv: id 'img0' appears more than once"),
    "missing-mask": (_set("mask_path", 4, "masks/nowhere.png"),
                     r"{d}/manifest\.csv: row 6: mask_path {d}/masks/nowhere\.png does not exist"),
    "manifest-not-csv": (_garbage, r"{d}/manifest\.csv: not a readable CSV manifest"),
    "image-not-an-image": (_not_an_image, r"cannot read image {d}/images/3\.png"),
    "one-class-only": (lambda t, r: t.assign(label="normal"), r"{d}/manifest\.csv: only class 'rest' is present"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("battery")
    for case, (old, new) in SPACE_EDITS.items():
        assert old in TINY_SPACE, case
        (w / f"{case}.yaml").write_text(TINY_SPACE.replace(old, new, 1))
    (w / "tiny.yaml").write_text(TINY_SPACE)
    good = write_manifest_dataset(w / "good", n_patients=6, size=32)
    for case, (edit, _) in DATA_EDITS.items():
        root = shutil.copytree(good, w / case)
        table = edit(pd.read_csv(root / "manifest.csv"), root)
        if table is not None:
            table.to_csv(root / "manifest.csv", index=False)
    (w / "no-layout").mkdir()
    return w


def _cxrtune(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from search.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrtune", *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return exit_.value.code, captured.err


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _assert_one_line(code: int, err: str, pattern: str) -> None:
    assert code == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(SPACE_EDITS))
def test_bad_space_file(case: str, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(work)
    space = work / f"{case}.yaml"
    code, err = _cxrtune(["run", "--space", str(space), "--out", str(work / "out")], monkeypatch, capsys)
    _assert_one_line(code, err, "^error: " + re.escape(str(space)) + ": " + SPACE_MESSAGES[case])
    assert err.strip().count("\n") == 0  # a space file is refused before anything is printed
    assert _snapshot(work) == before


@pytest.mark.parametrize("case", list(DATA_EDITS))
def test_bad_data(case: str, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(work)
    data = work / case
    code, err = _cxrtune(["run", "--space", str(work / "tiny.yaml"), "--data", str(data), "--out", str(tmp_path)],
                         monkeypatch, capsys)
    _assert_one_line(code, err, DATA_EDITS[case][1].replace("{d}", re.escape(str(data))))
    assert "ray cluster:" not in err and "computing frozen-backbone features" not in err  # before Ray starts
    assert _snapshot(work) == before
    # the run's own directory holds only its first record, so that a re-run under its name is allowed
    # (tests/test_rerun.py); no trial, no Tune state
    assert not list(tmp_path.rglob("trials.csv")) and not list(tmp_path.rglob("tune"))


@pytest.mark.parametrize("case, args, pattern", [
    ("space-file-missing", "run --space {w}/nowhere.yaml --out {w}/out", r"space file {w}/nowhere\.yaml not found"),
    ("data-missing", "run --space {w}/tiny.yaml --data {w}/nowhere --out {w}/out", r"data path {w}/nowhere does not exist"),
    ("data-no-layout", "run --space {w}/tiny.yaml --data {w}/no-layout --out {t}/out",
     r"{w}/no-layout: no known data layout found \(looked for manifest: "),
    ("check-missing", "data check {w}/nowhere", r"data path {w}/nowhere does not exist"),
    ("check-not-csv", "data check {w}/manifest-not-csv", r"{w}/manifest-not-csv/manifest\.csv: not a readable CSV"),
    ("check-no-label", "data check {w}/no-label-column", r"{w}/no-label-column/manifest\.csv: missing required column\(s\) label"),
    ("resume-not-a-sweep", "resume {w}/nowhere", r"{w}/nowhere is not a cxrtune results directory \(no space\.json\)"),
    ("report-not-a-sweep", "report {w}/nowhere", r"{w}/nowhere is not a sweep's results directory \(no trials\.csv\)"),
    ("select-not-a-sweep", "select {w}/nowhere", r"{w}/nowhere is not a finished sweep"),
    ("evaluate-no-model", "evaluate --model {w}/nowhere --data {w}/good", r"model directory {w}/nowhere does not exist"),
])
def test_wrong_path(case: str, args: str, pattern: str, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(work)
    code, err = _cxrtune(args.format(w=work, t=tmp_path).split(), monkeypatch, capsys)
    _assert_one_line(code, err, "^error: " + pattern.replace("{w}", re.escape(str(work))))
    assert _snapshot(work) == before
