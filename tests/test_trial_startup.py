"""benchmarks/trial_startup.py runs and prints one row per item a trial actor pays, plus the total."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_trial_startup_benchmark_prints_every_item_and_the_total() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/trial_startup.py", "--repeats", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^\| (.+?) \| \**([0-9.]+)\** \|$", proc.stdout, re.M))
    for item in ("import ray", "import ray.tune", "import torch", "import trainable.trial (head stage)"):
        assert float(rows[item]) >= 0, item
    paid = [v for k, v in rows.items() if "paid once per trial actor" in k]
    items = [float(v) for k, v in rows.items() if "paid once" not in k and not k.startswith("not ")]
    assert len(paid) == 1 and abs(float(paid[0]) - sum(items)) < 0.02, rows
