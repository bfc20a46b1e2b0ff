"""Interop: the README's "Reading a sweep with Ray Tune and Optuna" block runs as written against a
real sweep, Tune's best checkpoint and Optuna's best trial agree with trials.csv, and every column a
sweep writes is documented in docs/columns.md (whose schema version summary.json records)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from search.rundir import SCHEMA_VERSION
from tests.conftest import ROOT
from trainable.shared import TRIAL_DEFAULTS

PLACEHOLDER = 'Path("results/default-20261202-120000")'


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Reading a sweep with Ray Tune and Optuna"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_tune_and_optuna_block_runs(tiny_sweep: Path, tmp_path: Path) -> None:
    code = _readme_block()
    assert PLACEHOLDER in code
    script = tmp_path / "read_sweep.py"
    script.write_text(code.replace(PLACEHOLDER, f"Path({str(tiny_sweep)!r})"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_csv(tiny_sweep / "trials.csv", dtype={"trial_id": str})
    best = trials[trials["status"] == "TERMINATED"].iloc[0]
    first = proc.stdout.splitlines()[0].split()
    assert first[0] == best["trial_id"]                                   # Tune's best trial = trials.csv's first
    assert f"checkpoint_{int(best['best_epoch']) - 1:06d}" in first[1]    # its best epoch's checkpoint
    assert proc.stdout.strip().splitlines()[-1] == "True"


def _documented(table: str) -> list[str]:
    text = (ROOT / "docs" / "columns.md").read_text()
    section = text[text.index(f"## {table}"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return [name for line in section.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([^`]+)`", line.split("|")[1])]


def _pattern(name: str, metrics: list[str]) -> str:
    out = re.escape(name).replace(re.escape("<m>"), "(" + "|".join(map(re.escape, metrics)) + ")")
    out = out.replace(re.escape("<group>"), r"\w+").replace(re.escape("<class>"), r"\w+")
    return out.replace(re.escape("<param>"), "(" + "|".join(map(re.escape, TRIAL_DEFAULTS)) + ")")


def test_every_written_column_is_documented(tiny_sweep: Path) -> None:
    metrics = [m for m in _documented("history.csv") if "<" not in m and m not in ("trial_id", "epoch", "stage")]
    for table in ("trials.csv", "history.csv"):
        patterns = [_pattern(n, metrics) for n in _documented(table)]
        columns = pd.read_csv(tiny_sweep / table, nrows=1).columns
        undocumented = [c for c in columns if not any(re.fullmatch(p, c) for p in patterns)]
        assert undocumented == [], f"{table}: columns missing from docs/columns.md: {undocumented}"
    assert json.loads((tiny_sweep / "summary.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert f"Schema version **{SCHEMA_VERSION}**" in (ROOT / "docs" / "columns.md").read_text()
