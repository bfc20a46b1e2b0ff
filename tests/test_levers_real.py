"""benchmarks/levers_real.py: exits 0 with a message when cxr-real is absent (the full run needs it)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skips_without_data(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "levers_real.py"), "--quick",
                           "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no cxr-real data" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written, no Ray started
