"""benchmarks/gpu_check.py: its CPU part runs anywhere (the GPU part needs CUDA: see its doc)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_its_cpu_part_and_says_it_did_not_run_on_a_gpu() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has not run on a GPU" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| feature maps cpu vs cpu"))
    assert line.rstrip().endswith("| ok |") and "0.00e+00" in line
