"""The benchmark scripts (the benchmarks package) run as their users run them, for the tests of what only a script
holds; tests that call a script's functions import it (``from benchmarks.perf import op_count``)."""

import subprocess
import sys

from helpers.paths import ROOT


def run_benchmark(module, *args):
    """``python -m benchmarks.<module> ARGS`` (``module``: e.g. ``perf.throughput``) in a subprocess from the project
    root; its stdout (exit status 0)."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
