"""What the experiments share: one evaluate.py run into a folder, and reading a run's results.json and scores.csv.

Experiments run evaluate.py in a subprocess (its own process, as a user would) rather than calling the job in
process, so each run is a folder that can be read, resumed or compared later.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]  # the repository: evaluate.py, train.py, outputs/


def results_of(out: Path) -> dict:
    """The results.json of the evaluation run in ``out``."""
    return json.loads((Path(out) / "results.json").read_text())


def score_rows(out: Path) -> List[dict]:
    """The rows of the scores.csv of the evaluation run in ``out``, each {column: text}."""
    with open(Path(out) / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def evaluate(out: Path, *args: str, reuse: bool = False, quiet: bool = True) -> dict:
    """``python evaluate.py output_dir=OUT trainer.enable_progress_bar=false ARGS`` from the repository root; the
    run's results.json.

    ``args``: ``--config`` files and ``key=value`` overrides (later overrides win). ``reuse``: a run whose
    results.json exists is not started again (for runs that are final once done); without it evaluate.py always
    runs, and resumes from the folder itself (scored samples are kept, a larger ``limit_per_set`` adds the new
    ones). ``quiet``: its stdout is dropped (errors still reach stderr)."""
    out = Path(out)
    if not (reuse and (out / "results.json").is_file()):
        subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"output_dir={out}",
                        "trainer.enable_progress_bar=false", *args],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)
    return results_of(out)
