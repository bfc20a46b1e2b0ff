"""benchmarks/feature_scaling.py runs on phantom data and prints its three modes with their speed-ups."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_feature_scaling_benchmark_prints_the_three_modes() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/feature_scaling.py", "--data", "synthetic", "--quick",
                           "--images", "24", "--cpus", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \| ([0-9]+) \| ([0-9.]+)× \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["one key after another, 1 thread",
                                    "2 keys at once, 1 thread each (prepare_sweep on one node)",
                                    "one key after another, 2 intra-op threads"], proc.stdout
    assert rows[0][3] == "1.00" and all(float(r[1]) > 0 for r in rows)
    assert "data: 24 images at 96 px" in proc.stdout
