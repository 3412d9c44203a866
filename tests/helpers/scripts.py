"""The benchmark scripts (benchmarks/*.py, not a package) for the tests of what only a script holds."""

import importlib.util
import subprocess
import sys

from helpers.paths import ROOT


def load_benchmark(name):
    """``benchmarks/<name>.py`` as a module, for tests that must run its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name, *args):
    """``python benchmarks/<name>.py ARGS`` in a subprocess from the project root; its stdout (exit status 0)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
