"""The README's "Python API" section runs as written (a real sweep, in a subprocess), and the
package names load lazily: `import search, trainable` imports neither Ray nor torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_is_lazy() -> None:
    code = ("import sys, search, trainable\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
            "assert callable(search.run_sweep) and callable(trainable.load_model)\n"
            "import search.api\n"
            "assert search.select_trial is search.api.select_trial\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "results" / "from-python"
    for name in ("trials.csv", "report.html", "best/model.pt", "selected/model.pt", "selected/metadata.json"):
        assert (results / name).is_file(), name
    assert "balanced accuracy (sweep's own images):" in proc.stdout
    assert "body.bn2" in proc.stdout
