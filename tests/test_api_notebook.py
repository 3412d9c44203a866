"""docs/api.md is a notebook that works: its code cells run, in order, from a folder outside the repository."""

import re
import subprocess
import sys

import pytest

from helpers.paths import ROOT

pytestmark = pytest.mark.subprocess


def test_the_api_notebook_runs_outside_the_repository(tmp_path):
    cells = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(cells) >= 5
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "digits_gdm" in out and "DiffGuard AUROC on this slice:" in out
    assert re.search(r"^knn 0\.\d+", out, flags=re.M) and "refused: images must lie in [0, 1]" in out
    auroc = float(re.search(r"DiffGuard AUROC on this slice: ([0-9.]+)", out).group(1))
    assert auroc > 0.8  # digits 0-5 against 6-9 with the committed models: the method works on this slice
