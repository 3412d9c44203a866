"""Evaluate DiffGuard and the classifier baselines on a benchmark.

    python evaluate.py [--config conf/digits_gdm.yaml] [key=value ...]

With no arguments: the embedded Digits-OOD benchmark with the committed
checkpoints. See diffguard_pl/config.py (EvalConfig) for every key.
"""

import sys
from pathlib import Path

from diffguard_pl.cli import run
from diffguard_pl.config import EvalConfig
from diffguard_pl.evaluation import evaluate

DEFAULT_CONFIG = Path(__file__).resolve().parent / "conf" / "digits_gdm.yaml"

if __name__ == "__main__":
    sys.exit(run(EvalConfig, evaluate, sys.argv[1:], str(DEFAULT_CONFIG)))
